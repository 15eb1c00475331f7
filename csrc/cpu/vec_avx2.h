// 256-bit AVX2 + FMA vectors: the same vocabulary as VecGeneric (the specification), for float
// and double. Only for translation units compiled with -mavx2 -mfma -mf16c.
#pragma once

#include <immintrin.h>

#include <cstring>

#include "cpu/half.h"

#ifndef FASTATTN_CPU_ISA
#error "define FASTATTN_CPU_ISA (the ISA's namespace) before including this header"
#endif

namespace fastattn::FASTATTN_CPU_ISA {

template <class T>
struct VecAvx2;

template <>
struct VecAvx2<float> {
  using value_type = float;
  static constexpr int size = 8;
  static constexpr int kRegisters = 16;
  __m256 v;

  static VecAvx2 zero() { return {_mm256_setzero_ps()}; }
  static VecAvx2 broadcast(float x) { return {_mm256_set1_ps(x)}; }
  static VecAvx2 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  static VecAvx2 load_partial(const float* p, int n) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return {_mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes))};
  }
  void store_partial(float* p, int n) const {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes), v);
  }
  // Half-precision storage: float16 through F16C, bfloat16 by moving the bits (rounding to
  // nearest even on the way back, as half.h does). Partial forms go through a whole vector's copy.
  static VecAvx2 load(const float16* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
  static VecAvx2 load(const bfloat16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))};
  }
  void store(float16* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  void store(bfloat16* p) const {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), odd);
    const __m256i quiet_nan = _mm256_or_si256(bits, _mm256_set1_epi32(0x400000));
    rounded = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(quiet_nan),
                                                   _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    const __m256i high = _mm256_srli_epi32(rounded, 16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1)));
  }
  template <class S, class = std::enable_if_t<is_half_v<S>>>
  static VecAvx2 load_partial(const S* p, int n) {
    S lanes[size] = {};
    std::memcpy(lanes, p, n * sizeof(S));
    return load(lanes);
  }
  template <class S, class = std::enable_if_t<is_half_v<S>>>
  void store_partial(S* p, int n) const {
    S lanes[size];
    store(lanes);
    std::memcpy(p, lanes, n * sizeof(S));
  }
  // Within each 128-bit half: interleave, then gather quarter-columns; then swap halves across rows.
  static void transpose(VecAvx2 (&r)[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i].v, r[2 * i + 1].v);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i].v, r[2 * i + 1].v);
    }
    for (int i = 0; i < 2; ++i) {
      u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
      u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
      u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int k = 0; k < 4; ++k) {
      r[k].v = _mm256_permute2f128_ps(u[k], u[4 + k], 0x20);
      r[4 + k].v = _mm256_permute2f128_ps(u[k], u[4 + k], 0x31);
    }
  }
  friend float reduce_add(VecAvx2 a) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }
  friend float reduce_max(VecAvx2 a) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  }
  friend VecAvx2 operator+(VecAvx2 a, VecAvx2 b) { return {_mm256_add_ps(a.v, b.v)}; }
  friend VecAvx2 operator-(VecAvx2 a, VecAvx2 b) { return {_mm256_sub_ps(a.v, b.v)}; }
  friend VecAvx2 operator*(VecAvx2 a, VecAvx2 b) { return {_mm256_mul_ps(a.v, b.v)}; }
  friend VecAvx2 operator/(VecAvx2 a, VecAvx2 b) { return {_mm256_div_ps(a.v, b.v)}; }
  friend VecAvx2 fmadd(VecAvx2 a, VecAvx2 b, VecAvx2 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static VecAvx2 select_less(VecAvx2 a, VecAvx2 b, VecAvx2 if_less, VecAvx2 otherwise) {
    return {_mm256_blendv_ps(otherwise.v, if_less.v, _mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ))};
  }
  friend VecAvx2 max(VecAvx2 a, VecAvx2 b) { return {_mm256_max_ps(b.v, a.v)}; }
  friend bool any_less(VecAvx2 a, VecAvx2 b) { return _mm256_movemask_ps(_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)) != 0; }
  friend void split_nearest(VecAvx2 x, VecAvx2& n, VecAvx2& f) {
    n = {_mm256_round_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
    f = x - n;
  }
  friend VecAvx2 times_pow2(VecAvx2 p, VecAvx2 n) {
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
    return {_mm256_mul_ps(p.v, _mm256_castsi256_ps(bits))};
  }
};

