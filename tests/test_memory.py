"""Memory: a long sequence never materialises the score matrix, and views are never copied."""

import json
import textwrap
import tracemalloc

import numpy as np
import pytest

import fastattn

from conftest import assert_accurate, bool_mask, randn, run_python

MIB = 2**20

LONG_SEQLEN, LONG_HEADS, LONG_HEAD_DIM = 16384, 2, 64
CHECKED_ROWS = [0, 1, 47, 48, 63, 64, 65, 4095, 8191, 12345, 16383]

# Runs in a fresh process so that ru_maxrss, the peak resident size, reflects this call alone.
LONG_CAUSAL_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import numpy as np
    import fastattn

    folder, rows = sys.argv[1], json.loads(sys.argv[2])
    q, k, v = (np.load(f"{folder}/{name}.npy") for name in "qkv")
    fastattn.attention(q[:, :100], k[:, :100], v[:, :100], causal=True)  # start threads, allocate scratch
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fastattn.attention(q, k, v, causal=True)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.save(f"{folder}/rows.npy", out[:, rows])
    print(json.dumps({"growth_kib": after - before, "out_bytes": out.nbytes, "shape": out.shape}))
    """
)


def test_long_causal_sequence_uses_little_memory(rng, tmp_path):
    shape = (LONG_HEADS, LONG_SEQLEN, LONG_HEAD_DIM)
    q, k, v = (randn(rng, shape, np.float32) for _ in range(3))
    for name, x in zip("qkv", (q, k, v)):
        np.save(tmp_path / f"{name}.npy", x)

    result = run_python(LONG_CAUSAL_SCRIPT, str(tmp_path), json.dumps(CHECKED_ROWS))
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert tuple(report["shape"]) == shape
    # One L x S float32 score matrix would be 1 GiB per head; a tiled kernel needs a few tiles
    # per thread on top of its output.
    assert report["growth_kib"] * 1024 < report["out_bytes"] + 64 * MIB

    rows = np.load(tmp_path / "rows.npy")
    for position, row in enumerate(CHECKED_ROWS):
        # Causal (top-left): query row i attends exactly keys 0..i.
        visible = slice(0, row + 1)
        assert_accurate(rows[:, position : position + 1], q[:, row : row + 1], k[:, visible], v[:, visible])


def transposed_view(rng, batch, seqlen, heads, head_dim):
    return randn(rng, (batch, seqlen, heads, head_dim), np.float32).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float32"])
def test_views_are_read_in_place(rng, mask_kind):
    """NumPy reports its allocations to tracemalloc, so any copy of an input shows in the peak."""
    batch, heads, seqlen, head_dim = 4, 8, 1024, 64
    q = transposed_view(rng, batch, seqlen, heads, head_dim)
    k = randn(rng, (batch, heads, seqlen, head_dim), np.float32)[:, ::-1, ::-1, :]
    v = np.broadcast_to(randn(rng, (seqlen, head_dim), np.float32), (batch, heads, seqlen, head_dim))
    mask = {
        None: None,
        "bool": bool_mask(rng, (seqlen, seqlen)),
        "float32": np.where(bool_mask(rng, (seqlen, seqlen)), np.float32(0.5), np.float32(-np.inf)),
    }[mask_kind]
    if mask is not None:
        mask = np.broadcast_to(mask, (batch, heads, seqlen, seqlen))
    fastattn.attention(q, k, v, mask, causal=True)  # any one-time allocations happen here

    tracemalloc.start()
    try:
        out = fastattn.attention(q, k, v, mask, causal=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Each input is 8 MiB (the broadcast mask 32 or 128 MiB) if copied; the output is 8 MiB.
    assert peak < out.nbytes + 1 * MIB


@pytest.mark.parametrize("return_lse", [False, True])
def test_result_too_large_raises_memory_error(return_lse):
    """A result that cannot be allocated (here 2 TiB, the queries a stride-0 view of one row) raises
    MemoryError naming it, before any kernel work; element counts past 2^31 need no special case."""
    q = np.broadcast_to(np.zeros((1, 1, 1, 64), np.float32), (1, 1, 2**33, 64))
    k = np.zeros((1, 1, 4, 64), np.float32)
    with pytest.raises(MemoryError, match=r"cannot allocate the result: shape \(1, 1, 8589934592, 64\) of float32"):
        fastattn.attention(q, k, k, return_lse=return_lse)


@pytest.mark.parametrize("seqlen_q", [3, 40])  # the decode kernel, the tile kernel
def test_offsets_past_2_31_elements(isa, rng, seqlen_q):
    """Rows, heads and out= laid out more than 2^31 elements (8 GiB) apart in one buffer: every
    offset is formed in 64 bits. np.zeros maps its pages lazily, so only the touched ones are used."""
    far = 2**31 + 96  # elements between neighbouring rows or heads
    buffer = np.zeros(2 * far + 4096, np.float32)

    def view(start, shape, strides):
        x = np.lib.stride_tricks.as_strided(buffer[start:], shape, [4 * s for s in strides])
        x[...] = rng.standard_normal(shape)
        return x

    q = view(0, (2, seqlen_q, 16), (far, 16, 1))  # heads far apart
    k = view(700, (3, 16), (far, 1))  # every key row far from the next one
    v = view(800, (3, 2), (1, far))  # the two features far apart
    mask = view(1024, (2, seqlen_q, 3), (far, 3, 1))
    out = view(2048, (2, seqlen_q, 2), (far, 2, 1))
    inputs = [x.copy() for x in (q, k, v, mask)]
    result = fastattn.attention(q, k, v, mask, out=out)
    assert result is out
    np.testing.assert_allclose(out, fastattn.reference.attention(*inputs), rtol=1e-5, atol=1e-6)
    for x, before in zip((q, k, v, mask), inputs):
        np.testing.assert_array_equal(x, before)


def test_key_counts_past_2_31():
    """2^31 + 5 keys (a stride-0 view of one key and value row), kv_lengths past 2^31: every key
    index is 64-bit, and the log-sum-exp counts exactly the visible keys. Each key scores 1, so
    lse = 1 + log(number of visible keys). About 15 s on two idle cores."""
    keys = 2**31 + 5
    q = np.ones((1, 1, 1, 1))
    k = np.broadcast_to(np.ones((1, 1, 1, 1)), (1, 1, keys, 1))
    v = np.broadcast_to(np.array([0.5, -2.0]), (1, 1, keys, 2))
    out, lse = fastattn.attention(q, k, v, kv_lengths=np.array([keys - 2]), return_lse=True)
    np.testing.assert_array_equal(out[0, 0, 0], [0.5, -2.0])
    np.testing.assert_allclose(lse[0, 0, 0], 1 + np.log(keys - 2), rtol=1e-9)
