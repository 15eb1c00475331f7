"""Argument checks and the single dispatch point into the compiled kernels."""

import math
import os
from numbers import Real
from typing import NamedTuple

import numpy as np

from . import _core, interop
from .cuda import is_device_array

__all__ = ["attention", "scaled_dot_product_attention", "set_num_threads", "get_num_threads",
           "cpu_info", "set_isa"]

_FULL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _is_half(dtype):
    """float16, or bfloat16 (ml_dtypes' NumPy type, known by name so fastattn need not import it)."""
    return dtype == np.float16 or (dtype.kind == "V" and dtype.itemsize == 2 and dtype.name == "bfloat16")


def _is_supported(dtype):
    return dtype in _FULL_DTYPES or _is_half(dtype)


def _lse_dtype(dtype):
    """Half-precision inputs are computed in float32, and their log-sum-exp is kept at that precision."""
    return np.dtype(np.float32) if _is_half(dtype) else dtype


_FLOAT32_MAX = float(np.finfo(np.float32).max)
_MAX_NDIM = 9  # batch dims, head, row, column: the kernel takes up to six batch dims


def _within_float32(x):
    """Whether every |x| <= the largest float32 (False for NaN). The float32 and half-precision kernels
    apply scale, softcap and ALiBi slopes in float32, where a larger value becomes inf and the scores
    NaN (inf * 0, inf * tanh(0)); every dtype gets the same bound."""
    return bool(np.all(np.abs(x) <= _FLOAT32_MAX))


def _default_num_threads():
    env = os.environ.get("FASTATTN_NUM_THREADS")
    if env is not None:
        try:
            count = int(env)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"FASTATTN_NUM_THREADS must be a positive integer, got {env!r}")
        return count
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


_num_threads = _default_num_threads()


def set_num_threads(n):
    """Set the number of threads the CPU kernels use (default: FASTATTN_NUM_THREADS, else the
    cores available to this process). Results do not depend on it."""
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"set_num_threads needs a positive integer, got {n!r}")
    _num_threads = int(n)


def get_num_threads():
    """The number of threads the CPU kernels use."""
    return _num_threads


def cpu_info():
    """Which CPU kernel is in use, which ones this CPU supports (best last) and its features."""
    return {
        "isa": _core.current_isa(),
        "supported_isas": _core.supported_isas(),
        "features": dict(_core.cpu_features()),
        "num_threads": _num_threads,
    }


def set_isa(name):
    """Use the CPU kernel built for `name` ("scalar", "avx2", "avx512", "avx512bf16" or "amx"; see
    cpu_info()).

    The best supported one is chosen at import; FASTATTN_ISA=<name> chooses another. Meant for
    testing and comparison: the choice applies to the whole process.
    """
    if not isinstance(name, str):
        raise TypeError(f"set_isa needs an ISA name, got {type(name).__name__}")
    _core.set_isa(name)


if "FASTATTN_ISA" in os.environ:
    try:
        set_isa(os.environ["FASTATTN_ISA"])
    except ValueError as error:
        raise ValueError(f"FASTATTN_ISA: {error}") from None


class _Names:
    """How the caller spelled the arguments, so errors name them the caller's way."""

    def __init__(self, q, k, v, mask, causal):
        self.q, self.k, self.v, self.mask, self.causal = q, k, v, mask, causal


_ATTENTION_NAMES = _Names("q", "k", "v", "mask", "causal")
_SDPA_NAMES = _Names("query", "key", "value", "attn_mask", "is_causal")


def _check_array(x, name):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}; convert it explicitly, "
                        f"e.g. with np.asarray(..., dtype=np.float32)")
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dims (..., L, E), got shape {x.shape}")
    if x.ndim > _MAX_NDIM:
        raise ValueError(f"{name} has {x.ndim} dims; at most {_MAX_NDIM} are supported")
    if not x.dtype.isnative:
        raise ValueError(f"{name} has non-native byte order {x.dtype}; convert it with astype first")
    if not x.flags.aligned:
        raise ValueError(f"{name} is not aligned to its element size; copy it into an aligned array")
    # Heads come third from the end; a 2-D input is one head.
    return x if x.ndim > 2 else x[np.newaxis]


def _check_scale(scale, head_dim):
    if scale is None:
        # With head_dim 0 every score is 0 whatever the scale; PyTorch then averages v.
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not _within_float32(scale):
        raise ValueError(f"scale must be finite and at most {_FLOAT32_MAX:.4g} in magnitude (the largest float32), "
                         f"got {scale}")
    return float(scale)