template <>
struct VecAvx2<double> {
  using value_type = double;
  static constexpr int size = 4;
  static constexpr int kRegisters = 16;
  __m256d v;

  static VecAvx2 zero() { return {_mm256_setzero_pd()}; }
  static VecAvx2 broadcast(double x) { return {_mm256_set1_pd(x)}; }
  static VecAvx2 load(const double* p) { return {_mm256_loadu_pd(p)}; }
  void store(double* p) const { _mm256_storeu_pd(p, v); }
  static VecAvx2 load_partial(const double* p, int n) {
    const __m256i lanes = _mm256_setr_epi64x(0, 1, 2, 3);
    return {_mm256_maskload_pd(p, _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), lanes))};
  }
  void store_partial(double* p, int n) const {
    const __m256i lanes = _mm256_setr_epi64x(0, 1, 2, 3);
    _mm256_maskstore_pd(p, _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), lanes), v);
  }
  static void transpose(VecAvx2 (&r)[4]) {
    const __m256d t0 = _mm256_unpacklo_pd(r[0].v, r[1].v), t1 = _mm256_unpackhi_pd(r[0].v, r[1].v);
    const __m256d t2 = _mm256_unpacklo_pd(r[2].v, r[3].v), t3 = _mm256_unpackhi_pd(r[2].v, r[3].v);
    r[0].v = _mm256_permute2f128_pd(t0, t2, 0x20);
    r[1].v = _mm256_permute2f128_pd(t1, t3, 0x20);
    r[2].v = _mm256_permute2f128_pd(t0, t2, 0x31);
    r[3].v = _mm256_permute2f128_pd(t1, t3, 0x31);
  }
  friend double reduce_add(VecAvx2 a) {
    __m128d x = _mm_add_pd(_mm256_castpd256_pd128(a.v), _mm256_extractf128_pd(a.v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(x, _mm_unpackhi_pd(x, x)));
  }
  friend double reduce_max(VecAvx2 a) {
    __m128d x = _mm_max_pd(_mm256_castpd256_pd128(a.v), _mm256_extractf128_pd(a.v, 1));
    return _mm_cvtsd_f64(_mm_max_sd(x, _mm_unpackhi_pd(x, x)));
  }
  friend VecAvx2 operator+(VecAvx2 a, VecAvx2 b) { return {_mm256_add_pd(a.v, b.v)}; }
  friend VecAvx2 operator-(VecAvx2 a, VecAvx2 b) { return {_mm256_sub_pd(a.v, b.v)}; }
  friend VecAvx2 operator*(VecAvx2 a, VecAvx2 b) { return {_mm256_mul_pd(a.v, b.v)}; }
  friend VecAvx2 operator/(VecAvx2 a, VecAvx2 b) { return {_mm256_div_pd(a.v, b.v)}; }
  friend VecAvx2 fmadd(VecAvx2 a, VecAvx2 b, VecAvx2 c) { return {_mm256_fmadd_pd(a.v, b.v, c.v)}; }
  static VecAvx2 select_less(VecAvx2 a, VecAvx2 b, VecAvx2 if_less, VecAvx2 otherwise) {
    return {_mm256_blendv_pd(otherwise.v, if_less.v, _mm256_cmp_pd(a.v, b.v, _CMP_LT_OQ))};
  }
  friend VecAvx2 max(VecAvx2 a, VecAvx2 b) { return {_mm256_max_pd(b.v, a.v)}; }
  friend bool any_less(VecAvx2 a, VecAvx2 b) { return _mm256_movemask_pd(_mm256_cmp_pd(a.v, b.v, _CMP_LT_OQ)) != 0; }
  friend void split_nearest(VecAvx2 x, VecAvx2& n, VecAvx2& f) {
    n = {_mm256_round_pd(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
    f = x - n;
  }
  friend VecAvx2 times_pow2(VecAvx2 p, VecAvx2 n) {
    const __m256i exponent = _mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n.v));
    const __m256i bits = _mm256_slli_epi64(_mm256_add_epi64(exponent, _mm256_set1_epi64x(1023)), 52);
    return {_mm256_mul_pd(p.v, _mm256_castsi256_pd(bits))};
  }
};

}  // namespace fastattn::FASTATTN_CPU_ISA
