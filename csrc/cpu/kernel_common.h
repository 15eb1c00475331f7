// Pieces shared by the tile (prefill) and decode kernels: views of one head, mask semantics,
// aligned scratch memory. Compiled inside each ISA's namespace like everything in cpu/.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>

#include "cpu/half.h"
#include "params.h"

#ifndef FASTATTN_CPU_ISA
#error "define FASTATTN_CPU_ISA (the ISA's namespace) before including this header"
#endif

namespace fastattn::FASTATTN_CPU_ISA {

// A 2-D view of one head of one operand: element (i, j) sits at data[i * row + j * col].
template <class T>
struct MatrixView {
  T* data;
  int64_t row, col;
  T& operator()(int64_t i, int64_t j) const { return data[i * row + j * col]; }
};

// Everything about one (batch element, query head): its q and out rows, the k and v heads it reads
// (of storage type S, computed in T), its mask plane (element (i, j) at mask + i * mask_row +
// j * mask_col, in MaskT units), which keys its rows see, its ALiBi slope and where its rows'
// log-sum-exp goes.
template <class S>
struct HeadViews {
  using T = compute_t<S>;
  MatrixView<const S> q, k, v;
  MatrixView<S> out;
  const void* mask;
  int64_t mask_row, mask_col;
  int64_t seqlen_k;   // keys of this batch element (kv_lengths); no key at or past it exists
  int64_t diagonal;   // d(i) = i + diagonal
  T alibi_slope;      // 0 without ALiBi
  T* lse;             // null unless requested; row i at lse[i * lse_row]
  int64_t lse_row;
};

// The keys [begin, end) seen by some row in [first_row, last_row]: d - window_left .. d + window_right,
// within [0, seqlen_k). Rows see contiguous ranges that move right with the row.
struct KeyRange {
  int64_t begin, end;
};

template <class S>
KeyRange visible_keys(const AttentionParams& p, const HeadViews<S>& h, int64_t first_row, int64_t last_row) {
  int64_t begin = 0, end = h.seqlen_k;
  if (p.window_left >= 0) begin = std::max<int64_t>(begin, first_row + h.diagonal - p.window_left);
  if (p.window_right >= 0) end = std::min<int64_t>(end, last_row + h.diagonal + p.window_right + 1);
  return {begin, std::max(begin, end)};
}

// Whether some row in [first_row, last_row] does not see some key in [key_begin, key_end) that the
// range above includes: only such blocks need the per-row window test.
inline bool window_cuts(const AttentionParams& p, int64_t diagonal, int64_t first_row, int64_t last_row,
                        int64_t key_begin, int64_t key_end) {
  return (p.window_left >= 0 && key_begin < last_row + diagonal - p.window_left) ||
         (p.window_right >= 0 && key_end - 1 > first_row + diagonal + p.window_right);
}

// Whether row `query` sees `key` (a key < seqlen_k of its batch element).
inline bool in_window(const AttentionParams& p, int64_t diagonal, int64_t query, int64_t key) {
  const int64_t offset = key - (query + diagonal);  // key - d(i)
  return (p.window_left < 0 || offset >= -p.window_left) && (p.window_right < 0 || offset <= p.window_right);
}

inline int64_t dtype_size(DType dtype) { return dtype == DType::float64 ? 8 : dtype == DType::float32 ? 4 : 2; }

// Splits a flat batch index into the (broadcast) batch dims.
struct BatchIndex {
  int64_t index[kMaxBatchDims];
  BatchIndex(const AttentionParams& p, int64_t flat) {
    for (int d = p.batch_ndim - 1; d >= 0; --d) {
      index[d] = flat % p.batch_shape[d];
      flat /= p.batch_shape[d];
    }
  }
};

inline int64_t batch_count(const AttentionParams& p) {
  int64_t count = 1;
  for (int d = 0; d < p.batch_ndim; ++d) count *= p.batch_shape[d];
  return count;
}

inline int64_t offset_of(const AttentionParams& p, const Strides& st, const BatchIndex& b, int64_t head) {
  int64_t off = head * st.head;
  for (int d = 0; d < p.batch_ndim; ++d) off += b.index[d] * st.batch[d];
  return off;
}

template <class S>
HeadViews<S> head_views(const AttentionParams& p, const BatchIndex& b, int64_t head) {
  using T = compute_t<S>;
  auto input = [&](const void* base, const Strides& st, int64_t h) {
    return MatrixView<const S>{static_cast<const S*>(base) + offset_of(p, st, b, h), st.row, st.col};
  };
  HeadViews<S> views;
  views.q = input(p.q_ptr, p.q_strides, head);
  views.k = input(p.k_ptr, p.k_strides, head / (p.num_heads_q / p.num_heads_k));
  views.v = input(p.v_ptr, p.v_strides, head / (p.num_heads_q / p.num_heads_v));
  views.out = MatrixView<S>{static_cast<S*>(p.out_ptr) + offset_of(p, p.out_strides, b, head),
                            p.out_strides.row, p.out_strides.col};
  const int64_t mask_item_size = p.mask_kind == MaskKind::boolean ? 1 : dtype_size(p.mask_dtype);
  views.mask = p.mask_kind == MaskKind::none
                   ? nullptr
                   : static_cast<const char*>(p.mask_ptr) + mask_item_size * offset_of(p, p.mask_strides, b, head);
  views.mask_row = p.mask_strides.row;
  views.mask_col = p.mask_strides.col;
  views.seqlen_k = p.kv_lengths ? p.kv_lengths[offset_of(p, p.kv_lengths_strides, b, 0)] : p.seqlen_k;
  views.diagonal = p.align_bottom_right ? views.seqlen_k - p.seqlen_q : 0;
  views.alibi_slope = p.alibi_slopes ? static_cast<T>(p.alibi_slopes[offset_of(p, p.alibi_strides, b, head)]) : T(0);
  views.lse = p.lse_ptr ? static_cast<T*>(p.lse_ptr) + offset_of(p, p.lse_strides, b, head) : nullptr;
  views.lse_row = p.lse_strides.row;
  return views;
}

// The mask's element type: void (no mask), uint8_t (NumPy bool, nonzero = may attend), or that of a
// float mask: float, double, float16, bfloat16.
template <class MaskT>
struct MaskType {
  using type = MaskT;
};

template <class F>
void visit_mask_type(const AttentionParams& p, F&& f) {
  switch (p.mask_kind) {
    case MaskKind::none: return f(MaskType<void>{});
    case MaskKind::boolean: return f(MaskType<uint8_t>{});
    case MaskKind::additive:
      switch (p.mask_dtype) {
        case DType::float32: return f(MaskType<float>{});
        case DType::float64: return f(MaskType<double>{});
        case DType::float16: return f(MaskType<float16>{});
        case DType::bfloat16: return f(MaskType<bfloat16>{});
      }
  }
}

// A score after the mask of (query, key): -inf when hidden, plus the float mask.
template <class MaskT, class S, class T = compute_t<S>>
T apply_mask(T score, const HeadViews<S>& h, int64_t query, int64_t key) {
  if constexpr (std::is_void_v<MaskT>) {
    return score;
  } else {
    const MaskT m = static_cast<const MaskT*>(h.mask)[query * h.mask_row + key * h.mask_col];
    if constexpr (std::is_same_v<MaskT, uint8_t>) {
      return m != 0 ? score : -std::numeric_limits<T>::infinity();
    } else if constexpr (is_half_v<MaskT>) {
      return score + to_compute<T>(m);
    } else if constexpr (sizeof(MaskT) > sizeof(T)) {
      // A float64 mask on float32 scores: huge finite values (a "minus infinity" written as
      // -1e300) stay finite, as in the float64 reference, instead of rounding to -inf.
      constexpr MaskT lowest = std::numeric_limits<T>::lowest(), highest = std::numeric_limits<T>::max();
      return score + static_cast<T>(m < lowest && m != -INFINITY ? lowest : m > highest && m != INFINITY ? highest : m);
    } else {
      return score + m;
    }
  }
}

// 64-byte aligned memory for `count` elements of T; data() is null if the allocation failed.
template <class T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t count)
      : data_(static_cast<T*>(std::aligned_alloc(64, ((count * sizeof(T) + 63) / 64 + 1) * 64))), size_(count) {}
  ~AlignedBuffer() { std::free(data_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  T* data() const { return data_; }
  int64_t size() const { return size_; }

 private:
  T* data_;
  int64_t size_;
};

}  // namespace fastattn::FASTATTN_CPU_ISA
