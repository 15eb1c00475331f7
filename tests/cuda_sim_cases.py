"""The GPU kernel's correctness cases, run on Numba's CUDA simulator by tests/test_cuda_sim.py.

The simulator must be switched on (NUMBA_ENABLE_CUDASIM=1) before Numba is imported, so
test_cuda_sim.py runs this file as a script in a fresh interpreter; it prints one JSON line per case.
Importing the module only defines CASES (no Numba), so the test file can name the cases.

Shapes are tiny (the simulator runs each thread as a Python thread: about 0.1 s per block and key
block) but cover ragged query and key blocks, L = 1, L != S both ways, causal, boolean and float
masks broadcast with zero strides, rows with no visible key, GQA, float16, head dims 16, 80 and 256
(three head-dim buckets), Ev != E and non-contiguous layouts of q, k, v and out.
"""

import json
import os
import sys
import time

import numpy as np

from fastattn import reference

SEED = 20250601


def case(name, q_shape, k_shape, v_shape, dtype=np.float32, causal=False, mask=None, scale=None,
         layout=None, poison=None):
    """mask: None, or (kind, shape as given to the kernel before broadcasting, hidden fraction, dtype).
    layout: None (contiguous) or "transposed" (q, k, v and out stored (batch, L, heads, E) as torch's
    (B, L, H, E).transpose(1, 2) views are, and k stored with its head dim outermost: col stride S).
    poison: "nan_query_row" puts a NaN in one query row."""
    return dict(name=name, q_shape=q_shape, k_shape=k_shape, v_shape=v_shape, dtype=np.dtype(dtype).name,
                causal=causal, mask=mask, scale=scale, layout=layout, poison=poison)


CASES = [
    case("ragged_keys", (1, 1, 7, 16), (1, 1, 70, 16), (1, 1, 70, 16)),
    case("decode_L1", (2, 1, 1, 16), (2, 1, 20, 16), (2, 1, 20, 16)),
    case("L_gt_S_causal", (1, 1, 70, 16), (1, 1, 5, 16), (1, 1, 5, 16), causal=True),
    case("L_lt_S_causal", (1, 1, 5, 16), (1, 1, 70, 16), (1, 1, 70, 16), causal=True),
    case("square_causal", (1, 1, 70, 16), (1, 1, 70, 16), (1, 1, 70, 16), causal=True),
    case("bool_mask_broadcast", (2, 1, 9, 16), (2, 1, 30, 16), (2, 1, 30, 16),
         mask=("boolean", (9, 30), 0.3, "bool")),
    case("float_mask_heads_broadcast_causal", (1, 2, 9, 16), (1, 2, 20, 16), (1, 2, 20, 16), causal=True,
         mask=("additive", (1, 1, 9, 20), 0.3, "float32")),
    case("empty_rows_bool_causal", (1, 2, 9, 16), (1, 2, 20, 16), (1, 2, 20, 16), causal=True,
         mask=("boolean", (1, 2, 9, 20), "empty_rows", "bool")),
    case("empty_rows_float", (1, 1, 9, 16), (1, 1, 20, 16), (1, 1, 20, 16),
         mask=("additive", (9, 20), "empty_rows", "float32")),
    case("float64_mask_finfo_min", (1, 1, 9, 16), (1, 1, 20, 16), (1, 1, 20, 16),
         mask=("additive", (9, 20), "finfo_min", "float64")),
    case("gqa_4_2_1_Ev8", (1, 4, 9, 16), (1, 2, 20, 16), (1, 1, 20, 8), causal=True),
    case("Ev40_ne_E16", (1, 1, 9, 16), (1, 1, 20, 16), (1, 1, 20, 40), scale=0.3),
    case("head_dim_80", (1, 1, 20, 80), (1, 1, 40, 80), (1, 1, 40, 80), causal=True),
    case("head_dim_256", (1, 1, 3, 256), (1, 1, 10, 256), (1, 1, 10, 200)),
    case("float16", (1, 2, 9, 16), (1, 2, 30, 16), (1, 2, 30, 16), dtype=np.float16),
    case("float16_mask_head_dim_80", (1, 1, 9, 80), (1, 1, 20, 80), (1, 1, 20, 80), dtype=np.float16,
         causal=True, mask=("additive", (9, 20), 0.3, "float16")),
    case("transposed_layouts", (2, 2, 9, 16), (2, 2, 20, 16), (2, 2, 20, 8), layout="transposed"),
    case("batch_dims_broadcast", (2, 2, 1, 5, 16), (1, 2, 1, 20, 16), (2, 1, 1, 20, 16)),
    case("no_keys", (1, 2, 5, 16), (1, 2, 0, 16), (1, 2, 0, 8)),
    case("head_dim_0", (1, 1, 5, 0), (1, 1, 20, 0), (1, 1, 20, 8), mask=("additive", (5, 20), 0.3, "float32")),
    case("nan_query_row", (1, 1, 9, 16), (1, 1, 20, 16), (1, 1, 20, 16), causal=True, poison="nan_query_row"),
]


