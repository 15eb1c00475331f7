// AMX matrix products for bfloat16 prefill (Intel Sapphire Rapids and later): the tile kernel's two
// products run on tile registers with TDPBF16PS (a 16 x 16 float32 tile += 16 x 32 bfloat16 times
// 32 x 16 bfloat16), everything else (softmax, masks, windows, output) stays tile_kernel.h's float32
// AVX-512 code. Queries stay in the lanes, so the products are taken transposed:
//   scores [16 keys][16 queries]    = K [16 keys][32 features] . Q^T        (Q packed per tile)
//   acc [16 value features][16 q.] += V^T [16 features][32 keys] . P^T      (P packed per block)
// The right operand must hold pairs of the summed dimension in each 32-bit lane (q_pairs, p_pairs).
// K and V^T are copied as bfloat16 (exact) into zero-padded rows, once per head and thread when the
// head fits kHeadCacheBytes, else block by block. Products are exact in float32 and summed in
// float32; only the probabilities are rounded to bfloat16 (as every bfloat16 kernel does).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/bf16_pairs.h"
#include "cpu/tile_kernel.h"

namespace fastattn::FASTATTN_CPU_ISA {

// Every tile register is 16 rows of 64 bytes: 0-2 accumulate (one per query vector), 4 holds the
// left operand, 6 and 7 the right one.
struct AmxTileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

template <class V>
struct AmxBlocks {
  static_assert(std::is_same_v<typename V::value_type, float> && V::size == 16, "AVX-512 float32 lanes");
  using T = float;
  // 128 keys per block, not the FMA kernel's 64: the accumulators' tiles are loaded and stored once
  // per block and value column, so longer blocks halve that traffic; 8-26% faster at 1,8,512,64 and
  // 1,16,1024,128 (alternating processes), the same within noise at 1,8,2048,64.
  static constexpr int kBlockN = 128;
  static constexpr int M = Tile<V>::kBlockM, N = kBlockN;
  static constexpr int64_t kPadKeys = 32;  // zero keys after the last packed one: a product reads 32 at a time

  static int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }
  static int64_t padded_dim(const AttentionParams& p) { return round_up(std::max<int64_t>(p.head_dim, 1), 32); }
  static int64_t padded_dim_v(const AttentionParams& p) { return round_up(p.head_dim_v, 16); }

  // Packed keys: key j of the head is row j - first of k ([keys][padded_dim]) and column j - first of
  // vt ([padded_dim_v][vt_row]). A product reads 32 keys of vt, so a block whose length is not a
  // multiple of 32 would also read the next keys of a head packed whole, and their values times zero
  // probabilities are NaN where a value is inf: vt_tail is then the block's last, partial 32 keys
  // with zeros after them ([padded_dim_v][32]), else null.
  struct Keys {
    const uint16_t* k;
    const uint16_t* vt;
    int64_t vt_row, first;
    const uint16_t* vt_tail;
  };

  struct Scratch : TileScratch<V> {
    const int64_t dim, dim_v;
    const int64_t capacity;  // keys `packed` holds: the whole head if it fits, else one block
    AlignedBuffer<uint32_t> pairs;
    AlignedBuffer<uint16_t> packed;  // the head it holds whole, if any: TileScratch::holds_head
    AlignedBuffer<uint16_t> vt_tail;  // Keys::vt_tail

    explicit Scratch(const AttentionParams& p)
        : TileScratch<V>(p.head_dim, padded_dim_v(p), N, /*convert_kv=*/false, /*head_elements=*/0),
          dim(padded_dim(p)),
          dim_v(padded_dim_v(p)),
          capacity(int64_t{sizeof(uint16_t)} * (p.seqlen_k + kPadKeys) * (dim + dim_v) <= TileScratch<V>::kHeadCacheBytes
                       ? p.seqlen_k
                       : N),
          pairs((dim / 2 + N / 2) * M),
          packed((capacity + kPadKeys) * (dim + dim_v)),
          vt_tail(dim_v * kPadKeys) {
      this->q_pairs = pairs.data();
      this->p_pairs = pairs.data() + dim / 2 * M;
      // The padded rows of acc are never written by attend_tile; zero keeps them finite.
      if (ok()) std::fill(this->acc, this->acc + dim_v * M, T(0));
    }
    bool ok() const {
      return TileScratch<V>::ok() && pairs.data() != nullptr && packed.data() != nullptr &&
             (dim_v == 0 || vt_tail.data() != nullptr);
    }
    uint16_t* vt() const { return packed.data() + (capacity + kPadKeys) * dim; }
  };

