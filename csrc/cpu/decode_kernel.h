// Decode kernel: few query rows per key/value head, as in token-by-token generation, where the
// work is reading K and V once. Keys live in SIMD lanes: a chunk of a few vectors of keys gives
// a few vectors of scores per query row (each a dot product reduced across lanes), one
// online-softmax step, and acc[e] += p_j * v_j[e] over contiguous value rows.
//
// A work item is (batch element, group of query heads sharing one K head and one V head, key
// split). It serves every query row of the group from one read of its K/V chunk, and splits of
// kSplitKeys keys (a function of the shape only, so results do not depend on the thread count)
// are merged afterwards by log-sum-exp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>

#include "cpu/kernel_common.h"
#include "cpu/vec_math.h"

#ifndef FASTATTN_CPU_ISA
#error "define FASTATTN_CPU_ISA (the ISA's namespace) before including this header"
#endif

namespace fastattn::FASTATTN_CPU_ISA {

struct Decode {
  static constexpr int64_t kMaxRows = 16;      // query rows one work item serves
  static constexpr int64_t kSplitKeys = 512;  // keys per work item
  // K and V rows are requested about this many bytes (of each) ahead: decode waits on memory, and
  // the hardware prefetchers alone left half of the streaming-read bandwidth unused on Zen 4.
  // Zen 4, 2 threads, into L2 (prefetcht2): 4-8 KB ahead best, 16 KB 5% slower; prefetcht2 3-5%
  // ahead of prefetcht1; one line per row instead of every line 30% slower; into L1 (prefetcht0)
  // 32 keys ahead (32 KB of K and V at D = 128, all of its L1) 35% slower: lines were evicted
  // before use. The Intel machine with AMX (48 KB L1, 2 MB L2), 2 threads: 3 KB ahead 3-16%
  // faster than 4 KB and as fast as 2 KB, into L2; then into L1 (prefetcht0) at 3 KB, another
  // 4-6% for float64 and 0-10% for float32; prefetchnta 3x slower. Zen 4 has not run 3 KB.
  static constexpr int64_t kPrefetchBytes = 3072;
  static constexpr int kPrefetchLocality = 3;  // __builtin_prefetch's: 3 = prefetcht0
  // Vectors of keys per online-softmax step: K of 4 vectors of keys is read, then their V, so
  // each stream runs on 4x longer before the other interrupts it. On the Intel AMX machine, 2
  // threads, against one vector: float64 decode 3-7% faster, float32 0-5%; 8 as fast as 4, 16 and
  // 64 slower.
  static constexpr int kChunkVectors = 4;
};

// The rows of one work item: row r is query r % seqlen_q of the group's head r / seqlen_q. The keys
// are split evenly whatever the rows see; a split outside every row's window costs nothing.
struct DecodeShape {
  int64_t group_heads, rows, splits;
  explicit DecodeShape(const AttentionParams& p)
      : group_heads(std::gcd(p.num_heads_q / p.num_heads_k, p.num_heads_q / p.num_heads_v)),
        rows(group_heads * p.seqlen_q),
        splits(std::max<int64_t>(1, (p.seqlen_k + Decode::kSplitKeys - 1) / Decode::kSplitKeys)) {}
  int64_t groups(const AttentionParams& p) const { return p.num_heads_q / group_heads; }
};

inline bool use_decode_kernel(const AttentionParams& p) {
  return DecodeShape(p).rows <= Decode::kMaxRows && p.k_strides.col == 1 && p.v_strides.col == 1;
}

// What one row has seen of one split: running max m, running sum l, unnormalised acc.
// Laid out [rows][2 + head_dim_v] in the partial-results buffer.
template <class T>
struct RowState {
  T* data;
  T& m() const { return data[0]; }
  T& l() const { return data[1]; }
  T* acc() const { return data + 2; }
};

template <class V>
struct DecodeScratch {
  using T = typename V::value_type;
  static constexpr int W = V::size;
  int64_t q_stride, acc_stride;  // padded to whole vectors
  AlignedBuffer<T> memory;
  T* q;       // [rows][q_stride], pre-scaled, zero-padded
  T* acc;     // [rows][acc_stride]
  static constexpr int C = Decode::kChunkVectors * W;  // keys per online-softmax step
  T* scores;  // [rows][C]: a chunk's scores, then its probabilities
  T* alpha;   // [rows]: how much each row's acc shrinks at this chunk
  T* lane_index;  // [C]: 0, 1, 2, ...

