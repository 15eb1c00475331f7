"""PyTorch CPU tensors and JAX CPU arrays through the NumPy entry points, without copies.

A call whose array arguments are tensors of one framework views each of them as a NumPy array
sharing its memory, runs as for NumPy, and hands the result back in the caller's framework, sharing
the result's memory:
- PyTorch (float32, float64, float16, bfloat16): np.from_dlpack both ways, any strides. NumPy has
  no bfloat16 of its own, so bfloat16 tensors cross as int16 and are viewed as ml_dtypes.bfloat16.
  An out= tensor is written in place and returned itself.
- JAX (the same dtypes): np.asarray views a CPU array's buffer (JAX arrays are dense and
  immutable, so out= is refused), and jax.dlpack adopts the result's 64-byte-aligned buffer. One
  exception, documented rather than hidden: JAX cannot adopt a bfloat16 buffer through DLPack, so a
  bfloat16 result (not the inputs) is copied once into a JAX array.
The framework is told by the argument's type, so no framework is imported here unless the caller
already did, and arguments from different frameworks (NumPy included) raise TypeError: nothing is
converted implicitly.
"""

import math
import sys

import numpy as np

# The top-level module of an array type -> the framework handled here. Anything else is left to the
# NumPy path, whose checks name the argument and the type they refuse.
_FRAMEWORKS = {"torch": "torch", "jax": "jax", "jaxlib": "jax"}
_NOUNS = {"torch": "tensor", "jax": "array"}
_ALIGNMENT = 64  # what XLA's CPU runtime needs to adopt a buffer instead of copying it


def framework_of(arguments):
    """'torch' or 'jax' when the non-None arguments ({name: value}) are of that framework, None when
    none is; TypeError when they mix a framework with anything else."""
    present = {name: value for name, value in arguments.items() if value is not None}
    kinds = {name: _FRAMEWORKS.get(type(value).__module__.partition(".")[0]) for name, value in present.items()}
    frameworks = set(kinds.values()) - {None}
    if not frameworks:
        return None
    if len(frameworks) > 1:
        first, second = (next(name for name, kind in kinds.items() if kind == f) for f in sorted(frameworks))
        raise TypeError(f"{first} is a {kinds[first]} array but {second} is a {kinds[second]} array; pass every "
                        f"array argument from one framework (nothing is converted implicitly)")
    framework = frameworks.pop()
    others = [name for name, kind in kinds.items() if kind != framework]
    if others:
        first = next(name for name, kind in kinds.items() if kind == framework)
        noun = _NOUNS[framework]
        raise TypeError(f"{first} is a {framework} {noun} but {others[0]} is a {type(present[others[0]]).__name__}; "
                        f"pass every array argument as {framework} {noun}s (nothing is converted implicitly)")
    return framework


def as_numpy(array, name, framework):
    """A NumPy view of a CPU tensor or array: the same memory, strides and dtype."""
    if array is None:
        return None
    if framework == "jax":
        return _jax_as_numpy(array, name)
    if array.device.type != "cpu":
        raise TypeError(f"{name} is on {array.device}; fastattn takes CPU tensors here and GPU arrays "
                        f"through __cuda_array_interface__")
    if array.requires_grad:
        raise ValueError(f"{name} requires grad, but fastattn is inference-only and has no backward; "
                         f"pass {name}.detach()")
    torch = sys.modules["torch"]
    if array.dtype == torch.bfloat16:
        import ml_dtypes

        return np.from_dlpack(array.view(torch.int16)).view(ml_dtypes.bfloat16)
    try:
        return np.from_dlpack(array)
    except (BufferError, RuntimeError, TypeError) as error:  # a dtype NumPy has no equivalent for
        raise TypeError(f"{name} has dtype {array.dtype}, which fastattn does not take; pass float32, "
                        f"float64, float16 or bfloat16 ({error})") from None


def _jax_as_numpy(array, name):
    devices = array.devices()
    if any(device.platform != "cpu" for device in devices):
        raise TypeError(f"{name} is on {sorted(str(d) for d in devices)}; fastattn takes JAX arrays on the CPU "
                        f"(reading a GPU array here would copy it to the host)")
    return np.asarray(array)  # a read-only view of the CPU buffer


def empty(shape, dtype, name="the result"):
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary; MemoryError
    naming `name` when it cannot be allocated."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    try:
        buffer = np.empty(size + _ALIGNMENT, np.uint8)
    except MemoryError:
        raise MemoryError(f"cannot allocate {name}: shape {tuple(shape)} of {dtype} needs {size / 2**30:.1f} GiB") from None
    start = -buffer.ctypes.data % _ALIGNMENT
    return buffer[start:start + size].view(dtype).reshape(shape)


def as_framework(array, framework):
    """The NumPy result as the caller's framework type, sharing its memory (JAX bfloat16: a copy)."""
    if framework == "torch":
        torch = sys.modules["torch"]
        if array.dtype.name == "bfloat16":
            return torch.from_dlpack(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_dlpack(array)
    if framework == "jax":
        import jax  # already imported by the caller, who passed JAX arrays

        if array.dtype.name == "bfloat16":
            return jax.numpy.array(array)
        return jax.dlpack.from_dlpack(array)
    raise AssertionError(framework)
