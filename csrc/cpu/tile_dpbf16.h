// AVX512-BF16 matrix products for bfloat16 prefill (AMD Zen 4 and later, Intel Cooper Lake and
// later): the tile kernel's two products with VDPBF16PS, 16 float32 lanes += the dot products of 16
// pairs of bfloat16, so each instruction does the work of two FMAs. Queries stay in the lanes, the
// pairs run along the summed dimension (bf16_pairs.h):
//   scores[j][:] = sum_i k_pairs[j][i] . q_pairs[i][:]      (features 2i, 2i + 1; k word broadcast)
//   acc[e][:]   += sum_t v_pairs[t][e] . p_pairs[t][:]      (keys 2t, 2t + 1; v word broadcast)
// Everything else (softmax, masks, windows, output) is tile_kernel.h's float32 AVX-512 code. K and V
// are copied as bfloat16 (exact) into pair rows, once per head and thread when the head fits
// kHeadCacheBytes, else block by block. Products are exact in float32 and summed in float32; only
// the probabilities are rounded to bfloat16 (as torch's and FlashAttention's bfloat16 kernels do),
// and subnormals (bfloat16 inputs, float32 products and sums below 2^-126) flush to zero.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/bf16_pairs.h"
#include "cpu/tile_kernel.h"

namespace fastattn::FASTATTN_CPU_ISA {

template <class V>
struct DotBf16Blocks {
  static_assert(std::is_same_v<typename V::value_type, float> && V::size == 16, "AVX-512 float32 lanes");
  using T = float;
  // 128 keys per block, not the FMA kernel's 64, as in tile_amx.h: 9% faster at 1,8,512,64 and 16%
  // causal (alternating processes, 2 threads), the same within noise at 1,16,1024,128.
  static constexpr int kBlockN = 128;
  static constexpr int M = Tile<V>::kBlockM, N = kBlockN, KS = Tile<V>::kSteps;

  static int64_t feature_pairs(const AttentionParams& p) { return (p.head_dim + 1) / 2; }

  // Packed keys: the pairs of key j (features 2i, 2i + 1) are k[(j - first) * feature_pairs + i];
  // those of value column e for keys first + 2t, first + 2t + 1 are v[t * head_dim_v + e].
  struct Keys {
    const uint32_t* k;
    const uint32_t* v;
    int64_t first;
  };

  struct Scratch : TileScratch<V> {
    const int64_t k_row, v_row;
    const int64_t capacity;  // keys `packed` holds: the whole head if it fits, else one block
    AlignedBuffer<uint32_t> pairs;   // q_pairs, then p_pairs
    // K pairs, then V pairs; the head it holds whole, if any: TileScratch::holds_head
    AlignedBuffer<uint32_t> packed;

    explicit Scratch(const AttentionParams& p)
        : TileScratch<V>(p.head_dim, p.head_dim_v, N, /*convert_kv=*/false, /*head_elements=*/0),
          k_row(feature_pairs(p)),
          v_row(p.head_dim_v),
          capacity(int64_t{sizeof(uint32_t)} * packed_words(p.seqlen_k) <= TileScratch<V>::kHeadCacheBytes
                       ? p.seqlen_k
                       : N),
          // A block of N keys starting at a pair's second key spans N / 2 + 1 pairs.
          pairs((query_pairs() + N / 2 + 1) * M),
          packed(packed_words(capacity)) {
      this->q_pairs = pairs.data();
      this->p_pairs = pairs.data() + query_pairs() * M;
    }
    // Rows of q_pairs: pack_query_pairs writes 16 at a time.
    int64_t query_pairs() const { return (k_row + 15) / 16 * 16; }
    // K pairs for `keys` keys, then V pairs for their keys two by two (one row more: with an odd
    // count the last pair holds one key).
    int64_t packed_words(int64_t keys) const { return keys * k_row + (keys / 2 + 1) * v_row; }
    bool ok() const { return TileScratch<V>::ok() && pairs.data() != nullptr && packed.data() != nullptr; }
    uint32_t* v_pairs() const { return packed.data() + capacity * k_row; }
  };
  struct Thread {};

