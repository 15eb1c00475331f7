// Helpers for the x86 vectors' gathers, compiled in each ISA's namespace.
#pragma once

#include <cstdint>

#ifndef FASTATTN_CPU_ISA
#error "define FASTATTN_CPU_ISA (the ISA's namespace) before including this header"
#endif

namespace fastattn::FASTATTN_CPU_ISA {

// 32-bit gather indices reach lanes * stride elements; wider strides go lane by lane.
inline bool fits_gather_index(int64_t stride, int lanes) {
  return stride > -(int64_t(1) << 31) / lanes && stride < (int64_t(1) << 31) / lanes;
}

template <class V>
V gather_scalar(const typename V::value_type* base, int64_t stride, int n) {
  alignas(64) typename V::value_type lanes[V::size] = {};
  for (int i = 0; i < n; ++i) lanes[i] = base[i * stride];
  return V::load(lanes);
}

}  // namespace fastattn::FASTATTN_CPU_ISA
