// Prefill kernel: queries live in SIMD lanes. A tile of BLOCK_M queries is packed transposed,
// q_tile[d][BLOCK_M], already multiplied by scale. For each block of BLOCK_N keys:
//   scores[j][BLOCK_M] = sum_d k[j][d] * q_tile[d][:]      (k[j][d] broadcast, no packing of K)
//   online softmax lane by lane: m_i (running max), l_i (running sum), alpha = exp(m_old - m_new)
//   acc[e][BLOCK_M] = alpha * acc + sum_j v[j][e] * p[j][:]  (v[j][e] broadcast)
// so row maxima and sums never need a horizontal reduction, and K and V are read in place
// with any strides. The epilogue transposes acc / l_i into the output rows.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/kernel_common.h"
#include "cpu/vec_math.h"

#ifndef FASTATTN_CPU_ISA
#error "define FASTATTN_CPU_ISA (the ISA's namespace) before including this header"
#endif

namespace fastattn::FASTATTN_CPU_ISA {

// Register blocking: a micro-step keeps kSteps x kVectors accumulators, kVectors operands and one
// broadcast in registers: 4 x 3 + 3 + 1 = 16 (SSE2, AVX2) or 8 x 3 + 3 + 1 = 28 of 32 (AVX-512).
template <class V>
struct Tile {
  static constexpr int kVectors = 3;                           // SIMD vectors of queries per tile
  static constexpr int kBlockM = kVectors * V::size;           // queries per tile
  static constexpr int kBlockN = 64;                           // keys per online-softmax step (FmaBlocks)
  static constexpr int kSteps = V::kRegisters >= 32 ? 8 : 4;   // keys (or value columns) per micro-step
};

// Calls f(std::integral_constant<int, n>{}) for n in [1, Max], nothing for n = 0: a micro-kernel's
// run-time tail count (keys, value columns) as the compile-time one its registers need.
template <int Max, class F>
void with_count(int n, F&& f) {
  if constexpr (Max > 0) {
    if (n == Max) return f(std::integral_constant<int, Max>{});
    with_count<Max - 1>(n, f);
  }
}

// Rows of the K and V head a thread works on next, requested into L2 a few per micro-step of the
// current head (step()), so that they arrive while it computes. Requested a block (hundreds of
// lines) at a time instead, they made BERT-base up to 8% slower.
struct NextHeadPrefetch {
  static constexpr int64_t kLinesPerStep = 16;  // about the line-fill buffers of one core

  template <class S>
  void start(const MatrixView<const S>& k, const MatrixView<const S>& v, int64_t keys, int64_t head_dim,
             int64_t head_dim_v) {
    const bool rows_dense = k.col == 1 && v.col == 1;  // else the rows' bytes are not contiguous lines
    k_ = reinterpret_cast<const char*>(k.data);
    v_ = reinterpret_cast<const char*>(v.data);
    k_row_ = k.row * int64_t{sizeof(S)};
    v_row_ = v.row * int64_t{sizeof(S)};
    k_bytes_ = head_dim * int64_t{sizeof(S)};
    v_bytes_ = head_dim_v * int64_t{sizeof(S)};
    const int64_t lines_per_row = (k_bytes_ + 63) / 64 + (v_bytes_ + 63) / 64;
    rows_per_step_ = std::max<int64_t>(1, kLinesPerStep / std::max<int64_t>(1, lines_per_row));
    rows_ = rows_dense ? keys : 0;
    next_row_ = 0;
  }
  void stop() { rows_ = 0; }
  void step() {
    for (const int64_t end = std::min(rows_, next_row_ + rows_per_step_); next_row_ < end; ++next_row_) {
      for (int64_t b = 0; b < k_bytes_; b += 64) __builtin_prefetch(k_ + next_row_ * k_row_ + b, 0, 2);
      for (int64_t b = 0; b < v_bytes_; b += 64) __builtin_prefetch(v_ + next_row_ * v_row_ + b, 0, 2);
    }
  }

