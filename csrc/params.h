// The one struct the kernels see: raw pointers, sizes and element strides, filled by the binding.
#pragma once

#include <cstdint>

namespace fastattn {

// Batch dims beyond heads; every operand is viewed as [batch..., head, row, col].
inline constexpr int kMaxBatchDims = 6;

enum class DType : int32_t { float32, float64 };

enum class MaskKind : int32_t {
  none,
  boolean,   // true = the key may be attended
  additive,  // added to the scaled scores; -inf hides the key
};

// Element (not byte) strides of one operand. Zero strides express broadcasting.
struct Strides {
  int64_t batch[kMaxBatchDims];
  int64_t head;
  int64_t row;
  int64_t col;
};

struct AttentionParams {
  DType dtype;  // of q, k, v and out

  int32_t batch_ndim;
  int64_t batch_shape[kMaxBatchDims];
  int64_t num_heads_q, num_heads_k, num_heads_v;  // query head h reads key head h / (num_heads_q / num_heads_k)
  int64_t seqlen_q, seqlen_k;
  int64_t head_dim, head_dim_v;

  const void* q_ptr;
  const void* k_ptr;
  const void* v_ptr;
  void* out_ptr;
  Strides q_strides, k_strides, v_strides, out_strides;

  MaskKind mask_kind;
  DType mask_dtype;    // for MaskKind::additive
  const void* mask_ptr;
  Strides mask_strides;  // [batch..., head, query row, key]

  double scale;  // multiplies q k^T before the mask is added
  bool causal;   // key j visible to query i iff j <= i (top-left diagonal)

  int32_t num_threads;
};

}  // namespace fastattn
