// Functions built from the vector vocabulary (broadcast, +, -, *, fmadd, select_less,
// split_nearest, times_pow2), written once for every vector type.
#pragma once

#include <limits>

#ifndef FASTATTN_CPU_ISA
#error "define FASTATTN_CPU_ISA (the ISA's namespace) before including this header"
#endif

namespace fastattn::FASTATTN_CPU_ISA {

inline constexpr double kLog2e = 1.4426950408889634;

// Lanes equal to -inf become `replacement`.
template <class V>
V replace_neg_inf(V a, typename V::value_type replacement) {
  using T = typename V::value_type;
  return V::select_less(a, V::broadcast(std::numeric_limits<T>::lowest()), V::broadcast(replacement), a);
}

// 2^x for x <= 0 (the softmax needs no more): x = n + f with n an integer and |f| <= 1/2, 2^f by a
// polynomial, 2^n by times_pow2. Clamping at the smallest normal exponent keeps every intermediate
// normal, because an underflowing multiply costs a microcode assist (it made causal softmax blocks
// 3x slower); so lanes below it give 2^-126 (2^-1022), not 0: callers whose x can be -inf use exp2.
// NaN stays NaN.
// float: near-minimax degree 6 (Chebyshev fit on [-1/2, 1/2]), relative error below 1e-8.
// double: Taylor series of e^(f ln 2) to degree 13, truncation error below 1e-17.
template <class V>
V exp2_clamped(V x) {
  using T = typename V::value_type;
  const V clamped = max(x, V::broadcast(T(std::numeric_limits<T>::min_exponent - 1)));  // -126 / -1022
  V n, f;
  split_nearest(clamped, n, f);
  V p;
  if constexpr (sizeof(T) == 4) {
    p = V::broadcast(T(1.5465312753804028e-4));
    p = fmadd(p, f, V::broadcast(T(1.3395280111581087e-3)));
    p = fmadd(p, f, V::broadcast(T(9.618040174245834e-3)));
    p = fmadd(p, f, V::broadcast(T(5.550340563058853e-2)));
    p = fmadd(p, f, V::broadcast(T(2.4022650718688965e-1)));
    p = fmadd(p, f, V::broadcast(T(6.931471824645996e-1)));
    p = fmadd(p, f, V::broadcast(T(1.0)));
  } else {
    // ln(2)^k / k! for k = 13 .. 0
    constexpr double kCoefficients[] = {
        1.3691488853904124e-12, 2.5678435993488196e-11, 4.44553827187081e-10, 7.054911620801121e-09,
        1.0178086009239696e-07, 1.3215486790144305e-06, 1.5252733804059838e-05, 0.00015403530393381606,
        0.0013333558146428441, 0.009618129107628477, 0.055504108664821576, 0.2402265069591007,
        0.6931471805599453, 1.0};
    p = V::broadcast(T(kCoefficients[0]));
    for (int i = 1; i < int(sizeof(kCoefficients) / sizeof(double)); ++i)
      p = fmadd(p, f, V::broadcast(T(kCoefficients[i])));
  }
  return times_pow2(p, n);
}

// 2^x for x <= 0, exactly 0 below the smallest normal exponent, so a hidden key (-inf) weighs nothing.
template <class V>
V exp2(V x) {
  using T = typename V::value_type;
  const V lowest = V::broadcast(T(std::numeric_limits<T>::min_exponent - 1));
  return V::select_less(x, lowest, V::zero(), exp2_clamped(x));
}

// e^x for x <= 0.
template <class V>
V exp(V x) {
  using T = typename V::value_type;
  return exp2(x * V::broadcast(T(kLog2e)));
}

// tanh(x), for softcapping: an odd polynomial below |x| = 0.625, (1 - e^(-2|x|)) / (1 + e^(-2|x|))
// above, where 1 - e^(-2|x|) no longer cancels. The polynomials approximate tanh(x) / x in x^2,
// least-squares fits on Chebyshev nodes of [0, 0.625]: relative error below 5e-9 (float) and
// 5e-16 (double). NaN stays NaN; +-inf give +-1.
template <class V>
V tanh(V x) {
  using T = typename V::value_type;
  const V magnitude = max(x, V::zero() - x);
  const V u = x * x;
  V p;
  if constexpr (sizeof(T) == 4) {
    constexpr float kCoefficients[] = {-0.005697370902632259f, 0.020630160082934754f, -0.053735814025789856f,
                                       0.13331364826443529f, -0.3333327530359556f, 0.9999999982293112f};
    p = V::broadcast(kCoefficients[0]);
    for (int i = 1; i < 6; ++i) p = fmadd(p, u, V::broadcast(kCoefficients[i]));
  } else {
    constexpr double kCoefficients[] = {
        -1.609272255572624e-05, 7.722044920956256e-05, -0.00022865677159296342, 0.0005863704204334024,
        -0.0014549753539473676, 0.003591991574095597, -0.008863221029805076, 0.021869487535704984,
        -0.05396825392605493, 0.13333333333237662, -0.33333333333332466, 1.0};
    p = V::broadcast(kCoefficients[0]);
    for (int i = 1; i < 12; ++i) p = fmadd(p, u, V::broadcast(kCoefficients[i]));
  }
  const V small = p * x;
  const V t = exp2(magnitude * V::broadcast(T(-2 * kLog2e)));
  const V one = V::broadcast(T(1));
  const V large = (one - t) / (one + t);
  const V signed_large = V::select_less(x, V::zero(), V::zero() - large, large);
  return V::select_less(magnitude, V::broadcast(T(0.625)), small, signed_large);
}

}  // namespace fastattn::FASTATTN_CPU_ISA
