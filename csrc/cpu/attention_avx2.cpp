// The kernel over VecAvx2, compiled with this file's own ISA flags (see CMakeLists.txt).
#define FASTATTN_CPU_ISA avx2
#include "cpu/vec_avx2.h"
#include "cpu/attention_kernel.h"
#include "cpu/dispatch.h"

namespace fastattn::avx2 {

void attention_forward(const AttentionParams& p) {
  if (p.dtype == DType::float32)
    attention_forward_typed<VecAvx2<float>>(p);
  else
    attention_forward_typed<VecAvx2<double>>(p);
}

}  // namespace fastattn::avx2
