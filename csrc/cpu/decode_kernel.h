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
};

// The rows of one work item: row r is query r % seqlen_q of the group's head r / seqlen_q.
// Under causal (top-left) no row sees a key past seqlen_q - 1, so only keys < key_end are split.
struct DecodeShape {
  int64_t group_heads, rows, key_end, splits;
  explicit DecodeShape(const AttentionParams& p)
      : group_heads(std::gcd(p.num_heads_q / p.num_heads_k, p.num_heads_q / p.num_heads_v)),
        rows(group_heads * p.seqlen_q),
        key_end(p.causal ? std::min(p.seqlen_k, p.seqlen_q) : p.seqlen_k),
        splits(std::max<int64_t>(1, (key_end + Decode::kSplitKeys - 1) / Decode::kSplitKeys)) {}
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

  DecodeScratch(int64_t rows, int64_t head_dim, int64_t head_dim_v)
      : q_stride((head_dim + W - 1) / W * W),
        acc_stride((head_dim_v + W - 1) / W * W),
        memory(rows * (q_stride + acc_stride) + W),
        q(memory.data()),
        acc(q + rows * q_stride),
        scores(acc + rows * acc_stride) {}
  bool ok() const { return memory.data() != nullptr; }
};

// q_r . k_j over head_dim, both contiguous.
template <class V>
typename V::value_type dot(const typename V::value_type* q, const typename V::value_type* k, int64_t head_dim) {
  constexpr int W = V::size;
  V sum = V::zero();
  int64_t d = 0;
  for (; d + W <= head_dim; d += W) sum = fmadd(V::load(q + d), V::load(k + d), sum);
  if (d < head_dim) sum = fmadd(V::load(q + d), V::load_partial(k + d, static_cast<int>(head_dim - d)), sum);
  return reduce_add(sum);
}

// Decode streams K and V from memory once; asking for the rows a few chunks ahead keeps enough
// loads in flight to approach the memory bandwidth (the hardware prefetcher alone reached a
// fraction of it here).
inline constexpr int64_t kPrefetchDistance = 2;  // chunks

template <class T>
void prefetch_rows(const MatrixView<const T>& m, int64_t first, int64_t end, int64_t cols) {
  for (int64_t i = first; i < end; ++i)
    for (int64_t c = 0; c < cols; c += 64 / sizeof(T)) __builtin_prefetch(&m(i, c));
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

  for (int64_t chunk = key_begin; chunk < key_end; chunk += W) {
    const int keys = static_cast<int>(std::min<int64_t>(W, key_end - chunk));
    const int64_t ahead = chunk + kPrefetchDistance * W, ahead_end = std::min(ahead + W, key_end);
    prefetch_rows(k, ahead, ahead_end, E);
    prefetch_rows(v, ahead, ahead_end, Ev);
    for (int64_t r = 0; r < shape.rows; ++r) {
      const HeadViews<T>& h = heads[r / L];
      const int64_t query = r % L;
      RowState<T> state{states + r * (2 + Ev)};
      for (int j = 0; j < W; ++j) {
        const int64_t key = chunk + j;
        T score = neg_inf;
        if (j < keys && !(p.causal && key > query))
          score = apply_mask<MaskT>(dot<V>(s.q + r * s.q_stride, &k(key, 0), E), h, query, key);
        s.scores[j] = score;
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

      T* acc = s.acc + r * s.acc_stride;
      for (int64_t e = 0; e < Ev; e += W) {
        const int cols = static_cast<int>(std::min<int64_t>(W, Ev - e));
        V a = V::load(acc + e) * V::broadcast(alpha);
        for (int j = 0; j < keys; ++j) {
          const V value = cols == W ? V::load(&v(chunk + j, e)) : V::load_partial(&v(chunk + j, e), cols);
          a = fmadd(V::broadcast(s.scores[j]), value, a);
        }
        a.store(acc + e);
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
// with none at all gives zeros.
template <class T>
void merge_splits(const T* states, int64_t splits, int64_t split_stride, int64_t head_dim_v,
                  const MatrixView<T>& out, int64_t query) {
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
  for (int64_t e = 0; e < head_dim_v; ++e) out(query, e) *= inv_l;
}

}  // namespace fastattn::FASTATTN_CPU_ISA