 private:
  const char* k_ = nullptr;
  const char* v_ = nullptr;
  int64_t k_row_ = 0, v_row_ = 0, k_bytes_ = 0, v_bytes_ = 0;
  int64_t rows_ = 0, next_row_ = 0, rows_per_step_ = 1;
};

// A micro-kernel's loop over `count` keys or value columns: body(n, first) for n = Step at first =
// 0, Step, 2 Step, ..., each step also advancing the thread's next-head prefetch (null: none), then
// the remaining count % Step as one step of that compile-time size.
template <int Step, class F>
void micro_steps(int64_t count, NextHeadPrefetch* next_head, F&& body) {
  int64_t first = 0;
  for (; first + Step <= count; first += Step) {
    body(std::integral_constant<int, Step>{}, first);
    if (next_head) next_head->step();
  }
  with_count<Step - 1>(static_cast<int>(count - first), [&](auto tail) { body(tail, first); });
}

// Where a tile's state lives, lane r of each array belonging to query row r of the tile.
// from_vector(v) views the same state from query vector v on: lane 0 is then query row v * W, so
// the block functions below can run on the tile's last R - v vectors alone. lane_index stays
// 0, 1, 2, ... (it numbers lanes relative to the rows the functions are given).
template <class V>
struct TileLanes {
  using T = typename V::value_type;
  T* q_tile;   // [head_dim][BLOCK_M], pre-scaled queries, transposed
  T* scores;   // [BLOCK_N][BLOCK_M], scores then probabilities
  T* acc;      // [head_dim_v][BLOCK_M], unnormalised output, transposed
  T* row_max;  // [BLOCK_M], m_i
  T* row_sum;  // [BLOCK_M], l_i
  T* alpha;    // [BLOCK_M], exp(m_old - m_new) of the last block
  T* lane_index;  // [BLOCK_M], 0, 1, 2, ...
  // Only for the bfloat16 pair products (bf16_pairs.h), else null: pairs of bfloat16 in 32-bit lanes.
  uint32_t* q_pairs = nullptr;  // [head_dim / 2 padded][BLOCK_M], queries' features 2i, 2i + 1
  uint32_t* p_pairs = nullptr;  // [pairs][BLOCK_M], probabilities of two keys each
  NextHeadPrefetch* next_head = nullptr;  // the thread's; stepped by micro_steps (not by the AMX kernel)

  TileLanes from_vector(int vector) const {
    const int64_t lane = int64_t{vector} * V::size;
    return {q_tile + lane, scores + lane, acc + lane, row_max + lane, row_sum + lane, alpha + lane, lane_index,
            q_pairs ? q_pairs + lane : nullptr, p_pairs ? p_pairs + lane : nullptr, next_head};
  }
};

// Per-thread working memory, allocated once per call and thread: O(tile), never O(L x S).
template <class V>
struct TileScratch : TileLanes<V> {
  using T = typename V::value_type;
  static constexpr int64_t M = Tile<V>::kBlockM;
  AlignedBuffer<T> memory;
  T* k_block;  // [BLOCK_N][head_dim], a block of half-precision keys converted (see key_block)
  T* v_block;  // [BLOCK_N][head_dim_v]
  // Half precision, when it fits: the K and V head of the thread's current tiles, converted whole.
  AlignedBuffer<T> head_memory;  // [seqlen_k][head_dim], then [seqlen_k][head_dim_v]; else null
  // Which K and V head head_memory (or a policy's packed copy) holds, and how many of its keys.
  const void* head_k = nullptr;
  const void* head_v = nullptr;
  int64_t head_keys = -1;
  NextHeadPrefetch next_head_prefetch;

  // Whether the thread's copy already holds h's K and V heads; if not, it is taken to hold them from
  // now on, and the caller fills it.
  template <class S>
  bool holds_head(const HeadViews<S>& h) {
    if (head_k == h.k.data && head_v == h.v.data && head_keys == h.seqlen_k) return true;
    head_k = h.k.data;
    head_v = h.v.data;
    head_keys = h.seqlen_k;
    return false;
  }

