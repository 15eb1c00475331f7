// AVX-512 with AMX-BF16 (Sapphire Rapids and later): bfloat16 prefill multiplies on the AMX tiles
// (tile_amx.h); bfloat16 decode, which waits on memory rather than arithmetic, keeps the float32
// products (the same decode kernel, compiled here too), and every other dtype runs the AVX-512 build.
// Compiled with this file's own ISA flags (see CMakeLists.txt).
#define FASTATTN_CPU_ISA amx
#include "cpu/vec_avx512.h"
#include "cpu/attention_kernel.h"
#include "cpu/tile_amx.h"
#include "cpu/dispatch.h"

namespace fastattn::amx {

void attention_forward(const AttentionParams& p) {
  if (p.dtype != DType::bfloat16) return avx512::attention_forward(p);
  attention_forward_typed<VecAvx512<float>, bfloat16, AmxBlocks<VecAvx512<float>>>(p);
}

}  // namespace fastattn::amx
