"""The variants of fastattn.attention (align, window, softcap, ALiBi, kv_lengths, return_lse, out=) on
the GPU path under Numba's CUDA simulator, end to end through the public API, against the reference.

Run as a script with NUMBA_ENABLE_CUDASIM=1 (tests/test_cuda_sim.py does); prints one JSON line per
case. Importing the module only defines CASES. Shapes are tiny: the simulator is slow.
"""

import sys

import numpy as np
from cuda_sim_cases import report, start_simulator

from fastattn import reference

SEED = 20250602


def case(name, q_shape, k_shape, dtype=np.float32, **kwargs):
    return dict(name=name, q_shape=q_shape, k_shape=k_shape, dtype=np.dtype(dtype).name, kwargs=kwargs)


# kwargs values: "slopes_h" / "slopes_bh" become ALiBi slopes of shape (Hq,) / (B, Hq); "lengths:a,b"
# kv_lengths (keys past them hold NaN); "bool_mask" a random (L, S) bool mask; "out_transposed" an out
# buffer stored (B, L, H, Ev).
CASES = [
    case("window_causal_two_tiles", (1, 1, 70, 16), (1, 1, 70, 16), window=(5, 2), causal=True),
    case("bottom_right_causal_L_lt_S", (1, 2, 5, 16), (1, 2, 70, 16), align="bottom_right", causal=True),
    case("bottom_right_causal_L_gt_S_lse", (1, 1, 20, 16), (1, 1, 9, 16), align="bottom_right", causal=True,
         return_lse=True),
    case("kv_lengths_bottom_right_lse", (2, 2, 9, 16), (2, 2, 70, 16), kv_lengths="lengths:0,23",
         align="bottom_right", causal=True, return_lse=True),
    case("softcap_alibi_gqa", (1, 4, 9, 16), (1, 2, 30, 16), softcap=1.5, alibi_slopes="slopes_h"),
    case("alibi_batch_window_left_bool_mask", (2, 2, 9, 16), (2, 2, 30, 16), alibi_slopes="slopes_bh",
         window=(10, None), mask="bool_mask", return_lse=True),
    case("out_transposed_window", (2, 2, 9, 16), (2, 2, 30, 16), window=(3, 3), out="out_transposed"),
    case("float16_softcap_window_head_dim_80", (1, 1, 9, 80), (1, 1, 20, 80), dtype=np.float16, softcap=2.0,
         window=(4, 0)),
    case("float16_causal_lse", (1, 2, 9, 16), (1, 2, 20, 16), dtype=np.float16, causal=True, return_lse=True),
    # the drop-in without enable_gqa: one query head broadcast over four key heads, as torch does
    case("sdpa_one_query_head_four_key_heads", (2, 1, 9, 16), (2, 4, 20, 16), sdpa=True),
]


def make_call(c, rng, cuda):
    """(host q, k, v, reference kwargs, device q, k, v, fastattn kwargs)."""
    dtype = np.dtype(c["dtype"])
    batch, heads_q, seqlen_q, head_dim = c["q_shape"]
    seqlen_k = c["k_shape"][2]
    q = rng.standard_normal(c["q_shape"]).astype(dtype)
    k = rng.standard_normal(c["k_shape"]).astype(dtype)
    v = rng.standard_normal(c["k_shape"]).astype(dtype)
    host_kwargs, device_kwargs = {}, {}
    for key, value in c["kwargs"].items():
        if value == "slopes_h":
            value = rng.uniform(0.05, 0.5, heads_q)
        elif value == "slopes_bh":
            value = rng.uniform(0.05, 0.5, (batch, heads_q))
        elif value == "bool_mask":
            value = rng.random((seqlen_q, seqlen_k)) >= 0.3
        elif value == "out_transposed":
            buffer = cuda.to_device(np.full((batch, seqlen_q, heads_q, head_dim), 7, dtype))
            device_kwargs["out"] = buffer  # viewed below
            continue
        elif isinstance(value, str) and value.startswith("lengths:"):
            value = np.array([int(n) for n in value[len("lengths:"):].split(",")], dtype=np.int64)
            for b, length in enumerate(value):  # a cache's unused tail: never read
                k[b, :, length:] = np.nan
                v[b, :, length:] = np.nan
        host_kwargs[key] = value
        device_kwargs[key] = cuda.to_device(value) if isinstance(value, np.ndarray) else value
    if "out" in device_kwargs:
        device_kwargs["out"] = _transposed_view(cuda, device_kwargs["out"])
    return q, k, v, host_kwargs, cuda.to_device(q), cuda.to_device(k), cuda.to_device(v), device_kwargs