  DecodeScratch(int64_t rows, int64_t head_dim, int64_t head_dim_v)
      : q_stride((head_dim + W - 1) / W * W),
        acc_stride((head_dim_v + W - 1) / W * W),
        memory(rows * (q_stride + acc_stride + C + 1) + C),
        q(memory.data()),
        acc(q + rows * q_stride),
        scores(acc + rows * acc_stride),
        alpha(scores + rows * C),
        lane_index(alpha + rows) {
    if (ok())
      for (int i = 0; i < C; ++i) lane_index[i] = static_cast<T>(i);
  }
  bool ok() const { return memory.data() != nullptr; }
};

// Rows handled together in the score and value loops: each phase interleaves the independent work
// of RB rows, so a row's dependency chains (dot products, lane reductions, the softmax) overlap
// the others' instead of running one row after another.
template <class V>
inline constexpr int kDecodeRowBlock = V::kRegisters >= 32 ? 4 : 2;
inline constexpr int kDecodeKeyBlock = 4;

// scores[r * W + j] = q_r . k[key + j] for RB rows and NK consecutive keys: RB * NK dot products in
// flight, each K load shared by the RB rows. q rows are zero-padded to whole vectors; k rows are
// read exactly.
template <class V, int RB, int NK, class S>
void score_keys_decode(const typename V::value_type* q, int64_t q_stride, const MatrixView<const S>& k, int64_t key, int64_t head_dim,
                       typename V::value_type* scores, int64_t scores_stride) {
  constexpr int W = V::size;
  V sum[RB][NK];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NK; ++j) sum[r][j] = V::zero();
  // A do-while (head_dim >= 1 here) lets the accumulators stay in registers, where a loop that
  // might not run made GCC keep a copy of them on the stack.
  int64_t d = 0;
  do {
    const int cols = static_cast<int>(std::min<int64_t>(W, head_dim - d));
    V key_part[NK];
    for (int j = 0; j < NK; ++j)
      key_part[j] = cols == W ? V::load(&k(key + j, d)) : V::load_partial(&k(key + j, d), cols);
    for (int r = 0; r < RB; ++r) {
      const V q_part = V::load(q + r * q_stride + d);
      for (int j = 0; j < NK; ++j) sum[r][j] = fmadd(q_part, key_part[j], sum[r][j]);
    }
  } while ((d += W) < head_dim);
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < NK; ++j) scores[r * scores_stride + j] = reduce_add(sum[r][j]);
}

// For RB rows: acc_r[e0 .. e0 + NV * W) = alpha_r * acc_r + sum_j p_rj v[key + j][e], with the
// RB * NV accumulators in registers and each V load shared by the rows; the last vector holds
// last_cols columns.
template <class V, int RB, int NV, class S>
void accumulate_values_decode(const MatrixView<const S>& v, int64_t key, int keys,
                              const typename V::value_type* probs, int64_t probs_stride, const typename V::value_type* alpha,
                              int64_t e0, int last_cols, typename V::value_type* acc, int64_t acc_stride) {
  constexpr int W = V::size;
  V sum[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NV; ++c) sum[r][c] = V::load(acc + r * acc_stride + e0 + c * W) * V::broadcast(alpha[r]);
  int j = 0;  // keys >= 1; a do-while for the same reason as in score_keys_decode
  do {
    const S* row = &v(key + j, e0);
    V value[NV];
    for (int c = 0; c < NV - 1; ++c) value[c] = V::load(row + c * W);
    value[NV - 1] = last_cols == W ? V::load(row + (NV - 1) * W) : V::load_partial(row + (NV - 1) * W, last_cols);
    for (int r = 0; r < RB; ++r) {
      const V p = V::broadcast(probs[r * probs_stride + j]);
      for (int c = 0; c < NV; ++c) sum[r][c] = fmadd(p, value[c], sum[r][c]);
    }
  } while (++j < keys);
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < NV; ++c) sum[r][c].store(acc + r * acc_stride + e0 + c * W);
}

// Calls f(std::integral_constant<int, B>, first_row) over the rows in blocks of B = RB rows, then
// the remaining rows in one smaller block.
template <int RB, class F>
void for_row_blocks(int64_t rows, F&& f) {
  int64_t r = 0;
  for (; r + RB <= rows; r += RB) f(std::integral_constant<int, RB>{}, r);
  if constexpr (RB > 1) {
    if (r < rows) for_row_blocks<RB - 1>(rows - r, [&](auto block, int64_t first) { f(block, r + first); });
  }
}

// Value accumulators per row for one pass over a chunk's value rows.
template <class V, int RB>
inline constexpr int kDecodeValueVectors = std::max(1, (V::kRegisters / 2) / RB);

