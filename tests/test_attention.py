"""fastattn.attention against fastattn.reference on awkward shapes, masks, layouts and values."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastattn
from fastattn import reference

from conftest import bool_mask, check_against_reference, float_mask, make_mask, qkv, randn

pytestmark = pytest.mark.usefixtures("isa")

SEQLENS = [1, 7, 63, 64, 65, 197, 1000]
HEAD_DIMS = [1, 3, 17, 64, 80, 128, 256]
DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen_k", SEQLENS)
@pytest.mark.parametrize("seqlen_q", SEQLENS)
def test_every_seqlen_pair(rng, seqlen_q, seqlen_k, causal, dtype):
    q, k, v = qkv(rng, dtype, (2, seqlen_q, 17), (2, seqlen_k, 17), (2, seqlen_k, 5))
    check_against_reference(fastattn.attention(q, k, v, causal=causal), q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim_v", HEAD_DIMS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_every_head_dim_pair(rng, head_dim, head_dim_v, dtype):
    q, k, v = qkv(rng, dtype, (65, head_dim), (197, head_dim), (197, head_dim_v))
    check_against_reference(fastattn.attention(q, k, v), q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [1, 17, 64, 128])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(7, 65), (65, 7), (63, 64), (64, 65), (197, 1000), (1000, 197)])
def test_causal_head_dims(rng, seqlen_q, seqlen_k, head_dim, dtype):
    q, k, v = qkv(rng, dtype, (seqlen_q, head_dim), (seqlen_k, head_dim), (seqlen_k, head_dim))
    check_against_reference(fastattn.attention(q, k, v, causal=True), q, k, v, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "heads_q, heads_k, heads_v",
    [(8, 2, 2), (8, 1, 1), (8, 2, 4), (8, 4, 1), (6, 3, 2), (4, 4, 1), (3, 1, 3)],
)
def test_grouped_query_heads(rng, heads_q, heads_k, heads_v, causal, dtype):
    q, k, v = qkv(rng, dtype, (2, heads_q, 33, 16), (2, heads_k, 70, 16), (2, heads_v, 70, 24))
    out = fastattn.attention(q, k, v, causal=causal)
    check_against_reference(out, q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [1, 17, 128])
@pytest.mark.parametrize("seqlen_q", [1, 2])
@pytest.mark.parametrize("group", [1, 2, 3, 5, 7, 8])
def test_decode_groups(rng, group, seqlen_q, head_dim, dtype):
    """Few query rows per key head (the decode kernel, which blocks rows 4 or 2 at a time): group
    sizes that leave every remainder, keys over more than one split and a partial last chunk."""
    q, k, v = qkv(rng, dtype, (2, 2 * group, seqlen_q, head_dim), (2, 2, 1100, head_dim), (2, 2, 1100, 33))
    out = fastattn.attention(q, k, v)
    check_against_reference(out, q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "q_leading, k_leading, v_leading",  # the dims before (L or S, E): batch..., heads
    [
        ((), (), ()),  # 2-D: one implicit head
        ((4,), (4,), (4,)),
        ((4,), (), ()),  # 2-D k and v serve every query head
        ((2, 4), (2, 4), (2, 4)),
        ((3, 4), (1, 4), (1, 4)),
        ((1, 4), (3, 4), (3, 4)),  # k and v enlarge the batch
        ((2, 4), (4,), (4,)),
        ((2, 4), (), ()),
        ((2, 3, 4), (2, 3, 2), (2, 3, 2)),
        ((2, 1, 4), (1, 3, 4), (2, 3, 4)),
        ((2, 3, 4), (2,), (4,)),
        ((4,), (2, 1, 2), (3, 1)),
    ],
    ids=repr,
)
def test_batch_dims_broadcast(rng, q_leading, k_leading, v_leading, dtype):
    q, k, v = qkv(rng, dtype, (*q_leading, 9, 16), (*k_leading, 20, 16), (*v_leading, 20, 8))
    check_against_reference(fastattn.attention(q, k, v), q, k, v)


B, H, L, S = 2, 3, 20, 70
MASK_SHAPES = [(L, S), (1, S), (L, 1), (S,), (H, L, S), (B, 1, L, S), (B, H, 1, S), (1, 1), (B, H, L, S), (1, 1, 1, 1)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_dtype", [bool, np.float32, np.float64])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_shape", MASK_SHAPES, ids=repr)
def test_mask_broadcast_forms(rng, mask_shape, dtype, mask_dtype, causal):
    q, k, v = qkv(rng, dtype, (B, H, L, 16), (B, H, S, 16), (B, H, S, 16))
    mask = make_mask(rng, mask_shape, mask_dtype)
    out = fastattn.attention(q, k, v, mask, causal=causal)
    check_against_reference(out, q, k, v, mask, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(7, 65), (65, 7), (63, 64), (65, 64), (197, 1000), (1000, 197)])
def test_causal_with_and_without_mask(rng, seqlen_q, seqlen_k, mask_kind, dtype):
    q, k, v = qkv(rng, dtype, (2, seqlen_q, 32), (2, seqlen_k, 32), (2, seqlen_k, 32))
    make_mask = {None: lambda *_: None, "bool": bool_mask, "float": float_mask}[mask_kind]
    mask = make_mask(rng, (seqlen_q, seqlen_k))
    check_against_reference(fastattn.attention(q, k, v, mask, causal=True), q, k, v, mask, causal=True)


EMPTY_ROWS = [0, 5, 63, 64]


def hide_rows(mask_kind, seqlen_q, seqlen_k, causal, rng):
    """A mask under which the rows EMPTY_ROWS (and only those, barring chance) see no key."""
    if mask_kind == "bool":
        mask = bool_mask(rng, (seqlen_q, seqlen_k), hidden=0.2)
        hidden_value = False
    else:
        mask = float_mask(rng, (seqlen_q, seqlen_k), hidden=0.2)
        hidden_value = -np.inf
    for row in EMPTY_ROWS:
        # Under causal, row i sees only keys 0..i, so hiding those empties the row.
        mask[row, : row + 1 if causal else seqlen_k] = hidden_value
    return mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_fully_masked_rows_are_zero(rng, mask_kind, causal, dtype):
    q, k, v = qkv(rng, dtype, (2, 2, 130, 24), (2, 2, 197, 24), (2, 2, 197, 24))
    mask = hide_rows(mask_kind, 130, 197, causal, rng)
    out = fastattn.attention(q, k, v, mask, causal=causal)
    assert np.all(out[..., EMPTY_ROWS, :] == 0)
    check_against_reference(out, q, k, v, mask, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_no_keys_gives_zeros(rng, causal, dtype):
    q, k, v = qkv(rng, dtype, (2, 3, 9, 16), (2, 3, 0, 16), (2, 3, 0, 8))
    out = fastattn.attention(q, k, v, causal=causal)
    assert out.shape == (2, 3, 9, 8)
    assert np.all(out == 0)
    check_against_reference(out, q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_keys_with_mask_gives_zeros(rng, dtype):
    q, k, v = qkv(rng, dtype, (3, 9, 16), (3, 0, 16), (3, 0, 8))
    out = fastattn.attention(q, k, v, np.ones((9, 0), dtype=bool))
    assert out.shape == (3, 9, 8)
    assert np.all(out == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_queries_gives_empty(rng, dtype):
    q, k, v = qkv(rng, dtype, (2, 3, 0, 16), (2, 3, 11, 16), (2, 3, 11, 8))
    out = fastattn.attention(q, k, v, causal=True)
    assert out.shape == (2, 3, 0, 8)
    assert out.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_head_dim_averages_values(rng, dtype):
    q, k, v = qkv(rng, dtype, (3, 9, 0), (3, 11, 0), (3, 11, 8))
    check_against_reference(fastattn.attention(q, k, v), q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_value_dim_gives_empty(rng, dtype):
    q, k, v = qkv(rng, dtype, (3, 9, 16), (3, 11, 16), (3, 11, 0))
    out = fastattn.attention(q, k, v)
    assert out.shape == (3, 9, 0)
    assert out.dtype == dtype


def transposed(rng, dtype, batch, seqlen, heads, head_dim):
    """Made as (B, L, H, E), viewed as (B, H, L, E): the usual layout of a fused QKV projection."""
    return randn(rng, (batch, seqlen, heads, head_dim), dtype).transpose(0, 2, 1, 3)


def strided(rng, dtype, shape):
    """Every axis sliced with a step, so no stride is the contiguous one."""
    base = randn(rng, tuple(2 * n + 1 for n in shape), dtype)
    return base[tuple(slice(1, None, 2) for _ in shape)]


LAYOUTS = {
    "contiguous": lambda rng, dtype, shape: randn(rng, shape, dtype),
    "transposed": lambda rng, dtype, shape: transposed(rng, dtype, shape[0], shape[2], shape[1], shape[3]),
    "fortran": lambda rng, dtype, shape: np.asfortranarray(randn(rng, shape, dtype)),
    "stepped": strided,
    "reversed rows": lambda rng, dtype, shape: randn(rng, shape, dtype)[..., ::-1, :],
    "reversed features": lambda rng, dtype, shape: randn(rng, shape, dtype)[..., ::-1],
    "reversed everything": lambda rng, dtype, shape: randn(rng, shape, dtype)[::-1, ::-1, ::-1, ::-1],
    "batch broadcast": lambda rng, dtype, shape: np.broadcast_to(randn(rng, (1, *shape[1:]), dtype), shape),
    "head broadcast": lambda rng, dtype, shape: np.broadcast_to(randn(rng, (shape[0], 1, *shape[2:]), dtype), shape),
    "feature broadcast": lambda rng, dtype, shape: np.broadcast_to(randn(rng, (*shape[:-1], 1), dtype), shape),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_inputs(rng, layout, causal, dtype):
    make = LAYOUTS[layout]
    q = make(rng, dtype, (2, 4, 65, 24))
    k = make(rng, dtype, (2, 4, 70, 24))
    v = make(rng, dtype, (2, 4, 70, 40))
    check_against_reference(fastattn.attention(q, k, v, causal=causal), q, k, v, causal=causal)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mixed_layouts_with_gqa(rng, layout):
    q = transposed(rng, np.float32, 2, 33, 8, 24)
    k = LAYOUTS[layout](rng, np.float32, (2, 2, 70, 24))
    v = np.broadcast_to(randn(rng, (70, 16), np.float32), (2, 4, 70, 16))
    check_against_reference(fastattn.attention(q, k, v), q, k, v)


MASK_LAYOUTS = {
    "transposed": lambda mask: mask.T.copy().T,
    "reversed": lambda mask: np.ascontiguousarray(mask[..., ::-1])[..., ::-1],
    "stepped": lambda mask: np.repeat(np.repeat(mask, 2, axis=-1), 3, axis=-2)[..., ::3, ::2],
    "broadcast": lambda mask: np.broadcast_to(mask, (B, H, L, S)),
    "broadcast over queries": lambda mask: np.broadcast_to(mask[:1], (L, S)),
}


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("mask_layout", MASK_LAYOUTS)
def test_non_contiguous_mask(rng, mask_layout, mask_kind):
    q, k, v = qkv(rng, np.float32, (B, H, L, 16), (B, H, S, 16), (B, H, S, 16))
    mask = (bool_mask if mask_kind == "bool" else float_mask)(rng, (L, S))
    mask = MASK_LAYOUTS[mask_layout](mask)
    check_against_reference(fastattn.attention(q, k, v, mask), q, k, v, mask)


def exact_large_scores(rng, dtype, offset, scale):
    """Scaled scores of offset plus or minus a few dozen, all exactly representable: small integer
    features, plus one constant feature that carries the offset. A naive implementation computes
    such scores without rounding, so its error is the softmax's own and stays near eps."""
    q = rng.integers(-3, 4, (2, 65, 17)).astype(dtype)
    k = rng.integers(-3, 4, (2, 197, 17)).astype(dtype)
    q[..., -1] = 1
    k[..., -1] = offset / scale
    return q, k, randn(rng, (2, 197, 17), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("scale", [1.0, 0.25])
@pytest.mark.parametrize("offset", [1e3, -1e3])
def test_large_scores_do_not_overflow(rng, offset, scale, causal, dtype):
    q, k, v = exact_large_scores(rng, dtype, offset, scale)
    out = fastattn.attention(q, k, v, causal=causal, scale=scale)
    assert np.isfinite(out).all()
    check_against_reference(out, q, k, v, causal=causal, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_hot_large_scores_select_one_value(rng, dtype):
    # Query i scores +1e3 against key perm[i] and -1e3 against every other key.
    seqlen_q, seqlen_k = 65, 70
    perm = rng.permutation(seqlen_k)[:seqlen_q]
    q = 1e3 * np.eye(seqlen_k, dtype=dtype)[perm]
    k = 2 * np.eye(seqlen_k, dtype=dtype) - 1
    v = randn(rng, (seqlen_k, 24), dtype)
    out = fastattn.attention(q, k, v, scale=1.0)
    check_against_reference(out, q, k, v, scale=1.0)
    np.testing.assert_array_equal(reference.attention(q, k, v, scale=1.0), v[perm])


@pytest.mark.parametrize("dtype, mask_dtype", [(np.float32, np.float32), (np.float64, np.float64), (np.float64, np.float32)])
def test_mask_of_most_negative_finite_values(rng, dtype, mask_dtype):
    """Masks as Hugging Face builds them, with finfo.min rather than -inf: such a key weighs nothing
    next to a visible one, but a row that is finfo.min everywhere has equal scores, so it averages v
    (as the reference and torch do) rather than giving zeros."""
    q, k, v = qkv(rng, dtype, (2, 20, 16), (2, 70, 16), (2, 70, 16))
    mask = np.zeros((20, 70), mask_dtype)
    mask[:, ::3] = np.finfo(mask_dtype).min
    mask[[0, 7, 19]] = np.finfo(mask_dtype).min
    check_against_reference(fastattn.attention(q, k, v, mask), q, k, v, mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nan_query_row_stays_in_its_row(rng, causal, dtype):
    q, k, v = qkv(rng, dtype, (2, 65, 16), (2, 70, 16), (2, 70, 16))
    clean = fastattn.attention(q, k, v, causal=causal)
    q[1, 40, 3] = np.nan
    out = fastattn.attention(q, k, v, causal=causal)
    assert np.isnan(out[1, 40]).all()
    others = np.ones(out.shape[:-1], dtype=bool)
    others[1, 40] = False
    np.testing.assert_array_equal(out[others], clean[others])
    check_against_reference(out, q, k, v, causal=causal)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_inputs_not_modified_and_output_is_new(rng, mask_kind):
    q = transposed(rng, np.float32, 2, 33, 4, 16)
    k, v = randn(rng, (2, 4, 40, 16), np.float32), randn(rng, (2, 4, 40, 16), np.float32)
    mask = {None: None, "bool": bool_mask(rng, (33, 40)), "float": float_mask(rng, (33, 40))}[mask_kind]
    inputs = [x for x in (q, k, v, mask) if x is not None]
    before = [x.copy() for x in inputs]
    out = fastattn.attention(q, k, v, mask, causal=True)
    for x, x_before in zip(inputs, before):
        np.testing.assert_array_equal(x, x_before)
        assert not np.shares_memory(out, x)


def test_output_never_aliases_values(rng):
    """One key means out equals v: a lazy implementation could hand back v itself."""
    q, k, v = qkv(rng, np.float32, (3, 5, 8), (3, 1, 8), (3, 1, 8))
    q = q[:, :1]
    assert not np.shares_memory(fastattn.attention(q, k, v), v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.0, -0.3, 1.0, 2.5])
def test_explicit_scale(rng, scale, dtype):
    q, k, v = qkv(rng, dtype, (2, 65, 17), (2, 70, 17), (2, 70, 9))
    mask = float_mask(rng, (65, 70))
    out = fastattn.attention(q, k, v, mask, causal=True, scale=scale)
    check_against_reference(out, q, k, v, mask, causal=True, scale=scale)


def test_zero_scale_averages_visible_values(rng):
    q, k, v = qkv(rng, np.float64, (7, 4), (7, 4), (7, 3))
    out = fastattn.attention(q, k, v, causal=True, scale=0.0)
    expected = np.cumsum(v, axis=0) / np.arange(1, 8)[:, None]
    # Two float64 ways to average at most seven numbers: they agree to a few roundings.
    np.testing.assert_allclose(out, expected, rtol=1e-13)


@pytest.mark.parametrize("dtype, mask_dtype", [(np.float32, np.float64), (np.float64, np.float32)])
def test_mask_dtype_may_differ_from_query(rng, dtype, mask_dtype):
    q, k, v = qkv(rng, dtype, (2, 20, 16), (2, 70, 16), (2, 70, 16))
    mask = float_mask(rng, (20, 70)).astype(mask_dtype)
    check_against_reference(fastattn.attention(q, k, v, mask), q, k, v, mask)


@pytest.mark.parametrize("position", range(4))
def test_lists_are_refused_not_converted(rng, position):
    # Converting would be a silent copy; the message tells the caller to call np.asarray.
    args = list(qkv(rng, np.float64, (5, 4), (6, 4), (6, 3))) + [np.arange(6) < 4]
    args[position] = args[position].tolist()
    with pytest.raises(TypeError, match=["q", "k", "v", "mask"][position]):
        fastattn.attention(*args)


def test_repeated_calls_are_identical(rng):
    q, k, v = qkv(rng, np.float32, (2, 4, 197, 64), (2, 4, 197, 64), (2, 4, 197, 64))
    first = fastattn.attention(q, k, v, causal=True)
    np.testing.assert_array_equal(fastattn.attention(q, k, v, causal=True), first)


@st.composite
def attention_cases(draw):
    heads_k = draw(st.sampled_from([1, 2, 3]))
    heads_v = draw(st.sampled_from([1, heads_k]))
    heads_q = heads_k * heads_v * draw(st.sampled_from([1, 2]))
    seqlen_q, seqlen_k = draw(st.integers(0, 80)), draw(st.integers(0, 80))
    head_dim, head_dim_v = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q, k, v = qkv(
        rng,
        dtype,
        (heads_q, seqlen_q, head_dim),
        (heads_k, seqlen_k, head_dim),
        (heads_v, seqlen_k, head_dim_v),
    )
    mask = draw(st.sampled_from([None, bool_mask, float_mask]))
    if mask is not None:
        mask = mask(rng, draw(st.sampled_from([(seqlen_q, seqlen_k), (1, seqlen_k), (heads_q, seqlen_q, 1)])))
    causal = draw(st.booleans())
    scale = draw(st.sampled_from([None, 0.1, -1.0]))
    return q, k, v, mask, causal, scale


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(attention_cases())
def test_matches_reference_on_random_cases(case):
    q, k, v, mask, causal, scale = case
    out = fastattn.attention(q, k, v, mask, causal=causal, scale=scale)
    check_against_reference(out, q, k, v, mask, causal=causal, scale=scale)
