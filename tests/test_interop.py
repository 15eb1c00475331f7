"""PyTorch CPU tensors and JAX CPU arrays in, the same types out: the same numbers as the NumPy
path, no copies."""

import subprocess
import sys

import numpy as np
import pytest

import fastattn
from fastattn import interop

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

TORCH_DTYPES = {np.float32: torch.float32, np.float64: torch.float64, np.float16: torch.float16,
                "bfloat16": torch.bfloat16}


def tensors(rng, *shapes, dtype=np.float32):
    wide = np.float32 if dtype == "bfloat16" else dtype
    return [torch.from_numpy(rng.standard_normal(shape).astype(wide)).to(TORCH_DTYPES[dtype]) for shape in shapes]


def as_numpy(tensor):
    """A NumPy copy (bfloat16 through ml_dtypes), to run the NumPy path on the same values."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def bits(x):
    """Tensor or array -> its raw bits, to compare results exactly (NaNs included)."""
    x = as_numpy(x) if isinstance(x, torch.Tensor) else np.asarray(x)
    return x.view(f"u{x.dtype.itemsize}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, "bfloat16"], ids=str)
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
        (kwargs["mask"],) = tensors(rng, (4, 1, 50), dtype=dtype)
    if "alibi_slopes" in kwargs:
        kwargs["alibi_slopes"] = torch.tensor([0.5, 0.25, 0.125, 0.0625])
        kwargs["kv_lengths"] = torch.tensor([50, 17])
    copies = [x.clone() for x in (q, k, v)]
    result = fastattn.attention(q, k, v, **kwargs)
    numpy_kwargs = {key: as_numpy(value) if isinstance(value, torch.Tensor) else value
                    for key, value in kwargs.items()}
    expected = fastattn.attention(as_numpy(q), as_numpy(k), as_numpy(v), **numpy_kwargs)
    if kwargs.get("return_lse"):
        (result, lse), (expected, expected_lse) = result, expected
        assert isinstance(lse, torch.Tensor) and np.array_equal(lse.numpy(), expected_lse)
    assert isinstance(result, torch.Tensor) and result.dtype == q.dtype
    assert np.array_equal(bits(result), bits(expected))
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


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_half_precision_close_to_torch(rng, causal, dtype):
    """Both round once more than the float64 reference: fastattn by up to 1 unit of the dtype's
    rounding (tests/test_half_precision.py), torch by up to 1.4 here; so they differ by at most 3
    units of the row's magnitude."""
    q, k, v = tensors(rng, (2, 4, 70, 64), (2, 4, 90, 64), (2, 4, 90, 64), dtype=dtype)
    result = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert isinstance(result, torch.Tensor) and result.dtype == q.dtype
    unit = torch.finfo(q.dtype).eps / 2 * expected.float().abs().amax(-1, keepdim=True)
    assert ((result.float() - expected.float()).abs() <= 3 * unit).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, "bfloat16"], ids=str)
def test_views_share_memory(rng, dtype):
    """Inputs are read where they are, with their strides, and the result is the kernel's own buffer."""
    (q,) = tensors(rng, (2, 9, 4, 16), dtype=dtype)
    transposed = q.transpose(1, 2)  # (B, H, L, E) view of a (B, L, H, E) tensor
    view = interop.as_numpy(transposed, "q", "torch")
    assert view.ctypes.data == transposed.data_ptr()
    assert view.strides == tuple(s * q.element_size() for s in transposed.stride())
    result = interop.empty((2, 3), view.dtype)
    back = interop.as_framework(result, "torch")
    assert back.data_ptr() == result.ctypes.data and back.dtype == q.dtype


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
        (lambda q, k, v: fastattn.attention(q.int(), k.int(), v.int()), TypeError, "q has dtype int32"),
        (lambda q, k, v: fastattn.attention(q.bfloat16(), k, v), TypeError, "k has dtype float32 but q has bfloat16"),
        (lambda q, k, v: fastattn.attention(q.to("meta"), k.to("meta"), v.to("meta")), TypeError, "q is on meta"),
        (lambda q, k, v: fastattn.scaled_dot_product_attention(q, k, v.numpy()), TypeError,
         "query is a torch tensor but value"),
    ],
    ids=["k numpy", "q numpy", "mask numpy", "out numpy", "requires grad", "int32", "mixed dtypes", "meta device",
         "sdpa mixed"],
)
def test_refused(rng, make, error, message):
    q, k, v = tensors(rng, (2, 4, 9, 16), (2, 4, 20, 16), (2, 4, 20, 16))
    with pytest.raises(error, match=message):
        make(q, k, v)


def test_numpy_callers_never_import_a_framework():
    code = ("import sys, numpy as np, fastattn\n"
            "x = np.ones((2, 3, 8), np.float32)\n"
            "fastattn.attention(x, x, x)\n"
            "fastattn.scaled_dot_product_attention(x, x, x)\n"
            "imported = {'torch', 'jax', 'jaxlib'} & set(sys.modules)\n"
            "assert not imported, f'{imported} imported'\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert run.returncode == 0, run.stderr[-2000:]
