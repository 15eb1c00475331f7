// The kernel over VecAvx512, compiled with this file's own ISA flags (see CMakeLists.txt).
#define FASTATTN_CPU_ISA avx512
#include "cpu/vec_avx512.h"
#include "cpu/attention_kernel.h"
#include "cpu/dispatch.h"

namespace fastattn::avx512 {

void attention_forward(const AttentionParams& p) {
  if (p.dtype == DType::float32)
    attention_forward_typed<VecAvx512<float>>(p);
  else
    attention_forward_typed<VecAvx512<double>>(p);
}

}  // namespace fastattn::avx512
