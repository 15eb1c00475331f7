"""float16 and bfloat16 inputs: computed in float32, the result rounded once to the input dtype.

Three properties, on every ISA:
- accuracy: within 4 units of the output dtype's rounding of the float64 reference, relative to
  each output row's magnitude (the issue's criterion), on awkward sizes, causal, masked and strided;
- the half-precision path is the float32 path on the same values plus one rounding: bit-identical
  to fastattn on the inputs converted to float32, then rounded by NumPy / ml_dtypes;
- every half-precision value survives the kernel's load and store conversions unchanged.
"""

import numpy as np
import pytest

import fastattn
from fastattn import reference

from conftest import BF16_PRODUCT_ISAS, bool_mask, float_mask

ml_dtypes = pytest.importorskip("ml_dtypes")

pytestmark = pytest.mark.usefixtures("half_isa")

HALF_DTYPES = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]


def unit_roundoff(dtype):
    """Half the distance from 1 to the next value: 2^-11 for float16, 2^-8 for bfloat16."""
    return float(ml_dtypes.finfo(dtype).eps) / 2


def random_half(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def assert_within_half_rounding(out, ref, units=4, slack=0):
    """|out - ref| <= units * u * (max |ref| over the output row) + slack, u the unit roundoff of out's
    dtype. Rows that see no key must be exactly 0."""
    bound = units * unit_roundoff(out.dtype) * np.max(np.abs(ref), axis=-1, keepdims=True, initial=0) + slack
    err = np.abs(out.astype(np.float64) - ref)
    if err.size and not np.all(err <= bound):
        worst = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(f"error {err[worst]:.3g} > {units} units ({bound[worst]:.3g}) at {worst}: "
                             f"reference {ref[worst]:.5g}, got {float(out[worst]):.5g}")


def check(out, q, k, v, mask=None, **keywords):
    """out has q's dtype and is within 4 units of the reference."""
    assert out.dtype == q.dtype
    assert_within_half_rounding(out, reference.attention(q, k, v, mask, **keywords))


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen_q, seqlen_k, head_dim, head_dim_v",
                         [(1, 1, 1, 1), (7, 63, 17, 5), (65, 197, 80, 33), (48, 1000, 72, 64), (197, 65, 128, 128),
                          (1, 1100, 128, 128), (2, 700, 40, 24), (49, 129, 64, 64), (130, 128, 32, 48)])
