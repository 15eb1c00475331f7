"""fastattn.scaled_dot_product_attention as a drop-in for torch.nn.functional.scaled_dot_product_attention."""

import contextlib
import textwrap

import numpy as np
import pytest

import fastattn

from conftest import assert_within_naive_error, attention_in, bool_mask, float_mask, make_mask, qkv, randn, run_python

torch = pytest.importorskip("torch")
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

DTYPES = [np.float32, np.float64]


def torch_sdpa(q, k, v, attn_mask=None, *, dtype=None, backend=None, **kwargs):
    """torch's result on copies of the arrays (torch cannot view negative strides), optionally cast."""

    def tensor(x, cast):
        x = np.ascontiguousarray(x)
        return torch.from_numpy(x.astype(dtype) if cast and dtype is not None else x)

    args = [tensor(x, cast=True) for x in (q, k, v)]
    if attn_mask is not None:
        attn_mask = tensor(attn_mask, cast=attn_mask.dtype != np.bool_)
    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        return torch.nn.functional.scaled_dot_product_attention(*args, attn_mask=attn_mask, **kwargs).numpy()


def as_attention_args(q, k, v, enable_gqa=False):
    """torch broadcasts heads like batch dims unless enable_gqa; fastattn.attention groups them."""
    if enable_gqa:
        return q, k, v
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    return tuple(np.broadcast_to(x, batch + x.shape[-2:]) for x in (q, k, v))


def check_against_torch(q, k, v, attn_mask=None, **kwargs):
    """Run both and hold fastattn to the naive error bound of conftest.assert_within_naive_error.

    The naive implementation is torch's own MATH backend (softmax(q k^T) v) in the input dtype.
    The exact answer is torch in float64 for float32 inputs, and the spec's math in extended
    precision for float64 inputs.
    """
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask, **kwargs)
    expected = torch_sdpa(q, k, v, attn_mask, **kwargs)
    assert isinstance(out, np.ndarray)
    assert out.dtype == expected.dtype == q.dtype
    assert out.shape == expected.shape
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))

    naive = torch_sdpa(q, k, v, attn_mask, backend=SDPBackend.MATH, **kwargs)
    if q.dtype == np.float32:
        exact = torch_sdpa(q, k, v, attn_mask, dtype=np.float64, **kwargs)
    else:
        args = as_attention_args(q, k, v, kwargs.get("enable_gqa", False))
        exact = attention_in(np.longdouble, *args, attn_mask, kwargs.get("is_causal", False), kwargs.get("scale"))
    assert_within_naive_error(out, exact, naive)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [17, 64, 80])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(1, 1), (7, 65), (65, 7), (64, 64), (197, 197), (63, 1000)])
def test_shapes(isa, rng, seqlen_q, seqlen_k, head_dim, is_causal, dtype):
    q, k, v = qkv(rng, dtype, (2, 3, seqlen_q, head_dim), (2, 3, seqlen_k, head_dim), (2, 3, seqlen_k, head_dim))
    check_against_torch(q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape",
    [
        ((9, 16), (20, 16), (20, 8)),
        ((4, 9, 16), (4, 20, 16), (4, 20, 8)),
        ((2, 1, 9, 16), (2, 4, 20, 16), (2, 4, 20, 8)),  # one query head meets four key heads
        ((2, 4, 9, 16), (2, 1, 20, 16), (2, 1, 20, 8)),
        ((2, 4, 9, 16), (2, 1, 20, 16), (2, 4, 20, 8)),
        ((3, 4, 9, 16), (1, 4, 20, 16), (1, 4, 20, 8)),
        ((4, 9, 16), (3, 4, 20, 16), (3, 4, 20, 8)),
        ((2, 1, 4, 9, 16), (1, 3, 4, 20, 16), (2, 3, 1, 20, 8)),
    ],
    ids=repr,
)
def test_heads_broadcast_like_batch_dims(isa, rng, q_shape, k_shape, v_shape, dtype):
    check_against_torch(*qkv(rng, dtype, q_shape, k_shape, v_shape))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape",
    [
        ((2, 8, 9, 16), (2, 2, 20, 16), (2, 2, 20, 8)),
        ((2, 8, 9, 16), (2, 1, 20, 16), (2, 1, 20, 8)),
        ((2, 8, 9, 16), (2, 2, 20, 16), (2, 4, 20, 8)),  # key and value head counts differ
        ((2, 8, 9, 16), (2, 4, 20, 16), (2, 1, 20, 24)),
        ((8, 20, 16), (2, 9, 16), (2, 9, 16)),
        ((2, 8, 9, 16), (1, 2, 20, 16), (1, 2, 20, 8)),
        ((2, 4, 9, 16), (2, 4, 20, 16), (2, 4, 20, 8)),
    ],
    ids=repr,
)
def test_enable_gqa(isa, rng, q_shape, k_shape, v_shape, is_causal, dtype):
    check_against_torch(*qkv(rng, dtype, q_shape, k_shape, v_shape), is_causal=is_causal, enable_gqa=True)


B, H, L, S = 2, 3, 20, 70


