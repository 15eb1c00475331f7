"""Merge attention results computed over disjoint key ranges (split-K decoding, ring attention)."""

import numpy as np

__all__ = ["merge_states"]

from .api import _is_supported, _lse_dtype


def merge_states(parts):
    """Combine `(out, lse)` pairs from attention over disjoint key ranges into attention over all keys.

    Each part holds `out` (..., Hq, L, Ev) and `lse` (..., Hq, L), the natural-log log-sum-exp of
    each row's scaled scores over that part's keys (-inf for a row that saw no visible key). With
    m = max_i lse_i and w_i = exp(lse_i - m) per row:

        out = sum_i w_i out_i / sum_i w_i        lse = m + log(sum_i w_i)

    A row that no part saw gives out = 0 and lse = -inf. A part with w_i = 0 never contributes,
    even if its out holds NaN or inf. All parts share one shape and one dtype (float32, float64,
    float16 or bfloat16), which the results keep; lse has out's dtype, or float32 for half-precision
    outs (as fastattn.attention returns it), and the sums are formed in lse's dtype. Returns new
    arrays; the inputs are not modified.
    """
    outs, lses = _check_parts(parts)
    out_dtype = outs[0].dtype
    outs = [out.astype(lses[0].dtype) for out in outs] if out_dtype != lses[0].dtype else outs

    lse_max = np.max(np.stack(lses), axis=0)
    lse_max = np.where(np.isneginf(lse_max), 0, lse_max)  # rows no part saw: every weight becomes 0

    acc = np.zeros_like(outs[0])
    row_sum = np.zeros_like(lses[0])
    for out, lse in zip(outs, lses):
        weight = np.exp(lse - lse_max)[..., np.newaxis]
        # != 0 rather than > 0, so a NaN weight (from a NaN lse) still propagates
        acc += np.multiply(weight, out, out=np.zeros_like(acc), where=weight != 0)
        row_sum += weight[..., 0]

    seen = row_sum != 0
    out = np.divide(acc, row_sum[..., np.newaxis], out=np.zeros_like(acc), where=seen[..., np.newaxis])
    lse = lse_max + np.log(row_sum, out=np.full_like(row_sum, -np.inf), where=seen)
    return out.astype(out_dtype, copy=False), lse


def _check_parts(parts):
    """parts -> (outs, lses) as two lists, or a TypeError/ValueError naming the part and argument."""
    parts = list(parts)
    if not parts:
        raise ValueError("merge_states needs at least one (out, lse) part, got an empty sequence")
    outs, lses = [], []
    for index, part in enumerate(parts):
        if not isinstance(part, (tuple, list)) or len(part) != 2:
            raise ValueError(f"parts[{index}] must be an (out, lse) pair, got {type(part).__name__}"
                             + (f" of length {len(part)}" if isinstance(part, (tuple, list)) else ""))
        out, lse = part
        for x, name in ((out, "out"), (lse, "lse")):
            if not isinstance(x, np.ndarray):
                raise TypeError(f"parts[{index}] {name} must be a NumPy array, got {type(x).__name__}")
            if not _is_supported(x.dtype):
                raise TypeError(f"parts[{index}] {name} has dtype {x.dtype}; merge_states supports "
                                f"float32, float64, float16 and bfloat16")
        if out.ndim < 1:
            raise ValueError(f"parts[{index}] out must have at least 1 dim (..., Ev), got shape {out.shape}")
        if lse.shape != out.shape[:-1]:
            raise ValueError(f"parts[{index}] lse has shape {lse.shape} but its out has shape {out.shape}; "
                             f"lse must have shape out.shape[:-1] = {out.shape[:-1]}")
        if lse.dtype != _lse_dtype(out.dtype):
            raise TypeError(f"parts[{index}] lse has dtype {lse.dtype} but its out has {out.dtype}; "
                            f"lse must be {_lse_dtype(out.dtype)} (what fastattn.attention returns)")
        if index > 0 and out.dtype != outs[0].dtype:
            raise TypeError(f"parts[{index}] out has dtype {out.dtype} but parts[0] out has "
                            f"{outs[0].dtype}; pass one dtype")
        if index > 0 and out.shape != outs[0].shape:
            raise ValueError(f"parts[{index}] out has shape {out.shape} but parts[0] out has "
                             f"{outs[0].shape}; every part covers the same queries")
        outs.append(out)
        lses.append(lse)
    return outs, lses
