"""Float64 NumPy reference: the semantic specification every kernel is tested against.

It materialises the full ``L x S`` score matrix, so use it on small inputs only.

Shapes follow ``fastattn.attention``: ``q (..., Hq, L, E)``, ``k (..., Hk, S, E)``,
``v (..., Hv, S, Ev)``; query head ``h`` reads key head ``h // (Hq // Hk)`` and value head
``h // (Hq // Hv)``; batch dims broadcast; the result has shape ``(..., Hq, L, Ev)``.

``causal=True`` lets query ``i`` see key ``j`` iff ``j <= i`` (the top-left diagonal, as in
PyTorch). Drawn with ``x`` = visible, ``.`` = hidden::

    L = 3, S = 5 (L < S)        L = 5, S = 3 (L > S)
        keys j ->                   keys j ->
    i=0  x . . . .              i=0  x . .
    i=1  x x . . .              i=1  x x .
    i=2  x x x . .              i=2  x x x
                                i=3  x x x
                                i=4  x x x

A boolean ``mask`` marks visible keys with True; a floating ``mask`` is added to the scaled
scores (``-inf`` hides a key). With both ``causal`` and ``mask``, a key must pass both.
A row that sees no key at all returns zeros.
"""

import numpy as np


def attention(q, k, v, mask=None, *, causal=False, scale=None, dtype=np.float64):
    """softmax(q k^T * scale + mask) v, computed and returned in `dtype`.

    float64 is the specification. Tests also evaluate the same math in float32 (the naive
    implementation a kernel's rounding is compared with) and in np.longdouble (a more exact answer).
    """
    q, k, v = (np.asarray(x, dtype=dtype) for x in (q, k, v))
    num_heads_q, seqlen_q, head_dim = q.shape[-3:] if q.ndim > 2 else (1, *q.shape)
    seqlen_k = k.shape[-2]
    if k.ndim > 2 and k.shape[-3] != num_heads_q:  # grouped-query attention: repeat kv heads
        k = np.repeat(k, num_heads_q // k.shape[-3], axis=-3)
    if v.ndim > 2 and v.shape[-3] != num_heads_q:
        v = np.repeat(v, num_heads_q // v.shape[-3], axis=-3)
    if scale is None:
        scale = 1 / np.sqrt(dtype(head_dim)) if head_dim > 0 else 1
    scale = dtype(scale)

    scores = (q * scale) @ np.swapaxes(k, -1, -2)  # [..., L, S]
    visible = np.ones((seqlen_q, seqlen_k), dtype=bool)
    if causal:
        visible = np.tril(visible)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype == np.bool_:
            visible = visible & mask
        else:
            scores = scores + mask.astype(dtype)
    scores = np.where(visible, scores, -np.inf)

    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    row_max = np.where(np.isneginf(row_max), 0, row_max)  # rows with no visible key
    weights = np.exp(scores - row_max)
    row_sum = weights.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        weights = np.where(row_sum == 0, 0, weights / row_sum)  # a NaN row stays NaN
    return weights @ v
