// The fused attention kernel, written once over a small vector vocabulary (see vec_generic.h and
// vec_math.h) and compiled once per ISA inside that ISA's namespace.
//
// Layout: queries live in SIMD lanes. A tile of BLOCK_M queries is packed transposed,
// q_tile[d][BLOCK_M], already multiplied by scale * log2(e), so scores come out in base-2 units
// and the softmax needs exp2 only. For each block of BLOCK_N keys:
//   scores[j][BLOCK_M] = sum_d k[j][d] * q_tile[d][:]      (k[j][d] broadcast, no packing of K)
//   online softmax lane by lane: m_i (running max), l_i (running sum), alpha = exp2(m_old - m_new)
//   acc[e][BLOCK_M] = alpha * acc + sum_j v[j][e] * p[j][:]  (v[j][e] broadcast)
// so row maxima and sums never need a horizontal reduction, and K and V are read in place
// with any strides. The epilogue transposes acc / l_i into the output rows.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <new>
#include <type_traits>

#include "cpu/vec_math.h"
#include "params.h"

#ifndef FASTATTN_CPU_ISA
#error "define FASTATTN_CPU_ISA (the ISA's namespace) before including this header"
#endif

namespace fastattn::FASTATTN_CPU_ISA {

inline constexpr double kLog2e = 1.4426950408889634;

// A 2-D view of one head of one operand: element (i, j) sits at data[i * row + j * col].
template <class T>
struct MatrixView {
  T* data;
  int64_t row, col;
  T& operator()(int64_t i, int64_t j) const { return data[i * row + j * col]; }
};

// Register blocking: a micro-step keeps kSteps x kVectors accumulators, kVectors operands and one
// broadcast in registers: 4 x 3 + 3 + 1 = 16 (SSE2, AVX2) or 8 x 3 + 3 + 1 = 28 of 32 (AVX-512).
template <class V>
struct Tile {
  static constexpr int kVectors = 3;                           // SIMD vectors of queries per tile
  static constexpr int kBlockM = kVectors * V::size;           // queries per tile
  static constexpr int kBlockN = 64;                           // keys per online-softmax step
  static constexpr int kSteps = V::kRegisters >= 32 ? 8 : 4;   // keys (or value columns) per micro-step
};

// Per-thread working memory, allocated once per call and thread: O(tile), never O(L x S).
template <class V>
struct Scratch {
  using T = typename V::value_type;
  using Cfg = Tile<V>;
  T* q_tile;   // [head_dim][BLOCK_M], pre-scaled queries, transposed
  T* scores;   // [BLOCK_N][BLOCK_M], scores then probabilities
  T* acc;      // [head_dim_v][BLOCK_M], unnormalised output, transposed
  T* row_max;  // [BLOCK_M]
  T* row_sum;  // [BLOCK_M]
  void* memory;