  // The tile configuration, loaded while a thread works and released after (the tile registers are
  // part of the thread's saved state only in between).
  struct Thread {
    Thread() {
      static const AmxTileConfig config;
      _tile_loadconfig(&config);
    }
    ~Thread() { _tile_release(); }
    Thread(const Thread&) = delete;
    Thread& operator=(const Thread&) = delete;
  };

  // vt[e][first + j] = v[first + j][e] for rows with unit column stride: 32 keys by 16 features at a
  // time, the key pairs interleaved into words, then a 16 x 16 transpose of the words.
  static void transpose_values(const MatrixView<const bfloat16>& v, int64_t first, int64_t count, int64_t dim_v,
                               int64_t vt_row, uint16_t* vt) {
    for (int64_t e0 = 0; e0 < dim_v; e0 += 16) {
      const auto features = static_cast<__mmask16>((1u << std::min<int64_t>(16, dim_v - e0)) - 1);
      for (int64_t j0 = 0; j0 < count; j0 += 32) {
        V block[16];
        for (int i = 0; i < 16; ++i) {
          const int64_t j = j0 + 2 * i;
          const __m256i even = j < count ? _mm256_maskz_loadu_epi16(features, &v(first + j, e0)) : _mm256_setzero_si256();
          const __m256i odd = j + 1 < count ? _mm256_maskz_loadu_epi16(features, &v(first + j + 1, e0))
                                            : _mm256_setzero_si256();
          block[i] = as_vector<V>(interleave_pairs(even, odd));
        }
        V::transpose(block);
        for (int e = 0; e < 16 && e0 + e < dim_v; ++e) block[e].store(reinterpret_cast<float*>(vt + (e0 + e) * vt_row + j0));
      }
    }
  }

  // Keys [first, first + count) of the head into s.packed, zero past them and past the features.
  static void pack_keys(const AttentionParams& p, const HeadViews<bfloat16>& h, int64_t first, int64_t count,
                        Scratch& s) {
    const int64_t vt_row = s.capacity + kPadKeys;
    uint16_t* const k = s.packed.data();
    uint16_t* const vt = s.vt();
    std::fill(k + count * s.dim, k + (count + kPadKeys) * s.dim, uint16_t{0});
    for (int64_t j = 0; j < count; ++j) {
      uint16_t* row = k + j * s.dim;
      if (h.k.col == 1)
        std::memcpy(row, &h.k(first + j, 0), p.head_dim * sizeof(uint16_t));
      else
        for (int64_t d = 0; d < p.head_dim; ++d) row[d] = h.k(first + j, d).bits;
      std::fill(row + p.head_dim, row + s.dim, uint16_t{0});
    }
    if (h.v.col == 1)
      transpose_values(h.v, first, count, p.head_dim_v, vt_row, vt);
    else
      for (int64_t e = 0; e < p.head_dim_v; ++e)
        for (int64_t j = 0; j < count; ++j) vt[e * vt_row + j] = h.v(first + j, e).bits;
    for (int64_t e = 0; e < s.dim_v; ++e) {
      uint16_t* row = vt + e * vt_row;
      std::fill(row + (e < p.head_dim_v ? count : 0), row + count + kPadKeys, uint16_t{0});
    }
  }

  // Keys::vt_tail of the block [key_begin, key_begin + keys) of the head s.packed holds whole; null
  // when the block's keys fill whole products or end with the head (pack_keys zeroed what follows).
  static const uint16_t* copy_value_tail(const HeadViews<bfloat16>& h, int64_t key_begin, int keys, Scratch& s) {
    const int rest = keys % 32;
    if (rest == 0 || key_begin + keys == h.seqlen_k) return nullptr;
    const int64_t vt_row = s.capacity + kPadKeys;
    const auto kept = static_cast<__mmask32>((1u << rest) - 1);
    const uint16_t* const from = s.vt() + key_begin + (keys - rest);
    for (int64_t e = 0; e < s.dim_v; ++e)
      _mm512_store_si512(s.vt_tail.data() + e * kPadKeys, _mm512_maskz_loadu_epi16(kept, from + e * vt_row));
    return s.vt_tail.data();
  }

