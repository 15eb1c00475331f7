// The CPU attention kernel, written once over a small vector vocabulary (vec_generic.h is its
// specification, vec_math.h what is built from it) and compiled once per ISA inside that ISA's
// namespace. This file splits the work and hands it to the tile (prefill) or decode kernel.
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <new>
#include <type_traits>
#include <vector>

#include "cpu/decode_kernel.h"
#include "cpu/kernel_common.h"
#include "cpu/tile_kernel.h"
#include "params.h"

#ifndef FASTATTN_CPU_ISA
#error "define FASTATTN_CPU_ISA (the ISA's namespace) before including this header"
#endif

namespace fastattn::FASTATTN_CPU_ISA {

// Items 0 .. count-1 split into one contiguous run per thread. A thread takes items from the front
// of its own run; when that is empty it takes them one by one from the back of the longest other
// run. Runs keep each thread on its own heads: two cores reading the same K and V at once ran up
// to 15% slower than two cores on different heads (the lines bounce between their L2s), and
// dynamic scheduling alone mixes them. Taking from the back balances uneven (causal) items and
// a core slowed by a neighbour. Items are a few microseconds or more, so a mutex per run is cheap.
class WorkRuns {
 public:
  WorkRuns(int64_t count, int threads) : runs_(threads) {
    for (int t = 0; t < threads; ++t) {
      runs_[t].front = count * t / threads;
      runs_[t].back = count * (t + 1) / threads;
    }
  }

  bool next(int thread, int64_t& item) {
    if (take(runs_[thread], item, /*from_front=*/true)) return true;
    for (;;) {
      Run* longest = nullptr;
      int64_t most = 0;
      for (Run& run : runs_) {
        std::lock_guard<std::mutex> lock(run.mutex);
        if (run.back - run.front > most) {
          most = run.back - run.front;
          longest = &run;
        }
      }
      if (longest == nullptr) return false;
      if (take(*longest, item, /*from_front=*/false)) return true;
    }
  }

 private:
  struct alignas(64) Run {
    std::mutex mutex;
    int64_t front = 0, back = 0;
  };
  static bool take(Run& run, int64_t& item, bool from_front) {
    std::lock_guard<std::mutex> lock(run.mutex);
    if (run.front == run.back) return false;
    item = from_front ? run.front++ : --run.back;
    return true;
  }
  std::vector<Run> runs_;
};

// Whether to stop at the next work item: the calling thread (OpenMP's thread 0) asks
// p.interrupted every kPollInterval, and its first "yes" stops every thread. Work items last
// microseconds to milliseconds, so a call stops within a few milliseconds of the question.
class Interruption {
 public:
  explicit Interruption(const AttentionParams& p) : p_(p) {}

  bool stop(int thread) {
    if (stopped_.load(std::memory_order_relaxed)) return true;
    if (thread != 0 || p_.interrupted == nullptr) return false;
    const auto now = std::chrono::steady_clock::now();
    if (now < next_poll_) return false;
    next_poll_ = now + kPollInterval;
    if (!p_.interrupted(p_.interrupted_context)) return false;
    stopped_.store(true, std::memory_order_relaxed);
    return true;
  }