def make_inputs(c, rng):
    dtype = np.dtype(c["dtype"])
    q, k, v = (rng.standard_normal(shape).astype(dtype) for shape in (c["q_shape"], c["k_shape"], c["v_shape"]))
    if c["poison"] == "nan_query_row":
        q[..., 4, 3] = np.nan
    mask = None
    if c["mask"] is not None:
        kind, shape, hidden, mask_dtype = c["mask"]
        if hidden == "finfo_min":  # Hugging Face style: huge negative values, never -inf
            mask = np.zeros(shape, mask_dtype)
            mask[..., ::3] = np.finfo(mask_dtype).min
            mask[..., [0, 5], :] = -1e300  # a whole row of it averages v, as in the float64 reference
        elif hidden == "empty_rows":  # rows 0 and 5 see no key (under causal too)
            mask = rng.random(shape) >= 0.2 if kind == "boolean" else rng.standard_normal(shape)
            if kind == "additive":
                mask[rng.random(shape) < 0.2] = -np.inf
            mask[..., [0, 5], :] = False if kind == "boolean" else -np.inf
            mask = mask.astype(mask_dtype)
        elif kind == "boolean":
            mask = rng.random(shape) >= hidden
        else:
            mask = rng.standard_normal(shape)
            mask[rng.random(shape) < hidden] = -np.inf
            mask = mask.astype(mask_dtype)
    return q, k, v, mask


def tolerance_check(out, q, k, v, mask, causal, scale):
    """(max error, bound): FlashAttention's criterion as in tests/conftest.py.

    float32: the kernel may be at most twice as wrong as the naive float32 evaluation
    (reference.attention(..., dtype=np.float32)) against the float64 reference, plus 8 float32 eps
    of the output's magnitude for cases the naive evaluation happens to get exact.
    float16 inputs: the kernel computes in float32 from the same float16 values and rounds the result
    to float16 once, so the error is that rounding, at most eps16 / 2 of |exact| (plus 2^-25 absolute
    for float16 subnormals), on top of the float32 allowance above.
    NaN must sit exactly where the reference has NaN.
    """
    exact = reference.attention(q, k, v, mask, causal=causal, scale=scale)
    naive_mask = mask
    if mask is not None and mask.dtype == np.float64:
        # The naive float32 evaluation would round -1e300 to -inf and empty rows the float64 reference
        # averages; it gets the mask clamped to float32's range, which is what the kernel documents.
        limit = np.finfo(np.float32).max
        naive_mask = np.where(np.isinf(mask), mask, np.clip(mask, -limit, limit))
    naive = reference.attention(q, k, v, naive_mask, causal=causal, scale=scale, dtype=np.float32)
    nan = np.isnan(exact)
    if not np.array_equal(np.isnan(out), nan):
        return float("inf"), 0.0, "NaN positions differ"
    if exact.size == 0:
        return 0.0, 0.0, None
    out64 = np.where(nan, 0, out.astype(np.float64))
    exact = np.where(nan, 0, exact)
    naive_err = np.max(np.abs(np.where(nan, 0, naive) - exact))
    magnitude = max(1.0, float(np.max(np.abs(exact))))
    allowance = 2 * naive_err + 8 * np.finfo(np.float32).eps * magnitude
    if out.dtype == np.float16:
        allowance = allowance + np.finfo(np.float16).eps / 2 * np.abs(exact) + 2.0 ** -25
    excess = np.abs(out64 - exact) - allowance
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    err = float(np.abs(out64 - exact)[worst])
    bound = float(np.broadcast_to(allowance, exact.shape)[worst])
    return err, bound, None if err <= bound else f"error {err:.3g} > bound {bound:.3g} at {worst}"