@pytest.mark.parametrize(
    "dtype, mask_dtype",
    [(np.float32, bool), (np.float32, np.float32), (np.float64, bool), (np.float64, np.float64), (np.float64, np.float32)],
)
@pytest.mark.parametrize("mask_shape", [(L, S), (1, S), (L, 1), (1, 1), (B, 1, L, S), (1, H, 1, S), (B, H, L, S)], ids=repr)
def test_masks(isa, rng, mask_shape, dtype, mask_dtype):
    q, k, v = qkv(rng, dtype, (B, H, L, 16), (B, H, S, 16), (B, H, S, 16))
    mask = make_mask(rng, mask_shape, mask_dtype)
    check_against_torch(q, k, v, mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_fully_masked_rows_are_zero(isa, rng, mask_kind, dtype):
    q, k, v = qkv(rng, dtype, (B, H, 65, 16), (B, H, S, 16), (B, H, S, 16))
    if mask_kind == "bool":
        mask = bool_mask(rng, (65, S))
        mask[[0, 31, 64]] = False
    else:
        mask = float_mask(rng, (65, S)).astype(dtype)
        mask[[0, 31, 64]] = -np.inf
    out = check_against_torch(q, k, v, mask)
    assert np.all(out[..., [0, 31, 64], :] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_of_most_negative_finite_values(isa, rng, dtype):
    """Hugging Face masks with finfo(dtype).min: a row hidden that way everywhere averages v in torch."""
    q, k, v = qkv(rng, dtype, (B, H, L, 16), (B, H, S, 16), (B, H, S, 16))
    mask = np.zeros((B, 1, L, S), dtype)
    mask[..., ::3] = np.finfo(dtype).min
    mask[:, :, [0, 7, L - 1]] = np.finfo(dtype).min
    check_against_torch(q, k, v, mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape",
    [
        ((2, 9, 0), (2, 20, 0), (2, 20, 8)),  # no features: torch averages the values
        ((2, 9, 16), (2, 20, 16), (2, 20, 0)),
        ((2, 9, 16), (2, 0, 16), (2, 0, 8)),
        ((2, 0, 16), (2, 20, 16), (2, 20, 8)),
    ],
    ids=["E=0", "Ev=0", "S=0", "L=0"],
)
def test_empty_dims(isa, rng, q_shape, k_shape, v_shape, dtype):
    check_against_torch(*qkv(rng, dtype, q_shape, k_shape, v_shape))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.0, -0.5, 0.05, 3.0])
def test_explicit_scale(isa, rng, scale, dtype):
    check_against_torch(*qkv(rng, dtype, (2, 65, 17), (2, 70, 17), (2, 70, 9)), is_causal=True, scale=scale)


def test_non_contiguous_inputs(isa, rng):
    q = randn(rng, (2, 65, 4, 32), np.float32).transpose(0, 2, 1, 3)
    k = randn(rng, (2, 4, 70, 32), np.float32)[..., ::-1, :]
    v = np.broadcast_to(randn(rng, (70, 16), np.float32), (2, 4, 70, 16))
    mask = np.broadcast_to(bool_mask(rng, (1, 70)), (65, 70))
    check_against_torch(q, k, v, mask)


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape, kwargs, error",
    [
        ((2, 4, 9, 16), (2, 3, 20, 16), (2, 3, 20, 16), {}, ValueError),
        ((2, 4, 9, 16), (2, 3, 20, 16), (2, 3, 20, 16), {"enable_gqa": True}, ValueError),
        ((2, 4, 9, 16), (2, 4, 20, 16), (2, 3, 20, 16), {"enable_gqa": True}, ValueError),
        ((2, 1, 9, 16), (2, 2, 20, 16), (2, 2, 20, 16), {"enable_gqa": True}, ValueError),
        ((16,), (20, 16), (20, 16), {}, ValueError),
        ((9, 16), (20, 15), (20, 16), {}, ValueError),
        ((9, 16), (20, 16), (21, 16), {}, ValueError),
        ((2, 9, 16), (2, 20, 16), (2, 20, 16), {"attn_mask": np.ones((9, 20), bool), "is_causal": True}, ValueError),
        ((2, 9, 16), (2, 20, 16), (2, 20, 16), {"attn_mask": np.zeros((9, 20), np.float64)}, (TypeError, ValueError)),
        ((2, 9, 16), (2, 20, 16), (2, 20, 16), {"attn_mask": np.zeros((9, 20), np.int32)}, (TypeError, ValueError)),
        ((2, 9, 16), (2, 20, 16), (2, 20, 16), {"attn_mask": np.zeros((3, 2, 9, 20), np.float32)}, ValueError),
    ],
    ids=[
        "heads 4 vs 3",
        "heads 4 vs 3 gqa",
        "value heads 3 gqa",
        "query heads fewer than key heads gqa",
        "1-D query",
        "head_dim mismatch",
        "value length mismatch",
        "attn_mask with is_causal",
        "float64 mask with float32 query",
        "int mask",
        "mask enlarges the output",
    ],
)
def test_raises_where_torch_raises(rng, q_shape, k_shape, v_shape, kwargs, error):
    q, k, v = qkv(rng, np.float32, q_shape, k_shape, v_shape)
    with pytest.raises((RuntimeError, ValueError)):
        torch_sdpa(q, k, v, **kwargs)
    with pytest.raises(error):
        fastattn.scaled_dot_product_attention(q, k, v, **kwargs)


def test_dtype_mismatch_raises_type_error(rng):
    q, k, v = randn(rng, (9, 16), np.float32), randn(rng, (20, 16), np.float64), randn(rng, (20, 16), np.float32)
    with pytest.raises(RuntimeError):
        torch_sdpa(q, k, v)
    with pytest.raises(TypeError):
        fastattn.scaled_dot_product_attention(q, k, v)


def test_dropout_is_not_implemented(rng):
    q, k, v = qkv(rng, np.float32, (9, 16), (20, 16), (20, 16))
    with pytest.raises(NotImplementedError, match="inference"):
        fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.1)


def test_fastattn_does_not_import_torch():
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        import fastattn

        x = np.ones((2, 3, 4), np.float32)
        fastattn.attention(x, x, x, causal=True)
        fastattn.scaled_dot_product_attention(x, x, x, is_causal=True)
        assert "torch" not in sys.modules, "fastattn imported torch"
        """
    )
    run_python(script)