 private:
  static constexpr std::chrono::milliseconds kPollInterval{20};
  const AttentionParams& p_;
  std::atomic<bool> stopped_{false};
  std::chrono::steady_clock::time_point next_poll_ = std::chrono::steady_clock::now() + kPollInterval;
};

// No more threads than work items: waking an idle one costs a few microseconds, as much as a
// whole small call.
inline int thread_count(const AttentionParams& p, int64_t work_items) {
  return static_cast<int>(std::min<int64_t>(p.num_threads, work_items));
}

// Head `flat_head` of batch_count(p) * num_heads_q, batch elements outermost.
template <class S>
HeadViews<S> flat_head_views(const AttentionParams& p, int64_t flat_head) {
  return head_views<S>(p, BatchIndex(p, flat_head / p.num_heads_q), flat_head % p.num_heads_q);
}

// While a thread works on a head, the K and V of the one after it (usually its next work: runs are
// contiguous) are requested into L2. When a call's K and V exceed the caches, each head's first tile
// otherwise waits on memory; with the requests ViT-B/16 at batch 64 ran 8-11% faster, BERT-base at
// batch 32 0.5-10% (Intel, 2 threads, noisy). Only a head that fits in L2 beside the current one,
// only for calls whose K and V the caches do not hold (below that the requests only cost: 2,6,197,80
// up to 5% slower); a head that shares the current K and V (GQA) is there already.
template <class S>
void prefetch_next_head(const AttentionParams& p, const HeadViews<S>& current, int64_t next_flat_head,
                        NextHeadPrefetch& prefetch) {
  constexpr int64_t kMaxHeadBytes = int64_t{512} << 10;  // a quarter of Intel's 2 MB L2, half of Zen 4's
  constexpr int64_t kMinCallBytes = int64_t{8} << 20;    // beyond two L2s and a share of L3
  prefetch.stop();
  const int64_t kv_head_bytes = p.seqlen_k * (p.head_dim + p.head_dim_v) * int64_t{sizeof(S)};
  if (kv_head_bytes * batch_count(p) * p.num_heads_k < kMinCallBytes) return;
  if (next_flat_head >= batch_count(p) * p.num_heads_q) return;
  const HeadViews<S> next = flat_head_views<S>(p, next_flat_head);
  if (next.k.data == current.k.data && next.v.data == current.v.data) return;
  if (next.seqlen_k * (p.head_dim + p.head_dim_v) * int64_t{sizeof(S)} > kMaxHeadBytes) return;
  prefetch.start(next.k, next.v, next.seqlen_k, p.head_dim, p.head_dim_v);
}

// Work items (batch element, query head, query tile) in WorkRuns. Consecutive items are tiles of one
// head, so its K and V stay in L2 (heads in turn ran at 2/3 of the speed); within a head the last
// tiles, the heaviest under causal, come first.
template <class V, class S, class MaskT, class Blocks>
void run_tiles(const AttentionParams& p) {
  constexpr int M = Tile<V>::kBlockM;
  const int64_t tiles_per_head = (p.seqlen_q + M - 1) / M;
  const int64_t work_items = batch_count(p) * p.num_heads_q * tiles_per_head;
  const int threads = thread_count(p, work_items);
  WorkRuns runs(work_items, threads);
  Interruption interruption(p);
  std::atomic<bool> out_of_memory{false};
#pragma omp parallel num_threads(threads)
  {
    typename Blocks::Scratch scratch(p);
    if (!scratch.ok()) out_of_memory = true;
    [[maybe_unused]] const typename Blocks::Thread thread_state;  // held while the thread works
    const int thread = omp_get_thread_num();
    int64_t current_head = -1;  // flat (batch element, query head)
    for (int64_t item; scratch.ok() && !interruption.stop(thread) && runs.next(thread, item);) {
      const int64_t tile = tiles_per_head - 1 - item % tiles_per_head;
      const HeadViews<S> h = flat_head_views<S>(p, item / tiles_per_head);
      if (item / tiles_per_head != current_head) {
        current_head = item / tiles_per_head;
        prefetch_next_head(p, h, current_head + 1, scratch.next_head_prefetch);
      }
      attend_tile<V, MaskT, Blocks>(p, h, tile * M, scratch);
    }
  }
  if (out_of_memory) throw std::bad_alloc();
}

// Work items (batch element, head group, key split) in WorkRuns, then one merge per output row.
// A run is consecutive splits of the same heads, so each thread streams through its own part of
// K and V and its prefetches run on into its next split (dynamic scheduling interleaved the
// threads' splits: up to 20% slower on Zen 4, measured on the grid's decode shapes).
template <class V, class S, class MaskT>
void run_decode(const AttentionParams& p) {
  using T = typename V::value_type;
  const DecodeShape shape(p);
  const int64_t groups = shape.groups(p);
  const int64_t work_items = batch_count(p) * groups * shape.splits;
  const int64_t split_stride = shape.rows * (2 + p.head_dim_v);  // one RowState per row
  AlignedBuffer<T> states(work_items * split_stride);  // O(output x splits), never O(L x S)
  if (states.data() == nullptr) throw std::bad_alloc();
  const int threads = thread_count(p, work_items);
  WorkRuns runs(work_items, threads);
  Interruption interruption(p);
  std::atomic<bool> out_of_memory{false};
#pragma omp parallel num_threads(threads)
  {
    DecodeScratch<V> scratch(shape.rows, p.head_dim, p.head_dim_v);
    if (!scratch.ok()) out_of_memory = true;
    const int thread = omp_get_thread_num();
    for (int64_t item; scratch.ok() && !interruption.stop(thread) && runs.next(thread, item);) {
      const int64_t split = item % shape.splits;
      const int64_t group = item / shape.splits % groups;
      const BatchIndex batch(p, item / shape.splits / groups);
      HeadViews<S> heads[Decode::kMaxRows];
      for (int64_t g = 0; g < shape.group_heads; ++g)
        heads[g] = head_views<S>(p, batch, group * shape.group_heads + g);
      const int64_t key_begin = split * Decode::kSplitKeys;
      const int64_t key_end = std::min(p.seqlen_k, key_begin + Decode::kSplitKeys);
      decode_split<V, MaskT>(p, heads, shape, key_begin, key_end, scratch, states.data() + item * split_stride);
    }
#pragma omp barrier
    // After a failed allocation or an interruption some splits were never computed: merge nothing.
#pragma omp for schedule(static)
    for (int64_t row_item = 0; row_item < batch_count(p) * groups * shape.rows; ++row_item) {
      if (out_of_memory || interruption.stop(-1)) continue;
      const int64_t row = row_item % shape.rows;
      const int64_t group = row_item / shape.rows % groups;
      const int64_t batch_flat = row_item / shape.rows / groups;
      const BatchIndex batch(p, batch_flat);
      const int64_t head = group * shape.group_heads + row / p.seqlen_q;
      T* first_split = states.data() + (batch_flat * groups + group) * shape.splits * split_stride;
      merge_splits(first_split + row * (2 + p.head_dim_v), shape.splits, split_stride, p.head_dim_v,
                   head_views<S>(p, batch, head), row % p.seqlen_q);
    }
  }
  if (out_of_memory) throw std::bad_alloc();
}

// V: the compute vector (float for half precision); S: the storage type of q, k, v and out;
// Blocks: the prefill kernel's matrix products (tile_kernel.h).
template <class V, class S = typename V::value_type, class Blocks = FmaBlocks<V, S>>
void attention_forward_typed(const AttentionParams& p) {
  if (batch_count(p) * p.num_heads_q * p.seqlen_q == 0) return;
  visit_mask_type(p, [&](auto mask_type) {
    using MaskT = typename decltype(mask_type)::type;
    if (use_decode_kernel(p))
      run_decode<V, S, MaskT>(p);
    else
      run_tiles<V, S, MaskT, Blocks>(p);
  });
}

}  // namespace fastattn::FASTATTN_CPU_ISA
