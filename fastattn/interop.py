"""PyTorch CPU tensors through the NumPy entry points, by DLPack and without copies.

A call whose array arguments are PyTorch tensors views each of them as a NumPy array sharing its
memory (np.from_dlpack), runs as for NumPy, and hands the result back as a tensor sharing the result's
memory (torch.from_dlpack); an out= tensor is written in place and returned itself. The framework is
told by the argument's type, so PyTorch is never imported here unless the caller already did, and
NumPy arrays and tensors in one call raise TypeError: nothing is converted implicitly.
"""

import sys

import numpy as np

# The top-level module of an array type -> the framework handled here. Anything else is left to the
# NumPy path, whose checks name the argument and the type they refuse.
_FRAMEWORKS = {"torch": "torch"}


def framework_of(arguments):
    """'torch' when the non-None arguments ({name: value}) are PyTorch tensors, None when none is;
    TypeError when they mix PyTorch with anything else."""
    present = {name: value for name, value in arguments.items() if value is not None}
    kinds = {name: _FRAMEWORKS.get(type(value).__module__.partition(".")[0]) for name, value in present.items()}
    frameworks = set(kinds.values()) - {None}
    if not frameworks:
        return None
    framework = frameworks.pop()
    others = [name for name, kind in kinds.items() if kind != framework]
    if others:
        first = next(name for name, kind in kinds.items() if kind == framework)
        raise TypeError(f"{first} is a {framework} tensor but {others[0]} is a {type(present[others[0]]).__name__}; "
                        f"pass every array argument as {framework} tensors (nothing is converted implicitly)")
    return framework


def as_numpy(tensor, name):
    """A NumPy view of a CPU tensor: the same memory, strides and dtype."""
    if tensor is None:
        return None
    if tensor.device.type != "cpu":
        raise TypeError(f"{name} is on {tensor.device}; fastattn takes CPU tensors here and GPU arrays "
                        f"through __cuda_array_interface__")
    if tensor.requires_grad:
        raise ValueError(f"{name} requires grad, but fastattn is inference-only and has no backward; "
                         f"pass {name}.detach()")
    try:
        return np.from_dlpack(tensor)
    except (BufferError, RuntimeError, TypeError) as error:  # a dtype NumPy has no equivalent for
        raise TypeError(f"{name} has dtype {tensor.dtype}, which fastattn does not take yet; "
                        f"pass float32 or float64 ({error})") from None


def as_framework(array, framework):
    """The NumPy result as the caller's framework type, sharing its memory."""
    if framework == "torch":
        return sys.modules["torch"].from_dlpack(array)
    raise AssertionError(framework)
