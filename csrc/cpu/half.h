// Half-precision storage types (bfloat16 and IEEE float16) and their scalar conversions to and
// from float32, the type every half-precision input is computed in. The vector types convert whole
// vectors (vec_*.h); these scalar forms are their specification and handle odd layouts.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#ifndef FASTATTN_CPU_ISA
#error "define FASTATTN_CPU_ISA (the ISA's namespace) before including this header"
#endif

namespace fastattn::FASTATTN_CPU_ISA {

struct bfloat16 {
  uint16_t bits;
};
struct float16 {
  uint16_t bits;
};

template <class S>
inline constexpr bool is_half_v = std::is_same_v<S, bfloat16> || std::is_same_v<S, float16>;

// The type a storage type is computed in: halves in float32, the others in themselves.
template <class S>
using compute_t = std::conditional_t<is_half_v<S>, float, S>;

inline uint32_t bits_of(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

inline float float_of(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

inline float to_float(bfloat16 x) { return float_of(uint32_t{x.bits} << 16); }

inline float to_float(float16 x) {
  const uint32_t sign = uint32_t{x.bits & 0x8000u} << 16, exponent = (x.bits >> 10) & 0x1F, mantissa = x.bits & 0x3FF;
  if (exponent == 0) return float_of(sign | bits_of(static_cast<float>(mantissa) * 0x1p-24f));  // zero, subnormal
  if (exponent == 31) return float_of(sign | 0x7F800000u | mantissa << 13);                     // inf, NaN
  return float_of(sign | (exponent + 112) << 23 | mantissa << 13);
}

// Round to nearest, ties to even; NaN stays a (quiet) NaN.
inline bfloat16 to_bfloat16(float x) {
  const uint32_t bits = bits_of(x);
  if (x != x) return {static_cast<uint16_t>((bits >> 16) | 0x40)};
  return {static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)};
}

// Round to nearest, ties to even; overflow gives inf, NaN a quiet NaN. Below 2^-14 the addition of
// 0.5f (which has 2^-24 as its last mantissa bit there) lets the FPU round to the float16
// subnormal grid; above, the bias change and the carry of the dropped bits round the mantissa.
inline float16 to_float16(float x) {
  uint32_t bits = bits_of(x);
  const uint32_t sign = bits & 0x80000000u;
  bits ^= sign;
  uint32_t half;
  if (bits >= 0x47800000u) {  // >= 2^16 (rounds to inf), inf or NaN
    half = bits > 0x7F800000u ? 0x7E00 : 0x7C00;
  } else if (bits < 0x38800000u) {  // < 2^-14
    half = bits_of(float_of(bits) + 0.5f) - 0x3F000000u;
  } else {
    const uint32_t mantissa_odd = (bits >> 13) & 1;
    bits += (uint32_t{15} - 127) << 23;  // rebias the exponent
    bits += 0xFFF + mantissa_odd;
    half = bits >> 13;
  }
  return {static_cast<uint16_t>(half | sign >> 16)};
}

// An element of storage type S as its compute type T, and back (rounded).
template <class T, class S>
T to_compute(S x) {
  if constexpr (is_half_v<S>)
    return static_cast<T>(to_float(x));
  else
    return static_cast<T>(x);
}

template <class S, class T>
S to_storage(T x) {
  if constexpr (std::is_same_v<S, bfloat16>)
    return to_bfloat16(static_cast<float>(x));
  else if constexpr (std::is_same_v<S, float16>)
    return to_float16(static_cast<float>(x));
  else
    return static_cast<S>(x);
}

}  // namespace fastattn::FASTATTN_CPU_ISA