template <class V, int RB, int NV, class S>
void accumulate_values_decode_tail(int vectors, const MatrixView<const S>& v, int64_t key,
                                   int keys, const typename V::value_type* probs, int64_t probs_stride,
                                   const typename V::value_type* alpha, int64_t e0, int last_cols,
                                   typename V::value_type* acc, int64_t acc_stride) {
  if constexpr (NV > 0) {
    if (vectors == NV)
      return accumulate_values_decode<V, RB, NV>(v, key, keys, probs, probs_stride, alpha, e0, last_cols, acc, acc_stride);
    accumulate_values_decode_tail<V, RB, NV - 1, S>(vectors, v, key, keys, probs, probs_stride, alpha, e0, last_cols, acc,
                                                    acc_stride);
  }
}

// One split of one group: keys [key_begin, key_end) against all rows; leaves each row's m, l and
// acc in `states` ([rows][2 + head_dim_v]). K and V are read in their storage type S (half the
// bytes for half precision) and converted as they are loaded.
template <class V, class MaskT, class S>
void decode_split(const AttentionParams& p, const HeadViews<S>* heads,
                  const DecodeShape& shape, int64_t key_begin, int64_t key_end, DecodeScratch<V>& s,
                  typename V::value_type* states) {
  using T = typename V::value_type;
  constexpr int W = V::size;
  constexpr int RB = kDecodeRowBlock<V>;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t L = p.seqlen_q, E = p.head_dim, Ev = p.head_dim_v, rows = shape.rows;
  const T q_scale = static_cast<T>(p.scale);
  const MatrixView<const S>& k = heads[0].k;  // one K and one V head for the whole group
  const MatrixView<const S>& v = heads[0].v;

  for (int64_t r = 0; r < rows; ++r) {
    const MatrixView<const S>& q = heads[r / L].q;
    T* q_row = s.q + r * s.q_stride;
    for (int64_t d = 0; d < s.q_stride; ++d) q_row[d] = d < E ? to_compute<T>(q(r % L, d)) * q_scale : T(0);
    for (int64_t e = 0; e < s.acc_stride; ++e) s.acc[r * s.acc_stride + e] = T(0);
    RowState<T> state{states + r * (2 + Ev)};
    state.m() = neg_inf;
    state.l() = T(0);
  }

  // Only the keys some row sees (windows, causal, kv_lengths).
  const KeyRange range = visible_keys(p, heads[0], 0, L - 1);
  key_begin = std::max(key_begin, range.begin);
  key_end = std::min(key_end, range.end);
  const V cap = V::broadcast(static_cast<T>(p.softcap));
  const int64_t prefetch_keys =
      std::max<int64_t>(1, Decode::kPrefetchBytes / (std::max<int64_t>({E, Ev, 1}) * static_cast<int64_t>(sizeof(S))));
  constexpr int C = DecodeScratch<V>::C;
  for (int64_t chunk = key_begin; chunk < key_end; chunk += C) {
    const int keys = static_cast<int>(std::min<int64_t>(C, key_end - chunk));
    const int64_t ahead = chunk + prefetch_keys;
    int j = 0;
    if (E == 0) std::fill(s.scores, s.scores + rows * C, T(0));  // empty dot products
    for (; E > 0 && j + kDecodeKeyBlock <= keys; j += kDecodeKeyBlock) {
      // The prefetches are spread over the chunk's work: issued all at once they filled the line
      // fill buffers and stalled the work behind them until memory answered (GQA decode +15%).
      // They run on past key_end: the thread's next split is usually the next one (WorkRuns).
      for (int64_t a = ahead + j; a < std::min(range.end, ahead + j + kDecodeKeyBlock); ++a) {
        for (int64_t d = 0; d < E; d += 64 / sizeof(S)) __builtin_prefetch(&k(a, d), 0, Decode::kPrefetchLocality);
        for (int64_t e = 0; e < Ev; e += 64 / sizeof(S)) __builtin_prefetch(&v(a, e), 0, Decode::kPrefetchLocality);
      }
      for_row_blocks<RB>(rows, [&](auto block, int64_t r) {
        score_keys_decode<V, decltype(block)::value, kDecodeKeyBlock>(s.q + r * s.q_stride, s.q_stride, k,
                                                                      chunk + j, E, s.scores + r * C + j, C);
      });
    }
    for (; E > 0 && j < keys; ++j)
      for_row_blocks<RB>(rows, [&](auto block, int64_t r) {
        score_keys_decode<V, decltype(block)::value, 1>(s.q + r * s.q_stride, s.q_stride, k, chunk + j, E,
                                                        s.scores + r * C + j, C);
      });

    const int vectors = (keys + W - 1) / W;
    const bool lanes_hidden = !std::is_void_v<MaskT> || keys < vectors * W;  // a mask, or a partial chunk
    for (int64_t r = 0; r < rows; ++r) {
      const HeadViews<S>& h = heads[r / L];
      const int64_t query = r % L;
      RowState<T> state{states + r * (2 + Ev)};
      T* row_scores = s.scores + r * C;
      const bool hides = lanes_hidden || window_cuts(p, h.diagonal, query, query, chunk, chunk + keys);
      V x[Decode::kChunkVectors];
      V x_max = V::broadcast(neg_inf);
      for (int c = 0; c < vectors; ++c) {
        x[c] = V::load(row_scores + c * W);
        if (p.softcap > 0) x[c] = cap * tanh(x[c] / cap);
        if (p.alibi_slopes) {  // -slope * |d(i) - j|, j = chunk + lane
          const V offset = V::load(s.lane_index + c * W) - V::broadcast(static_cast<T>(query + h.diagonal - chunk));
          x[c] = fmadd(max(offset, V::zero() - offset), V::broadcast(-h.alibi_slope), x[c]);
        }
        if (hides) {
          T* const part = row_scores + c * W;
          x[c].store(part);
          for (int i = 0; i < W; ++i) {
            const int64_t key = chunk + c * W + i;
            const bool visible = c * W + i < keys && in_window(p, h.diagonal, query, key);
            part[i] = visible ? apply_mask<MaskT>(part[i], h, query, key) : neg_inf;
          }
          x[c] = V::load(part);
        }
        x_max = max(x_max, x[c]);
      }
      // Online softmax across the chunk's lanes; a row with no visible key yet subtracts 0.
      const T m_old = state.m();
      const T m_new = std::max(m_old, reduce_max(x_max));
      const T m_sub = m_new == neg_inf ? T(0) : m_new;
      V sum = V::zero();
      for (int c = 0; c < vectors; ++c) {
        const V probs = exp(x[c] - V::broadcast(m_sub));
        probs.store(row_scores + c * W);
        sum = sum + probs;
      }
      s.alpha[r] = std::exp(m_old - m_sub);
      state.m() = m_new;
      state.l() = state.l() * s.alpha[r] + reduce_add(sum);
    }

    constexpr int64_t kPassCols = kDecodeValueVectors<V, RB> * W;
    for (int64_t e0 = 0; e0 < Ev; e0 += kPassCols) {
      const int64_t cols = std::min(kPassCols, Ev - e0);
      const int value_vectors = static_cast<int>((cols + W - 1) / W);
      const int last_cols = static_cast<int>(cols - (value_vectors - 1) * W);
      for_row_blocks<RB>(rows, [&](auto block, int64_t r) {
        accumulate_values_decode_tail<V, decltype(block)::value, kDecodeValueVectors<V, RB>, S>(
            value_vectors, v, chunk, keys, s.scores + r * C, C, s.alpha + r, e0, last_cols, s.acc + r * s.acc_stride,
            s.acc_stride);
      });
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    T* acc = RowState<T>{states + r * (2 + Ev)}.acc();
    for (int64_t e = 0; e < Ev; ++e) acc[e] = s.acc[r * s.acc_stride + e];
  }
}

// Combines the splits of one row: out = sum_s acc_s e^(m_s - m) / sum_s l_s e^(m_s - m),
// m = max_s m_s, in split order, summed into the first split's acc. Splits that saw no visible key
// (m_s = -inf) add nothing; a row with none at all gives zeros (and log-sum-exp -inf).
template <class T, class S>
void merge_splits(T* states, int64_t splits, int64_t split_stride, int64_t head_dim_v, const HeadViews<S>& h,
                  int64_t query) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t sp = 0; sp < splits; ++sp) m = std::max(m, RowState<T>{states + sp * split_stride}.m());
  const T m_sub = m == -std::numeric_limits<T>::infinity() ? T(0) : m;
  T* const sum = RowState<T>{states}.acc();
  T l = 0;
  for (int64_t sp = 0; sp < splits; ++sp) {
    const RowState<T> state{states + sp * split_stride};
    const T weight = std::exp(state.m() - m_sub);
    l += state.l() * weight;
    for (int64_t e = 0; e < head_dim_v; ++e) sum[e] = sp == 0 ? state.acc()[e] * weight : sum[e] + state.acc()[e] * weight;
  }
  const T inv_l = l == T(0) ? T(0) : T(1) / l;
  if (h.lse) h.lse[query * h.lse_row] = l == T(0) ? -std::numeric_limits<T>::infinity() : m_sub + std::log(l);
  for (int64_t e = 0; e < head_dim_v; ++e) h.out(query, e) = to_storage<S>(sum[e] * inv_l);
}

}  // namespace fastattn::FASTATTN_CPU_ISA
