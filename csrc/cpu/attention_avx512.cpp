// The kernel over VecAvx512, compiled with this file's own ISA flags (see CMakeLists.txt).
#define FASTATTN_CPU_ISA avx512
#include "cpu/vec_avx512.h"
#include "cpu/attention_kernel.h"
#include "cpu/dispatch.h"

namespace fastattn::avx512 {

void attention_forward(const AttentionParams& p) {
  switch (p.dtype) {
    case DType::float32: return attention_forward_typed<VecAvx512<float>>(p);
    case DType::float64: return attention_forward_typed<VecAvx512<double>>(p);
    case DType::float16: return attention_forward_typed<VecAvx512<float>, float16>(p);
    case DType::bfloat16: return attention_forward_typed<VecAvx512<float>, bfloat16>(p);
  }
}

}  // namespace fastattn::avx512