def test_accuracy(rng, seqlen_q, seqlen_k, head_dim, head_dim_v, causal, dtype):
    q = random_half(rng, (2, 4, seqlen_q, head_dim), dtype)
    k = random_half(rng, (2, 2, seqlen_k, head_dim), dtype)
    v = random_half(rng, (2, 2, seqlen_k, head_dim_v), dtype)
    check(fastattn.attention(q, k, v, causal=causal), q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("mask_dtype", [bool, np.float32, np.float64, np.float16, ml_dtypes.bfloat16],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("seqlen_q", [1, 70])
def test_masks(rng, seqlen_q, mask_dtype, dtype):
    """Masks of every dtype, with rows that see no key at all (which give zeros)."""
    q = random_half(rng, (3, seqlen_q, 24), dtype)
    k, v = random_half(rng, (3, 130, 24), dtype), random_half(rng, (3, 130, 40), dtype)
    shape = (3, seqlen_q, 130)
    mask = bool_mask(rng, shape) if mask_dtype is bool else float_mask(rng, shape).astype(mask_dtype)
    mask[:, 0] = False if mask_dtype is bool else -np.inf
    out = fastattn.attention(q, k, v, mask)
    check(out, q, k, v, mask)
    assert not out[:, 0].astype(np.float32).any()


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_heads_past_the_head_cache(rng, dtype):
    """K and V heads over 8 MB once converted (float32) or packed (avx512bf16, amx) are prepared block
    by block."""
    q = random_half(rng, (40, 128), dtype)
    k, v = random_half(rng, (17000, 128), dtype), random_half(rng, (17000, 128), dtype)
    for keywords in (dict(), dict(causal=True, align="bottom_right", window=(9000, None))):
        assert_within_half_rounding(fastattn.attention(q, k, v, **keywords), reference.attention(q, k, v, **keywords))


# (query rows, keys, keywords, the keys no row sees). Before: rows 0-19 see keys i + 275 .. i + 281,
# a range that starts at an odd key. After: rows 0-20 see keys 0 .. i, a range that ends at an odd
# count, with key 21 and on still there.
UNSEEN_KEYS = {
    "before": (20, 301, dict(causal=True, align="bottom_right", window=(6, None)), slice(None, 275)),
    "after": (21, 40, dict(causal=True), slice(21, None)),
}


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("where", UNSEEN_KEYS)
def test_keys_no_row_sees_do_not_reach_the_output(rng, where, threads, dtype, half_isa):
    """Infinite values at keys that no row sees change nothing. A kernel that multiplies pairs of keys
    (avx512bf16) holds the keys beside a block's first and last key in the same words as theirs, and
    must not let inf times a zero probability in; AMX's products read 32 keys at a time, past a
    block's end."""
    seqlen_q, seqlen_k, keywords, unseen = UNSEEN_KEYS[where]
    q = random_half(rng, (2, seqlen_q, 32), dtype)
    k, v = random_half(rng, (2, seqlen_k, 32), dtype), random_half(rng, (2, seqlen_k, 24), dtype)
    v[:, unseen] = np.inf
    before = fastattn.get_num_threads()
    fastattn.set_num_threads(threads)
    try:
        out = fastattn.attention(q, k, v, **keywords)
    finally:
        fastattn.set_num_threads(before)
    v_seen = v.copy()
    v_seen[:, unseen] = 0
    check(out, q, k, v_seen, **keywords)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_strided_views(rng, dtype):
    """Transposed, sliced and reversed views are read where they are, as for float32."""
    q = random_half(rng, (50, 3, 80), dtype).transpose(1, 0, 2)[:, ::2]
    k = random_half(rng, (3, 80, 300), dtype).transpose(0, 2, 1)[:, ::-1]
    v = random_half(rng, (3, 300, 64), dtype)[..., 10:43]
    check(fastattn.attention(q, k, v), q, k, v)
    check(fastattn.attention(q[:, :1], k, v), q[:, :1], k, v)  # the decode kernel


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("seqlen_q", [1, 90])
def test_variants_and_lse(rng, seqlen_q, dtype):
    q = random_half(rng, (2, 4, seqlen_q, 32), dtype)
    k, v = random_half(rng, (2, 2, 200, 32), dtype), random_half(rng, (2, 2, 200, 16), dtype)
    keywords = dict(causal=True, align="bottom_right", window=(50, None), softcap=3.0,
                    alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]), kv_lengths=np.array([200, 137]))
    out, lse = fastattn.attention(q, k, v, return_lse=True, **keywords)
    ref, ref_lse = reference.attention(q, k, v, return_lse=True, **keywords)
    assert out.dtype == dtype and lse.dtype == np.float32
    assert_within_half_rounding(out, ref)
    # lse is computed and kept in float32: a few float32 units of the scores' magnitude.
    np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=1e-5 * max(1.0, np.abs(ref_lse).max()))


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("seqlen_q, causal", [(1, False), (3, False), (100, False), (100, True)])
def test_same_as_float32_then_rounded(rng, seqlen_q, causal, dtype, half_isa):
    """The half path converts its inputs exactly and computes as the float32 path does, so its result
    is the float32 result on the same values, rounded to nearest even (NumPy's, ml_dtypes'). Except
    bfloat16 prefill on avx512bf16 and amx, which multiply the probabilities rounded to bfloat16: their
    result is held to the reference as every half result is, their lse (float32 scores) to the float32
    path's."""
    q = random_half(rng, (2, 8, seqlen_q, 72), dtype)
    k, v = random_half(rng, (2, 2, 600, 72), dtype), random_half(rng, (2, 2, 600, 40), dtype)
    mask = float_mask(rng, (seqlen_q, 600)).astype(dtype)
    out, lse = fastattn.attention(q, k, v, mask, causal=causal, return_lse=True)
    wide = [x.astype(np.float32) for x in (q, k, v, mask)]
    out32, lse32 = fastattn.attention(*wide, causal=causal, return_lse=True)
    if half_isa in BF16_PRODUCT_ISAS and dtype == ml_dtypes.bfloat16 and seqlen_q > 16:
        assert_within_half_rounding(out, reference.attention(q, k, v, mask, causal=causal))
        np.testing.assert_allclose(lse, lse32, rtol=0, atol=1e-5 * max(1.0, np.abs(lse32).max()))
        return
    np.testing.assert_array_equal(out.view(np.uint16), out32.astype(dtype).view(np.uint16))
    np.testing.assert_array_equal(lse, lse32)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("seqlen_q", [1, 20])
