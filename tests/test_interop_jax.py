"""JAX CPU arrays in, JAX arrays out: the same numbers as the NumPy path, inputs read in place."""

import numpy as np
import pytest

import fastattn
from fastattn import interop

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
ml_dtypes = pytest.importorskip("ml_dtypes")

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]  # JAX keeps float64 off unless x64 is enabled


def arrays(rng, *shapes, dtype=np.float32):
    return [jnp.asarray(rng.standard_normal(shape).astype(dtype)) for shape in shapes]


def bits(x):
    x = np.asarray(x)
    return x.view(f"u{x.dtype.itemsize}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kwargs", [{}, {"causal": True, "return_lse": True}, {"mask": "float", "softcap": 2.0}],
                         ids=repr)
def test_attention_on_jax_arrays_equals_numpy(rng, kwargs, dtype):
    q, k, v = arrays(rng, (2, 4, 33, 16), (2, 2, 50, 16), (2, 2, 50, 8), dtype=dtype)
    kwargs = dict(kwargs)
    if kwargs.get("mask") == "float":
        (kwargs["mask"],) = arrays(rng, (33, 50), dtype=dtype)
    result = fastattn.attention(q, k, v, **kwargs)
    expected = fastattn.attention(*(np.asarray(x) for x in (q, k, v)),
                                  **{key: np.asarray(value) if isinstance(value, jax.Array) else value
                                     for key, value in kwargs.items()})
    if kwargs.get("return_lse"):
        (result, lse), (expected, expected_lse) = result, expected
        assert isinstance(lse, jax.Array) and np.array_equal(np.asarray(lse), expected_lse)
    assert isinstance(result, jax.Array) and result.dtype == q.dtype
    assert np.array_equal(bits(result), bits(expected))


def test_sdpa_on_jax_arrays(rng):
    q, k, v = arrays(rng, (2, 4, 9, 16), (2, 2, 20, 16), (2, 2, 20, 16))
    result = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    expected = fastattn.scaled_dot_product_attention(*(np.asarray(x) for x in (q, k, v)), is_causal=True,
                                                     enable_gqa=True)
    assert isinstance(result, jax.Array) and np.array_equal(np.asarray(result), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_no_copies(rng, dtype):
    """Inputs are viewed in place; float32 and float16 results are adopted by JAX in place. (A
    bfloat16 result is the documented exception: JAX cannot adopt it through DLPack.)"""
    (q,) = arrays(rng, (2, 9, 16), dtype=dtype)
    assert interop.as_numpy(q, "q", "jax").ctypes.data == q.unsafe_buffer_pointer()
    result = interop.empty((2, 3), dtype)
    back = interop.as_framework(result, "jax")
    assert back.dtype == result.dtype
    if np.dtype(dtype).name != "bfloat16":
        assert back.unsafe_buffer_pointer() == result.ctypes.data


def test_refused(rng):
    q, k, v = arrays(rng, (2, 9, 16), (2, 20, 16), (2, 20, 16))
    with pytest.raises(TypeError, match="q is a jax array but k is a ndarray"):
        fastattn.attention(q, np.asarray(k), v)
    with pytest.raises(TypeError, match="out is a JAX array, but JAX arrays are immutable"):
        fastattn.attention(q, k, v, out=jnp.zeros((2, 9, 16)))
    with pytest.raises(TypeError, match="q has dtype int32"):
        fastattn.attention(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32))
