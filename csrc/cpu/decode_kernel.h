// Decode kernel: few query rows per key/value head, as in token-by-token generation, where the
// work is reading K and V once. Keys live in SIMD lanes: a chunk of W keys gives one vector of
// scores per query row (each a dot product reduced across lanes), one online-softmax step, and
// acc[e] += p_j * v_j[e] over contiguous value rows.
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

#include "cpu/kernel_common.h"
#include "cpu/vec_math.h"

#ifndef FASTATTN_CPU_ISA
#error "define FASTATTN_CPU_ISA (the ISA's namespace) before including this header"
#endif

namespace fastattn::FASTATTN_CPU_ISA {

struct Decode {
  static constexpr int64_t kMaxRows = 16;      // query rows one work item serves
  static constexpr int64_t kSplitKeys = 512;  // keys per work item
  // K and V rows are requested this many keys ahead: decode waits on memory, and the hardware
  // prefetcher alone left 10-20% of the streaming-read bandwidth unused (measured: 32 > 64 > 128).
  static constexpr int64_t kPrefetchKeys = 32;
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
  T* scores;  // [W]
  T* lane_index;  // [W]: 0, 1, 2, ...

  DecodeScratch(int64_t rows, int64_t head_dim, int64_t head_dim_v)
      : q_stride((head_dim + W - 1) / W * W),
        acc_stride((head_dim_v + W - 1) / W * W),
        memory(rows * (q_stride + acc_stride) + 2 * W),
        q(memory.data()),
        acc(q + rows * q_stride),
        scores(acc + rows * acc_stride),
        lane_index(scores + W) {
    if (ok())
      for (int i = 0; i < W; ++i) lane_index[i] = static_cast<T>(i);
  }
  bool ok() const { return memory.data() != nullptr; }
};

// scores[j] = q . k[key + j] for NK consecutive keys: NK independent dot products in flight, each
// reduced across lanes at the end. q is zero-padded to whole vectors; k rows are read exactly.
template <class V, int NK>
void score_keys_decode(const typename V::value_type* q, const MatrixView<const typename V::value_type>& k,
                       int64_t key, int64_t head_dim, typename V::value_type* scores) {
  constexpr int W = V::size;
  V sum[NK];
  for (int j = 0; j < NK; ++j) sum[j] = V::zero();
  int64_t d = 0;
  for (; d + W <= head_dim; d += W) {
    const V q_part = V::load(q + d);
    for (int j = 0; j < NK; ++j) sum[j] = fmadd(q_part, V::load(&k(key + j, d)), sum[j]);
  }
  if (d < head_dim) {
    const V q_part = V::load(q + d);
    for (int j = 0; j < NK; ++j)
      sum[j] = fmadd(q_part, V::load_partial(&k(key + j, d), static_cast<int>(head_dim - d)), sum[j]);
  }
  for (int j = 0; j < NK; ++j) scores[j] = reduce_add(sum[j]);
}

// acc[e0 .. e0 + NV * W) = alpha * acc + sum_j p_j v[key + j][e], with NV accumulators in registers;
// the last vector holds last_cols columns.
template <class V, int NV>
void accumulate_values_decode(const MatrixView<const typename V::value_type>& v, int64_t key, int keys,
                              const typename V::value_type* probs, typename V::value_type alpha, int64_t e0,
                              int last_cols, typename V::value_type* acc) {
  constexpr int W = V::size;
  V sum[NV];
  for (int c = 0; c < NV; ++c) sum[c] = V::load(acc + e0 + c * W) * V::broadcast(alpha);
  for (int j = 0; j < keys; ++j) {
    const V p = V::broadcast(probs[j]);
    const typename V::value_type* row = &v(key + j, e0);
    for (int c = 0; c < NV - 1; ++c) sum[c] = fmadd(p, V::load(row + c * W), sum[c]);
    const V last = last_cols == W ? V::load(row + (NV - 1) * W) : V::load_partial(row + (NV - 1) * W, last_cols);
    sum[NV - 1] = fmadd(p, last, sum[NV - 1]);
  }
  for (int c = 0; c < NV; ++c) sum[c].store(acc + e0 + c * W);
}

inline constexpr int kDecodeValueVectors = 8;  // accumulators per pass over a chunk's value rows

template <class V, int NV = kDecodeValueVectors>
void accumulate_values_decode_tail(int vectors, const MatrixView<const typename V::value_type>& v, int64_t key,
                                   int keys, const typename V::value_type* probs, typename V::value_type alpha,
                                   int64_t e0, int last_cols, typename V::value_type* acc) {
  if constexpr (NV > 0) {
    if (vectors == NV) return accumulate_values_decode<V, NV>(v, key, keys, probs, alpha, e0, last_cols, acc);
    accumulate_values_decode_tail<V, NV - 1>(vectors, v, key, keys, probs, alpha, e0, last_cols, acc);
  }
}

// One split of one group: keys [key_begin, key_end) against all rows; leaves each row's m, l and
// acc in `states` ([rows][2 + head_dim_v]).
template <class V, class MaskT>
void decode_split(const AttentionParams& p, const HeadViews<typename V::value_type>* heads,
                  const DecodeShape& shape, int64_t key_begin, int64_t key_end, DecodeScratch<V>& s,
                  typename V::value_type* states) {
  using T = typename V::value_type;
  constexpr int W = V::size;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t L = p.seqlen_q, E = p.head_dim, Ev = p.head_dim_v;
  const T q_scale = static_cast<T>(p.scale);
  const MatrixView<const T>& k = heads[0].k;  // one K and one V head for the whole group
  const MatrixView<const T>& v = heads[0].v;

  for (int64_t r = 0; r < shape.rows; ++r) {
    const MatrixView<const T>& q = heads[r / L].q;
    T* q_row = s.q + r * s.q_stride;
    for (int64_t d = 0; d < s.q_stride; ++d) q_row[d] = d < E ? q(r % L, d) * q_scale : T(0);
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
  for (int64_t chunk = key_begin; chunk < key_end; chunk += W) {
    const int keys = static_cast<int>(std::min<int64_t>(W, key_end - chunk));
    const int64_t ahead = chunk + Decode::kPrefetchKeys;
    for (int64_t j = ahead; j < std::min(key_end, ahead + W); ++j) {
      for (int64_t d = 0; d < E; d += 64 / sizeof(T)) __builtin_prefetch(&k(j, d));
      for (int64_t e = 0; e < Ev; e += 64 / sizeof(T)) __builtin_prefetch(&v(j, e));
    }
    for (int64_t r = 0; r < shape.rows; ++r) {
      const HeadViews<T>& h = heads[r / L];
      const int64_t query = r % L;
      RowState<T> state{states + r * (2 + Ev)};
      const T* q_row = s.q + r * s.q_stride;
      int j = 0;
      for (; j + 4 <= keys; j += 4) score_keys_decode<V, 4>(q_row, k, chunk + j, E, s.scores + j);
      for (; j < keys; ++j) score_keys_decode<V, 1>(q_row, k, chunk + j, E, s.scores + j);
      if (p.softcap > 0 || p.alibi_slopes) {
        V x = V::load(s.scores);
        if (p.softcap > 0) x = cap * tanh(x / cap);
        if (p.alibi_slopes) {  // -slope * |d(i) - j|, j = chunk + lane
          const V offset = V::load(s.lane_index) - V::broadcast(static_cast<T>(query + h.diagonal - chunk));
          x = fmadd(max(offset, V::zero() - offset), V::broadcast(-h.alibi_slope), x);
        }
        x.store(s.scores);
      }
      for (j = 0; j < W; ++j) {
        const int64_t key = chunk + j;
        const bool visible = j < keys && in_window(p, h.diagonal, query, key);
        s.scores[j] = visible ? apply_mask<MaskT>(s.scores[j], h, query, key) : neg_inf;
      }
      // Online softmax across the chunk's lanes; a row with no visible key yet subtracts 0.
      const V scores = V::load(s.scores);
      const T m_old = state.m();
      const T m_new = std::max(m_old, reduce_max(scores));
      const T m_sub = m_new == neg_inf ? T(0) : m_new;
      const V probs = exp(scores - V::broadcast(m_sub));
      const T alpha = std::exp(m_old - m_sub);
      probs.store(s.scores);
      state.m() = m_new;
      state.l() = state.l() * alpha + reduce_add(probs);

      constexpr int64_t kPassCols = kDecodeValueVectors * W;
      for (int64_t e0 = 0; e0 < Ev; e0 += kPassCols) {
        const int64_t cols = std::min(kPassCols, Ev - e0);
        const int vectors = static_cast<int>((cols + W - 1) / W);
        const int last_cols = static_cast<int>(cols - (vectors - 1) * W);
        accumulate_values_decode_tail<V>(vectors, v, chunk, keys, s.scores, alpha, e0, last_cols,
                                         s.acc + r * s.acc_stride);
      }
    }
  }
  for (int64_t r = 0; r < shape.rows; ++r) {
    T* acc = RowState<T>{states + r * (2 + Ev)}.acc();
    for (int64_t e = 0; e < Ev; ++e) acc[e] = s.acc[r * s.acc_stride + e];
  }
}

// Combines the splits of one row: out = sum_s acc_s e^(m_s - m) / sum_s l_s e^(m_s - m),
// m = max_s m_s, in split order. Splits that saw no visible key (m_s = -inf) add nothing; a row
// with none at all gives zeros (and log-sum-exp -inf).
template <class T>
void merge_splits(const T* states, int64_t splits, int64_t split_stride, int64_t head_dim_v,
                  const HeadViews<T>& h, int64_t query) {
  const MatrixView<T>& out = h.out;
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t sp = 0; sp < splits; ++sp) m = std::max(m, RowState<const T>{states + sp * split_stride}.m());
  const T m_sub = m == -std::numeric_limits<T>::infinity() ? T(0) : m;
  T l = 0;
  for (int64_t e = 0; e < head_dim_v; ++e) out(query, e) = T(0);
  for (int64_t sp = 0; sp < splits; ++sp) {
    const RowState<const T> state{states + sp * split_stride};
    const T weight = std::exp(state.m() - m_sub);
    l += state.l() * weight;
    for (int64_t e = 0; e < head_dim_v; ++e) out(query, e) += state.acc()[e] * weight;
  }
  const T inv_l = l == T(0) ? T(0) : T(1) / l;
  if (h.lse) h.lse[query * h.lse_row] = l == T(0) ? -std::numeric_limits<T>::infinity() : m_sub + std::log(l);
  for (int64_t e = 0; e < head_dim_v; ++e) out(query, e) *= inv_l;
}

}  // namespace fastattn::FASTATTN_CPU_ISA
