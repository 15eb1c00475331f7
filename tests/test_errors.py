"""Every documented error, and that its message names the argument at fault."""

import numpy as np
import pytest

import fastattn
from fastattn import _core

# Messages may use the parameter name (q) or the word (query).
NAMED = {
    "q": r"\b(q|query)\b",
    "k": r"\b(k|key)\b",
    "v": r"\b(v|value)\b",
    "mask": r"\b(mask|attn_mask)\b",
    "scale": r"\bscale\b",
}


def ones(*shape, dtype=np.float32):
    return np.ones(shape, dtype)


Q = ones(2, 4, 9, 16)
K = ones(2, 4, 20, 16)
V = ones(2, 4, 20, 8)


@pytest.mark.parametrize(
    "q, k, v, culprit",
    [
        (Q, ones(2, 4, 20, 15), V, "k"),  # head_dim differs from the query's
        (Q, K, ones(2, 4, 21, 8), "v"),  # key and value lengths differ
        (Q, ones(3, 4, 20, 16), V, "k"),  # batch 3 against the query's 2
        (Q, K, ones(3, 4, 20, 8), "v"),
        (Q, ones(2, 3, 20, 16), ones(2, 3, 20, 8), "k"),  # 4 query heads are not a multiple of 3
        (Q, K, ones(2, 3, 20, 8), "v"),
        (ones(2, 2, 9, 16), K, ones(2, 2, 20, 8), "k"),  # more key heads than query heads
        (ones(2, 4, 9, 16), ones(2, 2, 20, 16), ones(2, 8, 20, 8), "v"),
        (ones(16), ones(20, 16), ones(20, 8), "q"),  # fewer than 2 dims
        (ones(9, 16), ones(16), ones(20, 8), "k"),
        (ones(9, 16), ones(20, 16), ones(8), "v"),
        (np.array(1.0, np.float32), ones(20, 16), ones(20, 8), "q"),
    ],
    ids=[
        "key head_dim",
        "value length",
        "key batch",
        "value batch",
        "key heads do not divide",
        "value heads do not divide",
        "more key heads than query heads",
        "more value heads than query heads",
        "1-D query",
        "1-D key",
        "1-D value",
        "0-D query",
    ],
)
def test_incompatible_shapes(q, k, v, culprit):
    with pytest.raises(ValueError, match=NAMED[culprit]):
        fastattn.attention(q, k, v)


@pytest.mark.parametrize(
    "mask_shape",
    [(9, 21), (10, 20), (3, 9, 20), (2, 1, 9, 2), (3, 2, 4, 9, 20), (7, 1, 1, 1, 1)],
    ids=["keys", "queries", "heads", "keys, broadcastable head", "enlarges batch", "adds a dim"],
)
@pytest.mark.parametrize("mask_dtype", [bool, np.float32])
def test_mask_not_broadcastable_to_output(mask_shape, mask_dtype):
    with pytest.raises(ValueError, match=NAMED["mask"]):
        fastattn.attention(Q, K, V, np.ones(mask_shape, mask_dtype))


def test_mask_may_not_enlarge_two_dim_output():
    with pytest.raises(ValueError, match=NAMED["mask"]):
        fastattn.attention(ones(9, 16), ones(20, 16), ones(20, 8), np.ones((2, 9, 20), bool))


# Beyond float32's range the float32 kernels' scale is inf and every score NaN (found by fuzzing).
@pytest.mark.parametrize("scale", [np.nan, np.inf, -np.inf, 1e300, -1e39])
def test_scale_must_be_finite_in_float32(scale):
    with pytest.raises(ValueError, match=NAMED["scale"]):
        fastattn.attention(Q, K, V, scale=scale)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.complex64, np.complex128, np.bool_, np.longdouble])
def test_non_float_inputs(dtype):
    q, k, v = (x.astype(dtype) for x in (Q, K, V))
    with pytest.raises(TypeError):
        fastattn.attention(q, k, v)


def test_bool_query_with_float_key_value():
    with pytest.raises(TypeError, match=NAMED["q"]):
        fastattn.attention(Q.astype(bool), K, V)


@pytest.mark.parametrize(
    "q, k, v",
    [
        (Q, K.astype(np.float64), V),
        (Q, K, V.astype(np.float64)),
        (Q.astype(np.float64), K, V),
    ],
    ids=["key float64", "value float64", "query float64"],
)
def test_mixed_dtypes(q, k, v):
    with pytest.raises(TypeError):
        fastattn.attention(q, k, v)


