"""Turns a CudaAttentionParams into a kernel launch: the specialisation (head-dim bucket, mask kind and
dtype, windowed; the input dtype through Numba's own signature cache), the grid (query tiles, query heads,
batch) and flat views of the operands.

Every operand reaches the kernel as a flat 1-D device array spanning exactly the memory its strides
touch, plus a layout tuple (origin, batch strides, head, row and column strides, in elements). So any
strides work, zero (broadcast), transposed or negative, without a copy, and the kernel has one
signature whatever the number of batch dims.

The launch goes to params.stream, by default the legacy default stream (0), which orders it after
work queued on that stream by CuPy and PyTorch (their defaults); the call returns once the launch is
queued, without waiting for the GPU. Under NUMBA_ENABLE_CUDASIM=1 the same code runs on the simulator's device arrays.
"""

import ctypes
import math
import sys
import threading
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Tuple

import numpy as np
from numba import cuda
from numba.cuda import config as config_module

from . import kernel as _kernel

_SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
# A mask is bool (True = may attend) or float16/float32/float64 (added to the scaled scores); values of
# a float64 mask beyond float32's range are clamped to it, as in the CPU kernel.
_MASK_DTYPES = {np.dtype(np.bool_): "bool", np.dtype(np.float16): "float16",
                np.dtype(np.float32): "float32", np.dtype(np.float64): "float64"}
_MAX_GRID_YZ = 65535  # CUDA's limit on gridDim.y and gridDim.z


class Strides(NamedTuple):
    """Element (not byte) strides of one operand, as in csrc/params.h; zero strides broadcast."""
    batch: Tuple[int, ...]
    head: int
    row: int
    col: int


@dataclass
class CudaAttentionParams:
    """csrc/params.h's AttentionParams for the GPU, field for field (num_threads has no GPU meaning).

    q (batch..., Hq, L, E), k (batch..., Hk, S, E), v (batch..., Hv, S, Ev), out (batch..., Hq, L, Ev)
    and mask (batch..., Hq, L, S) are device arrays (numba device arrays, anything with
    __cuda_array_interface__, or the simulator's arrays); their own shapes and strides are ignored:
    batch_shape, the sizes and the *_strides fields (Strides or plain (batch, head, row, col) tuples)
    say where each element is, relative to the array's first element. out is written.
    """
    dtype: Any  # np.float32 or np.float16: of q, k, v and out
    batch_shape: Tuple[int, ...]
    num_heads_q: int
    num_heads_k: int  # query head h reads key head h // (num_heads_q // num_heads_k)
    num_heads_v: int  # and value head h // (num_heads_q // num_heads_v)
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    head_dim_v: int
    q: Any
    k: Any
    v: Any
    out: Any
    q_strides: Strides
    k_strides: Strides
    v_strides: Strides
    out_strides: Strides
    mask_kind: str = "none"  # "none", "boolean" (True = may attend) or "additive" (-inf hides)
    mask: Optional[Any] = None
    mask_strides: Optional[Strides] = None  # [batch..., head, query row, key]
    scale: float = 1.0  # multiplies q k^T before the mask is added
    causal: bool = False  # key j visible to query i iff j <= d(i): window_right capped at 0
    # As in params.h: d(i) = i (+ seqlen_k_b - seqlen_q when align_bottom_right); key j visible iff
    # d(i) - window_left <= j <= d(i) + window_right (a negative side: unbounded), j < seqlen_k_b.
    align_bottom_right: bool = False
    window_left: int = -1
    window_right: int = -1
    kv_lengths: Optional[Any] = None  # int64 [batch...]: seqlen_k_b, each in [0, seqlen_k]
    kv_lengths_strides: Optional[Strides] = None  # batch strides; head, row and col 0
    softcap: float = 0.0  # > 0: scores become softcap * tanh(scores / softcap)
    alibi_slopes: Optional[Any] = None  # float64 [batch..., Hq]: adds -slope * |d(i) - j|
    alibi_strides: Optional[Strides] = None  # batch and head strides; row and col 0
    lse: Optional[Any] = None  # float32 [batch..., Hq, L], written: each row's log-sum-exp
    lse_strides: Optional[Strides] = None  # batch, head and row strides; col 0
    # GPU only, not in params.h: the CUDA stream to launch on (a numba stream, e.g.
    # cuda.external_stream(torch.cuda.current_stream().cuda_stream)); 0 is the default stream.
    stream: Any = 0


