"""The fused attention kernel for NVIDIA GPUs, written with numba-cuda: FlashAttention-2's forward
pass on the CUDA cores (float32 FMAs; Numba cannot reach the tensor cores).

One thread block computes one query tile of BLOCK_M rows of one (batch element, query head):

    prologue   Q^T, pre-multiplied by scale, is staged in shared memory  q_tile [head_dim][BLOCK_M]
    key loop   for each block of BLOCK_N keys some row of the tile sees (window, causal, kv_lengths):
                 scores = Q K^T      K^T staged in chunks of K_CHUNK dims    k_chunk [K_CHUNK][BLOCK_N]
                 transform           softcap, ALiBi bias; -inf outside the row's window or past the
                                     last key; the mask block, staged as float32 addends in p_tile
                                     (coalesced), -inf or + the value
                 online softmax      m_i, l_i, alpha = exp(m_old - m_new); P^T to shared memory
                 acc = alpha acc + P V   V staged in chunks of V_CHUNK keys   v_chunk [V_CHUNK][head_dim]
    epilogue   out = acc / l_i (zeros for a row that saw no visible key); lse = m_i + log(l_i)

Threads form a ROW_GROUPS x KEY_GROUPS grid. Thread (rg, kg) owns the rows rg + ROW_GROUPS * i
(i < ROWS_PER_THREAD), the keys kg + KEY_GROUPS * j of each key block (j < KEYS_PER_THREAD) and the
output columns kg + KEY_GROUPS * e (e < COLS_PER_THREAD): strided ownership makes every shared-memory
access of a warp hit distinct banks or broadcast, with plain 4-byte loads. Its scores, its share of
the output (acc) and its rows' m_i and l_i live in registers. A row's maximum over a key block is
reduced across its KEY_GROUPS threads through shared memory (no warp shuffles, so the CUDA simulator
runs this same code); l_i stays a per-thread partial sum until the epilogue.

Every operand is a flat 1-D view of its memory plus a layout tuple of element strides, so broadcast
(zero-stride) and transposed views are read in place. Inputs are float32 or float16; the staged tiles,
the softmax and the accumulation are float32.
"""

import math
from collections import namedtuple

from numba import cuda, float32, int64, uint64

MASK_NONE, MASK_BOOLEAN, MASK_ADDITIVE = "none", "boolean", "additive"
MASK_KINDS = (MASK_NONE, MASK_BOOLEAN, MASK_ADDITIVE)

MAX_BATCH_DIMS = 6  # as kMaxBatchDims in csrc/params.h
# dims tuple: batch shape (padded with leading 1s to MAX_BATCH_DIMS), then these.
# Window sides < 0 are unbounded (causal is folded in as right = 0); the flags are 0 or 1.
(DIM_HEADS_Q, DIM_Q_PER_K, DIM_Q_PER_V, DIM_SEQLEN_Q, DIM_SEQLEN_K, DIM_HEAD_DIM, DIM_HEAD_DIM_V,
 DIM_WINDOW_LEFT, DIM_WINDOW_RIGHT, DIM_BOTTOM_RIGHT, DIM_HAS_KV_LENGTHS, DIM_HAS_ALIBI, DIM_HAS_LSE) = range(
    MAX_BATCH_DIMS, MAX_BATCH_DIMS + 13)
DIMS_LENGTH = MAX_BATCH_DIMS + 13
# layout tuple of one operand, in elements: origin, batch strides, head, row and column strides.
LAYOUT_ORIGIN, LAYOUT_BATCH, LAYOUT_HEAD, LAYOUT_ROW, LAYOUT_COL = 0, 1, 1 + MAX_BATCH_DIMS, 2 + MAX_BATCH_DIMS, 3 + MAX_BATCH_DIMS
LAYOUT_LENGTH = 4 + MAX_BATCH_DIMS

LOG2E = 1.4426950408889634
FLOAT32_LOWEST = -3.4028234663852886e38

TileConfig = namedtuple(
    "TileConfig", "head_dim block_m block_n rows_per_thread keys_per_thread k_chunk v_chunk min_blocks")