@pytest.mark.parametrize("not_an_array", [None, "abc", object(), {"a": 1}])
@pytest.mark.parametrize("position", ["q", "k", "v"])
def test_inputs_that_are_not_arrays(not_an_array, position):
    args = {"q": Q, "k": K, "v": V}
    args[position] = not_an_array
    with pytest.raises(TypeError):
        fastattn.attention(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("mask_dtype", [np.int8, np.int64, np.longdouble, np.complex64])
def test_mask_dtype(mask_dtype):
    with pytest.raises(TypeError, match=NAMED["mask"]):
        fastattn.attention(Q, K, V, np.ones((9, 20), mask_dtype))


def test_causal_and_scale_are_keyword_only():
    with pytest.raises(TypeError):
        fastattn.attention(Q, K, V, None, True)


@pytest.mark.parametrize("threads", [0, -1])
def test_num_threads_must_be_positive(threads):
    before = fastattn.get_num_threads()
    with pytest.raises(ValueError, match="thread"):
        fastattn.set_num_threads(threads)
    assert fastattn.get_num_threads() == before


def test_sdpa_dropout_is_inference_only():
    with pytest.raises(NotImplementedError, match="inference"):
        fastattn.scaled_dot_product_attention(Q, K, Q, dropout_p=0.1)


def test_sdpa_mask_with_is_causal():
    with pytest.raises(ValueError, match=r"\b(attn_mask|is_causal)\b"):
        fastattn.scaled_dot_product_attention(Q, K, V, np.ones((9, 20), bool), is_causal=True)


@pytest.mark.parametrize("enable_gqa", [False, True])
def test_sdpa_heads_that_neither_broadcast_nor_group(enable_gqa):
    with pytest.raises(ValueError, match=NAMED["k"]):
        fastattn.scaled_dot_product_attention(Q, ones(2, 3, 20, 16), ones(2, 3, 20, 8), enable_gqa=enable_gqa)


def test_sdpa_mask_not_broadcastable():
    with pytest.raises(ValueError, match=r"\battn_mask\b"):
        fastattn.scaled_dot_product_attention(Q, K, V, np.ones((9, 21), bool))


def test_sdpa_float64_mask_with_float32_query():
    # torch accepts a float mask only in float32 or the query's dtype.
    with pytest.raises((TypeError, ValueError), match=r"\battn_mask\b"):
        fastattn.scaled_dot_product_attention(Q, K, V, np.zeros((9, 20), np.float64))


def test_dtypes_compare_by_value():
    """An array that went through pickle carries another (equal) dtype object: it is accepted."""
    import pickle

    q, k, v, mask = (pickle.loads(pickle.dumps(x)) for x in (Q, K, V, np.ones((9, 20), bool)))
    np.testing.assert_array_equal(fastattn.attention(q, k, v, mask), fastattn.attention(Q, K, V))


# The compiled entry point checks what it reads whatever it is given (found by fuzzing: k with fewer
# dims than q raised IndexError, and a non-array alibi_slopes, kv_lengths or lse was read as one).
def _binding_arrays():
    q, k, v = (np.ones((1, 2, 4, 3), np.float32) for _ in range(3))
    return q, k, v, np.zeros((1, 2, 4, 3), np.float32)


@pytest.mark.parametrize("name", ["k", "v", "out"])
def test_binding_refuses_fewer_dims(name):
    arrays = dict(zip("q k v out".split(), _binding_arrays()))
    arrays[name] = arrays[name][0]
    with pytest.raises(ValueError, match=rf"\b{name}\b.*dims"):
        _core.attention_forward(arrays["q"], arrays["k"], arrays["v"], arrays["out"], None, 1.0, False, 1)


@pytest.mark.parametrize("name", ["mask", "alibi_slopes", "kv_lengths", "lse"])
def test_binding_refuses_non_arrays(name):
    q, k, v, out = _binding_arrays()
    keywords = {} if name == "mask" else {name: [1.0, 2.0]}
    mask = [[1.0]] if name == "mask" else None
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        _core.attention_forward(q, k, v, out, mask, 1.0, False, 1, **keywords)
