// The one struct the kernels see: raw pointers, sizes and element strides, filled by the binding.
#pragma once

#include <cstdint>

namespace fastattn {

// Batch dims beyond heads; every operand is viewed as [batch..., head, row, col].
inline constexpr int kMaxBatchDims = 6;

enum class DType : int32_t { float32, float64, float16, bfloat16 };

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
  DType dtype;  // of q, k, v and out; float16 and bfloat16 are computed in float32

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

  // Which keys row i sees (fastattn/reference.py draws them): with d(i) = i + (align_bottom_right ?
  // seqlen_k_b - seqlen_q : 0), key j is visible iff j < seqlen_k_b, d(i) - window_left <= j and
  // j <= d(i) + window_right, where a negative window side is unbounded. causal is window_right = 0,
  // folded in by the binding.
  bool align_bottom_right;
  int64_t window_left, window_right;
  const int64_t* kv_lengths;  // seqlen_k_b per batch element (batch strides below), or null: seqlen_k
  Strides kv_lengths_strides;

  double softcap;               // > 0: a score s becomes softcap * tanh(s / softcap), before bias and mask
  const double* alibi_slopes;   // [batch..., Hq] or null: adds -slope * |d(i) - j|
  Strides alibi_strides;        // batch and head

  void* lse_ptr;  // [batch..., Hq, L] of the compute dtype (float32 for halves), or null: log-sum-exp of each row's scores
  Strides lse_strides;  // batch, head, and row (in .row)

  int32_t num_threads;

  // Asked by the calling thread between work items, at most every few tens of milliseconds, whether
  // to stop early (the binding checks for Ctrl-C); the output is then incomplete. Null: never asked.
  bool (*interrupted)(void* context);
  void* interrupted_context;
};

}  // namespace fastattn
