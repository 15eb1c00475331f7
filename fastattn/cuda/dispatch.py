"""fastattn.attention for GPU arrays: the same checks as the CPU path (fastattn.api), then one launch.

Inputs are viewed, never copied or moved: anything with __cuda_array_interface__ (CuPy arrays, PyTorch
CUDA tensors, Numba device arrays) through numba.cuda.as_cuda_array, and the CUDA simulator's arrays
as they are. The result is a new array of the same kind as q, on the same device. Host and device
arrays in one call raise TypeError: nothing is moved between them implicitly.
"""

import numpy as np
from numba import cuda

from .. import api
from . import is_device_array, launcher

_SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
_MASK_DTYPES = (np.dtype(np.bool_), np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


class _Operand:
    """A device array as shape, NumPy dtype and element strides, with 2-D inputs given a head dim."""

    def __init__(self, array, name, min_ndim=2):
        if not is_device_array(array):
            raise TypeError(f"{name} is a {type(array).__name__} but other arguments are GPU arrays; "
                            f"pass all of them on the same device (nothing is copied implicitly)")
        self.original = array
        self.array = array if hasattr(array, "_ary") else cuda.as_cuda_array(array)
        self.dtype = np.dtype(self.array.dtype)
        shape, strides = tuple(self.array.shape), tuple(self.array.strides)
        if len(shape) < min_ndim:
            raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {shape}")
        if any(s % self.dtype.itemsize for s in strides):
            raise ValueError(f"{name} has a stride that is not a multiple of its element size")
        self.ndim = len(shape)
        self.shape = shape if len(shape) > 2 or min_ndim < 2 else (1,) + shape
        self.strides = tuple(s // self.dtype.itemsize for s in strides)
        if len(self.shape) > len(shape):
            self.strides = (0,) + self.strides

    def broadcast_heads(self, heads):
        """One head serves `heads` heads: a head dim of stride 0 (see api._attention)."""
        if self.shape[-3] != heads:
            self.shape = self.shape[:-3] + (heads,) + self.shape[-2:]
            self.strides = self.strides[:-3] + (0,) + self.strides[-2:]

    def byte_range(self):
        """[first, last] byte addresses the operand's elements occupy (None without elements)."""
        interface = getattr(self.array, "__cuda_array_interface__", None)
        base = interface["data"][0] if interface is not None else \
            self.array._ary.__array_interface__["data"][0]  # the simulator's arrays wrap NumPy
        shape, strides = tuple(self.array.shape), tuple(self.array.strides)
        if any(n == 0 for n in shape):
            return None
        low = base + sum((n - 1) * s for n, s in zip(shape, strides) if s < 0)
        high = base + sum((n - 1) * s for n, s in zip(shape, strides) if s > 0) + self.dtype.itemsize - 1
        return low, high

    def strides_for(self, target):
        """Element strides of this operand broadcast to `target` (batch..., head, row, col)."""
        padded_shape = (1,) * (len(target) - len(self.shape)) + self.shape
        padded_strides = (0,) * (len(target) - len(self.strides)) + self.strides
        strides = tuple(0 if n == 1 and t != 1 else s for n, t, s in zip(padded_shape, target, padded_strides))
        return launcher.Strides(strides[:-3], *strides[-3:])


def attention(q, k, v, mask, causal, scale, names, variants=api._Variants(), heads=None):
    ndim_out = max(np.ndim(x) if not is_device_array(x) else len(x.shape) for x in (q, k, v))
    q, k, v = _Operand(q, names.q), _Operand(k, names.k), _Operand(v, names.v)
    if heads is not None:
        for x in (q, k, v):
            x.broadcast_heads(heads)
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{names.q} has dtype {q.dtype}; the GPU kernel takes float32 and float16")
    for x, name in ((k, names.k), (v, names.v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but {names.q} has {q.dtype}; pass one dtype")
    layout = api._check_shapes(q.shape, k.shape, v.shape, names)
    scale = api._check_scale(scale, layout.head_dim)
    causal = api._check_causal(causal, names)

    params = dict(mask_kind="none", mask=None, mask_strides=None)
    if mask is not None:
        mask = _Operand(mask, names.mask, min_ndim=0)
        if mask.dtype not in _MASK_DTYPES:
            raise TypeError(f"{names.mask} has dtype {mask.dtype}; use bool, float16, float32 or float64")
        target = api._mask_target(mask.shape, layout, names)
        params = dict(mask_kind="boolean" if mask.dtype == np.bool_ else "additive", mask=mask.array,
                      mask_strides=mask.strides_for(target))

    batch = layout.batch
    out_shape = batch + (layout.heads_q, layout.seqlen_q, layout.head_dim_v)
    params.update(_variant_params(variants, layout))
    given_out = variants.out
    if given_out is None:
        out = cuda.device_array(out_shape, dtype=q.dtype)
    else:
        out = _checked_out(given_out, out_shape if ndim_out > 2 else out_shape[1:], q.dtype,
                           ((q, names.q), (k, names.k), (v, names.v), (mask, names.mask)))
    out_operand = _Operand(out, "out")
    lse = None
    if variants.return_lse:
        # float32 for float16 inputs too, as on the CPU: the log-sum-exp is computed in float32
        lse = cuda.device_array(batch + (layout.heads_q, layout.seqlen_q), dtype=np.float32)
        lse_operand = _Operand(lse, "lse", min_ndim=0)
        params.update(lse=lse_operand.array,
                      lse_strides=_tail_strides(lse_operand, batch, (layout.heads_q, layout.seqlen_q)))
    launcher.attention_forward(launcher.CudaAttentionParams(
        dtype=q.dtype, batch_shape=batch, num_heads_q=layout.heads_q, num_heads_k=k.shape[-3],
        num_heads_v=v.shape[-3], seqlen_q=layout.seqlen_q, seqlen_k=layout.seqlen_k, head_dim=layout.head_dim,
        head_dim_v=layout.head_dim_v, q=q.array, k=k.array, v=v.array, out=out_operand.array,
        q_strides=q.strides_for(batch + q.shape[-3:]), k_strides=k.strides_for(batch + k.shape[-3:]),
        v_strides=v.strides_for(batch + v.shape[-3:]), out_strides=out_operand.strides_for(out_shape),
        scale=scale, causal=causal, **params))
    if given_out is not None:
        result = given_out
    else:
        result = _like(q.original, out.reshape(out_shape[-2:]) if ndim_out <= 2 else out)
    if not variants.return_lse:
        return result
    return result, _like(q.original, lse.reshape(lse.shape[-1:]) if ndim_out <= 2 else lse)


def _variant_params(variants, layout):
    """CudaAttentionParams fields for align, window, softcap, ALiBi and kv_lengths, checked as on the
    CPU. Slopes and lengths must be device arrays of float64 and int64: converting them would be a
    copy, and the lengths are copied to the host once to check their range."""
    bottom_right, (window_left, window_right), softcap = api._check_scalar_variants(variants)
    params = dict(align_bottom_right=bottom_right, window_left=window_left, window_right=window_right,
                  softcap=softcap)
    if variants.alibi_slopes is not None:
        slopes = _Operand(variants.alibi_slopes, "alibi_slopes", min_ndim=1)
        if slopes.dtype != np.float64:
            raise TypeError(f"alibi_slopes on the GPU must be float64, got {slopes.dtype}")
        api._check_alibi_shape(slopes.shape, layout)
        params.update(alibi_slopes=slopes.array,
                      alibi_strides=_tail_strides(slopes, layout.batch, (layout.heads_q,)))
    if variants.kv_lengths is not None:
        lengths = _Operand(variants.kv_lengths, "kv_lengths", min_ndim=0)
        if lengths.dtype != np.int64:
            raise TypeError(f"kv_lengths on the GPU must be int64, got {lengths.dtype}")
        if lengths.shape != layout.batch:  # before the copy: a wrong shape may not even be readable
            api._check_kv_lengths_values(np.empty(lengths.shape), layout)
        api._check_kv_lengths_values(lengths.array.copy_to_host().reshape(lengths.shape), layout)
        params.update(kv_lengths=lengths.array, kv_lengths_strides=_tail_strides(lengths, layout.batch, ()))
    return params


def _checked_out(out, shape, dtype, inputs):
    operand = _Operand(out, "out", min_ndim=0)
    if tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}; the result has shape {shape}")
    if operand.dtype != dtype:
        raise ValueError(f"out has dtype {operand.dtype}; the result has dtype {dtype}")
    span = operand.byte_range()
    for x, name in inputs:
        other = x.byte_range() if x is not None else None
        if span and other and span[0] <= other[1] and other[0] <= span[1]:
            raise ValueError(f"out overlaps {name}; the inputs must stay intact while out is written")
    return out


def _tail_strides(operand, batch, tail):
    """Element strides of an operand of shape batch + tail (fewer leading dims broadcast) as
    launcher.Strides: the tail's dims become head, then row; the rest are 0."""
    target = batch + tail
    shape = (1,) * (len(target) - len(operand.shape)) + operand.shape
    strides = (0,) * (len(target) - len(operand.strides)) + operand.strides
    strides = tuple(0 if n == 1 and t != 1 else s for n, t, s in zip(shape, target, strides))
    return launcher.Strides(strides[:len(batch)], *(strides[len(batch):] + (0,) * (3 - len(tail))))


def _like(example, out):
    """The result as the kind of array the caller passed: Numba (or simulator) arrays as they are,
    CuPy arrays and PyTorch tensors through __cuda_array_interface__, without a copy."""
    module = type(example).__module__.split(".")[0]
    if module == "cupy":
        import cupy

        return cupy.asarray(out)
    if module == "torch":
        import torch

        return torch.as_tensor(out, device=example.device)
    return out
