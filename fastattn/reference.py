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

``align="bottom_right"`` moves the diagonal to key ``d(i) = i + S - L`` (FlashAttention's
convention, what a KV cache needs: the last query sees every key). ``causal`` then means
``j <= d(i)``::

    align="bottom_right", causal      L = 5, S = 3: rows 0-1 see nothing
    L = 3, S = 5                      i=0  . . .
    i=0  x x x . .                    i=1  . . .
    i=1  x x x x .                    i=2  x . .
    i=2  x x x x x                    i=3  x x .
                                      i=4  x x x

``window=(left, right)`` keeps key j iff ``d(i) - left <= j <= d(i) + right``; a side that is
``None`` or negative is unbounded, and ``causal`` caps ``right`` at 0. ``window=(1, 0)``,
top-left, L = S = 4::

    i=0  x . . .
    i=1  x x . .
    i=2  . x x .
    i=3  . . x x

``kv_lengths[b]`` (one per batch element) removes keys ``j >= kv_lengths[b]``: they do not
exist, so whatever k and v hold there (a cache's unused tail) never matters. With
``bottom_right`` the diagonal is ``i + kv_lengths[b] - L``.

The score of a visible key is ``s = (q . k) * scale``, then ``softcap * tanh(s / softcap)`` when
``softcap`` is given, then ``- slope[h] * |d(i) - j|`` with ``alibi_slopes``, then plus a
floating ``mask``. A boolean ``mask`` marks visible keys with True; a floating ``mask`` is added
(``-inf`` hides a key). A key must pass every rule that is given. A row that sees no key at all
returns zeros, and its log-sum-exp (``return_lse=True``) is ``-inf``.
"""

import numpy as np


def attention(q, k, v, mask=None, *, causal=False, scale=None, align="top_left", window=None,
              softcap=None, alibi_slopes=None, kv_lengths=None, return_lse=False, dtype=np.float64):
    """softmax(scores) v with the scores described above, computed and returned in `dtype`;
    with return_lse also the natural log-sum-exp of each row's scores, shape (..., Hq, L).

    float64 is the specification. Tests also evaluate the same math in float32 (the naive
    implementation a kernel's rounding is compared with) and in np.longdouble (a more exact answer).
    alibi_slopes: (Hq,) or batch + (Hq,); kv_lengths: the batch shape (B,) for 4-D inputs.
    """
    q, k, v = (np.asarray(x, dtype=dtype) for x in (q, k, v))
    ndim = max(q.ndim, k.ndim, v.ndim)
    q, k, v = (x if x.ndim > 2 else x[np.newaxis] for x in (q, k, v))  # a 2-D input is one head
    batch = np.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    q, k, v = (np.broadcast_to(x, batch + x.shape[-3:]) for x in (q, k, v))
    num_heads_q, seqlen_q, head_dim = q.shape[-3:]
    seqlen_k = k.shape[-2]
    if k.shape[-3] != num_heads_q:  # grouped-query attention: repeat kv heads
        k = np.repeat(k, num_heads_q // k.shape[-3], axis=-3)
    if v.shape[-3] != num_heads_q:
        v = np.repeat(v, num_heads_q // v.shape[-3], axis=-3)
    if scale is None:
        scale = 1 / np.sqrt(dtype(head_dim)) if head_dim > 0 else 1
    scale = dtype(scale)

    scores = (q * scale) @ np.swapaxes(k, -1, -2)  # [..., L, S]
    # Positions broadcast as batch + (head, L, S); lengths and slopes carry the batch dims.
    lengths = seqlen_k
    if kv_lengths is not None:
        lengths = np.asarray(kv_lengths).astype(np.int64).reshape(batch)[..., None, None, None]
    rows = np.arange(seqlen_q)[:, None]
    keys = np.arange(seqlen_k)[None, :]
    diagonal = rows + (lengths - seqlen_q if align == "bottom_right" else 0)
    visible = keys < lengths
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0 if right is None or right < 0 else min(right, 0)
    if left is not None and left >= 0:
        visible = visible & (keys >= diagonal - left)
    if right is not None and right >= 0:
        visible = visible & (keys <= diagonal + right)

    if softcap is not None:
        scores = dtype(softcap) * np.tanh(scores / dtype(softcap))
    if alibi_slopes is not None:
        slopes = np.asarray(alibi_slopes, dtype=dtype)[..., None, None]  # [..., Hq, 1, 1]
        scores = scores - slopes * np.abs(diagonal - keys).astype(dtype)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype == np.bool_:
            visible = visible & mask
        else:
            scores = scores + mask.astype(dtype)
    visible = np.broadcast_to(visible, scores.shape)
    scores = np.where(visible, scores, -np.inf)

    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    row_max = np.where(np.isneginf(row_max), 0, row_max)  # rows with no visible key
    weights = np.exp(scores - row_max)
    row_sum = weights.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        weights = np.where(row_sum == 0, 0, weights / row_sum)  # a NaN row stays NaN
        lse = (np.log(row_sum) + row_max)[..., 0]  # log 0 = -inf for rows with no visible key
    if kv_lengths is not None:  # keys past a length do not exist: whatever v holds there is never read
        v = np.where((keys < lengths)[..., 0, :, None], v, 0)
    out = weights @ v
    if ndim == 2:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out