  // Keys [first, first + count) of the head into s.packed; the odd feature and the odd key of the
  // last pair, if any, are zero.
  static void pack_keys(const AttentionParams& p, const HeadViews<bfloat16>& h, int64_t first, int64_t count,
                        Scratch& s) {
    for (int64_t j = 0; j < count && s.k_row > 0; ++j) {
      auto* row = reinterpret_cast<uint16_t*>(s.packed.data() + j * s.k_row);
      row[2 * s.k_row - 1] = 0;
      if (h.k.col == 1)
        std::memcpy(row, &h.k(first + j, 0), p.head_dim * sizeof(uint16_t));
      else
        for (int64_t d = 0; d < p.head_dim; ++d) row[d] = h.k(first + j, d).bits;
    }
    uint32_t* const v = s.v_pairs();
    for (int64_t t = 0; 2 * t < count; ++t) {
      const int64_t even = first + 2 * t, odd = even + 1;
      const bool has_odd = 2 * t + 1 < count;
      uint32_t* row = v + t * s.v_row;
      if (h.v.col != 1) {
        for (int64_t e = 0; e < p.head_dim_v; ++e)
          row[e] = h.v(even, e).bits | (has_odd ? uint32_t{h.v(odd, e).bits} << 16 : 0u);
        continue;
      }
      for (int64_t e0 = 0; e0 < p.head_dim_v; e0 += 16) {
        const auto features = static_cast<__mmask16>((1u << std::min<int64_t>(16, p.head_dim_v - e0)) - 1);
        const __m256i lo = _mm256_maskz_loadu_epi16(features, &h.v(even, e0));
        const __m256i hi = has_odd ? _mm256_maskz_loadu_epi16(features, &h.v(odd, e0)) : _mm256_setzero_si256();
        _mm512_mask_storeu_epi32(row + e0, features, interleave_pairs(lo, hi));
      }
    }
  }

  static Keys prepare(const AttentionParams& p, const HeadViews<bfloat16>& h, int64_t key_begin, int keys,
                      Scratch& s) {
    if (s.capacity < p.seqlen_k) {
      pack_keys(p, h, key_begin, keys, s);
      return {s.packed.data(), s.v_pairs(), key_begin};
    }
    if (!s.holds_head(h)) pack_keys(p, h, 0, h.seqlen_k, s);
    return {s.packed.data(), s.v_pairs(), 0};
  }

  template <int R>
  static void pack_queries(const AttentionParams& p, const HeadViews<bfloat16>& h, int64_t row_begin, int64_t rows,
                           Scratch& s) {
    pack_query_pairs<V, R>(h.q, row_begin, rows, p.head_dim, 2 * s.query_pairs(), s.q_pairs);
  }

  static __m512bh as_pairs(__m512i words) { return (__m512bh)words; }

