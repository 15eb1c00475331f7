// The portable fallback: the kernel over 16-byte VecGeneric (SSE2 on x86-64, NEON on AArch64),
// compiled with the baseline flags only.
#define FASTATTN_CPU_ISA generic
#include "cpu/vec_generic.h"
#include "cpu/attention_kernel.h"
#include "cpu/dispatch.h"

namespace fastattn::generic {

void attention_forward(const AttentionParams& p) {
  if (p.dtype == DType::float32)
    attention_forward_typed<VecGeneric<float, 4>>(p);
  else
    attention_forward_typed<VecGeneric<double, 2>>(p);
}

}  // namespace fastattn::generic