def device_view(cuda, x, layout_order=None):
    """A device copy of x whose memory is ordered by `layout_order` (a permutation of x's axes, outermost
    first; None = C order). Returns (device array, element strides of x's axes in that memory)."""
    order = layout_order or tuple(range(x.ndim))
    stored = np.ascontiguousarray(np.transpose(x, order))
    device = cuda.to_device(stored)
    stored_strides = [s // stored.itemsize for s in stored.strides]
    strides = [0] * x.ndim
    for position, axis in enumerate(order):
        strides[axis] = stored_strides[position]
    return device, strides


def to_params(launcher, batch_shape, array, strides):
    nb = len(batch_shape)
    return array, launcher.Strides(tuple(strides[:nb]), strides[nb], strides[nb + 1], strides[nb + 2])


def run_case(c, cuda, launcher, rng):
    q, k, v, mask = make_inputs(c, rng)
    batch = np.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    heads_q, seqlen_q, head_dim = q.shape[-3:]
    heads_k, seqlen_k, _ = k.shape[-3:]
    heads_v, _, head_dim_v = v.shape[-3:]
    nb = len(batch)
    transposed = c["layout"] == "transposed"
    # (batch, L, heads, E) memory for q, v and out; k with its E axis outermost within a head.
    row_major_heads = tuple(range(nb)) + (nb + 1, nb, nb + 2)
    k_order = tuple(range(nb)) + (nb, nb + 2, nb + 1)

    def operand(x, order):
        x = x.reshape((1,) * (nb - (x.ndim - 3)) + x.shape)
        device, strides = device_view(cuda, x, order if transposed else None)
        # Batch dims of size 1 broadcast: stride 0, as fastattn.api passes np.broadcast_to views.
        strides = [0 if d < nb and x.shape[d] == 1 and batch[d] != 1 else s for d, s in enumerate(strides)]
        return to_params(launcher, batch, device, strides)

    q_dev, q_strides = operand(q, row_major_heads)
    k_dev, k_strides = operand(k, k_order)
    v_dev, v_strides = operand(v, row_major_heads)
    out_shape = batch + (heads_q, seqlen_q, head_dim_v)
    out_host = np.full(out_shape, 7.0, dtype=q.dtype)  # 7: any element the kernel misses shows
    out_dev, out_strides = operand(out_host, row_major_heads)

    mask_kind, mask_dev, mask_strides = "none", None, None
    if mask is not None:
        mask_kind = c["mask"][0]
        full = batch + (heads_q, seqlen_q, seqlen_k)
        padded = mask.reshape((1,) * (len(full) - mask.ndim) + mask.shape)
        device, strides = device_view(cuda, padded)
        strides = [0 if n == 1 and f != 1 else s for n, f, s in zip(padded.shape, full, strides)]
        mask_dev, mask_strides = to_params(launcher, batch, device, strides)

    scale = c["scale"] if c["scale"] is not None else 1 / np.sqrt(head_dim) if head_dim > 0 else 1.0
    params = launcher.CudaAttentionParams(
        dtype=q.dtype, batch_shape=batch, num_heads_q=heads_q, num_heads_k=heads_k, num_heads_v=heads_v,
        seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim, head_dim_v=head_dim_v,
        q=q_dev, k=k_dev, v=v_dev, out=out_dev, q_strides=q_strides, k_strides=k_strides,
        v_strides=v_strides, out_strides=out_strides, mask_kind=mask_kind, mask=mask_dev,
        mask_strides=mask_strides, scale=scale, causal=c["causal"])
    launcher.attention_forward(params)
    stored = out_dev.copy_to_host()
    out = np.transpose(stored, np.argsort(row_major_heads)) if transposed else stored
    err, bound, problem = tolerance_check(out, q, k, v, mask, c["causal"], scale)
    if problem is None and c["mask"] is not None and c["mask"][2] == "empty_rows" and not np.all(out[..., [0, 5], :] == 0):
        problem = "rows with no visible key are not zero"
    if problem is None and c["poison"] == "nan_query_row":
        others = np.ones(out.shape[:-1], bool)
        others[..., 4] = False
        if not (np.isnan(out[..., 4, :]).all() and np.isfinite(out[others]).all()):
            problem = "the NaN did not stay in its row"
    return err, bound, problem


def start_simulator():
    """numba.cuda on the simulator; NUMBA_ENABLE_CUDASIM must be set before Numba is first imported."""
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    from numba import cuda
    from numba.cuda import config

    if not config.ENABLE_CUDASIM:
        raise RuntimeError("set NUMBA_ENABLE_CUDASIM=1 before Numba is imported")
    return cuda


def report(cases, names, run):
    """Prints one JSON line per case named in `names` (all if empty): run(case) returns a dict with
    'problem' (None when the case passed) and any figures; an exception is reported as the problem."""
    for c in cases:
        if names and c["name"] not in names:
            continue
        start = time.perf_counter()
        try:
            result = run(c)
        except Exception as error:  # report, and go on with the other cases
            result = {"problem": f"{type(error).__name__}: {error}"}
        print(json.dumps({"name": c["name"], "ok": result["problem"] is None, **result,
                          "seconds": round(time.perf_counter() - start, 2)}), flush=True)


def main(names):
    cuda = start_simulator()
    from fastattn.cuda import launcher

    # Scores plus a mask near float32's lowest value overflow to -inf in (s - m) * log2(e), as they do
    # on the GPU, where exp2 then gives 0; the simulator's NumPy scalars would warn about it.
    np.seterr(over="ignore")
    rng = np.random.default_rng(SEED)

    def run(c):
        err, bound, problem = run_case(c, cuda, launcher, rng)
        return {"problem": problem, "max_error": err, "bound": bound}

    report(CASES, names, run)

if __name__ == "__main__":
    main(set(sys.argv[1:]))