  Scratch(int64_t head_dim, int64_t head_dim_v) {
    const int64_t m = Cfg::kBlockM;
    const int64_t count = (head_dim + Cfg::kBlockN + head_dim_v + 2) * m;
    // Every piece is a multiple of BLOCK_M elements, hence of the vector width: all stay aligned.
    memory = std::aligned_alloc(64, ((count * sizeof(T) + 63) / 64) * 64);
    T* base = static_cast<T*>(memory);
    q_tile = base;
    scores = q_tile + head_dim * m;
    acc = scores + Cfg::kBlockN * m;
    row_max = acc + head_dim_v * m;
    row_sum = row_max + m;
  }
  ~Scratch() { std::free(memory); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// Everything one work item (batch element, query head, query tile) needs.
template <class T>
struct HeadViews {
  MatrixView<const T> q, k, v;
  MatrixView<T> out;
  const void* mask;  // element (i, j) at mask + i * mask_row + j * mask_col, in mask_dtype units
  int64_t mask_row, mask_col;
};

// Loads the query tile transposed and pre-scaled; rows past the end are zero.
template <class V>
void pack_query_tile(const MatrixView<const typename V::value_type>& q, int64_t row_begin,
                     int64_t rows, int64_t head_dim, typename V::value_type q_scale, Scratch<V>& s) {
  using T = typename V::value_type;
  constexpr int M = Tile<V>::kBlockM;
  for (int64_t d = 0; d < head_dim; ++d) {
    T* dst = s.q_tile + d * M;
    for (int64_t r = 0; r < rows; ++r) dst[r] = q(row_begin + r, d) * q_scale;
    for (int64_t r = rows; r < M; ++r) dst[r] = T(0);
  }
}

// scores[j][:] = k[key_begin + j] . q_tile for NK consecutive keys, accumulated in registers.
template <class V, int NK>
void score_keys(const MatrixView<const typename V::value_type>& k, int64_t key_begin,
                int64_t head_dim, const typename V::value_type* q_tile,
                typename V::value_type* scores) {
  constexpr int R = Tile<V>::kVectors, W = V::size, M = Tile<V>::kBlockM;
  V acc[NK][R];
  for (int j = 0; j < NK; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = V::zero();
  for (int64_t d = 0; d < head_dim; ++d) {
    V q[R];
    for (int r = 0; r < R; ++r) q[r] = V::load(q_tile + d * M + r * W);
    for (int j = 0; j < NK; ++j) {
      const V key = V::broadcast(k(key_begin + j, d));
      for (int r = 0; r < R; ++r) acc[j][r] = fmadd(key, q[r], acc[j][r]);
    }
  }
  for (int j = 0; j < NK; ++j)
    for (int r = 0; r < R; ++r) acc[j][r].store(scores + j * M + r * W);
}

// The last keys % kSteps keys of a block, with a micro-step of exactly that many keys.
template <class V, int NK = Tile<V>::kSteps - 1>
void score_key_tail(int keys, const MatrixView<const typename V::value_type>& k, int64_t key_begin,
                    int64_t head_dim, const typename V::value_type* q_tile, typename V::value_type* scores) {
  if constexpr (NK > 0) {
    if (keys == NK) return score_keys<V, NK>(k, key_begin, head_dim, q_tile, scores);
    score_key_tail<V, NK - 1>(keys, k, key_begin, head_dim, q_tile, scores);
  }
}

template <class V>
void score_block(const MatrixView<const typename V::value_type>& k, int64_t key_begin, int keys,
                 int64_t head_dim, Scratch<V>& s) {
  constexpr int KS = Tile<V>::kSteps, M = Tile<V>::kBlockM;
  int j = 0;
  for (; j + KS <= keys; j += KS) score_keys<V, KS>(k, key_begin + j, head_dim, s.q_tile, s.scores + j * M);
  score_key_tail<V>(keys - j, k, key_begin + j, head_dim, s.q_tile, s.scores + j * M);
}

// Hides invisible keys (-inf) and adds the float mask, in base-2 units, for the rows < rows_valid.
// Only blocks that cross the causal diagonal or have a mask come here.
template <class V, class MaskT>
void mask_block(const HeadViews<typename V::value_type>& h, bool causal, int64_t row_begin,
                int64_t rows_valid, int64_t key_begin, int keys, Scratch<V>& s) {
  using T = typename V::value_type;
  constexpr int M = Tile<V>::kBlockM;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const MaskT* mask = static_cast<const MaskT*>(h.mask);
  for (int j = 0; j < keys; ++j) {
    const int64_t key = key_begin + j;
    T* row = s.scores + j * M;
    for (int64_t r = 0; r < rows_valid; ++r) {
      const int64_t query = row_begin + r;
      bool visible = !causal || key <= query;
      T bias = 0;
      if constexpr (std::is_same_v<MaskT, uint8_t>) {  // NumPy bool: one byte, nonzero = true
        visible = visible && mask[query * h.mask_row + key * h.mask_col] != 0;
      } else if constexpr (!std::is_same_v<MaskT, void>) {
        bias = static_cast<T>(mask[query * h.mask_row + key * h.mask_col] * kLog2e);
      }
      row[r] = visible ? row[r] + bias : neg_inf;
    }
  }
}

// Online softmax over one block, lane by lane: updates m_i and l_i, turns scores into
// probabilities and rescales acc by alpha = exp2(m_old - m_new).
template <class V>
void softmax_block(int keys, int64_t head_dim_v, Scratch<V>& s) {
  using T = typename V::value_type;
  constexpr int R = Tile<V>::kVectors, W = V::size, M = Tile<V>::kBlockM;
  for (int r = 0; r < R; ++r) {
    const int lane0 = r * W;
    const V m_old = V::load(s.row_max + lane0);
    V m_new = m_old;
    for (int j = 0; j < keys; ++j) m_new = max(m_new, V::load(s.scores + j * M + lane0));
    // A row that has seen no visible key keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
    const V m_sub = replace_neg_inf(m_new, T(0));
    const V alpha = exp2(m_old - m_sub);
    V sum = V::zero();
    for (int j = 0; j < keys; ++j) {
      const V p = exp2(V::load(s.scores + j * M + lane0) - m_sub);
      p.store(s.scores + j * M + lane0);
      sum = sum + p;
    }
    fmadd(V::load(s.row_sum + lane0), alpha, sum).store(s.row_sum + lane0);
    m_new.store(s.row_max + lane0);
    for (int64_t e = 0; e < head_dim_v; ++e) {
      T* a = s.acc + e * M + lane0;
      (V::load(a) * alpha).store(a);
    }
  }
}

// acc[e][:] += sum_j v[key_begin + j][e] * p[j][:] for NE consecutive output columns.
template <class V, int NE>
void accumulate_values(const MatrixView<const typename V::value_type>& v, int64_t key_begin,
                       int keys, int64_t col_begin, Scratch<V>& s) {
  constexpr int R = Tile<V>::kVectors, W = V::size, M = Tile<V>::kBlockM;
  V acc[NE][R];
  for (int c = 0; c < NE; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = V::load(s.acc + (col_begin + c) * M + r * W);
  for (int j = 0; j < keys; ++j) {
    V p[R];
    for (int r = 0; r < R; ++r) p[r] = V::load(s.scores + j * M + r * W);
    for (int c = 0; c < NE; ++c) {
      const V value = V::broadcast(v(key_begin + j, col_begin + c));
      for (int r = 0; r < R; ++r) acc[c][r] = fmadd(value, p[r], acc[c][r]);
    }
  }
  for (int c = 0; c < NE; ++c)
    for (int r = 0; r < R; ++r) acc[c][r].store(s.acc + (col_begin + c) * M + r * W);
}

template <class V, int NE = Tile<V>::kSteps - 1>
void accumulate_value_tail(int cols, const MatrixView<const typename V::value_type>& v, int64_t key_begin,
                           int keys, int64_t col_begin, Scratch<V>& s) {
  if constexpr (NE > 0) {
    if (cols == NE) return accumulate_values<V, NE>(v, key_begin, keys, col_begin, s);
    accumulate_value_tail<V, NE - 1>(cols, v, key_begin, keys, col_begin, s);
  }
}

template <class V>
void accumulate_block(const MatrixView<const typename V::value_type>& v, int64_t key_begin,
                      int keys, int64_t head_dim_v, Scratch<V>& s) {
  constexpr int CS = Tile<V>::kSteps;
  int64_t e = 0;
  for (; e + CS <= head_dim_v; e += CS) accumulate_values<V, CS>(v, key_begin, keys, e, s);
  accumulate_value_tail<V>(static_cast<int>(head_dim_v - e), v, key_begin, keys, e, s);
}

// One query tile of one head against all the keys it can see.
template <class V>
void attend_tile(const AttentionParams& p, const HeadViews<typename V::value_type>& h,
                 int64_t row_begin, Scratch<V>& s) {
  using T = typename V::value_type;
  constexpr int M = Tile<V>::kBlockM, N = Tile<V>::kBlockN;
  const int64_t rows = std::min<int64_t>(M, p.seqlen_q - row_begin);

  pack_query_tile<V>(h.q, row_begin, rows, p.head_dim, static_cast<T>(p.scale * kLog2e), s);
  for (int i = 0; i < M; ++i) {
    s.row_max[i] = -std::numeric_limits<T>::infinity();
    s.row_sum[i] = T(0);
  }
  for (int64_t i = 0; i < p.head_dim_v * M; ++i) s.acc[i] = T(0);

  // Causal: the tile's last row sees keys up to row_begin + rows - 1; later blocks are skipped.
  const int64_t key_end = p.causal ? std::min(p.seqlen_k, row_begin + rows) : p.seqlen_k;
  for (int64_t key_begin = 0; key_begin < key_end; key_begin += N) {
    const int keys = static_cast<int>(std::min<int64_t>(N, key_end - key_begin));
    score_block<V>(h.k, key_begin, keys, p.head_dim, s);
    // Only blocks with a key past the tile's first row cross the diagonal.
    const bool crosses_diagonal = p.causal && key_begin + keys - 1 > row_begin;
    switch (p.mask_kind) {
      case MaskKind::none:
        if (crosses_diagonal) mask_block<V, void>(h, true, row_begin, rows, key_begin, keys, s);
        break;
      case MaskKind::boolean:
        mask_block<V, uint8_t>(h, crosses_diagonal, row_begin, rows, key_begin, keys, s);
        break;
      case MaskKind::additive:
        if (p.mask_dtype == DType::float32)
          mask_block<V, float>(h, crosses_diagonal, row_begin, rows, key_begin, keys, s);
        else
          mask_block<V, double>(h, crosses_diagonal, row_begin, rows, key_begin, keys, s);
        break;
    }
    softmax_block<V>(keys, p.head_dim_v, s);
    accumulate_block<V>(h.v, key_begin, keys, p.head_dim_v, s);
  }

  // Epilogue: out = acc / l_i; rows that saw no visible key (l_i = 0) give zeros.
  for (int64_t r = 0; r < rows; ++r) {
    const T inv_sum = s.row_sum[r] == T(0) ? T(0) : T(1) / s.row_sum[r];
    for (int64_t e = 0; e < p.head_dim_v; ++e) h.out(row_begin + r, e) = s.acc[e * M + r] * inv_sum;
  }
}

inline int64_t offset_of(const Strides& st, const int64_t* batch_index, int batch_ndim, int64_t head) {
  int64_t off = head * st.head;
  for (int d = 0; d < batch_ndim; ++d) off += batch_index[d] * st.batch[d];
  return off;
}

template <class V>
void attention_forward_typed(const AttentionParams& p) {
  using T = typename V::value_type;
  constexpr int M = Tile<V>::kBlockM;
  int64_t batch_count = 1;
  for (int d = 0; d < p.batch_ndim; ++d) batch_count *= p.batch_shape[d];
  const int64_t tiles_per_head = (p.seqlen_q + M - 1) / M;
  const int64_t work_items = batch_count * p.num_heads_q * tiles_per_head;
  if (work_items == 0) return;
  const int64_t heads_per_k = p.num_heads_q / p.num_heads_k;
  const int64_t heads_per_v = p.num_heads_q / p.num_heads_v;
  const int64_t mask_item_size = p.mask_kind == MaskKind::boolean ? 1
                                 : p.mask_dtype == DType::float64 ? 8
                                                                  : 4;
  bool out_of_memory = false;

#pragma omp parallel num_threads(p.num_threads)
  {
    Scratch<V> scratch(p.head_dim, p.head_dim_v);
    if (scratch.memory == nullptr) {
#pragma omp atomic write
      out_of_memory = true;
    }
    // Dynamic schedule; within a head, later (heavier, under causal) tiles are handed out first.
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < work_items; ++item) {
      if (scratch.memory == nullptr) continue;
      const int64_t tile = tiles_per_head - 1 - item % tiles_per_head;
      const int64_t head = (item / tiles_per_head) % p.num_heads_q;
      int64_t batch_flat = item / tiles_per_head / p.num_heads_q;
      int64_t batch_index[kMaxBatchDims];
      for (int d = p.batch_ndim - 1; d >= 0; --d) {
        batch_index[d] = batch_flat % p.batch_shape[d];
        batch_flat /= p.batch_shape[d];
      }
      auto view = [&](const void* base, const Strides& st, int64_t h) {
        const T* data = static_cast<const T*>(base) + offset_of(st, batch_index, p.batch_ndim, h);
        return MatrixView<const T>{data, st.row, st.col};
      };
      HeadViews<T> views;
      views.q = view(p.q_ptr, p.q_strides, head);
      views.k = view(p.k_ptr, p.k_strides, head / heads_per_k);
      views.v = view(p.v_ptr, p.v_strides, head / heads_per_v);
      views.out = MatrixView<T>{static_cast<T*>(p.out_ptr) +
                                    offset_of(p.out_strides, batch_index, p.batch_ndim, head),
                                p.out_strides.row, p.out_strides.col};
      views.mask = nullptr;
      if (p.mask_kind != MaskKind::none) {
        views.mask = static_cast<const char*>(p.mask_ptr) +
                     mask_item_size * offset_of(p.mask_strides, batch_index, p.batch_ndim, head);
      }
      views.mask_row = p.mask_strides.row;
      views.mask_col = p.mask_strides.col;
      attend_tile<V>(p, views, tile * M, scratch);
    }
  }
  if (out_of_memory) throw std::bad_alloc();
}

}  // namespace fastattn::FASTATTN_CPU_ISA