  // Every piece is a multiple of BLOCK_M elements, hence of the vector width: all stay aligned.
  TileScratch(const AttentionParams& p, bool convert_kv)
      : TileScratch(p.head_dim, p.head_dim_v, Tile<V>::kBlockN, convert_kv,
                    convert_kv && p.seqlen_k * (p.head_dim + p.head_dim_v) * int64_t{sizeof(T)} <= kHeadCacheBytes
                        ? p.seqlen_k * (p.head_dim + p.head_dim_v) : 0) {}
  TileScratch(int64_t head_dim, int64_t head_dim_v, int64_t block_n, bool convert_kv, int64_t head_elements)
      : memory((head_dim + block_n + head_dim_v + 4) * M + (convert_kv ? block_n * (head_dim + head_dim_v) : 0)),
        head_memory(head_elements) {
    this->q_tile = memory.data();
    this->scores = this->q_tile + head_dim * M;
    this->acc = this->scores + block_n * M;
    this->row_max = this->acc + head_dim_v * M;
    this->row_sum = this->row_max + M;
    this->alpha = this->row_sum + M;
    this->lane_index = this->alpha + M;
    this->next_head = &next_head_prefetch;
    k_block = this->lane_index + M;
    v_block = k_block + block_n * head_dim;
    if (ok())
      for (int i = 0; i < M; ++i) this->lane_index[i] = static_cast<T>(i);
  }
  bool ok() const { return memory.data() != nullptr; }
  bool caches_heads() const { return head_memory.size() > 0 && head_memory.data() != nullptr; }

  // Consecutive tiles of a thread share their K and V head (run_tiles orders them so): converting
  // it once instead of each block once per tile cut the time half precision takes over float32
  // from 13% to 2% at 1,8,512,64 (one thread). 8 MB holds K and V of 8192 keys at head dims 128.
  static constexpr int64_t kHeadCacheBytes = int64_t{8} << 20;
};

// The keys of one block as the micro-kernels read them, in the compute type: key j of the head is
// row j - first of k and v.
template <class T>
struct KeyBlock {
  MatrixView<const T> k, v;
  int64_t first;
};

// Rows [first, first + rows) of x converted into dense rows of T at dst.
template <class V, class S>
MatrixView<const typename V::value_type> convert_rows(const MatrixView<const S>& x, int64_t first, int64_t rows,
                                                      int64_t cols, typename V::value_type* dst) {
  using T = typename V::value_type;
  constexpr int W = V::size;
  for (int64_t r = 0; r < rows; ++r) {
    T* row = dst + r * cols;
    if (x.col != 1) {
      for (int64_t c = 0; c < cols; ++c) row[c] = to_compute<T>(x(first + r, c));
      continue;
    }
    const S* source = x.data + (first + r) * x.row;
    int64_t c = 0;
    for (; c + W <= cols; c += W) V::load(source + c).store(row + c);
    if (c < cols) V::load_partial(source + c, static_cast<int>(cols - c)).store_partial(row + c, static_cast<int>(cols - c));
  }
  return {dst, cols, 1};
}

// Keys [key_begin, key_begin + keys): read in place, or (half precision) converted into the
// scratch, the whole head once if it fits (and again only when the head changes), else this block,
// so the micro-kernels below always see the compute type.
template <class V, class S>
KeyBlock<typename V::value_type> key_block(const AttentionParams& p, const HeadViews<S>& h, int64_t key_begin,
                                           int keys, TileScratch<V>& s) {
  if constexpr (std::is_same_v<S, typename V::value_type>) {
    return {h.k, h.v, 0};
  } else {
    if (!s.caches_heads())
      return {convert_rows<V>(h.k, key_begin, keys, p.head_dim, s.k_block),
              convert_rows<V>(h.v, key_begin, keys, p.head_dim_v, s.v_block), key_begin};
    auto* const head_v = s.head_memory.data() + h.seqlen_k * p.head_dim;
    if (!s.holds_head(h)) {
      convert_rows<V>(h.k, 0, h.seqlen_k, p.head_dim, s.head_memory.data());
      convert_rows<V>(h.v, 0, h.seqlen_k, p.head_dim_v, head_v);
    }
    return {{s.head_memory.data(), p.head_dim, 1}, {head_v, p.head_dim_v, 1}, 0};
  }
}

// Loads the query tile transposed and pre-scaled; rows past the end are zero. Rows with unit column
// stride go through square in-register transposes; any other layout element by element (vector
// gathers were slower here: Zen 4 microcodes them).
template <class V, int R, class S>
void pack_query_tile(const MatrixView<const S>& q, int64_t row_begin,
                     int64_t rows, int64_t head_dim, typename V::value_type q_scale, TileScratch<V>& s) {
  using T = typename V::value_type;
  constexpr int W = V::size, M = Tile<V>::kBlockM;
  if (q.col != 1) {
    for (int64_t d = 0; d < head_dim; ++d) {
      T* column = s.q_tile + d * M;
      for (int64_t r = 0; r < rows; ++r) column[r] = to_compute<T>(q(row_begin + r, d)) * q_scale;
      for (int64_t r = rows; r < R * W; ++r) column[r] = T(0);
    }
    return;
  }
  const V scale = V::broadcast(q_scale);
  for (int r0 = 0; r0 < R * W; r0 += W) {
    for (int64_t d0 = 0; d0 < head_dim; d0 += W) {
      const int cols = static_cast<int>(std::min<int64_t>(W, head_dim - d0));
      V block[W];
      for (int i = 0; i < W; ++i) {
        if (r0 + i >= rows) {
          block[i] = V::zero();
          continue;
        }
        const S* row = &q(row_begin + r0 + i, d0);
        block[i] = cols == W ? V::load(row) : V::load_partial(row, cols);
      }
      V::transpose(block);
      for (int i = 0; i < cols; ++i) (block[i] * scale).store(s.q_tile + (d0 + i) * M + r0);
    }
  }
}

// out = acc / l_i, transposed back into the output rows; rows that saw no visible key (l_i = 0)
// give zeros. In-register transposes for unit column stride, element by element otherwise.
template <class V, int R, class S>
void store_output_tile(const MatrixView<S>& out, int64_t row_begin, int64_t rows,
                       int64_t head_dim_v, TileScratch<V>& s) {
  using T = typename V::value_type;
  constexpr int W = V::size, M = Tile<V>::kBlockM;
  T* const inv_sum = s.alpha;  // free once the last block is accumulated
  for (int r = 0; r < R * W; ++r) inv_sum[r] = s.row_sum[r] == T(0) ? T(0) : T(1) / s.row_sum[r];
  if (out.col != 1) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t e = 0; e < head_dim_v; ++e) out(row_begin + r, e) = to_storage<S>(s.acc[e * M + r] * inv_sum[r]);
    return;
  }
  for (int r0 = 0; r0 < rows; r0 += W) {
    const V inv = V::load(inv_sum + r0);
    for (int64_t e0 = 0; e0 < head_dim_v; e0 += W) {
      const int cols = static_cast<int>(std::min<int64_t>(W, head_dim_v - e0));
      V block[W];
      for (int i = 0; i < W; ++i) block[i] = i < cols ? V::load(s.acc + (e0 + i) * M + r0) * inv : V::zero();
      V::transpose(block);
      for (int i = 0; i < W && r0 + i < rows; ++i) {
        S* row = &out(row_begin + r0 + i, e0);
        if (cols == W)
          block[i].store(row);
        else
          block[i].store_partial(row, cols);
      }
    }
  }
}

