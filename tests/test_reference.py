"""The spec itself: fastattn.reference on a worked example and on drawn masks, and fastattn.attention
against both."""

import math

import numpy as np
import pytest

import fastattn
from fastattn import reference

from conftest import check_against_reference

pytestmark = pytest.mark.usefixtures("isa")

X = np.array([[1.0, 0.5, 2.0, 1.5], [0.5, 2.0, 1.0, 0.0], [1.5, 1.0, 0.5, 2.0]])
W_Q = np.array([[0.5, 1, 0], [0, 0.5, 1], [1, 0, 0.5], [0.5, 0, 1]])
W_K = np.array([[1, 0, 0.5], [0.5, 1, 0], [0, 0.5, 1], [1, 0, 0.5]])
W_V = np.array([[0, 1, 0.5, 1], [1, 0.5, 0, 1], [0.5, 0, 1, 1], [0, 1, 0.5, 1]])

# Both results are float64 evaluations of the same formula on values of order 1 to 20, so they
# may differ only by a few roundings.
FLOAT64_AGREEMENT = 1e-14


def softmax_by_hand(Q, K, V, scale):
    out = []
    for q_row in Q:
        scores = [scale * sum(a * b for a, b in zip(q_row, k_row)) for k_row in K]
        row_max = max(scores)
        weights = [math.exp(s - row_max) for s in scores]
        total = sum(weights)
        out.append([sum(w * v_row[d] for w, v_row in zip(weights, V)) / total for d in range(V.shape[1])])
    return np.array(out)


def test_worked_example_projections():
    Q, K, V = X @ W_Q, X @ W_K, X @ W_V
    np.testing.assert_array_equal(Q[0], [3.25, 1.25, 3.0])
    np.testing.assert_array_equal(K[0], [2.75, 1.5, 3.25])
    np.testing.assert_array_equal(V[0], [1.5, 2.75, 3.25, 5.0])
    assert Q[0] @ K[0] == 20.5625


@pytest.mark.parametrize("scale", [1.0, None], ids=["scale=1", "default-scale"])
def test_worked_example(scale):
    Q, K, V = X @ W_Q, X @ W_K, X @ W_V
    expected = softmax_by_hand(Q, K, V, 1 / math.sqrt(3) if scale is None else scale)

    np.testing.assert_allclose(reference.attention(Q, K, V, scale=scale), expected, rtol=FLOAT64_AGREEMENT)
    for dtype in (np.float64, np.float32):
        q, k, v = (x.astype(dtype) for x in (Q, K, V))
        check_against_reference(fastattn.attention(q, k, v, scale=scale), q, k, v, scale=scale)


def visible_from_drawing(drawing):
    """'x' = visible, '.' = hidden, as drawn in fastattn.reference's docstring."""
    return np.array([[c == "x" for c in line.split()] for line in drawing.strip().splitlines()])


CAUSAL_DRAWINGS = {
    "L<S": """
        x . . . .
        x x . . .
        x x x . .
    """,
    "L>S": """
        x . .
        x x .
        x x x
        x x x
        x x x
    """,
    "L=S": """
        x . . .
        x x . .
        x x x .
        x x x x
    """,
}


def uniform_weights_case(visible, dtype=np.float64):
    """With q = 0 every visible key gets the same weight, and v = identity prints the weights."""
    seqlen_q, seqlen_k = visible.shape
    q = np.zeros((seqlen_q, 3), dtype)
    k = np.ones((seqlen_k, 3), dtype)
    v = np.eye(seqlen_k, dtype=dtype)
    counts = visible.sum(axis=1, keepdims=True)
    expected = np.divide(visible, counts, out=np.zeros(visible.shape), where=counts > 0)
    return q, k, v, expected


@pytest.mark.parametrize("drawing", CAUSAL_DRAWINGS.values(), ids=CAUSAL_DRAWINGS.keys())
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_causal_matches_drawing(drawing, dtype):
    visible = visible_from_drawing(drawing)
    q, k, v, expected = uniform_weights_case(visible, dtype)
    # Hidden keys must get exactly zero weight in the spec; visible ones exactly 1/count.
    np.testing.assert_array_equal(reference.attention(q, k, v, causal=True), expected)
    check_against_reference(fastattn.attention(q, k, v, causal=True), q, k, v, causal=True)


MASK_DRAWING = """
    x . x . x
    . . . . .
    x x x x x
    . x . . .
"""


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bool_mask_matches_drawing(causal, dtype):
    mask = visible_from_drawing(MASK_DRAWING)
    visible = mask & np.tri(*mask.shape, dtype=bool) if causal else mask
    q, k, v, expected = uniform_weights_case(visible, dtype)
    np.testing.assert_array_equal(reference.attention(q, k, v, mask, causal=causal), expected)
    check_against_reference(fastattn.attention(q, k, v, mask, causal=causal), q, k, v, mask, causal)


def test_float_mask_is_added_to_scaled_scores():
    mask = np.where(visible_from_drawing(MASK_DRAWING), np.log(np.arange(1.0, 6.0)), -np.inf)
    q, k, v, _ = uniform_weights_case(np.isfinite(mask))
    weights = np.exp(mask)
    counts = weights.sum(axis=1, keepdims=True)
    expected = np.divide(weights, counts, out=np.zeros(weights.shape), where=counts > 0)
    np.testing.assert_allclose(reference.attention(q, k, v, mask), expected, rtol=FLOAT64_AGREEMENT, atol=0)
    check_against_reference(fastattn.attention(q, k, v, mask), q, k, v, mask)


def test_batch_dims_only_v_has():
    """Batch dims of v alone still batch the log-sum-exp and kv_lengths (found by the property tests)."""
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((7, 2, 5, 3))
    lengths = np.arange(7) % 5 + 1
    out, lse = reference.attention(q, k, v, kv_lengths=lengths, return_lse=True)
    assert out.shape == (7, 2, 3, 3) and lse.shape == (7, 2, 3)
    for b in range(7):
        one, one_lse = reference.attention(q, k[:, :lengths[b]], v[b, :, :lengths[b]], return_lse=True)
        np.testing.assert_allclose(out[b], one, rtol=0, atol=FLOAT64_AGREEMENT)
        np.testing.assert_allclose(lse[b], one_lse, rtol=0, atol=FLOAT64_AGREEMENT)


def test_two_dim_inputs_with_variants():
    """2-D q, k, v are one head: kv_lengths is then a scalar and alibi_slopes has one slope; the result
    stays 2-D."""
    rng = np.random.default_rng(4)
    q, k, v = rng.standard_normal((6, 4)), rng.standard_normal((9, 4)), rng.standard_normal((9, 3))
    out = reference.attention(q, k, v, kv_lengths=np.array(5))
    np.testing.assert_allclose(out, reference.attention(q, k[:5], v[:5]), rtol=0, atol=FLOAT64_AGREEMENT)
    assert reference.attention(q, k, v, alibi_slopes=np.ones(1)).shape == (6, 3)


def test_unsigned_kv_lengths():
    """bottom_right with unsigned lengths: d(i) = i + length - L must not wrap around below zero."""
    q, kv = np.ones((1, 2, 1)), np.ones((1, 1, 1))
    out = reference.attention(q, kv, kv, causal=True, align="bottom_right", kv_lengths=np.array(1, np.uint16))
    np.testing.assert_array_equal(out[0, :, 0], [0.0, 1.0])  # row 0 sees no key: d(0) = -1
