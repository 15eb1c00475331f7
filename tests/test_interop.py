"""PyTorch CPU tensors in, PyTorch tensors out: the same numbers as the NumPy path, no copies."""

import subprocess
import sys

import numpy as np
import pytest

import fastattn
from fastattn import interop

torch = pytest.importorskip("torch")


def tensors(rng, *shapes, dtype=np.float32):
    return [torch.from_numpy(rng.standard_normal(shape).astype(dtype)) for shape in shapes]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"causal": True}, {"mask": "bool"}, {"mask": "float"}, {"window": (5, 0), "softcap": 2.0},
     {"alibi_slopes": "slopes", "kv_lengths": "lengths", "align": "bottom_right", "causal": True},
     {"return_lse": True, "causal": True}],
    ids=repr,
)
def test_attention_on_tensors_equals_numpy(rng, kwargs, dtype):
    q, k, v = tensors(rng, (2, 4, 33, 16), (2, 2, 50, 16), (2, 2, 50, 8), dtype=dtype)
    kwargs = dict(kwargs)
    if kwargs.get("mask") == "bool":
        kwargs["mask"] = torch.from_numpy(rng.random((33, 50)) > 0.3)
    elif kwargs.get("mask") == "float":
        kwargs["mask"] = torch.from_numpy(rng.standard_normal((4, 1, 50)).astype(dtype))
    if "alibi_slopes" in kwargs:
        kwargs["alibi_slopes"] = torch.tensor([0.5, 0.25, 0.125, 0.0625])
        kwargs["kv_lengths"] = torch.tensor([50, 17])
    copies = [x.clone() for x in (q, k, v)]
    result = fastattn.attention(q, k, v, **kwargs)
    as_numpy = {key: value.numpy() if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}
    expected = fastattn.attention(q.numpy(), k.numpy(), v.numpy(), **as_numpy)
    if kwargs.get("return_lse"):
        (result, lse), (expected, expected_lse) = result, expected
        assert isinstance(lse, torch.Tensor) and np.array_equal(lse.numpy(), expected_lse)
    assert isinstance(result, torch.Tensor) and result.dtype == q.dtype
    assert np.array_equal(result.numpy(), expected)
    assert all(torch.equal(x, copy) for x, copy in zip((q, k, v), copies))  # inputs intact


@pytest.mark.parametrize("enable_gqa", [False, True])
def test_sdpa_on_tensors_equals_torch(rng, enable_gqa):
    """The drop-in on torch's own types, including one query head over many key heads."""
    q_heads = 4 if enable_gqa else 1
    q, k, v = tensors(rng, (2, q_heads, 9, 16), (2, 2, 20, 16), (2, 2, 20, 16))
    result = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    assert isinstance(result, torch.Tensor) and result.shape == expected.shape
    torch.testing.assert_close(result, expected, rtol=0, atol=2e-6)


def test_views_share_memory(rng):
    """Inputs are read where they are, with their strides, and the result is the kernel's own buffer."""
    (q,) = tensors(rng, (2, 9, 4, 16))
    transposed = q.transpose(1, 2)  # (B, H, L, E) view of a (B, L, H, E) tensor
    view = interop.as_numpy(transposed, "q")
    assert view.ctypes.data == transposed.data_ptr()
    assert view.strides == tuple(s * 4 for s in transposed.stride())
    result = np.ones((2, 3), np.float32)
    assert interop.as_framework(result, "torch").data_ptr() == result.ctypes.data


def test_out_tensor_is_written_in_place(rng):
    q, k, v = tensors(rng, (2, 4, 9, 16), (2, 4, 20, 16), (2, 4, 20, 16))
    buffer = torch.full((2, 9, 4, 16), 7.0)
    out = buffer.transpose(1, 2)  # (B, H, L, Ev) view of a (B, L, H, Ev) buffer
    pointer = out.data_ptr()
    assert fastattn.attention(q, k, v, out=out) is out
    assert out.data_ptr() == pointer
    assert np.array_equal(buffer.transpose(1, 2).numpy(), fastattn.attention(q.numpy(), k.numpy(), v.numpy()))


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda q, k, v: fastattn.attention(q, k.numpy(), v), TypeError, "q is a torch tensor but k is a ndarray"),
        (lambda q, k, v: fastattn.attention(q.numpy(), k, v.numpy()), TypeError, "k is a torch tensor but q"),
        (lambda q, k, v: fastattn.attention(q, k, v, mask=np.ones((9, 20), bool)), TypeError, "mask is a ndarray"),
        (lambda q, k, v: fastattn.attention(q, k, v, out=np.empty((2, 4, 9, 16), np.float32)), TypeError,
         "out is a ndarray"),
        (lambda q, k, v: fastattn.attention(q.requires_grad_(), k, v), ValueError, "q requires grad"),
        (lambda q, k, v: fastattn.attention(q.bfloat16(), k.bfloat16(), v.bfloat16()), TypeError,
         "q has dtype torch.bfloat16"),
        (lambda q, k, v: fastattn.attention(q.half(), k.half(), v.half()), TypeError, "q has dtype float16"),
        (lambda q, k, v: fastattn.attention(q.to("meta"), k.to("meta"), v.to("meta")), TypeError, "q is on meta"),
        (lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v.numpy()), TypeError,
         "query is a torch tensor but value"),
    ],
    ids=["k numpy", "q numpy", "mask numpy", "out numpy", "requires grad", "bfloat16", "float16", "meta device",
         "sdpa mixed"],
)
def test_refused(rng, make, error, message):
    q, k, v = tensors(rng, (2, 4, 9, 16), (2, 4, 20, 16), (2, 4, 20, 16))
    with pytest.raises(error, match=message):
        make(q, k, v)


def test_numpy_callers_never_import_torch():
    code = ("import sys, numpy as np, fastattn\n"
            "x = np.ones((2, 3, 8), np.float32)\n"
            "fastattn.attention(x, x, x)\n"
            "fastattn.scaled_dot_product_attention(x, x, x)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert run.returncode == 0, run.stderr[-2000:]
