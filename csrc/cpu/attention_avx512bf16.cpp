// AVX-512 with AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake and later): bfloat16 prefill
// multiplies with VDPBF16PS (tile_dpbf16.h); bfloat16 decode, which waits on memory rather than
// arithmetic, keeps the float32 products (the same decode kernel, compiled here too), and every
// other dtype runs the AVX-512 build. Compiled with this file's own ISA flags (see CMakeLists.txt).
#define FASTATTN_CPU_ISA avx512bf16
#include "cpu/vec_avx512.h"
#include "cpu/attention_kernel.h"
#include "cpu/tile_dpbf16.h"
#include "cpu/dispatch.h"

namespace fastattn::avx512bf16 {

void attention_forward(const AttentionParams& p) {
  if (p.dtype != DType::bfloat16) return avx512::attention_forward(p);
  attention_forward_typed<VecAvx512<float>, bfloat16, DotBf16Blocks<VecAvx512<float>>>(p);
}

}  // namespace fastattn::avx512bf16
