// Pairs of bfloat16 in 32-bit lanes, the operand layout of both bfloat16 dot-product instructions
// (AVX512-BF16's VDPBF16PS and AMX's TDPBF16PS): each lane holds two values of the summed
// dimension, the even one in the low half. Shared by tile_dpbf16.h and tile_amx.h; only for
// translation units compiled with AVX512-BF16.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "cpu/tile_kernel.h"

namespace fastattn::FASTATTN_CPU_ISA {

// Lane i of words [2i] | [2i + 1] << 16 for the pairs (lo[i], hi[i]) of 16 bfloat16 each.
inline __m512i interleave_pairs(__m256i lo, __m256i hi) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(order, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
}

template <class V>
V as_vector(__m512i words) {  // shuffles move the bits unchanged
  return {_mm512_castsi512_ps(words)};
}

// q_pairs[i][r] = features 2i and 2i + 1 of query row_begin + r, for i < dim / 2 (dim a multiple
// of 32; zero past the rows and features). Not scaled: the scale multiplies the float32 scores,
// as in the float32 kernel.
template <class V, int R>
void pack_query_pairs(const MatrixView<const bfloat16>& q, int64_t row_begin, int64_t rows, int64_t head_dim,
                      int64_t dim, uint32_t* q_pairs) {
  constexpr int M = Tile<V>::kBlockM;
  if (q.col != 1) {
    std::fill(q_pairs, q_pairs + dim / 2 * M, uint32_t{0});
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < head_dim; ++d)
        q_pairs[d / 2 * M + r] |= uint32_t{q(row_begin + r, d).bits} << (d % 2 * 16);
    return;
  }
  // With unit column stride a row's feature pairs are its 32-bit words: 16 rows by 16 words at a
  // time, transposed.
  for (int r0 = 0; r0 < R * 16; r0 += 16)
    for (int64_t d0 = 0; d0 < dim; d0 += 32) {
      const int64_t features = std::clamp<int64_t>(head_dim - d0, 0, 32);
      const auto mask = static_cast<__mmask32>(features == 32 ? ~0u : (1u << features) - 1);
      V block[16];
      for (int i = 0; i < 16; ++i)
        block[i] = r0 + i < rows && features > 0
                       ? as_vector<V>(_mm512_maskz_loadu_epi16(mask, &q(row_begin + r0 + i, d0)))
                       : V::zero();
      V::transpose(block);
      for (int i = 0; i < 16; ++i) block[i].store(reinterpret_cast<float*>(q_pairs + (d0 / 2 + i) * M + r0));
    }
}

// p_pairs[t][r] = the probabilities (s.scores) of the block's keys 2t - lead and 2t + 1 - lead for
// query r, rounded to bfloat16, for t < pair_count; zero for keys outside [0, keys).
template <class V, int R>
void pack_probability_pairs(const TileLanes<V>& s, int keys, int lead, int pair_count) {
  constexpr int M = Tile<V>::kBlockM;
  for (int t = 0; t < pair_count; ++t)
    for (int r = 0; r < R; ++r) {
      const int even = 2 * t - lead, odd = even + 1;
      const float* const scores = s.scores + r * 16;
      const __m512 p_even = even >= 0 && even < keys ? _mm512_load_ps(scores + even * M) : _mm512_setzero_ps();
      const __m512 p_odd = odd < keys ? _mm512_load_ps(scores + odd * M) : _mm512_setzero_ps();
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(p_odd, p_even);  // even in the low half, odd in the high
      const __m512i words = interleave_pairs(_mm512_castsi512_si256(both), _mm512_extracti64x4_epi64(both, 1));
      _mm512_store_si512(s.p_pairs + t * M + r * 16, words);
    }
}

}  // namespace fastattn::FASTATTN_CPU_ISA
