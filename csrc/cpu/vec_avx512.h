// 512-bit AVX-512F vectors: the same vocabulary as VecGeneric (the specification), for float and
// double. Only for translation units compiled with the AVX-512 flags.
#pragma once

#include <immintrin.h>

#include "cpu/half.h"

#ifndef FASTATTN_CPU_ISA
#error "define FASTATTN_CPU_ISA (the ISA's namespace) before including this header"
#endif

namespace fastattn::FASTATTN_CPU_ISA {

template <class T>
struct VecAvx512;

template <>
struct VecAvx512<float> {
  using value_type = float;
  static constexpr int size = 16;
  static constexpr int kRegisters = 32;
  __m512 v;

  static VecAvx512 zero() { return {_mm512_setzero_ps()}; }
  static VecAvx512 broadcast(float x) { return {_mm512_set1_ps(x)}; }
  static VecAvx512 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  static VecAvx512 load_partial(const float* p, int n) {
    return {_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p)};
  }
  void store_partial(float* p, int n) const { _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v); }
  // Half-precision storage: float16 through F16C, bfloat16 by moving the bits (rounding to
  // nearest even on the way back, as half.h does).
  static VecAvx512 load(const float16* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
  static VecAvx512 load(const bfloat16* p) { return from_halves(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static VecAvx512 load_partial(const float16* p, int n) {
    return {_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p))};
  }
  static VecAvx512 load_partial(const bfloat16* p, int n) {
    return from_halves(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p));
  }
  void store(float16* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_halves(float16{})); }
  void store(bfloat16* p) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_halves(bfloat16{})); }
  template <class S, class = std::enable_if_t<is_half_v<S>>>
  void store_partial(S* p, int n) const {
    _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), to_halves(S{}));
  }
  static VecAvx512 from_halves(__m256i bfloat16_bits) {
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bfloat16_bits), 16))};
  }
  __m256i to_halves(float16) const { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  __m256i to_halves(bfloat16) const {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), odd);
    const __m512i quiet_nan = _mm512_or_si512(bits, _mm512_set1_epi32(0x400000));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_mask_blend_epi32(nan, rounded, quiet_nan), 16));
  }
  // Within each 128-bit lane as for AVX2 (u[4i + k]: rows 4i..4i+3 of columns 4L + k in lane L),
  // then two rounds of 128-bit lane shuffles gather lane L of u[k], u[4 + k], u[8 + k], u[12 + k].
  static void transpose(VecAvx512 (&r)[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i].v, r[2 * i + 1].v);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i].v, r[2 * i + 1].v);
    }
    for (int i = 0; i < 4; ++i) {
      u[4 * i + 0] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
      u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xEE);
      u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int k = 0; k < 4; ++k) {
      const __m512 v0 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x88), v1 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xDD);
      const __m512 w0 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x88), w1 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xDD);
      r[k].v = _mm512_shuffle_f32x4(v0, w0, 0x88);
      r[8 + k].v = _mm512_shuffle_f32x4(v0, w0, 0xDD);
      r[4 + k].v = _mm512_shuffle_f32x4(v1, w1, 0x88);
      r[12 + k].v = _mm512_shuffle_f32x4(v1, w1, 0xDD);
    }
  }
  friend float reduce_add(VecAvx512 a) { return _mm512_reduce_add_ps(a.v); }
  friend float reduce_max(VecAvx512 a) { return _mm512_reduce_max_ps(a.v); }
  friend VecAvx512 operator+(VecAvx512 a, VecAvx512 b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend VecAvx512 operator-(VecAvx512 a, VecAvx512 b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend VecAvx512 operator*(VecAvx512 a, VecAvx512 b) { return {_mm512_mul_ps(a.v, b.v)}; }
  friend VecAvx512 operator/(VecAvx512 a, VecAvx512 b) { return {_mm512_div_ps(a.v, b.v)}; }
  friend VecAvx512 fmadd(VecAvx512 a, VecAvx512 b, VecAvx512 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static VecAvx512 select_less(VecAvx512 a, VecAvx512 b, VecAvx512 if_less, VecAvx512 otherwise) {
    return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ), otherwise.v, if_less.v)};
  }
  friend VecAvx512 max(VecAvx512 a, VecAvx512 b) { return {_mm512_max_ps(b.v, a.v)}; }
  friend bool any_less(VecAvx512 a, VecAvx512 b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ) != 0; }
  // vreduceps gives f in one uop; vrndscaleps (for n) takes two on the Intel machine.
  friend void split_nearest(VecAvx512 x, VecAvx512& n, VecAvx512& f) {
    f = {_mm512_reduce_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
    n = x - f;
  }
  friend VecAvx512 times_pow2(VecAvx512 p, VecAvx512 n) { return {_mm512_scalef_ps(p.v, n.v)}; }
};

