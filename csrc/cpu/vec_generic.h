// Portable vector of N lanes on the compiler's vector extension (GCC and Clang): the fallback
// kernel's vector and the specification the ISA-specific vectors follow, operation for operation.
// It lives in the namespace of the ISA it is compiled for, so no inline copy is shared between
// translation units built with different instruction-set flags.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>
#include <type_traits>

#include "cpu/half.h"

#ifndef FASTATTN_CPU_ISA
#error "define FASTATTN_CPU_ISA (the ISA's namespace) before including this header"
#endif

namespace fastattn::FASTATTN_CPU_ISA {

template <class T, int N>
struct VecGeneric {
  using value_type = T;
  static constexpr int size = N;
  static constexpr int kRegisters = 16;  // x86-64 SSE2; AArch64 has 32, but 16 is a safe budget
  using Bits = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef T Native __attribute__((vector_size(N * sizeof(T))));
  typedef Bits NativeBits __attribute__((vector_size(N * sizeof(T))));
  Native v;

  static VecGeneric zero() { return {Native{} }; }
  static VecGeneric broadcast(T x) { return {Native{} + x}; }
  static VecGeneric load(const T* p) {
    VecGeneric r;
    std::memcpy(&r.v, p, sizeof(Native));
    return r;
  }
  void store(T* p) const { std::memcpy(p, &v, sizeof(Native)); }
  // The first n lanes from p (0 <= n <= N), zeros after them; reads nothing past p + n.
  static VecGeneric load_partial(const T* p, int n) {
    VecGeneric r = zero();
    for (int i = 0; i < n; ++i) r.v[i] = p[i];
    return r;
  }

  // Writes the first n lanes to p (0 <= n <= N); touches nothing past p + n.
  void store_partial(T* p, int n) const {
    for (int i = 0; i < n; ++i) p[i] = v[i];
  }
  // Half-precision storage (half.h): converted to T on loading, rounded on storing.
  template <class S, class = std::enable_if_t<is_half_v<S>>>
  static VecGeneric load(const S* p) {
    return load_partial(p, N);
  }
  template <class S, class = std::enable_if_t<is_half_v<S>>>
  static VecGeneric load_partial(const S* p, int n) {
    VecGeneric r = zero();
    for (int i = 0; i < n; ++i) r.v[i] = to_compute<T>(p[i]);
    return r;
  }
  template <class S, class = std::enable_if_t<is_half_v<S>>>
  void store(S* p) const {
    store_partial(p, N);
  }
  template <class S, class = std::enable_if_t<is_half_v<S>>>
  void store_partial(S* p, int n) const {
    for (int i = 0; i < n; ++i) p[i] = to_storage<S>(v[i]);
  }
  // rows[i][j] <-> rows[j][i]: a square block of N x N elements, one row per vector.
  static void transpose(VecGeneric (&rows)[N]) {
    for (int i = 0; i < N; ++i)
      for (int j = i + 1; j < N; ++j) std::swap(rows[i].v[j], rows[j].v[i]);
  }

  friend VecGeneric operator+(VecGeneric a, VecGeneric b) { return {a.v + b.v}; }
  friend VecGeneric operator-(VecGeneric a, VecGeneric b) { return {a.v - b.v}; }
  friend VecGeneric operator*(VecGeneric a, VecGeneric b) { return {a.v * b.v}; }
  friend VecGeneric operator/(VecGeneric a, VecGeneric b) { return {a.v / b.v}; }
  // a * b + c
  friend VecGeneric fmadd(VecGeneric a, VecGeneric b, VecGeneric c) { return {a.v * b.v + c.v}; }
  // Lane-wise a < b ? if_less : otherwise (false for NaN).
  static VecGeneric select_less(VecGeneric a, VecGeneric b, VecGeneric if_less, VecGeneric otherwise) {
    return {a.v < b.v ? if_less.v : otherwise.v};
  }
  // Lane-wise a < b ? b : a: a NaN in a is kept, a NaN in b is not (vmaxps with swapped operands).
  friend VecGeneric max(VecGeneric a, VecGeneric b) { return {a.v < b.v ? b.v : a.v}; }
  // Whether a < b in any lane.
  friend bool any_less(VecGeneric a, VecGeneric b) {
    for (int i = 0; i < N; ++i)
      if (a.v[i] < b.v[i]) return true;
    return false;
  }
  friend T reduce_add(VecGeneric a) {
    T sum = a.v[0];
    for (int i = 1; i < N; ++i) sum += a.v[i];
    return sum;
  }
  friend T reduce_max(VecGeneric a) {
    T m = a.v[0];
    for (int i = 1; i < N; ++i) m = m < a.v[i] ? a.v[i] : m;
    return m;
  }
  // x = n + f, n the nearest integer (ties to even), both exact, for |x| < 2^(mantissa bits - 1):
  // adding and removing 1.5 * 2^mantissa_bits leaves the integer part in the mantissa (IEEE
  // arithmetic, no fast-math).
  friend void split_nearest(VecGeneric x, VecGeneric& n, VecGeneric& f) {
    const T shifter = sizeof(T) == 4 ? T(12582912.0) : T(6755399441055744.0);
    n = {(x.v + shifter) - shifter};
    f = x - n;
  }
  // p * 2^n for lanes of n holding integers in the normal exponent range.
  friend VecGeneric times_pow2(VecGeneric p, VecGeneric n) {
    constexpr int mantissa_bits = sizeof(T) == 4 ? 23 : 52;
    constexpr Bits bias = sizeof(T) == 4 ? 127 : 1023;
    const NativeBits bits = (__builtin_convertvector(n.v, NativeBits) + bias) << mantissa_bits;
    Native scale;
    std::memcpy(&scale, &bits, sizeof(Native));
    return {p.v * scale};
  }
};

}  // namespace fastattn::FASTATTN_CPU_ISA
