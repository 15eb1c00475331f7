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

    def strides_for(self, target):
        """Element strides of this operand broadcast to `target` (batch..., head, row, col)."""
        padded_shape = (1,) * (len(target) - len(self.shape)) + self.shape
        padded_strides = (0,) * (len(target) - len(self.strides)) + self.strides
        strides = tuple(0 if n == 1 and t != 1 else s for n, t, s in zip(padded_shape, target, padded_strides))
        return launcher.Strides(strides[:-3], *strides[-3:])


def attention(q, k, v, mask, causal, scale, names):
    ndim_out = max(np.ndim(x) if not is_device_array(x) else len(x.shape) for x in (q, k, v))
    q, k, v = _Operand(q, names.q), _Operand(k, names.k), _Operand(v, names.v)
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
    out = cuda.device_array(out_shape, dtype=q.dtype)
    out_operand = _Operand(out, "out")
    launcher.attention_forward(launcher.CudaAttentionParams(
        dtype=q.dtype, batch_shape=batch, num_heads_q=layout.heads_q, num_heads_k=k.shape[-3],
        num_heads_v=v.shape[-3], seqlen_q=layout.seqlen_q, seqlen_k=layout.seqlen_k, head_dim=layout.head_dim,
        head_dim_v=layout.head_dim_v, q=q.array, k=k.array, v=v.array, out=out,
        q_strides=q.strides_for(batch + q.shape[-3:]), k_strides=k.strides_for(batch + k.shape[-3:]),
        v_strides=v.strides_for(batch + v.shape[-3:]), out_strides=out_operand.strides_for(out_shape),
        scale=scale, causal=causal, **params))
    if ndim_out <= 2:
        out = out.reshape(out_shape[-2:])
    return _like(q.original, out)


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