# One configuration per head-dim bucket: a head dim E (and Ev) up to `head_dim` runs the kernel of the
# smallest bucket that holds both. 128 threads per block; each thread keeps a tile of scores (4 x 8;
# 4 x 4 at 128, 2 x 4 at 256) and its share of the output (acc, below) in registers. Shared memory
# stays under 48 KB (no opt-in attribute needed). min_blocks is the launch bound's minimum of resident
# blocks per SM, which caps registers at 65536 / (128 * min_blocks): the largest value for which no
# specialisation spills (bench/gpu_resources.py prints the compiled figures).
TILE_CONFIGS = {
    #        head_dim block_m block_n  rows keys  k_chunk v_chunk min_blocks    acc per thread
    32: TileConfig(32, 64, 64, 4, 8, 32, 32, 2),     # 4 x 4
    64: TileConfig(64, 64, 64, 4, 8, 16, 16, 2),     # 4 x 8
    128: TileConfig(128, 32, 64, 4, 4, 16, 16, 2),   # 4 x 8
    256: TileConfig(256, 16, 64, 2, 4, 16, 8, 2),    # 2 x 16
}
HEAD_DIM_BUCKETS = tuple(sorted(TILE_CONFIGS))
MAX_HEAD_DIM = HEAD_DIM_BUCKETS[-1]


# Every specialisation that ships: (head-dim bucket, mask kind, mask dtype, windowed), for each input
# dtype. windowed: a window (causal is one) hides keys per row; the other variants are run-time.
INPUT_DTYPES = ("float32", "float16")
MASK_VARIANTS = ((MASK_NONE, None), (MASK_BOOLEAN, "bool"), (MASK_ADDITIVE, "float16"),
                 (MASK_ADDITIVE, "float32"), (MASK_ADDITIVE, "float64"))


def specialisations():
    """(input dtype, bucket, mask kind, mask dtype, windowed) of every kernel the launcher can compile."""
    return [(dtype, bucket, kind, mask_dtype, windowed) for dtype in INPUT_DTYPES for bucket in HEAD_DIM_BUCKETS
            for kind, mask_dtype in MASK_VARIANTS for windowed in (False, True)]


def kernel_signature(dtype, mask_dtype):
    """The argument types the launcher passes: flat contiguous arrays (q, k, v, out, mask, kv_lengths,
    ALiBi slopes, lse: float32 whatever the inputs, as on the CPU), the dims and layout tuples, scale, softcap and batch_begin. Without a mask, q
    stands in for it; absent kv_lengths, slopes and lse are one-element placeholders."""
    from numba import types
    array = types.Array(getattr(types, dtype), 1, "C")
    mask = array if mask_dtype is None else types.Array(
        types.boolean if mask_dtype == "bool" else getattr(types, mask_dtype), 1, "C")
    layout = types.UniTuple(types.int64, LAYOUT_LENGTH)
    return (array, array, array, array, mask, types.Array(types.int64, 1, "C"), types.Array(types.float64, 1, "C"),
            types.Array(types.float32, 1, "C"), types.UniTuple(types.int64, DIMS_LENGTH), layout, layout, layout, layout, layout, layout,
            layout, layout, types.float64, types.float64, types.int64)


def head_dim_bucket(head_dim, head_dim_v):
    """The smallest bucket that holds both head dims, or None if they exceed MAX_HEAD_DIM."""
    for bucket in HEAD_DIM_BUCKETS:
        if max(head_dim, head_dim_v) <= bucket:
            return bucket
    return None