// scores[j][:] = k[key_begin + j] . q_tile for NK consecutive keys, accumulated in registers.
template <class V, int R, int NK>
void score_keys(const MatrixView<const typename V::value_type>& k, int64_t key_begin,
                int64_t head_dim, const typename V::value_type* q_tile,
                typename V::value_type* scores) {
  constexpr int W = V::size, M = Tile<V>::kBlockM;
  V acc[NK][R];
  for (int j = 0; j < NK; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = V::zero();
  // head_dim >= 1 (attend_tile's caller handles 0): a do-while lets the accumulators stay in
  // registers, where a loop that might not run made GCC keep a copy of them on the stack.
  int64_t d = 0;
  do {
    V q[R];
    for (int r = 0; r < R; ++r) q[r] = V::load(q_tile + d * M + r * W);
    for (int j = 0; j < NK; ++j) {
      const V key = V::broadcast(k(key_begin + j, d));
      for (int r = 0; r < R; ++r) acc[j][r] = fmadd(key, q[r], acc[j][r]);
    }
  } while (++d < head_dim);
  for (int j = 0; j < NK; ++j)
    for (int r = 0; r < R; ++r) acc[j][r].store(scores + j * M + r * W);
}

template <class V, int R>
void score_block(const MatrixView<const typename V::value_type>& k, int64_t key_begin, int keys,
                 int64_t head_dim, const TileLanes<V>& s) {
  constexpr int KS = Tile<V>::kSteps, M = Tile<V>::kBlockM;
  if (head_dim == 0) {  // empty dot products
    std::fill(s.scores, s.scores + keys * M, typename V::value_type(0));
    return;
  }
  micro_steps<KS>(keys, s.next_head, [&](auto n, int64_t j) {
    score_keys<V, R, decltype(n)::value>(k, key_begin + j, head_dim, s.q_tile, s.scores + j * M);
  });
}

// Applies the caller's mask to the rows < rows_valid: -inf where hidden, plus a float mask.
template <class V, class MaskT, class S>
void mask_block(const HeadViews<S>& h, int64_t row_begin, int64_t rows_valid,
                int64_t key_begin, int keys, const TileLanes<V>& s) {
  using T = typename V::value_type;
  constexpr int M = Tile<V>::kBlockM;
  for (int j = 0; j < keys; ++j) {
    T* row = s.scores + j * M;
    for (int64_t r = 0; r < rows_valid; ++r) row[r] = apply_mask<MaskT>(row[r], h, row_begin + r, key_begin + j);
  }
}

// Softcap, then the ALiBi bias -slope * |d(i) - j|, on the rows' scores of one block. Lane r is
// query row_begin + r, so d(i) - j = r - (j - row_begin - diagonal).
template <class V, int R, class S>
void transform_scores(const AttentionParams& p, const HeadViews<S>& h, int64_t row_begin,
                      int64_t key_begin, int keys, const TileLanes<V>& s) {
  using T = typename V::value_type;
  constexpr int W = V::size, M = Tile<V>::kBlockM;
  const V cap = V::broadcast(static_cast<T>(p.softcap));
  const V minus_slope = V::broadcast(-h.alibi_slope);
  for (int j = 0; j < keys; ++j) {
    const V delta = V::broadcast(static_cast<T>(key_begin + j - row_begin - h.diagonal));
    for (int r = 0; r < R; ++r) {
      T* scores = s.scores + j * M + r * W;
      V x = V::load(scores);
      if (p.softcap > 0) x = cap * tanh(x / cap);
      if (p.alibi_slopes) {
        const V offset = V::load(s.lane_index + r * W) - delta;
        x = fmadd(max(offset, V::zero() - offset), minus_slope, x);
      }
      x.store(scores);
    }
  }
}

// -inf for the keys outside a row's window. Key j is visible to lane r (query row_begin + r) iff
// delta - right <= r <= delta + left with delta = j - d(row_begin); the bounds are clamped to
// [-1, BLOCK_M] so that they stay exact in T.
template <class V, int R>
void hide_outside_window(const AttentionParams& p, int64_t diagonal, int64_t row_begin, int64_t key_begin,
                         int keys, const TileLanes<V>& s) {
  using T = typename V::value_type;
  constexpr int W = V::size, M = Tile<V>::kBlockM;
  const V neg_inf = V::broadcast(-std::numeric_limits<T>::infinity());
  auto lane_bound = [](int64_t bound) { return V::broadcast(static_cast<T>(std::clamp<int64_t>(bound, -1, M))); };
  for (int j = 0; j < keys; ++j) {
    const int64_t delta = key_begin + j - row_begin - diagonal;
    const V first_lane = lane_bound(p.window_right >= 0 ? delta - p.window_right : -1);
    const V last_lane = lane_bound(p.window_left >= 0 ? delta + p.window_left : M);
    for (int r = 0; r < R; ++r) {
      T* scores = s.scores + j * M + r * W;
      const V lane = V::load(s.lane_index + r * W);
      V x = V::select_less(lane, first_lane, neg_inf, V::load(scores));
      V::select_less(last_lane, lane, neg_inf, x).store(scores);
    }
  }
}

// Online softmax over one block, lane by lane: updates m_i and l_i, turns scores into
// probabilities and leaves alpha = exp(m_old - m_new) for accumulate_block. Returns whether any
// lane's maximum moved: if none did, alpha is exactly 1 and acc needs no rescaling.
// log2(e) multiplies s - m, a difference near 0: folded into the scores it would round every score
// at 1.44x its magnitude (60 ulp at 1e3). MayHide: the block may hold -inf scores (a mask, the
// causal diagonal), which must weigh exactly 0; otherwise every score is finite and exp2_clamped
// suffices.
template <class V, int R, bool MayHide>
bool softmax_block(int keys, const TileLanes<V>& s) {
  using T = typename V::value_type;
  constexpr int W = V::size, M = Tile<V>::kBlockM;
  const V log2e = V::broadcast(T(kLog2e));
  T* const scores = s.scores;
  bool max_moved = false;
  for (int r = 0; r < R; ++r) {
    const int lane0 = r * W;
    const V m_old = V::load(s.row_max + lane0);
    // Four running maxima: one chain would wait on each compare in turn.
    V m[4] = {m_old, m_old, m_old, m_old};
    int j = 0;
    for (; j + 4 <= keys; j += 4)
      for (int u = 0; u < 4; ++u) m[u] = max(m[u], V::load(scores + (j + u) * M + lane0));
    for (; j < keys; ++j) m[0] = max(m[0], V::load(scores + j * M + lane0));
    const V m_new = max(max(m[0], m[1]), max(m[2], m[3]));
    max_moved = max_moved || any_less(m_old, m_new);
    // A row that has seen no visible key keeps m = -inf; use 0 instead so exp gives 0, not NaN.
    const V m_sub = replace_neg_inf(m_new, T(0));
    V sum = V::zero();
    for (j = 0; j < keys; ++j) {
      T* const row = scores + j * M + lane0;
      const V x = (V::load(row) - m_sub) * log2e;
      const V p = MayHide ? exp2(x) : exp2_clamped(x);
      p.store(row);
      sum = sum + p;
    }
    const V alpha = exp2((m_old - m_sub) * log2e);
    alpha.store(s.alpha + lane0);
    fmadd(V::load(s.row_sum + lane0), alpha, sum).store(s.row_sum + lane0);
    m_new.store(s.row_max + lane0);
  }
  return max_moved;
}

// acc[e][:] = alpha * acc[e][:] + sum_j v[key_begin + j][e] * p[j][:] for NE consecutive output
// columns (acc[e][:] + ... when no maximum moved).
template <class V, int R, int NE>
void accumulate_values(const MatrixView<const typename V::value_type>& v, int64_t key_begin,
                       int keys, int64_t col_begin, bool rescale, const TileLanes<V>& s) {
  constexpr int W = V::size, M = Tile<V>::kBlockM;
  // Multiplying by 1 is exact. A conditional multiply, or a key loop that might not run, made GCC
  // keep the accumulators on the stack: with both, this product ran 8% faster (AVX-512, Intel).
  V acc[NE][R];
  V alpha[R];
  for (int r = 0; r < R; ++r) alpha[r] = rescale ? V::load(s.alpha + r * W) : V::broadcast(1);
  for (int c = 0; c < NE; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = V::load(s.acc + (col_begin + c) * M + r * W) * alpha[r];
  int j = 0;  // keys >= 1
  do {
    V p[R];
    for (int r = 0; r < R; ++r) p[r] = V::load(s.scores + j * M + r * W);
    for (int c = 0; c < NE; ++c) {
      const V value = V::broadcast(v(key_begin + j, col_begin + c));
      for (int r = 0; r < R; ++r) acc[c][r] = fmadd(value, p[r], acc[c][r]);
    }
  } while (++j < keys);
  for (int c = 0; c < NE; ++c)
    for (int r = 0; r < R; ++r) acc[c][r].store(s.acc + (col_begin + c) * M + r * W);
}

template <class V, int R>
void accumulate_block(const MatrixView<const typename V::value_type>& v, int64_t key_begin,
                      int keys, int64_t head_dim_v, bool rescale, const TileLanes<V>& s) {
  constexpr int CS = Tile<V>::kSteps;
  micro_steps<CS>(head_dim_v, s.next_head, [&](auto n, int64_t e) {
    accumulate_values<V, R, decltype(n)::value>(v, key_begin, keys, e, rescale, s);
  });
}

// The tile's matrix products, as a policy: these multiply in the compute type with FMAs, K and V
// read in place (or converted, for half precision); tile_dpbf16.h and tile_amx.h have bfloat16 ones
// (VDPBF16PS, AMX). A policy provides:
//   kBlockN                                      keys per online-softmax step
//   Scratch(p)                                   per-thread memory, a TileScratch
//   Thread                                       per-thread state, held while the thread works
//   Keys prepare(p, h, key_begin, keys, s)       what score and accumulate read of a block
//   pack_queries<R>(p, h, row_begin, rows, s)    the query tile, into s
//   score<R>(p, keys, key_begin, count, s)       s.scores = scale * q k^T
//   accumulate<R>(p, keys, key_begin, count, rescale, s)   s.acc = alpha * s.acc + P V
template <class V, class S>
struct FmaBlocks {
  using T = typename V::value_type;
  static constexpr int kBlockN = Tile<V>::kBlockN;
  struct Scratch : TileScratch<V> {
    explicit Scratch(const AttentionParams& p) : TileScratch<V>(p, /*convert_kv=*/!std::is_same_v<S, T>) {}
  };
  struct Thread {};
  using Keys = KeyBlock<T>;

  static Keys prepare(const AttentionParams& p, const HeadViews<S>& h, int64_t key_begin, int keys, Scratch& s) {
    return key_block(p, h, key_begin, keys, s);
  }
  template <int R>
  static void pack_queries(const AttentionParams& p, const HeadViews<S>& h, int64_t row_begin, int64_t rows,
                           Scratch& s) {
    pack_query_tile<V, R>(h.q, row_begin, rows, p.head_dim, static_cast<T>(p.scale), s);
  }
  template <int R>
  static void score(const AttentionParams& p, const Keys& kv, int64_t key_begin, int keys, const TileLanes<V>& s) {
    score_block<V, R>(kv.k, key_begin - kv.first, keys, p.head_dim, s);
  }
  template <int R>
  static void accumulate(const AttentionParams& p, const Keys& kv, int64_t key_begin, int keys, bool rescale,
                         const TileLanes<V>& s) {
    accumulate_block<V, R>(kv.v, key_begin - kv.first, keys, p.head_dim_v, rescale, s);
  }
};

// One block of keys against the R query vectors of `s` (query rows row_begin .. row_begin + rows - 1
// valid; last_row is the tile's last row).
template <class V, class MaskT, int R, class Blocks, class S>
void attend_block(const AttentionParams& p, const HeadViews<S>& h, const typename Blocks::Keys& kv,
                  int64_t row_begin, int64_t rows, int64_t last_row, int64_t key_begin, int keys,
                  const TileLanes<V>& s) {
  Blocks::template score<R>(p, kv, key_begin, keys, s);
  if (p.softcap > 0 || p.alibi_slopes) transform_scores<V, R>(p, h, row_begin, key_begin, keys, s);
  if constexpr (!std::is_void_v<MaskT>) mask_block<V, MaskT>(h, row_begin, rows, key_begin, keys, s);
  const bool cut = window_cuts(p, h.diagonal, row_begin, last_row, key_begin, key_begin + keys);
  if (cut) hide_outside_window<V, R>(p, h.diagonal, row_begin, key_begin, keys, s);
  const bool may_hide = !std::is_void_v<MaskT> || cut;
  const bool rescale = may_hide ? softmax_block<V, R, true>(keys, s) : softmax_block<V, R, false>(keys, s);
  Blocks::template accumulate<R>(p, kv, key_begin, keys, rescale, s);
}

// The same, for the tile's query vectors from `first` on (the earlier ones see none of the keys).
template <class V, class MaskT, int R, class Blocks, class S>
void attend_block_from(int first, const AttentionParams& p, const HeadViews<S>& h, const typename Blocks::Keys& kv,
                       int64_t row_begin, int64_t rows, int64_t last_row, int64_t key_begin, int keys,
                       const TileLanes<V>& s) {
  constexpr int W = V::size;
  if constexpr (R > 1)
    if (first > 0)
      return attend_block_from<V, MaskT, R - 1, Blocks>(first - 1, p, h, kv, row_begin + W, rows - W, last_row,
                                                        key_begin, keys, s.from_vector(1));
  attend_block<V, MaskT, R, Blocks>(p, h, kv, row_begin, rows, last_row, key_begin, keys, s);
}

// One query tile of one head, R vectors of queries (fewer than kVectors only for the last tile
// of a head, so a ragged end wastes less than one vector), against all the keys it can see.
template <class V, class MaskT, int R, class Blocks, class S>
void attend_tile(const AttentionParams& p, const HeadViews<S>& h, int64_t row_begin, typename Blocks::Scratch& s) {
  using T = typename V::value_type;
  constexpr int W = V::size, M = Tile<V>::kBlockM, N = Blocks::kBlockN;
  const int64_t rows = std::min<int64_t>(R * W, p.seqlen_q - row_begin);

  Blocks::template pack_queries<R>(p, h, row_begin, rows, s);
  for (int i = 0; i < R * W; ++i) {
    s.row_max[i] = -std::numeric_limits<T>::infinity();
    s.row_sum[i] = T(0);
  }
  for (int64_t i = 0; i < p.head_dim_v * M; ++i) s.acc[i] = T(0);

  // Only the keys some row of the tile sees are scored (windows, causal, kv_lengths), and only
  // blocks that some row's window cuts are masked per row. Keys from `hidden_begin` on are hidden
  // from the tile's first row (causal, or a right window), and each further W keys from one more
  // query vector: there the blocks are W keys wide (the first W - 1) and leave out the vectors
  // that see none of their keys, a third of the diagonal's work with three vectors.
  const int64_t last_row = row_begin + rows - 1;
  const KeyRange range = visible_keys(p, h, row_begin, last_row);
  const int64_t hidden_begin =
      p.window_right >= 0 ? std::clamp(row_begin + h.diagonal + p.window_right + 1, range.begin, range.end)
                          : range.end;
  // The output rows are requested for writing a few before each block: written only at the end,
  // they missed every cache then and the stores stalled (6% of a causal N = 512 call); requested all
  // at once, the requests stalled the first block.
  const int64_t blocks = (hidden_begin - range.begin + N - 1) / N + (range.end - hidden_begin + W - 1) / W;
  const int64_t rows_per_block = blocks > 0 ? (rows + blocks - 1) / blocks : 0;
  int64_t prefetched = 0;
  auto prefetch_output = [&] {
    for (const int64_t end = std::min(rows, prefetched + rows_per_block); prefetched < end; ++prefetched)
      for (int64_t e = 0; e < p.head_dim_v; e += 64 / sizeof(S)) __builtin_prefetch(&h.out(row_begin + prefetched, e), 1);
  };
  for (int64_t key_begin = range.begin; key_begin < hidden_begin; key_begin += N) {
    const int keys = static_cast<int>(std::min<int64_t>(N, hidden_begin - key_begin));
    prefetch_output();
    attend_block<V, MaskT, R, Blocks>(p, h, Blocks::prepare(p, h, key_begin, keys, s), row_begin, rows, last_row,
                                      key_begin, keys, s);
  }
  for (int64_t key_begin = hidden_begin, first = 0; key_begin < range.end; ++first) {
    const int64_t key_end = std::min(range.end, hidden_begin + (first + 1) * W - 1);  // vector `first`'s last key + 1
    const int keys = static_cast<int>(key_end - key_begin);
    prefetch_output();
    attend_block_from<V, MaskT, R, Blocks>(static_cast<int>(first), p, h, Blocks::prepare(p, h, key_begin, keys, s),
                                           row_begin, rows, last_row, key_begin, keys, s);
    key_begin = key_end;
  }

  if (h.lse)
    for (int64_t r = 0; r < rows; ++r)
      h.lse[(row_begin + r) * h.lse_row] = s.row_sum[r] == T(0) ? -std::numeric_limits<T>::infinity()
                                                                  : s.row_max[r] + std::log(s.row_sum[r]);
  store_output_tile<V, R>(h.out, row_begin, rows, p.head_dim_v, s);
}

// The tile starting at row_begin, with as many query vectors as its rows need.
template <class V, class MaskT, class Blocks, class S>
void attend_tile(const AttentionParams& p, const HeadViews<S>& h, int64_t row_begin, typename Blocks::Scratch& s) {
  static_assert(Tile<V>::kVectors == 3, "one case per vector count below");
  switch ((std::min<int64_t>(Tile<V>::kBlockM, p.seqlen_q - row_begin) + V::size - 1) / V::size) {
    case 1: return attend_tile<V, MaskT, 1, Blocks>(p, h, row_begin, s);
    case 2: return attend_tile<V, MaskT, 2, Blocks>(p, h, row_begin, s);
    default: return attend_tile<V, MaskT, 3, Blocks>(p, h, row_begin, s);
  }
}

}  // namespace fastattn::FASTATTN_CPU_ISA
