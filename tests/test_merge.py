"""merge_states: attention over disjoint key ranges, merged, equals attention over all keys."""

import inspect

import numpy as np
import pytest

import fastattn
from fastattn import reference
from fastattn.merge import merge_states

from conftest import SEED, assert_within_naive_error, attention_in

# A RuntimeWarning (exp overflow, 0/0, log(0)) fails the test: merging must not raise any.
pytestmark = pytest.mark.filterwarnings("error")

DTYPES = [np.float32, np.float64]
HAS_REFERENCE_LSE = "return_lse" in inspect.signature(reference.attention).parameters
HAS_KERNEL_LSE = "return_lse" in inspect.signature(fastattn.attention).parameters


def attention_with_lse(q, k, v, visible):
    """float64 softmax(q k^T / sqrt(E)) v over the keys `visible` (bool, (..., L, S)) shows each row,
    and each row's natural-log log-sum-exp of its visible scaled scores. A row that sees no key
    gives zeros and -inf."""
    scores = (q @ np.swapaxes(k, -1, -2)) / np.sqrt(q.shape[-1])
    scores = np.where(visible, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    row_max = np.where(np.isneginf(row_max), 0, row_max)
    weights = np.exp(scores - row_max)
    row_sum = weights.sum(axis=-1, keepdims=True)
    seen = row_sum > 0
    probabilities = np.divide(weights, row_sum, out=np.zeros_like(weights), where=seen)
    lse = row_max + np.log(row_sum, out=np.full_like(row_sum, -np.inf), where=seen)
    return probabilities @ v, lse[..., 0]


def key_ranges(cuts, seqlen_k):
    bounds = [0, *cuts, seqlen_k]
    return list(zip(bounds[:-1], bounds[1:]))


def make_visible(rng, kind, shape, ranges):
    """Which keys each row sees: all, causal, or random with row 0 and one whole key range hidden."""
    seqlen_q, seqlen_k = shape[-2:]
    if kind == "all":
        return np.ones(shape, bool)
    if kind == "causal":
        return np.broadcast_to(np.tril(np.ones((seqlen_q, seqlen_k), bool)), shape)
    visible = rng.random(shape) >= 0.3
    visible[..., 0, :] = False
    nonempty = [(start, stop) for start, stop in ranges if stop > start]
    if len(nonempty) > 1:
        start, stop = nonempty[-1]
        visible[..., start:stop] = False
    return visible


def assert_merge_matches(parts, full_out, full_lse, dtype):
    """Compare merge_states(parts) with attention over all keys.

    Rounding lse_i and m to `dtype` moves lse_i - m by up to eps * max|lse|, so the weight
    exp(lse_i - m) by a factor 1 + eps max|lse|, and the normalised mix of outs by up to twice that;
    rounding out and the running sums adds about eps per part. Hence the bound
    2 eps (parts + max|lse|), relative to the magnitudes (the float64 parts also differ from the
    full attention by that much rounding). A part dropped, counted twice or misweighted is off by O(1).
    """
    out, lse = merge_states(parts)
    assert out.dtype == lse.dtype == dtype
    assert out.shape == full_out.shape and lse.shape == full_lse.shape
    unseen = np.isneginf(full_lse)
    np.testing.assert_array_equal(np.isneginf(lse), unseen)
    np.testing.assert_array_equal(out[unseen], 0)
    seen_lse = np.abs(full_lse[~unseen])
    relative = 2 * np.finfo(dtype).eps * (len(parts) + seen_lse.max(initial=0))
    out_magnitude = max(1.0, np.abs(full_out).max(initial=0))
    lse_magnitude = max(1.0, seen_lse.max(initial=0))
    np.testing.assert_allclose(out, full_out, rtol=0, atol=relative * out_magnitude)
    np.testing.assert_allclose(lse[~unseen], full_lse[~unseen], rtol=0, atol=relative * lse_magnitude)


CASES = {
    # id: batch dims, query heads, L, S, E, Ev, cut points between key ranges
    "one part": ((), 1, 5, 8, 4, 4, []),
    "two halves": ((2,), 3, 7, 65, 16, 8, [32]),
    "empty ranges": ((2,), 2, 9, 20, 8, 5, [0, 7, 7, 20]),
    "one key each": ((), 2, 4, 5, 3, 3, [1, 2, 3, 4]),
    "no batch dims": ((), None, 6, 13, 8, 8, [4, 9]),
    "two batch dims": ((2, 3), 2, 6, 33, 8, 8, "random"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["all", "causal", "random"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_merge_equals_attention_over_all_keys(case, mask_kind, dtype):
    rng = np.random.default_rng(SEED)
    batch, heads, seqlen_q, seqlen_k, head_dim, head_dim_v, cuts = case
    lead = batch + ((heads,) if heads is not None else ())
    if cuts == "random":
        cuts = sorted(rng.integers(0, seqlen_k + 1, size=4))
    ranges = key_ranges(cuts, seqlen_k)
    # Scores of a few units, so the parts' lse differ and the weights matter.
    q = 3 * rng.standard_normal(lead + (seqlen_q, head_dim))
    k = rng.standard_normal(lead + (seqlen_k, head_dim))
    v = rng.standard_normal(lead + (seqlen_k, head_dim_v))
    visible = make_visible(rng, mask_kind, lead + (seqlen_q, seqlen_k), ranges)

    full_out, full_lse = attention_with_lse(q, k, v, visible)
    parts = [attention_with_lse(q, k[..., a:b, :], v[..., a:b, :], visible[..., a:b]) for a, b in ranges]
    parts = [(out.astype(dtype), lse.astype(dtype)) for out, lse in parts]
    assert_merge_matches(parts, full_out, full_lse, dtype)


@pytest.mark.skipif(not HAS_REFERENCE_LSE, reason="fastattn.reference.attention has no return_lse yet")
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_of_reference_parts(dtype):
    rng = np.random.default_rng(SEED)
    q = 3 * rng.standard_normal((2, 3, 9, 16))
    k = rng.standard_normal((2, 3, 40, 16))
    v = rng.standard_normal((2, 3, 40, 8))
    ranges = key_ranges([0, 11, 11, 30], 40)
    visible = make_visible(rng, "random", (2, 3, 9, 40), ranges)
    full_out, full_lse = reference.attention(q, k, v, visible, return_lse=True)
    expected_out, expected_lse = attention_with_lse(q, k, v, visible)
    np.testing.assert_allclose(full_out, expected_out, rtol=0, atol=1e-12)
    np.testing.assert_allclose(full_lse, expected_lse, rtol=0, atol=1e-12)
    parts = [tuple(np.asarray(x, dtype) for x in reference.attention(
        q, k[..., a:b, :], v[..., a:b, :], visible[..., a:b], return_lse=True)) for a, b in ranges]
    assert_merge_matches(parts, full_out, full_lse, dtype)


@pytest.mark.skipif(not (HAS_KERNEL_LSE and HAS_REFERENCE_LSE), reason="fastattn.attention has no return_lse yet")
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_of_kernel_parts(dtype):
    """Split-K with the kernel: merged fastattn parts are held to the naive error bound, the naive
    result being the same split and merge of the reference evaluated in `dtype`."""
    rng = np.random.default_rng(SEED)
    q = (3 * rng.standard_normal((2, 3, 9, 16))).astype(dtype)
    k = rng.standard_normal((2, 3, 70, 16)).astype(dtype)
    v = rng.standard_normal((2, 3, 70, 8)).astype(dtype)
    ranges = key_ranges([0, 23, 23, 64], 70)
    visible = make_visible(rng, "random", (2, 3, 9, 70), ranges)

    def merged(attend):
        return merge_states([attend(k[..., a:b, :], v[..., a:b, :], visible[..., a:b]) for a, b in ranges])

    out, lse = merged(lambda k, v, mask: fastattn.attention(q, k, v, mask, return_lse=True))
    naive_out, naive_lse = merged(lambda k, v, mask: attention_in(dtype, q, k, v, mask, return_lse=True))
    exact_dtype = np.float64 if dtype == np.float32 else np.longdouble
    exact_out, exact_lse = attention_in(exact_dtype, q, k, v, visible, return_lse=True)
    unseen = np.isneginf(exact_lse)
    np.testing.assert_array_equal(np.isneginf(lse), unseen)
    assert_within_naive_error(out, exact_out, naive_out)
    assert_within_naive_error(lse[~unseen], exact_lse[~unseen], naive_lse[~unseen])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_no_part_saw_give_zeros_and_minus_inf(dtype):
    out_a = np.array([[1.0, 2.0], [np.nan, np.inf], [3.0, 4.0]], dtype)
    out_b = np.array([[np.inf, -np.inf], [5.0, 6.0], [np.nan, np.nan]], dtype)
    lse_a = np.array([-np.inf, -np.inf, 0.5], dtype)
    lse_b = np.array([-np.inf, -np.inf, -np.inf], dtype)
    out, lse = merge_states([(out_a, lse_a), (out_b, lse_b)])
    np.testing.assert_array_equal(out, np.array([[0, 0], [0, 0], [3, 4]], dtype))
    np.testing.assert_array_equal(lse, np.array([-np.inf, -np.inf, 0.5], dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_propagates_only_from_parts_with_weight(dtype):
    out_a = np.array([[np.nan, 1.0], [2.0, 3.0], [4.0, 5.0]], dtype)
    out_b = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]], dtype)
    lse_a = np.array([0.0, 0.0, np.nan], dtype)
    lse_b = np.array([0.0, 0.0, 0.0], dtype)
    out, lse = merge_states([(out_a, lse_a), (out_b, lse_b)])
    np.testing.assert_array_equal(out, np.array([[np.nan, 1], [1.5, 2], [np.nan, np.nan]], dtype))
    np.testing.assert_allclose(lse, np.array([np.log(2), np.log(2), np.nan], dtype), rtol=np.finfo(dtype).eps)

    hidden_nan = np.array([[np.nan, np.nan], [0.0, 0.0], [0.0, 0.0]], dtype)
    out, _ = merge_states([(hidden_nan, np.array([-np.inf, 0, 0], dtype)), (out_b, lse_b)])
    np.testing.assert_array_equal(out, np.array([[1, 1], [0.5, 0.5], [0.5, 0.5]], dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_part_is_returned_unchanged_in_new_arrays(dtype):
    rng = np.random.default_rng(SEED)
    part_out = rng.standard_normal((3, 5, 4)).astype(dtype)
    part_lse = (10 * rng.standard_normal((3, 5))).astype(dtype)
    out, lse = merge_states([[part_out, part_lse]])
    np.testing.assert_array_equal(out, part_out)
    np.testing.assert_array_equal(lse, part_lse)
    assert not np.shares_memory(out, part_out) and not np.shares_memory(lse, part_lse)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1e4, -1e4])
def test_weights_depend_only_on_lse_differences(offset, dtype):
    """exp(lse) overflows or underflows at these offsets; the merge must not."""
    out_a = np.array([[1.0, 0.0]], dtype)
    out_b = np.array([[0.0, 1.0]], dtype)
    lse_a = np.array([offset], dtype)
    lse_b = np.array([offset - 1], dtype)
    far_below = np.array([offset - 1e3], dtype)
    out, lse = merge_states([(out_a, lse_a), (out_b, lse_b), (np.full_like(out_a, 7), far_below)])
    weight_b = np.exp(-1.0)
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(out, [[1 / (1 + weight_b), weight_b / (1 + weight_b)]], rtol=4 * eps)
    np.testing.assert_allclose(lse, [offset + np.log1p(weight_b)], rtol=4 * eps, atol=4 * eps)


def test_inputs_are_not_modified():
    rng = np.random.default_rng(SEED)
    parts = [(rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 4))) for _ in range(3)]
    parts[1][1][0, 1] = -np.inf
    copies = [(out.copy(), lse.copy()) for out, lse in parts]
    merge_states(parts)
    for (out, lse), (out_copy, lse_copy) in zip(parts, copies):
        np.testing.assert_array_equal(out, out_copy)
        np.testing.assert_array_equal(lse, lse_copy)


OUT = np.zeros((2, 3, 4), np.float32)
LSE = np.zeros((2, 3), np.float32)


@pytest.mark.parametrize(
    "parts, error, message",
    [
        ([], ValueError, r"at least one"),
        ([OUT], ValueError, r"parts\[0\].*pair"),
        ((OUT, LSE), ValueError, r"parts\[0\].*pair"),  # one pair not wrapped in a list
        ([(OUT, LSE), (OUT, LSE, LSE)], ValueError, r"parts\[1\].*pair.*length 3"),
        ([(OUT, LSE), (np.zeros((2, 3, 5), np.float32), LSE)], ValueError, r"parts\[1\] out.*shape"),
        ([(OUT, LSE), (np.zeros((1, 3, 4), np.float32), LSE[:1])], ValueError, r"parts\[1\] out.*shape"),
        ([(OUT, LSE), (OUT, np.zeros((2, 4), np.float32))], ValueError, r"parts\[1\] lse.*shape"),
        ([(OUT, LSE[..., np.newaxis])], ValueError, r"parts\[0\] lse.*shape"),
        ([(np.array(0, np.float32), np.array(0, np.float32))], ValueError, r"parts\[0\] out.*dim"),
        ([(OUT.tolist(), LSE)], TypeError, r"parts\[0\] out.*NumPy array"),
        ([(OUT, LSE), (OUT, LSE.tolist())], TypeError, r"parts\[1\] lse.*NumPy array"),
        ([(OUT.astype(np.int32), LSE)], TypeError, r"parts\[0\] out.*int32"),
        ([(OUT, LSE.astype(np.float16))], TypeError, r"parts\[0\] lse.*float16"),
        ([(OUT, LSE.astype(np.float64))], TypeError, r"parts\[0\] lse.*float64"),
        ([(OUT, LSE), (OUT.astype(np.float64), LSE.astype(np.float64))], TypeError, r"parts\[1\] out.*float64"),
    ],
    ids=["empty", "not a pair", "pair not in a list", "triple", "other Ev", "other batch", "lse of other shape",
         "lse with out's shape", "0-D out", "list out", "list lse", "int out", "float16 lse",
         "lse dtype differs from out", "parts of different dtypes"],
)
def test_errors_name_the_part_and_argument(parts, error, message):
    with pytest.raises(error, match=message):
        merge_states(parts)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_parts(dtype):
    """Half-precision outs come with float32 lse; the merge sums in float32 and rounds once, so the
    merged result is within 2 units of the dtype's rounding of the whole (each part's out was
    rounded once, the merge rounds once more)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtype = np.dtype(getattr(ml_dtypes, dtype) if dtype == "bfloat16" else dtype)
    rng = np.random.default_rng(SEED)
    q, k, v = (rng.standard_normal(shape).astype(dtype) for shape in ((2, 3, 20, 16), (2, 3, 90, 16), (2, 3, 90, 8)))
    parts = [fastattn.attention(q, k[..., a:b, :], v[..., a:b, :], return_lse=True) for a, b in ((0, 40), (40, 90))]
    out, lse = merge_states(parts)
    assert out.dtype == dtype and lse.dtype == np.float32
    whole, whole_lse = reference.attention(q, k, v, return_lse=True)
    unit = float(ml_dtypes.finfo(dtype).eps) / 2 * np.abs(whole).max(axis=-1, keepdims=True)
    assert np.all(np.abs(out.astype(np.float64) - whole) <= 2 * unit)
    np.testing.assert_allclose(lse, whole_lse, rtol=1e-6)
    with pytest.raises(TypeError, match="lse must be float32"):
        merge_states([(parts[0][0], parts[0][1].astype(dtype))])