def attention_forward(params):
    """Writes softmax(q k^T * scale + mask) v into params.out. Arguments are validated by fastattn.api;
    the checks here keep the launch memory-safe and name what is unsupported on the GPU."""
    p = params
    dtype = np.dtype(p.dtype)
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"the GPU kernel takes float32 or float16 inputs, got {dtype}")
    if len(p.batch_shape) > _kernel.MAX_BATCH_DIMS:
        raise ValueError(f"at most {_kernel.MAX_BATCH_DIMS} batch dims are supported, got {len(p.batch_shape)}")
    bucket = _kernel.head_dim_bucket(p.head_dim, p.head_dim_v)
    if bucket is None:
        raise ValueError(f"the GPU kernel supports head dims up to {_kernel.MAX_HEAD_DIM}, got "
                         f"head_dim {p.head_dim} and head_dim_v {p.head_dim_v}")
    if min(p.num_heads_k, p.num_heads_v) < 1 or p.num_heads_q % p.num_heads_k or p.num_heads_q % p.num_heads_v:
        raise ValueError(f"{p.num_heads_q} query heads is not a multiple of the {p.num_heads_k} key heads "
                         f"and the {p.num_heads_v} value heads")
    if p.num_heads_q > _MAX_GRID_YZ:
        raise ValueError(f"the GPU kernel supports at most {_MAX_GRID_YZ} query heads, got {p.num_heads_q}")
    if p.mask_kind not in _kernel.MASK_KINDS:
        raise ValueError(f"mask_kind must be one of {_kernel.MASK_KINDS}, got {p.mask_kind!r}")
    if (p.mask_kind == _kernel.MASK_NONE) != (p.mask is None):
        raise ValueError(f"mask_kind {p.mask_kind!r} does not match mask {type(p.mask).__name__}")

    batch = tuple(int(n) for n in p.batch_shape)
    batch_count = math.prod(batch)
    if batch_count * p.num_heads_q * p.seqlen_q * (p.head_dim_v + (p.lse is not None)) == 0:
        return  # nothing to write
    if not p.softcap >= 0:
        raise ValueError(f"softcap must be >= 0 (0 for none), got {p.softcap}")

    def operand(array, strides, heads, rows, cols, expected_dtype, name):
        shape = batch + (heads, rows, cols)
        return _flat_view(array, expected_dtype, shape, _stride_tuple(strides, len(batch)), name)

    def operand_or_placeholder(array, strides, heads, rows, cols, expected_dtype, name):
        if array is None:
            return _placeholder(expected_dtype), (0,) * _kernel.LAYOUT_LENGTH
        return operand(array, strides, heads, rows, cols, expected_dtype, name)

    q, q_layout = operand(p.q, p.q_strides, p.num_heads_q, p.seqlen_q, p.head_dim, dtype, "q")
    k, k_layout = operand(p.k, p.k_strides, p.num_heads_k, p.seqlen_k, p.head_dim, dtype, "k")
    v, v_layout = operand(p.v, p.v_strides, p.num_heads_v, p.seqlen_k, p.head_dim_v, dtype, "v")
    out, out_layout = operand(p.out, p.out_strides, p.num_heads_q, p.seqlen_q, p.head_dim_v, dtype, "out")
    mask_dtype = None
    if p.mask_kind == _kernel.MASK_NONE:
        mask, mask_layout = q, q_layout  # never read; keeps one signature per input dtype
    else:
        mask_dtype = _MASK_DTYPES.get(_dtype_of(p.mask))
        if mask_dtype is None or (p.mask_kind == _kernel.MASK_BOOLEAN) != (mask_dtype == "bool"):
            raise TypeError(f"a {p.mask_kind} mask must be "
                            f"{'bool' if p.mask_kind == _kernel.MASK_BOOLEAN else 'float16, float32 or float64'}, "
                            f"got {_dtype_of(p.mask)}")
        mask, mask_layout = operand(p.mask, p.mask_strides, p.num_heads_q, p.seqlen_q, p.seqlen_k,
                                    _dtype_of(p.mask), "mask")

    window_left = max(int(p.window_left), -1)
    window_right = max(int(p.window_right), -1)
    if p.causal:
        window_right = 0 if window_right < 0 else min(window_right, 0)
    kv_lengths, kv_layout = operand_or_placeholder(p.kv_lengths, p.kv_lengths_strides, 1, 1, 1, np.dtype(np.int64),
                                                   "kv_lengths")
    alibi, alibi_layout = operand_or_placeholder(p.alibi_slopes, p.alibi_strides, p.num_heads_q, 1, 1,
                                                 np.dtype(np.float64), "alibi_slopes")
    lse, lse_layout = operand_or_placeholder(p.lse, p.lse_strides, p.num_heads_q, p.seqlen_q, 1, np.dtype(np.float32),
                                             "lse")
    windowed = window_left >= 0 or window_right >= 0
    kernel = compiled_kernel(bucket, p.mask_kind, mask_dtype, windowed)
    config = _kernel.TILE_CONFIGS[bucket]
    dims = (1,) * (_kernel.MAX_BATCH_DIMS - len(batch)) + batch + (
        p.num_heads_q, p.num_heads_q // p.num_heads_k, p.num_heads_q // p.num_heads_v,
        p.seqlen_q, p.seqlen_k, p.head_dim, p.head_dim_v, window_left, window_right, int(bool(p.align_bottom_right)),
        int(p.kv_lengths is not None), int(p.alibi_slopes is not None), int(p.lse is not None))
    dims = tuple(int(n) for n in dims)
    query_tiles = -(-p.seqlen_q // config.block_m)
    threads = _kernel.threads_per_block(config)
    for batch_begin in range(0, batch_count, _MAX_GRID_YZ):
        grid = (query_tiles, p.num_heads_q, min(_MAX_GRID_YZ, batch_count - batch_begin))
        kernel[grid, threads, p.stream](q, k, v, out, mask, kv_lengths, alibi, lse, dims, q_layout, k_layout,
                                        v_layout, out_layout, mask_layout, kv_layout, alibi_layout, lse_layout,
                                        float(p.scale), float(p.softcap), batch_begin)


_compiled = {}


def compiled_kernel(bucket, mask_kind, mask_dtype, windowed):
    """The dispatcher of one specialisation, made once per process. Numba compiles it on the first
    launch for each input dtype and keeps that code: later calls with the same dtypes never recompile."""
    key = (bucket, mask_kind, mask_dtype, windowed)
    if key not in _compiled:
        config = _kernel.TILE_CONFIGS[bucket]
        function = _kernel.make_attention_kernel(config, mask_kind, windowed, mask_dtype)
        options = {"launch_bounds": _kernel.launch_bounds(config)}
        if config_module.ENABLE_CUDASIM:
            options = {}  # the simulator's jit takes no launch bounds
            _make_simulator_shared_arrays_thread_safe()
        _compiled[key] = cuda.jit(**options)(function)
    return _compiled[key]


def compiled_specialisations():
    """{(bucket, mask kind, mask dtype, windowed): number of compiled input-dtype versions}, for tests
    that check repeated calls do not recompile."""
    return {key: len(getattr(dispatcher, "overloads", ())) for key, dispatcher in _compiled.items()}


def _stride_tuple(strides, batch_ndim):
    batch_strides, head, row, col = strides
    batch_strides = tuple(int(s) for s in batch_strides)
    if len(batch_strides) != batch_ndim:
        raise ValueError(f"{len(batch_strides)} batch strides for {batch_ndim} batch dims")
    return batch_strides + (int(head), int(row), int(col))


def _dtype_of(array):
    interface = getattr(array, "__cuda_array_interface__", None)
    if interface is not None:
        return np.dtype(interface["typestr"])
    return np.dtype(array.dtype)


def _flat_view(array, dtype, shape, strides, name):
    """(flat 1-D device array over the elements `shape` and `strides` reach, layout tuple)."""
    if _dtype_of(array) != dtype:
        raise TypeError(f"{name} has dtype {_dtype_of(array)}, expected {dtype}")
    low = sum((n - 1) * s for n, s in zip(shape, strides) if s < 0)
    high = sum((n - 1) * s for n, s in zip(shape, strides) if s > 0)
    span = high - low + 1 if all(n > 0 for n in shape) else 0
    padded = (0,) * (_kernel.MAX_BATCH_DIMS - (len(shape) - 3))
    layout = (-low,) + padded + tuple(strides)
    if span == 0:
        return _placeholder(dtype), layout  # an operand without elements is never read
    interface = getattr(array, "__cuda_array_interface__", None)
    if interface is not None:
        pointer = interface["data"][0] + low * dtype.itemsize
        flat = cuda.from_cuda_array_interface(
            {"shape": (span,), "strides": None, "typestr": dtype.str, "data": (pointer, False),
             "version": 3}, owner=array, sync=False)
        return flat, layout
    host = getattr(array, "_ary", None)  # the simulator's device arrays wrap a NumPy array
    if host is None:
        raise TypeError(f"{name} is not a device array (it has no __cuda_array_interface__)")
    pointer = host.__array_interface__["data"][0] + low * dtype.itemsize
    memory = (ctypes.c_char * (span * dtype.itemsize)).from_address(pointer)
    flat = np.frombuffer(memory, dtype=dtype)
    return _simulator_array(flat), layout


_placeholders = {}


def _placeholder(dtype):
    if dtype not in _placeholders:
        _placeholders[dtype] = cuda.device_array(1, dtype=dtype)
    return _placeholders[dtype]


def _simulator_array(host):
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    return FakeCUDAArray(host)


def _make_simulator_shared_arrays_thread_safe():
    """numba-cuda 0.30.4's simulator runs a block's threads as Python threads; the first to call
    cuda.shared.array at a line creates the block's array and files it under that line, without a
    lock. Two threads can both find no array and each keep its own, so the block's threads stop
    sharing the tile: a wrong block now and then under load (about 1 in 200 blocks of a small test
    kernel with sys.setswitchinterval(1e-6)).
    This replaces the method by the same lookup done under a lock (dynamic shared memory, unused here,
    keeps the original)."""
    from numba.cuda import types
    from numba.cuda.np import numpy_support
    from numba.cuda.simulator import kernelapi

    shared = kernelapi.FakeCUDAShared
    if getattr(shared.array, "thread_safe", False):
        return
    unsafe_array = shared.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:
            return unsafe_array(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        line = (caller.f_code.co_filename, caller.f_lineno)  # the original's key
        with lock:
            if line not in self._allocations:
                if isinstance(dtype, types.Type):
                    dtype = numpy_support.as_dtype(dtype)
                self._allocations[line] = np.empty(shape, dtype)
            return self._allocations[line]

    array.thread_safe = True
    shared.array = array