def threads_per_block(config):
    return (config.block_m // config.rows_per_thread) * (config.block_n // config.keys_per_thread)


def launch_bounds(config):
    """(max threads per block, min resident blocks per SM) for cuda.jit and compile_ptx."""
    return threads_per_block(config), config.min_blocks


def _padded_stride(block, key_groups):
    # Row stride of the [*][block] tiles a thread writes at (key, row) = (kg + KEY_GROUPS j, rg + ...):
    # stride = 32 / KEY_GROUPS (mod 32) spreads a warp's (kg, rg) pairs over distinct banks.
    return block + 32 // key_groups if key_groups <= 32 else block + 1


def shared_memory_bytes(config):
    """Static shared memory of one block, in bytes (float32 tiles)."""
    key_groups = config.block_n // config.keys_per_thread
    p_stride = _padded_stride(config.block_m, key_groups)
    floats = (config.head_dim * (config.block_m + 1)      # q_tile
              + config.k_chunk * (config.block_n + 1)     # k_chunk
              + config.v_chunk * config.head_dim          # v_chunk
              + config.block_n * p_stride                 # p_tile
              + key_groups * p_stride)                    # row_partials
    return 4 * floats


@cuda.jit(device=True, inline="always")
def nonneg(index):
    """An index known to be >= 0, as unsigned: Numba then emits no negative-index wraparound, which
    would otherwise cost integer instructions and registers on every shared-memory load."""
    return uint64(index)


@cuda.jit(device=True, inline="always")
def operand_offset(layout, batch_index, head):
    """Element offset of (batch element, head, row 0, column 0) in a flat operand."""
    offset = layout[LAYOUT_ORIGIN] + head * layout[LAYOUT_HEAD]
    for d in range(MAX_BATCH_DIMS):
        offset += batch_index[d] * layout[LAYOUT_BATCH + d]
    return offset


@cuda.jit(device=True, inline="always")
def clamp_to_float32(value):
    """A float64 mask value outside float32's finite range, other than +-inf, becomes float32's
    lowest or highest value (as in the CPU kernel): a row whose keys are all -1e300 then averages v,
    as the float64 reference does, instead of becoming a row with no visible key."""
    if value < FLOAT32_LOWEST and value != -math.inf:
        return FLOAT32_LOWEST
    if value > -FLOAT32_LOWEST and value != math.inf:
        return -FLOAT32_LOWEST
    return value


def make_attention_kernel(config, mask_kind, windowed, mask_dtype=None):
    """The Python function of one specialisation; launcher.py jits it, bench/gpu_resources.py
    compiles it to PTX. Tile sizes, the mask kind, the mask dtype ("bool", "float16", "float32" or
    "float64", or None without a mask) and windowed (rows see a window of keys: causal, window=)
    are compile-time constants; align, kv_lengths, softcap, ALiBi and lse are run-time."""
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"mask_kind must be one of {MASK_KINDS}, got {mask_kind!r}")
    HEAD_DIM = config.head_dim
    BLOCK_M, BLOCK_N = config.block_m, config.block_n
    ROWS_PER_THREAD, KEYS_PER_THREAD = config.rows_per_thread, config.keys_per_thread
    K_CHUNK, V_CHUNK = config.k_chunk, config.v_chunk
    ROW_GROUPS, KEY_GROUPS = BLOCK_M // ROWS_PER_THREAD, BLOCK_N // KEYS_PER_THREAD
    THREADS = ROW_GROUPS * KEY_GROUPS
    COLS_PER_THREAD = HEAD_DIM // KEY_GROUPS
    P_STRIDE = _padded_stride(BLOCK_M, KEY_GROUPS)
    # +1: the loads write these tiles transposed, down a column; the padding spreads it over the banks.
    Q_TILE_SHAPE, K_CHUNK_SHAPE = (HEAD_DIM, BLOCK_M + 1), (K_CHUNK, BLOCK_N + 1)
    assert BLOCK_M % ROWS_PER_THREAD == 0 and BLOCK_N % KEYS_PER_THREAD == 0
    assert HEAD_DIM % KEY_GROUPS == 0 and BLOCK_N % V_CHUNK == 0 and HEAD_DIM % K_CHUNK == 0
    HAS_MASK = mask_kind != MASK_NONE
    BOOLEAN_MASK = mask_kind == MASK_BOOLEAN
    WINDOWED = bool(windowed)
    NEG_INF = float32(-math.inf)
    SCALE_LOG2E = float32(LOG2E)
    WIDE_MASK = mask_kind == MASK_ADDITIVE and mask_dtype == "float64"

    def attention_kernel(q, k, v, out, mask, kv_lengths, alibi_slopes, lse, dims, q_layout, k_layout, v_layout,
                         out_layout, mask_layout, kv_layout, alibi_layout, lse_layout, scale, softcap, batch_begin):
        q_tile = cuda.shared.array(Q_TILE_SHAPE, float32)                # Q^T * scale
        k_chunk = cuda.shared.array(K_CHUNK_SHAPE, float32)              # K^T, K_CHUNK dims
        v_chunk = cuda.shared.array((V_CHUNK, HEAD_DIM), float32)        # V, V_CHUNK keys
        p_tile = cuda.shared.array((BLOCK_N, P_STRIDE), float32)         # P^T
        row_partials = cuda.shared.array((KEY_GROUPS, P_STRIDE), float32)  # per-thread row max / sum

        scores = cuda.local.array((ROWS_PER_THREAD, KEYS_PER_THREAD), float32)
        acc = cuda.local.array((ROWS_PER_THREAD, COLS_PER_THREAD), float32)
        m_i = cuda.local.array(ROWS_PER_THREAD, float32)
        l_i = cuda.local.array(ROWS_PER_THREAD, float32)
        q_values = cuda.local.array(ROWS_PER_THREAD, float32)
        k_values = cuda.local.array(KEYS_PER_THREAD, float32)
        v_values = cuda.local.array(COLS_PER_THREAD, float32)

        seqlen_q, seqlen_k = dims[DIM_SEQLEN_Q], dims[DIM_SEQLEN_K]
        head_dim, head_dim_v = dims[DIM_HEAD_DIM], dims[DIM_HEAD_DIM_V]
        row_begin = cuda.blockIdx.x * BLOCK_M
        head = cuda.blockIdx.y
        batch = cuda.blockIdx.z + batch_begin
        tid = cuda.threadIdx.x
        kg = tid % KEY_GROUPS
        rg = tid // KEY_GROUPS

        # The flat batch index split into the batch dims (unsigned division: no floor fix-ups).
        batch_index = cuda.local.array(MAX_BATCH_DIMS, int64)
        rest = nonneg(batch)
        for d in range(MAX_BATCH_DIMS - 1, -1, -1):
            batch_index[d] = int64(rest % nonneg(dims[d]))
            rest //= nonneg(dims[d])
        q_base = operand_offset(q_layout, batch_index, head)
        k_base = operand_offset(k_layout, batch_index, head // dims[DIM_Q_PER_K])
        v_base = operand_offset(v_layout, batch_index, head // dims[DIM_Q_PER_V])
        out_base = operand_offset(out_layout, batch_index, head)
        mask_base = operand_offset(mask_layout, batch_index, head)
        q_row, q_col = q_layout[LAYOUT_ROW], q_layout[LAYOUT_COL]
        k_row, k_col = k_layout[LAYOUT_ROW], k_layout[LAYOUT_COL]
        v_row, v_col = v_layout[LAYOUT_ROW], v_layout[LAYOUT_COL]
        mask_row_stride, mask_col_stride = mask_layout[LAYOUT_ROW], mask_layout[LAYOUT_COL]
        rows = min(BLOCK_M, seqlen_q - row_begin)
        # The keys some row of the tile sees: [key_start, key_end), within this element's length.
        if dims[DIM_HAS_KV_LENGTHS]:
            seqlen_k = kv_lengths[nonneg(operand_offset(kv_layout, batch_index, 0))]
        diagonal = seqlen_k - seqlen_q if dims[DIM_BOTTOM_RIGHT] else 0  # d(i) = i + diagonal
        window_left, window_right = dims[DIM_WINDOW_LEFT], dims[DIM_WINDOW_RIGHT]
        key_start = 0
        key_end = seqlen_k
        if WINDOWED:
            if window_left >= 0:
                key_start = max(0, row_begin + diagonal - window_left)
            if window_right >= 0:
                key_end = min(key_end, row_begin + rows + diagonal + window_right)
        has_alibi = dims[DIM_HAS_ALIBI] != 0
        slope = float32(0)
        if has_alibi:
            slope = float32(alibi_slopes[nonneg(operand_offset(alibi_layout, batch_index, head))])
        softcap32 = float32(softcap)
        transform = softcap > 0 or has_alibi
        scale32 = float32(scale)

        # Load: Q^T * scale, consecutive threads reading consecutive columns of a row; zero padding.
        for index in range(tid, BLOCK_M * HEAD_DIM, THREADS):
            r = index // HEAD_DIM
            d = index % HEAD_DIM
            value = float32(0)
            if r < rows and d < head_dim:
                value = float32(q[nonneg(q_base + (row_begin + r) * q_row + d * q_col)]) * scale32
            q_tile[nonneg(d), nonneg(r)] = value

        for i in range(ROWS_PER_THREAD):
            m_i[i] = NEG_INF
            l_i[i] = float32(0)
            for e in range(COLS_PER_THREAD):
                acc[i, e] = float32(0)

        for key_begin in range(key_start, key_end, BLOCK_N):
            keys = min(BLOCK_N, key_end - key_begin)

            if HAS_MASK:
                # Load: the mask block, transposed into p_tile as float32 addends (a hidden key of a
                # boolean mask is -inf); consecutive threads read consecutive keys of a row. Each thread
                # later reads back exactly the entries it overwrites with P, so p_tile can hold both.
                for index in range(tid, BLOCK_M * BLOCK_N, THREADS):
                    r = int64(nonneg(index) // BLOCK_N)
                    key = int64(nonneg(index) % BLOCK_N)
                    addend = float32(0)
                    if r < rows and key < keys:
                        mask_value = mask[nonneg(mask_base + (row_begin + r) * mask_row_stride
                                                 + (key_begin + key) * mask_col_stride)]
                        if BOOLEAN_MASK:
                            addend = float32(0) if mask_value else NEG_INF
                        elif WIDE_MASK:
                            addend = float32(clamp_to_float32(mask_value))
                        else:
                            addend = float32(mask_value)
                    p_tile[nonneg(key), nonneg(r)] = addend

            # scores = (Q * scale) K^T over chunks of K_CHUNK dims.
            for i in range(ROWS_PER_THREAD):
                for j in range(KEYS_PER_THREAD):
                    scores[i, j] = float32(0)
            for d_begin in range(0, head_dim, K_CHUNK):
                # Load: K^T chunk; consecutive threads read consecutive dims of a key.
                for index in range(tid, BLOCK_N * K_CHUNK, THREADS):
                    key = index // K_CHUNK
                    d = index % K_CHUNK
                    value = float32(0)
                    if key < keys and d_begin + d < head_dim:
                        value = float32(k[nonneg(k_base + (key_begin + key) * k_row + (d_begin + d) * k_col)])
                    k_chunk[nonneg(d), nonneg(key)] = value
                # Sync: the chunk is complete.
                cuda.syncthreads()
                # Compute: a ROWS_PER_THREAD x KEYS_PER_THREAD outer product per dim.
                for d in range(min(K_CHUNK, head_dim - d_begin)):
                    for i in range(ROWS_PER_THREAD):
                        q_values[i] = q_tile[nonneg(d_begin + d), nonneg(rg + ROW_GROUPS * i)]
                    for j in range(KEYS_PER_THREAD):
                        k_values[j] = k_chunk[nonneg(d), nonneg(kg + KEY_GROUPS * j)]
                    for i in range(ROWS_PER_THREAD):
                        for j in range(KEYS_PER_THREAD):
                            scores[i, j] += q_values[i] * k_values[j]
                # Sync: everyone is done with this chunk before the next one overwrites it.
                if d_begin + K_CHUNK < head_dim:
                    cuda.syncthreads()
            if head_dim == 0:
                cuda.syncthreads()  # no chunk synced the mask block: scores are all 0

            # Softcap and ALiBi; hide keys past key_end (a ragged last block) and outside the row's
            # window; add the mask.
            if HAS_MASK or WINDOWED or transform or keys < BLOCK_N:
                for i in range(ROWS_PER_THREAD):
                    r = rg + ROW_GROUPS * i
                    for j in range(KEYS_PER_THREAD):
                        key = kg + KEY_GROUPS * j
                        offset = key_begin + key - (row_begin + r + diagonal)  # j - d(i)
                        if key >= keys or (WINDOWED and ((window_left >= 0 and offset < -window_left)
                                                         or (window_right >= 0 and offset > window_right))):
                            scores[i, j] = NEG_INF
                            continue
                        if softcap > 0:
                            scores[i, j] = softcap32 * math.tanh(scores[i, j] / softcap32)
                        if has_alibi:
                            scores[i, j] -= slope * float32(abs(offset))
                        if HAS_MASK:
                            addend = p_tile[nonneg(key), nonneg(r)]
                            if BOOLEAN_MASK:
                                if addend == NEG_INF:
                                    scores[i, j] = NEG_INF
                            else:
                                scores[i, j] += addend

            # Online softmax, step 1: each thread's maximum of its keys, per row, to shared memory.
            # max is `a < b ? b : a` with a the running value: a NaN score is not taken into the
            # maximum; the probability exp(NaN) carries it into l_i and acc, so NaN stays in its row.
            for i in range(ROWS_PER_THREAD):
                block_max = NEG_INF
                for j in range(KEYS_PER_THREAD):
                    if block_max < scores[i, j]:
                        block_max = scores[i, j]
                row_partials[nonneg(kg), nonneg(rg + ROW_GROUPS * i)] = block_max
            # Sync: every partial maximum is written.
            cuda.syncthreads()
            # Step 2: the row maximum m_new; P = exp(s - m_new) to shared memory; rescale l_i and acc.
            for i in range(ROWS_PER_THREAD):
                r = rg + ROW_GROUPS * i
                m_new = m_i[i]
                for g in range(KEY_GROUPS):
                    if m_new < row_partials[nonneg(g), nonneg(r)]:
                        m_new = row_partials[nonneg(g), nonneg(r)]
                # A row that has seen no visible key keeps m = -inf; subtract 0 so that exp gives 0.
                m_sub = float32(0) if m_new == NEG_INF else m_new
                # log2(e) multiplies the difference, not the score: a score of 1e3 keeps its bits.
                alpha = math.exp2((m_i[i] - m_sub) * SCALE_LOG2E)
                m_i[i] = m_new
                block_sum = float32(0)
                for j in range(KEYS_PER_THREAD):
                    p = math.exp2((scores[i, j] - m_sub) * SCALE_LOG2E)
                    p_tile[nonneg(kg + KEY_GROUPS * j), nonneg(r)] = p
                    block_sum += p
                l_i[i] = l_i[i] * alpha + block_sum
                for e in range(COLS_PER_THREAD):
                    acc[i, e] *= alpha

            # acc += P V over chunks of V_CHUNK keys.
            for j_begin in range(0, keys, V_CHUNK):
                # Load: V chunk; consecutive threads read consecutive columns of a key.
                for index in range(tid, V_CHUNK * HEAD_DIM, THREADS):
                    j = index // HEAD_DIM
                    c = index % HEAD_DIM
                    value = float32(0)
                    if j_begin + j < keys and c < head_dim_v:
                        value = float32(v[nonneg(v_base + (key_begin + j_begin + j) * v_row + c * v_col)])
                    v_chunk[nonneg(j), nonneg(c)] = value
                # Sync: the chunk and P are complete.
                cuda.syncthreads()
                # Compute: a ROWS_PER_THREAD x COLS_PER_THREAD outer product per key.
                for j in range(min(V_CHUNK, keys - j_begin)):
                    for i in range(ROWS_PER_THREAD):
                        q_values[i] = p_tile[nonneg(j_begin + j), nonneg(rg + ROW_GROUPS * i)]
                    for e in range(COLS_PER_THREAD):
                        v_values[e] = v_chunk[nonneg(j), nonneg(kg + KEY_GROUPS * e)]
                    for i in range(ROWS_PER_THREAD):
                        for e in range(COLS_PER_THREAD):
                            acc[i, e] += q_values[i] * v_values[e]
                # Sync: done with v_chunk (and, after the last chunk, with p_tile and row_partials).
                cuda.syncthreads()

        # Epilogue: l_i summed over the row's KEY_GROUPS threads; out = acc / l_i, zeros where l_i = 0.
        for i in range(ROWS_PER_THREAD):
            row_partials[nonneg(kg), nonneg(rg + ROW_GROUPS * i)] = l_i[i]
        cuda.syncthreads()
        out_row, out_col = out_layout[LAYOUT_ROW], out_layout[LAYOUT_COL]
        lse_base = operand_offset(lse_layout, batch_index, head)
        for i in range(ROWS_PER_THREAD):
            r = rg + ROW_GROUPS * i
            if r < rows:
                row_sum = float32(0)
                for g in range(KEY_GROUPS):
                    row_sum += row_partials[nonneg(g), nonneg(r)]
                inv_sum = float32(0) if row_sum == float32(0) else float32(1) / row_sum
                if dims[DIM_HAS_LSE] and kg == 0:
                    lse[nonneg(lse_base + (row_begin + r) * lse_layout[LAYOUT_ROW])] = (
                        NEG_INF if row_sum == float32(0) else m_i[i] + math.log(row_sum))
                for e in range(COLS_PER_THREAD):
                    c = kg + KEY_GROUPS * e
                    if c < head_dim_v:
                        out[nonneg(out_base + (row_begin + r) * out_row + c * out_col)] = acc[i, e] * inv_sum

    attention_kernel.__name__ = f"attention_d{HEAD_DIM}_{mask_kind}{'_windowed' if WINDOWED else ''}"
    attention_kernel.__qualname__ = attention_kernel.__name__
    return attention_kernel