def _transposed_view(cuda, buffer):
    """A (B, H, L, E) view of a (B, L, H, E) device buffer: the simulator's arrays wrap NumPy."""
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    return FakeCUDAArray(buffer._ary.transpose(0, 2, 1, 3))


def within_naive_error(out, exact, naive, dtype):
    """FlashAttention's criterion as in tests/conftest.py; float16 adds its final rounding."""
    hidden = ~np.isfinite(exact)
    if not np.array_equal(~np.isfinite(out), hidden) or not np.array_equal(out[hidden], exact[hidden]):
        return "non-finite positions or values differ"
    out, exact, naive = (np.where(hidden, 0, x).astype(np.float64) for x in (out, exact, naive))
    allowance = 2 * np.max(np.abs(naive - exact), initial=0) + 8 * np.finfo(np.float32).eps * max(
        1.0, float(np.max(np.abs(exact), initial=0)))
    if dtype == np.float16:
        allowance = allowance + np.finfo(np.float16).eps / 2 * np.abs(exact) + 2.0 ** -25
    excess = np.abs(out - exact) - allowance
    return None if excess.size == 0 or excess.max() <= 0 else f"error exceeds the bound by {excess.max():.3g}"


def run_case(c, rng, cuda, fastattn):
    q, k, v, host_kwargs, q_dev, k_dev, v_dev, device_kwargs = make_call(c, rng, cuda)
    mask = host_kwargs.pop("mask", None)
    device_mask = device_kwargs.pop("mask", None)
    if host_kwargs.pop("sdpa", False):
        device_kwargs.pop("sdpa")
        result = fastattn.scaled_dot_product_attention(q_dev, k_dev, v_dev, device_mask, **device_kwargs)
        q = np.broadcast_to(q, k.shape[:-2] + q.shape[-2:])
    else:
        result = fastattn.attention(q_dev, k_dev, v_dev, device_mask, **device_kwargs)
    out_dev, lse_dev = result if c["kwargs"].get("return_lse") else (result, None)
    if "out" in device_kwargs and out_dev is not device_kwargs["out"]:
        return "out= was not returned"
    out = out_dev.copy_to_host()
    ref_kwargs = {key: value for key, value in host_kwargs.items() if key not in ("out", "return_lse")}
    exact = reference.attention(q, k, v, mask, return_lse=True, **ref_kwargs)
    naive = reference.attention(q, k, v, mask, return_lse=True, dtype=np.float32, **ref_kwargs)
    problem = within_naive_error(out, exact[0], naive[0], q.dtype)
    if problem is None and lse_dev is not None:
        lse = lse_dev.copy_to_host()
        if lse.dtype != np.float32:  # computed in float32 and kept so, whatever the inputs (as on the CPU)
            return f"lse has dtype {lse.dtype}, not float32"
        problem = within_naive_error(lse, exact[1], naive[1], np.float32)
        problem = problem and "lse: " + problem
    return problem


def main(names):
    cuda = start_simulator()
    import fastattn

    np.seterr(over="ignore", invalid="ignore")
    rng = np.random.default_rng(SEED)
    report(CASES, names, lambda c: {"problem": run_case(c, rng, cuda, fastattn)})

if __name__ == "__main__":
    main(set(sys.argv[1:]))
