"""The GPU back end: a fused Numba CUDA attention kernel (kernel.py) and its launcher (launcher.py).

Importing this package imports no Numba: is_device_array below needs nothing but the object, so
fastattn.api can ask it about every argument and a CPU-only user never pays for Numba. The
submodules import numba-cuda (`pip install fastattn[cuda]`) and are imported only for device arrays.
"""

__all__ = ["is_device_array"]


def is_device_array(x):
    """True for GPU arrays: anything exposing __cuda_array_interface__ (CuPy, PyTorch CUDA tensors,
    Numba device arrays), and the CUDA simulator's device arrays (NUMBA_ENABLE_CUDASIM=1), which mark
    themselves with __cuda_ndarray__ instead."""
    return hasattr(x, "__cuda_array_interface__") or getattr(type(x), "__cuda_ndarray__", False) is True
