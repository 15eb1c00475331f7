"""fastattn.attention's variants (align, window, softcap, ALiBi, kv_lengths, log-sum-exp, out=)
against the reference, alone and in every pair, on the tile and decode kernels of every ISA."""

import itertools

import numpy as np
import pytest
from conftest import assert_accurate, assert_within_naive_error, attention_in, bool_mask, float_mask, qkv

import fastattn
from fastattn import reference

# (B, Hq, Hk, L, S, E, Ev): awkward sizes; the second and fourth take the decode kernel (few rows
# per key head), the fourth with more keys than one 512-key split; the third has L > S.
SHAPES = {
    "tile": (2, 4, 2, 53, 97, 24, 20),
    "decode": (2, 4, 1, 3, 700, 40, 33),
    "tall": (2, 2, 2, 97, 53, 16, 16),
}


def variant_kwargs(name, rng, shape):
    """The keywords of one variant for inputs of `shape`."""
    batch, heads_q, _, seqlen_q, seqlen_k = shape[:5]
    return {
        "bottom_right": lambda: dict(align="bottom_right"),
        "causal": lambda: dict(causal=True),
        "window": lambda: dict(window=(13, 5)),
        "window_left": lambda: dict(window=(20, None)),
        "softcap": lambda: dict(softcap=1.5),
        "alibi": lambda: dict(alibi_slopes=rng.uniform(0.01, 0.5, heads_q)),
        "alibi_batch": lambda: dict(alibi_slopes=rng.uniform(0.01, 0.5, (batch, heads_q))),
        "kv_lengths": lambda: dict(kv_lengths=np.array([seqlen_k * 2 // 3, seqlen_k - 1])[:batch]),
        "bool_mask": lambda: dict(mask=bool_mask(rng, (batch, heads_q, seqlen_q, seqlen_k))),
        "float_mask": lambda: dict(mask=float_mask(rng, (seqlen_q, seqlen_k))),
    }[name]()


VARIANTS = ["bottom_right", "causal", "window", "window_left", "softcap", "alibi", "alibi_batch",
            "kv_lengths", "bool_mask", "float_mask"]
COMBINATIONS = [(name,) for name in VARIANTS] + list(itertools.combinations(VARIANTS, 2))


def merged_kwargs(names, rng, shape):
    kwargs = {}
    for name in names:
        kwargs.update(variant_kwargs(name, rng, shape))
    if "mask" in kwargs and kwargs["mask"].dtype != np.bool_:
        kwargs["mask"] = kwargs["mask"].astype(np.float32)
    return kwargs


def assert_lse_accurate(lse, q, k, v, kwargs):
    """The log-sum-exp held to the same criterion as the output; -inf exactly where no key is seen."""
    mask = kwargs.get("mask")
    rest = {key: value for key, value in kwargs.items() if key != "mask"}
    _, exact = attention_in(np.longdouble if q.dtype == np.float64 else np.float64, q, k, v, mask,
                            return_lse=True, **rest)
    _, naive = attention_in(q.dtype.type, q, k, v, mask, return_lse=True, **rest)
    assert lse.dtype == q.dtype and lse.shape == exact.shape
    hidden = np.isneginf(exact)
    np.testing.assert_array_equal(np.isneginf(lse), hidden, err_msg="-inf positions differ")
    assert_within_naive_error(np.where(hidden, 0, lse), np.where(hidden, 0, exact), np.where(hidden, 0, naive))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("names", COMBINATIONS, ids="+".join)
def test_variant_pairs(isa, rng, names, shape_name, dtype):
    shape = SHAPES[shape_name]
    batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v = shape
    q, k, v = qkv(rng, dtype, (batch, heads_q, seqlen_q, head_dim), (batch, heads_kv, seqlen_k, head_dim),
                  (batch, heads_kv, seqlen_k, head_dim_v))
    kwargs = merged_kwargs(names, rng, shape)
    out, lse = fastattn.attention(q, k, v, return_lse=True, **kwargs)
    mask = kwargs.pop("mask", None)
    assert_accurate(out, q, k, v, mask, **kwargs)
    assert_lse_accurate(lse, q, k, v, dict(kwargs, mask=mask))


def test_bottom_right_decode_sees_the_cache(rng):
    """With bottom_right and causal, the last query row sees every key (KV-cache decoding), where
    top_left would let a single query see only key 0."""
    q, k, v = qkv(rng, np.float64, (1, 2, 1, 16), (1, 2, 40, 16), (1, 2, 40, 16))
    np.testing.assert_allclose(fastattn.attention(q, k, v, causal=True, align="bottom_right"),
                               reference.attention(q, k, v), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fastattn.attention(q, k, v, causal=True), v[:, :, :1], rtol=1e-12)


def test_window_drawn_example():
    """window=(1, 0), top-left, L = S = 4: each row sees itself and the key before it (the drawing in
    fastattn.reference). With v = identity rows, the output rows are the attention weights."""
    q = np.zeros((1, 4, 4))
    k = np.zeros((1, 4, 4))
    v = np.eye(4)[np.newaxis]
    weights = fastattn.attention(q, k, v, window=(1, 0))[0]
    expected = np.array([[1, 0, 0, 0], [.5, .5, 0, 0], [0, .5, .5, 0], [0, 0, .5, .5]])
    np.testing.assert_allclose(weights, expected, rtol=1e-15)


def test_softcap_bounds_the_scores(rng):
    """Huge scores capped at c: the weights are those of c * tanh(s / c), not a one-hot softmax."""
    q, k, v = qkv(rng, np.float64, (1, 1, 5, 8), (1, 1, 9, 8), (1, 1, 9, 8))
    q *= 100
    out = fastattn.attention(q, k, v, softcap=2.0)
    np.testing.assert_allclose(out, reference.attention(q, k, v, softcap=2.0), rtol=1e-12, atol=1e-12)
    assert not np.allclose(out, reference.attention(q, k, v), atol=1e-3)


def test_keys_past_kv_lengths_are_never_read(isa, rng):
    """A cache's unused tail may hold anything: NaN there must not reach the output."""
    for shape in ((2, 4, 2, 53, 97, 24), (2, 4, 1, 1, 1100, 32)):
        batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim = shape
        q, k, v = qkv(rng, np.float32, (batch, heads_q, seqlen_q, head_dim),
                      (batch, heads_kv, seqlen_k, head_dim), (batch, heads_kv, seqlen_k, head_dim))
        lengths = np.array([seqlen_k // 3, seqlen_k - 7])
        for b, length in enumerate(lengths):
            k[b, :, length:] = np.nan
            v[b, :, length:] = np.inf
        out = fastattn.attention(q, k, v, kv_lengths=lengths, causal=True, align="bottom_right")
        assert np.isfinite(out).all()
        assert_accurate(out, q, k, v, causal=True, align="bottom_right", kv_lengths=lengths)


def test_keys_outside_every_window_are_skipped(isa, rng):
    """Keys no row of a 64-key neighbourhood can see are not read (cost grows with the window):
    NaN in K and V far from every diagonal leaves the output finite."""
    q, k, v = qkv(rng, np.float32, (1, 2, 600, 16), (1, 2, 600, 16), (1, 2, 600, 16))
    k[:, :, :200] = np.nan
    v[:, :, :200] = np.nan
    out = fastattn.attention(q[:, :, 400:], k, v, window=(60, 0), align="bottom_right")
    assert np.isfinite(out).all()


def test_zero_kv_length_gives_zeros_and_neg_inf(isa, rng):
    q, k, v = qkv(rng, np.float32, (2, 2, 70, 8), (2, 2, 30, 8), (2, 2, 30, 8))
    out, lse = fastattn.attention(q, k, v, kv_lengths=np.array([0, 30]), return_lse=True)
    assert (out[0] == 0).all() and np.isneginf(lse[0]).all()
    assert np.isfinite(lse[1]).all()


def test_return_lse_with_2d_inputs(rng):
    q, k, v = qkv(rng, np.float64, (7, 8), (11, 8), (11, 5))
    out, lse = fastattn.attention(q, k, v, return_lse=True)
    ref_out, ref_lse = reference.attention(q, k, v, return_lse=True)
    assert out.shape == (7, 5) and lse.shape == (7,)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-13)


def test_out_with_transposed_strides(isa, rng):
    """out= a (B, L, H, D) buffer viewed as (B, H, L, D): written in place and returned."""
    q, k, v = qkv(rng, np.float32, (2, 3, 50, 16), (2, 3, 60, 16), (2, 3, 60, 12))
    buffer = np.full((2, 50, 3, 12), np.nan, dtype=np.float32)
    view = buffer.transpose(0, 2, 1, 3)
    result = fastattn.attention(q, k, v, causal=True, out=view)
    assert result is view
    assert_accurate(view, q, k, v, causal=True)
    out, lse = fastattn.attention(q[0, 0], k[0, 0], v[0, 0], out=buffer[0, :, 0], return_lse=True)
    np.testing.assert_array_equal(buffer[0, :, 0], fastattn.attention(q[0, 0], k[0, 0], v[0, 0]))


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(align="top-left"), ValueError, "align"),
    (dict(window=(3,)), ValueError, "window"),
    (dict(window=(1.5, 2)), TypeError, "window left"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=-1), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(softcap=1e39), ValueError, "largest float32"),  # inf in float32: the cap gave NaN (found by fuzzing)
    (dict(softcap=float("nan")), ValueError, "softcap"),
    (dict(softcap="2"), TypeError, "softcap"),
    (dict(alibi_slopes=np.ones(3)), ValueError, "alibi_slopes"),
    (dict(alibi_slopes=np.ones((3, 4))), ValueError, "alibi_slopes"),
    (dict(alibi_slopes=[1.0] * 4), TypeError, "alibi_slopes"),
    (dict(alibi_slopes=np.ones(4, dtype=np.int64)), TypeError, "alibi_slopes"),
    (dict(alibi_slopes=np.full(4, np.nan)), ValueError, "alibi_slopes"),
    (dict(alibi_slopes=np.full(4, 1e39)), ValueError, "largest float32"),  # inf * 0 gave NaN (found by fuzzing)
    (dict(kv_lengths=np.array([5, 31])), ValueError, "kv_lengths"),
    (dict(kv_lengths=np.array([-1, 3])), ValueError, "kv_lengths"),
    (dict(kv_lengths=np.array([5])), ValueError, "kv_lengths"),
    (dict(kv_lengths=np.array([5.0, 6.0])), TypeError, "kv_lengths"),
    (dict(return_lse=1), TypeError, "return_lse"),
    (dict(out=np.empty((2, 4, 10, 6), np.float32)), ValueError, "out"),
    (dict(out=np.empty((2, 4, 10, 8), np.float64)), ValueError, "out"),
])
def test_variant_errors(rng, kwargs, error, words):
    q, k, v = qkv(rng, np.float32, (2, 4, 10, 8), (2, 2, 30, 8), (2, 2, 30, 8))
    with pytest.raises(error, match=words):
        fastattn.attention(q, k, v, **kwargs)


def test_out_overlapping_an_input_is_refused(rng):
    q, k, v = qkv(rng, np.float32, (1, 2, 10, 8), (1, 2, 10, 8), (1, 2, 10, 8))
    with pytest.raises(ValueError, match="overlaps q"):
        fastattn.attention(q, k, v, out=q)
    read_only = np.empty((1, 2, 10, 8), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fastattn.attention(q, k, v, out=read_only)
    q_before = q.copy()
    with pytest.raises(ValueError, match="overlaps v"):
        fastattn.attention(q, k, v, out=v)
    np.testing.assert_array_equal(q, q_before)
