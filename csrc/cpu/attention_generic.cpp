// The portable fallback: the kernel over 16-byte VecGeneric (SSE2 on x86-64, NEON on AArch64),
// compiled with the baseline flags only.
#define FASTATTN_CPU_ISA generic
#include "cpu/vec_generic.h"
#include "cpu/attention_kernel.h"
#include "cpu/dispatch.h"

namespace fastattn::generic {

void attention_forward(const AttentionParams& p) {
  using F = VecGeneric<float, 4>;
  switch (p.dtype) {
    case DType::float32: return attention_forward_typed<F>(p);
    case DType::float64: return attention_forward_typed<VecGeneric<double, 2>>(p);
    case DType::float16: return attention_forward_typed<F, float16>(p);
    case DType::bfloat16: return attention_forward_typed<F, bfloat16>(p);
  }
}

}  // namespace fastattn::generic