template <>
struct VecAvx512<double> {
  using value_type = double;
  static constexpr int size = 8;
  static constexpr int kRegisters = 32;
  __m512d v;

  static VecAvx512 zero() { return {_mm512_setzero_pd()}; }
  static VecAvx512 broadcast(double x) { return {_mm512_set1_pd(x)}; }
  static VecAvx512 load(const double* p) { return {_mm512_loadu_pd(p)}; }
  void store(double* p) const { _mm512_storeu_pd(p, v); }
  static VecAvx512 load_partial(const double* p, int n) {
    return {_mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), p)};
  }
  void store_partial(double* p, int n) const { _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1), v); }
  // t[2i + k]: rows 2i, 2i+1 of columns 2L + k in lane L; then the same lane shuffles as for float.
  static void transpose(VecAvx512 (&r)[8]) {
    __m512d t[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm512_unpacklo_pd(r[2 * i].v, r[2 * i + 1].v);
      t[2 * i + 1] = _mm512_unpackhi_pd(r[2 * i].v, r[2 * i + 1].v);
    }
    for (int k = 0; k < 2; ++k) {
      const __m512d v0 = _mm512_shuffle_f64x2(t[k], t[2 + k], 0x88), v1 = _mm512_shuffle_f64x2(t[k], t[2 + k], 0xDD);
      const __m512d w0 = _mm512_shuffle_f64x2(t[4 + k], t[6 + k], 0x88), w1 = _mm512_shuffle_f64x2(t[4 + k], t[6 + k], 0xDD);
      r[k].v = _mm512_shuffle_f64x2(v0, w0, 0x88);
      r[4 + k].v = _mm512_shuffle_f64x2(v0, w0, 0xDD);
      r[2 + k].v = _mm512_shuffle_f64x2(v1, w1, 0x88);
      r[6 + k].v = _mm512_shuffle_f64x2(v1, w1, 0xDD);
    }
  }
  friend double reduce_add(VecAvx512 a) { return _mm512_reduce_add_pd(a.v); }
  friend double reduce_max(VecAvx512 a) { return _mm512_reduce_max_pd(a.v); }
  friend VecAvx512 operator+(VecAvx512 a, VecAvx512 b) { return {_mm512_add_pd(a.v, b.v)}; }
  friend VecAvx512 operator-(VecAvx512 a, VecAvx512 b) { return {_mm512_sub_pd(a.v, b.v)}; }
  friend VecAvx512 operator*(VecAvx512 a, VecAvx512 b) { return {_mm512_mul_pd(a.v, b.v)}; }
  friend VecAvx512 operator/(VecAvx512 a, VecAvx512 b) { return {_mm512_div_pd(a.v, b.v)}; }
  friend VecAvx512 fmadd(VecAvx512 a, VecAvx512 b, VecAvx512 c) { return {_mm512_fmadd_pd(a.v, b.v, c.v)}; }
  static VecAvx512 select_less(VecAvx512 a, VecAvx512 b, VecAvx512 if_less, VecAvx512 otherwise) {
    return {_mm512_mask_blend_pd(_mm512_cmp_pd_mask(a.v, b.v, _CMP_LT_OQ), otherwise.v, if_less.v)};
  }
  friend VecAvx512 max(VecAvx512 a, VecAvx512 b) { return {_mm512_max_pd(b.v, a.v)}; }
  friend bool any_less(VecAvx512 a, VecAvx512 b) { return _mm512_cmp_pd_mask(a.v, b.v, _CMP_LT_OQ) != 0; }
  // vreducepd gives f in one uop; vrndscalepd (for n) takes two on the Intel machine.
  friend void split_nearest(VecAvx512 x, VecAvx512& n, VecAvx512& f) {
    f = {_mm512_reduce_pd(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
    n = x - f;
  }
  friend VecAvx512 times_pow2(VecAvx512 p, VecAvx512 n) { return {_mm512_scalef_pd(p.v, n.v)}; }
};

}  // namespace fastattn::FASTATTN_CPU_ISA