def test_every_value_round_trips(seqlen_q, dtype, half_isa):
    """One key: every output row is that key's value row. All 65536 bit patterns as values pass
    through the load and store conversions unchanged (NaNs stay NaN, wherever they are), in the
    decode (one row) and the tile kernel. VDPBF16PS and AMX read bfloat16 subnormals (below 2^-126) as
    zero."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    v = bits.view(dtype).reshape(1, 1, -1)
    q = np.ones((1, seqlen_q, 8), dtype)
    k = np.ones((1, 1, 8), dtype)
    out = fastattn.attention(q, k, v)
    # Compared as float32 (exact for every half value): -0 comes out as +0, the sum starting at 0.
    expected = v[0, 0].astype(np.float32)
    if half_isa in BF16_PRODUCT_ISAS and dtype == ml_dtypes.bfloat16 and seqlen_q > 16:
        expected[np.abs(expected) < np.finfo(np.float32).tiny] = 0
    for row in out[0]:
        np.testing.assert_array_equal(row.astype(np.float32), expected)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_inputs_unchanged_and_out(rng, dtype):
    q, k, v = (random_half(rng, (2, 33, 16), dtype) for _ in range(3))
    copies = [x.copy() for x in (q, k, v)]
    out = np.empty((2, 33, 16), dtype)
    assert fastattn.attention(q, k, v, out=out) is out
    for x, copy in zip((q, k, v), copies):
        np.testing.assert_array_equal(x.view(np.uint16), copy.view(np.uint16))
    with pytest.raises(ValueError, match="out has dtype float32"):
        fastattn.attention(q, k, v, out=np.empty((2, 33, 16), np.float32))


def test_mixed_dtypes_refused(rng):
    q = random_half(rng, (2, 8, 16), np.float16)
    k = random_half(rng, (2, 8, 16), ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match="k has dtype bfloat16 but q has float16"):
        fastattn.attention(q, k, k)
    with pytest.raises(TypeError, match="supports float32, float64, float16 and bfloat16"):
        fastattn.attention(*(np.ones((2, 8, 16), ml_dtypes.float8_e4m3fn) for _ in range(3)))


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_one_kv_head_with_other_lengths(rng, threads, dtype):
    """K and V broadcast over the batch (the same memory) with a different length per element: the
    prefill kernel's converted copy of a head must not be reused for more keys than it holds."""
    q = random_half(rng, (3, 2, 60, 32), dtype)
    k, v = random_half(rng, (1, 2, 200, 32), dtype), random_half(rng, (1, 2, 200, 16), dtype)
    lengths = np.array([137, 200, 60])
    before = fastattn.get_num_threads()
    fastattn.set_num_threads(threads)
    try:
        out = fastattn.attention(q, k, v, kv_lengths=lengths)
    finally:
        fastattn.set_num_threads(before)
    check(out, q, k, v, kv_lengths=lengths)