  // scores[j][:] = scale * k[j] . q for NK consecutive keys, accumulated in registers.
  template <int R, int NK>
  static void score_keys(const uint32_t* k, int64_t k_row, const uint32_t* q_pairs, __m512 scale, float* scores) {
    __m512 acc[NK][R];
    for (int j = 0; j < NK; ++j)
      for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
    int64_t i = 0;  // k_row >= 1: see score_keys in tile_kernel.h for the do-while
    do {
      __m512bh q[R];
      for (int r = 0; r < R; ++r) q[r] = as_pairs(_mm512_load_si512(q_pairs + i * M + r * 16));
      for (int j = 0; j < NK; ++j) {
        const __m512bh key = as_pairs(_mm512_set1_epi32(static_cast<int>(k[j * k_row + i])));
        for (int r = 0; r < R; ++r) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], q[r], key);
      }
    } while (++i < k_row);
    for (int j = 0; j < NK; ++j)
      for (int r = 0; r < R; ++r) _mm512_store_ps(scores + j * M + r * 16, _mm512_mul_ps(acc[j][r], scale));
  }

  template <int R>
  static void score(const AttentionParams& p, const Keys& kv, int64_t key_begin, int keys, const TileLanes<V>& s) {
    if (p.head_dim == 0) {  // empty dot products
      std::fill(s.scores, s.scores + keys * M, T(0));
      return;
    }
    const int64_t k_row = feature_pairs(p);
    const uint32_t* const k = kv.k + (key_begin - kv.first) * k_row;
    const __m512 scale = _mm512_set1_ps(static_cast<T>(p.scale));
    micro_steps<KS>(keys, s.next_head, [&](auto n, int64_t j) {
      score_keys<R, decltype(n)::value>(k + j * k_row, k_row, s.q_pairs, scale, s.scores + j * M);
    });
  }

  // acc[e][:] = alpha * acc[e][:] + sum_t v[t][e] . p_pairs[t][:] for NE consecutive value columns
  // and `pairs` key pairs. The first pair's low key and the last pair's high key may lie outside
  // the block (first_keep, last_keep clear their value bits): their probability is zero, but a
  // value there may be inf or NaN, which the float32 kernels never read.
  template <int R, int NE>
  static void accumulate_values(const uint32_t* v, int64_t v_row, int pairs, uint32_t first_keep,
                                uint32_t last_keep, int64_t col_begin, bool rescale, const TileLanes<V>& s) {
    __m512 acc[NE][R];
    for (int c = 0; c < NE; ++c)
      for (int r = 0; r < R; ++r) acc[c][r] = _mm512_load_ps(s.acc + (col_begin + c) * M + r * 16);
    if (rescale)
      for (int r = 0; r < R; ++r) {
        const __m512 alpha = _mm512_load_ps(s.alpha + r * 16);
        for (int c = 0; c < NE; ++c) acc[c][r] = _mm512_mul_ps(acc[c][r], alpha);
      }
    auto add_pair = [&](int t, uint32_t keep) {
      __m512bh prob[R];
      for (int r = 0; r < R; ++r) prob[r] = as_pairs(_mm512_load_si512(s.p_pairs + t * M + r * 16));
      for (int c = 0; c < NE; ++c) {
        const __m512bh value = as_pairs(_mm512_set1_epi32(static_cast<int>(v[t * v_row + col_begin + c] & keep)));
        for (int r = 0; r < R; ++r) acc[c][r] = _mm512_dpbf16_ps(acc[c][r], prob[r], value);
      }
    };
    if (pairs == 1) {
      add_pair(0, first_keep & last_keep);
    } else {
      add_pair(0, first_keep);
      for (int t = 1; t < pairs - 1; ++t) add_pair(t, ~0u);
      add_pair(pairs - 1, last_keep);
    }
    for (int c = 0; c < NE; ++c)
      for (int r = 0; r < R; ++r) _mm512_store_ps(s.acc + (col_begin + c) * M + r * 16, acc[c][r]);
  }

  template <int R>
  static void accumulate(const AttentionParams& p, const Keys& kv, int64_t key_begin, int keys, bool rescale,
                         const TileLanes<V>& s) {
    // The block's keys in the packing's pairs: `lead` = 1 when it starts at a pair's high key.
    const int64_t offset = key_begin - kv.first;
    const int lead = static_cast<int>(offset % 2);
    const int pairs = (lead + keys + 1) / 2;
    const uint32_t first_keep = lead ? 0xFFFF0000u : ~0u;
    const uint32_t last_keep = (lead + keys) % 2 ? 0x0000FFFFu : ~0u;
    pack_probability_pairs<V, R>(s, keys, lead, pairs);
    const int64_t v_row = p.head_dim_v;
    const uint32_t* const v = kv.v + offset / 2 * v_row;
    micro_steps<KS>(v_row, s.next_head, [&](auto n, int64_t e) {
      accumulate_values<R, decltype(n)::value>(v, v_row, pairs, first_keep, last_keep, e, rescale, s);
    });
  }
};

}  // namespace fastattn::FASTATTN_CPU_ISA