  static Keys prepare(const AttentionParams& p, const HeadViews<bfloat16>& h, int64_t key_begin, int keys,
                      Scratch& s) {
    const int64_t vt_row = s.capacity + kPadKeys;
    if (s.capacity < p.seqlen_k) {  // the block alone, zero after it
      pack_keys(p, h, key_begin, keys, s);
      return {s.packed.data(), s.vt(), vt_row, key_begin, nullptr};
    }
    if (!s.holds_head(h)) pack_keys(p, h, 0, h.seqlen_k, s);
    return {s.packed.data(), s.vt(), vt_row, 0, copy_value_tail(h, key_begin, keys, s)};
  }

  template <int R>
  static void pack_queries(const AttentionParams& p, const HeadViews<bfloat16>& h, int64_t row_begin, int64_t rows,
                           Scratch& s) {
    pack_query_pairs<V, R>(h.q, row_begin, rows, p.head_dim, s.dim, s.q_pairs);
  }

  // Bytes between the rows of a tile over the query lanes (q_pairs, p_pairs, scores, acc).
  static constexpr int kStride = M * sizeof(uint32_t);

  // Accumulators 0 .. R-1 += the left operand (16 rows at `left`, `left_stride` bytes apart) times
  // the R right operands side by side from `right` on (one per query vector).
  template <int R>
  static void multiply(const void* left, int64_t left_stride, const uint32_t* right) {
    _tile_loadd(4, left, left_stride);
    _tile_loadd(6, right, kStride);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (R > 1) {
      _tile_loadd(7, right + 16, kStride);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (R > 2) {
      _tile_loadd(6, right + 32, kStride);
      _tile_dpbf16ps(2, 4, 6);
    }
  }

  template <int R>
  static void store_accumulators(T* to) {
    _tile_stored(0, to, kStride);
    if constexpr (R > 1) _tile_stored(1, to + 16, kStride);
    if constexpr (R > 2) _tile_stored(2, to + 32, kStride);
  }

  template <int R>
  static void score(const AttentionParams& p, const Keys& kv, int64_t key_begin, int keys, const TileLanes<V>& s) {
    const int64_t dim = padded_dim(p);
    const uint16_t* const k = kv.k + (key_begin - kv.first) * dim;
    for (int j0 = 0; j0 < keys; j0 += 16) {
      _tile_zero(0);
      if constexpr (R > 1) _tile_zero(1);
      if constexpr (R > 2) _tile_zero(2);
      for (int64_t d0 = 0; d0 < dim; d0 += 32)
        multiply<R>(k + j0 * dim + d0, dim * sizeof(uint16_t), s.q_pairs + d0 / 2 * M);
      store_accumulators<R>(s.scores + j0 * M);
    }
    const V scale = V::broadcast(static_cast<T>(p.scale));
    for (int j = 0; j < keys; ++j)
      for (int r = 0; r < R; ++r) (V::load(s.scores + j * M + r * 16) * scale).store(s.scores + j * M + r * 16);
  }

  template <int R>
  static void accumulate(const AttentionParams& p, const Keys& kv, int64_t key_begin, int keys, bool rescale,
                         const TileLanes<V>& s) {
    const int64_t dim_v = padded_dim_v(p);
    if (dim_v == 0) return;
    if (rescale)
      for (int64_t e = 0; e < p.head_dim_v; ++e)
        for (int r = 0; r < R; ++r)
          (V::load(s.acc + e * M + r * 16) * V::load(s.alpha + r * 16)).store(s.acc + e * M + r * 16);

    // Zero past the block's keys up to the 32 a product reads.
    const int chunks = (keys + 31) / 32;
    pack_probability_pairs<V, R>(s, keys, /*lead=*/0, chunks * 16);

    const uint16_t* const vt = kv.vt + (key_begin - kv.first);
    const int in_place = kv.vt_tail ? keys / 32 : chunks;
    for (int64_t e0 = 0; e0 < dim_v; e0 += 16) {
      T* const acc = s.acc + e0 * M;
      _tile_loadd(0, acc, kStride);
      if constexpr (R > 1) _tile_loadd(1, acc + 16, kStride);
      if constexpr (R > 2) _tile_loadd(2, acc + 32, kStride);
      for (int c = 0; c < in_place; ++c)
        multiply<R>(vt + e0 * kv.vt_row + c * 32, kv.vt_row * sizeof(uint16_t), s.p_pairs + c * 16 * M);
      if (kv.vt_tail)
        multiply<R>(kv.vt_tail + e0 * kPadKeys, kPadKeys * sizeof(uint16_t), s.p_pairs + in_place * 16 * M);
      store_accumulators<R>(acc);
    }
  }
};

}  // namespace fastattn::FASTATTN_CPU_ISA