class _Layout(NamedTuple):
    """The sizes every operand must agree on; the output is batch + (heads_q, seqlen_q, head_dim_v)."""
    batch: tuple
    heads_q: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    head_dim_v: int


def _check_shapes(q_shape, k_shape, v_shape, names):
    """Shapes of at least 3 dims (batch..., heads, rows, cols) -> their _Layout, or a ValueError."""
    heads_q, seqlen_q, head_dim = q_shape[-3:]
    heads_k, seqlen_k, head_dim_k = k_shape[-3:]
    heads_v, seqlen_v, head_dim_v = v_shape[-3:]
    if head_dim_k != head_dim:
        raise ValueError(f"{names.k} has head_dim {head_dim_k} but {names.q} has {head_dim}")
    if seqlen_v != seqlen_k:
        raise ValueError(f"{names.v} has {seqlen_v} keys (dim -2) but {names.k} has {seqlen_k}")
    for heads, name in ((heads_k, names.k), (heads_v, names.v)):
        if heads == 0 or heads_q % heads != 0:
            raise ValueError(
                f"{names.q} has {heads_q} heads, which is not a multiple of the {heads} heads of {name} "
                f"(grouped-query attention needs query heads = n * key/value heads)")
    try:
        batch = q_shape[:-3]
        if not batch == k_shape[:-3] == v_shape[:-3]:  # np.broadcast_shapes costs 2 us
            batch = np.broadcast_shapes(batch, k_shape[:-3], v_shape[:-3])
    except ValueError:
        raise ValueError(
            f"the batch dims of {names.q} {q_shape[:-3]}, {names.k} {k_shape[:-3]} and "
            f"{names.v} {v_shape[:-3]} do not broadcast") from None
    return _Layout(batch, heads_q, seqlen_q, seqlen_k, head_dim, head_dim_v)


def _mask_target(mask_shape, layout, names):
    """The scores' shape, which the mask must broadcast to without growing it."""
    target = layout.batch + (layout.heads_q, layout.seqlen_q, layout.seqlen_k)
    try:
        if np.broadcast_shapes(mask_shape, target) == target:
            return target
    except ValueError:
        pass
    raise ValueError(f"{names.mask} of shape {tuple(mask_shape)} does not broadcast to the scores' shape "
                     f"{target} (batch..., query heads, L, S)")


def _check_causal(causal, names):
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"{names.causal} must be a bool, got {type(causal).__name__}")
    return bool(causal)


_ALIGNS = ("top_left", "bottom_right")


class _Variants(NamedTuple):
    """fastattn.attention's keywords beyond the drop-in's, as the caller passed them; the defaults
    change nothing."""
    align: str = "top_left"
    window: object = None
    softcap: object = None
    alibi_slopes: object = None
    kv_lengths: object = None
    return_lse: bool = False
    out: object = None


def _check_window(window):
    if window is None:
        return (-1, -1)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be a pair (left, right) or None, got {window!r}")
    sides = []
    for side, name in zip(window, ("left", "right")):
        if side is None:
            side = -1
        if isinstance(side, bool) or not isinstance(side, (int, np.integer)):
            raise TypeError(f"window {name} side must be an int or None, got {type(side).__name__}")
        sides.append(max(int(side), -1))
    return tuple(sides)


def _check_softcap(softcap):
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, Real):
        raise TypeError(f"softcap must be a positive number or None, got {type(softcap).__name__}")
    if not (softcap > 0 and _within_float32(softcap)):
        raise ValueError(f"softcap must be positive and at most {_FLOAT32_MAX:.4g} (the largest float32), "
                         f"got {softcap}")
    return float(softcap)


def _check_scalar_variants(variants):
    """(align_bottom_right, (window_left, window_right), softcap) of the keywords that are plain values,
    shared by the CPU and GPU paths."""
    if variants.align not in _ALIGNS:
        raise ValueError(f"align must be one of {_ALIGNS}, got {variants.align!r}")
    if not isinstance(variants.return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be a bool, got {type(variants.return_lse).__name__}")
    return variants.align == "bottom_right", _check_window(variants.window), _check_softcap(variants.softcap)


def _check_alibi_shape(shape, layout):
    if tuple(shape) not in ((layout.heads_q,), layout.batch + (layout.heads_q,)):
        raise ValueError(f"alibi_slopes has shape {tuple(shape)}; expected ({layout.heads_q},) or "
                         f"{layout.batch + (layout.heads_q,)} (batch..., query heads)")


def _check_kv_lengths_values(lengths, layout):
    """lengths: the host values; shape and range as fastattn.attention documents."""
    if lengths.shape != layout.batch:
        raise ValueError(f"kv_lengths has shape {lengths.shape}; expected the batch shape {layout.batch} "
                         f"(one length per batch element)")
    if lengths.size and (lengths.min() < 0 or lengths.max() > layout.seqlen_k):
        raise ValueError(f"kv_lengths must lie in [0, {layout.seqlen_k}] (the keys of k), got values from "
                         f"{lengths.min()} to {lengths.max()}")


def _check_alibi_slopes(slopes, layout):
    """(Hq,) or batch + (Hq,), any real float dtype; read as float64 (a parameter vector, not data)."""
    if slopes is None:
        return None
    if not isinstance(slopes, np.ndarray):
        raise TypeError(f"alibi_slopes must be a NumPy array, got {type(slopes).__name__}")
    if slopes.dtype.kind != "f" and not _is_half(slopes.dtype):
        raise TypeError(f"alibi_slopes must have a float dtype, got {slopes.dtype}")
    _check_alibi_shape(slopes.shape, layout)
    target = layout.batch + (layout.heads_q,)
    slopes = slopes.astype(np.float64)
    if not _within_float32(slopes):
        raise ValueError(f"alibi_slopes must be finite and at most {_FLOAT32_MAX:.4g} in magnitude (the largest "
                         f"float32)")
    return np.broadcast_to(slopes, target)


def _check_kv_lengths(kv_lengths, layout):
    """The batch shape ((B,) for 4-D inputs), integers in [0, S]; read as int64."""
    if kv_lengths is None:
        return None
    if not isinstance(kv_lengths, np.ndarray):
        raise TypeError(f"kv_lengths must be a NumPy array, got {type(kv_lengths).__name__}")
    if kv_lengths.dtype.kind not in "iu":
        raise TypeError(f"kv_lengths must have an integer dtype, got {kv_lengths.dtype}")
    _check_kv_lengths_values(kv_lengths, layout)
    return kv_lengths.astype(np.int64)


def _check_out(out, shape, dtype, inputs):
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array or None, got {type(out).__name__}")
    if out.shape != shape:
        raise ValueError(f"out has shape {out.shape}; the result has shape {shape}")
    if out.dtype != dtype:
        raise ValueError(f"out has dtype {out.dtype}; the result has dtype {dtype}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    if not out.dtype.isnative or not out.flags.aligned:
        raise ValueError("out must be aligned and in native byte order")
    for x, name in inputs:
        try:
            overlaps = x is not None and np.shares_memory(out, x, max_work=1000)
        except np.exceptions.TooHardError:  # strides too intricate to decide quickly: refuse
            overlaps = True
        if overlaps:
            raise ValueError(f"out overlaps {name}; the inputs must stay intact while out is written")
    return out


def _broadcast(x, shape):
    """x viewed with `shape` (stride 0 in broadcast dims); x itself when it has that shape already,
    since np.broadcast_to costs about 10 us, a quarter of a small call."""
    return x if x.shape == shape else np.broadcast_to(x, shape)


def _only_numpy(arrays):
    """Whether each of `arrays` is None or exactly a NumPy array: the common call, which then skips the
    GPU and framework checks (together a sixth of a small call's time)."""
    for x in arrays:
        if x is not None and type(x) is not np.ndarray:
            return False
    return True


def _attention(q, k, v, mask, causal, scale, names, variants=_Variants(), heads=None):
    """heads: if given, q, k or v with one head serve all `heads` heads (a stride-0 head dim)."""
    if _only_numpy((q, k, v, mask, variants.out, variants.alibi_slopes, variants.kv_lengths)):
        framework = None
    elif any(is_device_array(x) for x in (q, k, v, mask, variants.out)):
        from .cuda import dispatch  # imports numba-cuda, only for callers that hold GPU arrays

        return dispatch.attention(q, k, v, mask, causal, scale, names, variants, heads)
    else:
        framework = interop.framework_of({names.q: q, names.k: k, names.v: v, names.mask: mask,
                                          "out": variants.out, "alibi_slopes": variants.alibi_slopes,
                                          "kv_lengths": variants.kv_lengths})
    if framework is not None:
        if framework == "jax" and variants.out is not None:
            raise TypeError("out is a JAX array, but JAX arrays are immutable; leave out=None to get a new one")
        views = variants._replace(**{field: interop.as_numpy(getattr(variants, field), field, framework)
                                     for field in ("out", "alibi_slopes", "kv_lengths")})
        result = _attention(*(interop.as_numpy(x, name, framework) for x, name in
                              ((q, names.q), (k, names.k), (v, names.v), (mask, names.mask))),
                            causal, scale, names, views, heads)
        out, lse = result if variants.return_lse else (result, None)
        out = variants.out if variants.out is not None else interop.as_framework(out, framework)
        return out if lse is None else (out, interop.as_framework(lse, framework))

    ndim_out = max(np.ndim(q), np.ndim(k), np.ndim(v))
    q = _check_array(q, names.q)
    k = _check_array(k, names.k)
    v = _check_array(v, names.v)
    if heads is not None:
        q, k, v = (_broadcast(x, x.shape[:-3] + (heads,) + x.shape[-2:]) for x in (q, k, v))
    if not _is_supported(q.dtype):
        raise TypeError(f"{names.q} has dtype {q.dtype}; fastattn supports float32, float64, float16 and "
                        f"bfloat16 (ml_dtypes.bfloat16)")
    for x, name in ((k, names.k), (v, names.v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but {names.q} has {q.dtype}; pass one dtype")
    layout = _check_shapes(q.shape, k.shape, v.shape, names)
    scale = _check_scale(scale, layout.head_dim)
    causal = _check_causal(causal, names)

    if mask is not None:
        if not isinstance(mask, np.ndarray):
            raise TypeError(f"{names.mask} must be a NumPy array or None, got {type(mask).__name__}")
        if mask.dtype != np.bool_ and not _is_supported(mask.dtype):
            raise TypeError(f"{names.mask} has dtype {mask.dtype}; use bool or a float dtype (float32, float64, "
                            f"float16, bfloat16)")
        if not mask.dtype.isnative or not mask.flags.aligned:
            raise ValueError(f"{names.mask} must be aligned and in native byte order")
        mask = np.broadcast_to(mask, _mask_target(mask.shape, layout, names))  # broadcast dims: stride 0

    bottom_right, window, softcap = _check_scalar_variants(variants)
    slopes = _check_alibi_slopes(variants.alibi_slopes, layout)
    kv_lengths = _check_kv_lengths(variants.kv_lengths, layout)

    batch = layout.batch
    out_shape = batch + (layout.heads_q, layout.seqlen_q, layout.head_dim_v)
    out = _check_out(variants.out, out_shape if ndim_out > 2 else out_shape[1:], q.dtype,
                     ((q, names.q), (k, names.k), (v, names.v), (mask, names.mask)))
    result = interop.empty(out_shape, q.dtype) if out is None else out if ndim_out > 2 else out[np.newaxis]
    lse_shape = batch + (layout.heads_q, layout.seqlen_q)
    lse = interop.empty(lse_shape, _lse_dtype(q.dtype), "the log-sum-exp") if variants.return_lse else None
    if math.prod(batch) * layout.heads_q * layout.seqlen_q > 0:
        _core.attention_forward(
            _broadcast(q, batch + q.shape[-3:]),
            _broadcast(k, batch + k.shape[-3:]),
            _broadcast(v, batch + v.shape[-3:]),
            result, mask, scale, causal, _num_threads,
            align_bottom_right=bottom_right, window_left=window[0], window_right=window[1],
            softcap=softcap, alibi_slopes=slopes, kv_lengths=kv_lengths, lse=lse)
    if out is None:
        out = result if ndim_out > 2 else result[0]
    if not variants.return_lse:
        return out
    return out, lse if ndim_out > 2 else lse[0]


def attention(q, k, v, mask=None, *, causal=False, scale=None, align="top_left", window=None, softcap=None,
              alibi_slopes=None, kv_lengths=None, return_lse=False, out=None):
    """softmax(q k^T * scale + mask) v, fused: the L x S score matrix is never stored.

    q (..., Hq, L, E), k (..., Hk, S, E), v (..., Hk, S, Ev); one dtype, float32, float64, float16
    or bfloat16 (ml_dtypes.bfloat16), any strides. Half precision is computed in float32 (scores,
    softmax, accumulation) and the result rounded to the input dtype; on the "avx512bf16" and "amx"
    ISAs bfloat16 probabilities are rounded to bfloat16 before they multiply v (README, "Data types").
    Batch dims broadcast. Query head h uses key/value head h // (Hq // Hk) (grouped-query attention).
    mask: bool (True = may attend) or any float dtype (added to the scaled scores), broadcastable to
    (..., Hq, L, S). scale defaults to 1 / sqrt(E); a given one is finite in float32 (|scale| <=
    3.4e38). A row with no visible key gives zeros.
    fastattn.reference draws every rule below.

    align: "top_left" (PyTorch) puts row i's diagonal at key d(i) = i, "bottom_right"
    (FlashAttention, KV caches) at i + S - L. causal: key j visible iff j <= d(i).
    window=(left, right): key j visible iff d(i) - left <= j <= d(i) + right; None or a negative
    side is unbounded; causal caps right at 0. Keys outside every row's window cost nothing.
    softcap=c (0 < c <= 3.4e38): scores become c * tanh(scores / c) after scaling, before ALiBi and
    the mask.
    alibi_slopes (Hq,) or (..., Hq), float, |slope| <= 3.4e38: adds -slope * |d(i) - j| (read as
    float64).
    kv_lengths, the batch shape ((B,) for 4-D inputs), integers in [0, S]: keys j >= kv_lengths[b]
    do not exist for batch element b; bottom_right then uses kv_lengths[b] for S.
    return_lse: also return the natural log-sum-exp of each row's scores, (..., Hq, L) of q's
    dtype (float32 for half precision), -inf for a row with no visible key (fastattn.merge_states
    combines such results).
    out: an array of the result's shape and dtype, any strides, not overlapping an input, written
    and returned instead of a new C-contiguous array.

    PyTorch CPU tensors and JAX CPU arrays work in place of every array argument (all from one
    framework; tensors not requiring grad): read where they are, the result returned in the caller's
    framework (fastattn.interop says how, and the one case that copies).
    """
    variants = _Variants(align, window, softcap, alibi_slopes, kv_lengths, return_lse, out)
    return _attention(q, k, v, mask, causal, scale, _ATTENTION_NAMES, variants)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention (PyTorch 2.13) on NumPy arrays.

    Inference only: dropout_p must be 0. Without enable_gqa, the head dims broadcast like batch
    dims; with it, Hq must be a multiple of the key and value heads. attn_mask is bool, float32 or
    of the query's dtype, and cannot be combined with is_causal (as in PyTorch). A scale beyond
    float32's range raises ValueError, where PyTorch's float32 kernels return NaN.
    """
    if dropout_p != 0.0:
        raise NotImplementedError(
            f"dropout_p={dropout_p}: fastattn is inference-only and never applies dropout; pass 0.0")
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal=True cannot both be set (PyTorch refuses too); "
                         "fastattn.attention(q, k, v, mask, causal=True) applies both")
    if isinstance(attn_mask, np.ndarray) and isinstance(query, np.ndarray):
        if attn_mask.dtype not in (np.dtype(np.bool_), np.dtype(np.float32), query.dtype):
            raise TypeError(f"attn_mask has dtype {attn_mask.dtype}; PyTorch takes bool, float32 "
                            f"or the query's dtype {query.dtype}")
    heads = None if enable_gqa else _broadcast_heads(query, key, value)
    return _attention(query, key, value, attn_mask, is_causal, scale, _SDPA_NAMES, heads=heads)


def _broadcast_heads(query, key, value):
    """PyTorch without enable_gqa treats the head dim as a batch dim: equal, or 1 to broadcast.
    The common head count, or None when there is no head dim (_attention reports bad shapes)."""
    shapes = [tuple(getattr(x, "shape", ())) for x in (query, key, value)]
    if min(len(shape) for shape in shapes) < 2 or max(len(shape) for shape in shapes) < 3:
        return None
    counts = [shape[-3] if len(shape) > 2 else 1 for shape in shapes]  # a 2-D input is one head
    heads = set(counts) - {1}
    if len(heads) > 1:
        raise ValueError(f"query, key and value have {counts[0]}, {counts[1]} and {counts[2]} heads; "
                         f"without enable_gqa=True they must be equal or 1")
    return heads.pop() if heads else 1
