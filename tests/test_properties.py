"""Property-based tests (hypothesis): fastattn.attention and the drop-in against fastattn.reference
on random batch dims, heads, sizes, memory layouts, masks and keywords, on every ISA; and the
identities the math guarantees (merged key splits, permuted keys, a constant added to a float
mask row).

Every float32 result is held to the naive float32 implementation's error against the float64
reference, every float64 result to the float64 reference's error against np.longdouble
(conftest.assert_within_naive_error), float16 and bfloat16 results to test_half_precision's 4 units
of their rounding. No input is ever modified.

Profiles: "ci" (the default: derandomized, so every run tries the same examples) and "long"
(FASTATTN_HYPOTHESIS_PROFILE=long: twenty times as many random examples, saved in the example
database so a failure is replayed next time). Each test gets a share of the profile's examples.
The long profile has also found correct results that fail the criterion: with a few hundred keys,
errors of 10-20 eps where the naive result erred by 1-2. The kernels sum over the keys (and the
features) in one running sum, as any sequential float sum does, where numpy's BLAS sums in blocks;
compare such a failure with a sequential sum before calling it a bug.
"""

import math
import os
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import fastattn
from fastattn import reference

from conftest import BF16_PRODUCT_ISAS, SUPPORTED_ISAS, assert_accurate, assert_within_naive_error, attention_in
from test_half_precision import HALF_DTYPES, assert_within_half_rounding, unit_roundoff
from test_variants import assert_lse_accurate

# Named apart from hypothesis's own "ci" profile, which it loads by itself under a CI runner.
settings.register_profile(
    "fastattn-ci", derandomize=True, database=None, max_examples=400, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile(
    "fastattn-long", max_examples=8000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
PROFILE = settings.get_profile("fastattn-" + os.environ.get("FASTATTN_HYPOTHESIS_PROFILE", "ci"))


def examples(share):
    """The profile's settings with `share` of its examples (the costly tests take fewer)."""
    return settings(PROFILE, max_examples=max(1, round(PROFILE.max_examples * share)))


DTYPES = [np.float32, np.float64]


def around(*sizes):
    return sorted({n + d for n in sizes for d in (-1, 0, 1) if n + d >= 0})


# Sizes on either side of the kernels' widths. SIMD lanes: 4/2 (scalar float32/float64), 8/4
# (AVX2), 16/8 (AVX-512); query tiles of 3 vectors: 12/6, 24/12, 48/24 rows; key blocks of 64;
# the decode kernel for at most 16 query rows per key/value head, its key splits of 512.
ROW_COUNTS = around(6, 12, 16, 24, 48, 64, 96)
KEY_COUNTS = around(16, 64, 128, 512)
HEAD_DIMS = around(2, 4, 8, 16, 32)
GROUPS = [5, 7, 8, 9, 15, 16, 17]  # query heads per key/value head around the decode kernel's 16 rows

# Work of one example, batch * Hq * L * S * (E + Ev): the reference in np.longdouble (no BLAS)
# takes about 0.1 s per 10^6, and the ci profile must stay within a minute.
WORK_BUDGET = 2_000_000


def rarely_zero(sizes):
    """sizes, or 0 (an empty dim: valid, but then the kernels do little) one time in 16. Zero is
    tied to a middle choice: hypothesis favours the first (its simplest), and with zero there it
    drew 0 for a third of the examples."""
    return st.sampled_from(range(16)).flatmap(lambda pick: st.just(0) if pick == 7 else sizes)


def seqlens(sizes):
    return rarely_zero(st.one_of(st.sampled_from(sizes), st.integers(1, 5), st.integers(1, 2 * max(sizes))))


def head_dims():
    return rarely_zero(st.one_of(st.sampled_from(HEAD_DIMS), st.integers(1, 40)))


def scales(head_dim):
    """None (1 / sqrt(E)), 0, or a multiple of 1 / sqrt(E) of either sign: scores of a few units,
    as in a trained model. Much larger scores (2.5 at E = 25, scores near 40) take the criterion
    out of its range: a float32 dot product is then off by several eps of the score however it
    sums, the output by 10-20 eps, and the naive float32 result (numpy's BLAS, whose blocked sums
    err less than one FMA chain) by only a few eps in about 2% of the cases, so the bound of twice
    its error fails on correct results. Large scores have their own tests (test_attention.py,
    exact integer scores)."""
    unit = 1 / math.sqrt(max(head_dim, 1))
    return st.sampled_from([None, 0.0, -1.0 * unit, 0.5 * unit, 2.0 * unit])


class Layout(NamedTuple):
    """How an array sits in memory: `order` lists the axes from outermost to innermost in memory
    (a transposed view when it is not 0, 1, 2, ...), `steps` the slicing step of each axis
    (negative: reversed), `broadcast` the axes of stride 0."""
    order: tuple
    steps: tuple
    broadcast: frozenset


@st.composite
def layouts(draw, ndim, allow_broadcast=True, keep=(), unit_columns=False):
    """keep: axes never broadcast; unit_columns: the last axis contiguous (stride 1 element)."""
    if draw(st.booleans()):
        return Layout(tuple(range(ndim)), (1,) * ndim, frozenset())
    inner = ndim - 1 if unit_columns else ndim
    order = tuple(draw(st.permutations(range(inner)))) + tuple(range(inner, ndim))
    steps = tuple(draw(st.lists(st.sampled_from([1, -1, 2, -2, 3]), min_size=inner, max_size=inner)))
    steps += (1,) * (ndim - inner)
    axes = [axis for axis in range(inner) if allow_broadcast and axis not in keep]
    broadcast = frozenset(draw(st.sets(st.sampled_from(axes), max_size=2))) if axes else frozenset()
    return Layout(order, steps, broadcast)


def operands(draw, rng, dtype, shapes, unit_columns=False):
    """q, k, v of these shapes in drawn layouts (k and v with unit column strides if asked), with
    stride 0 anywhere but in two places. Not along v's keys: every value row the same makes the
    exact answer that row, which numpy's pairwise sums reach exactly (naive error 0) while the
    kernel's running sum of S copies rounds up to ~10 eps at S = 128, past the criterion's floor of
    8 eps (a correct result failed). Not along the features of both q and k: their scores would be
    E q k, sqrt(E) times larger than scales() intends."""
    q_layout = draw(layouts(len(shapes[0])))
    q_constant_features = len(shapes[0]) - 1 in q_layout.broadcast
    k_layout = draw(layouts(len(shapes[1]), keep=(len(shapes[1]) - 1,) if q_constant_features else (),
                            unit_columns=unit_columns))
    v_layout = draw(layouts(len(shapes[2]), keep=(len(shapes[2]) - 2,), unit_columns=unit_columns))
    return tuple(arrange(randn(rng, dtype), shape, layout)
                 for shape, layout in zip(shapes, (q_layout, k_layout, v_layout)))


def arrange(fill, shape, layout):
    """An array of `shape` laid out as `layout`; fill(shape) makes C-contiguous values."""
    base_shape = [1 if axis in layout.broadcast else n for axis, n in enumerate(shape)]
    padded = [n * abs(step) for n, step in zip(base_shape, layout.steps)]
    memory = np.asarray(fill(tuple(padded[axis] for axis in layout.order)))
    x = memory.transpose(np.argsort(layout.order))
    x = x[tuple(slice(None, None, step) for step in layout.steps) + (...,)]  # `...` keeps 0-D an array
    assert x.shape == tuple(base_shape)
    return np.broadcast_to(x, shape) if layout.broadcast else x


def operand_shape(draw, batch, heads, seqlen, head_dim):
    """One operand's shape: a suffix of the batch dims, some of them 1 (broadcast), then
    (heads, seqlen, head_dim); a single head without batch dims may also come as a 2-D array."""
    ndim = draw(st.integers(0, len(batch)))
    own = tuple(1 if draw(st.booleans()) else n for n in batch[len(batch) - ndim:])
    if not own and heads == 1 and draw(st.booleans()):
        return (seqlen, head_dim)
    return own + (heads, seqlen, head_dim)


def broadcast_shape(draw, target):
    """A shape that broadcasts to `target` without growing it: fewer leading dims, some of them 1."""
    ndim = draw(st.integers(0, len(target)))
    return tuple(1 if draw(st.booleans()) else n for n in target[len(target) - ndim:])


def describe(x):
    if not isinstance(x, np.ndarray):
        return repr(x)
    strides = tuple(stride // x.itemsize for stride in x.strides)
    return f"<{x.dtype} {x.shape} strides {strides}>" if x.ndim else repr(x)


class Case(NamedTuple):
    isa: str
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    mask: object
    kwargs: dict  # the keywords of fastattn.attention besides return_lse and out

    def __repr__(self):  # the arrays' layouts, not their values (print_blob reproduces those)
        kwargs = ", ".join(f"{key}={describe(value)}" for key, value in self.kwargs.items())
        arrays = ", ".join(f"{name}={describe(getattr(self, name))}" for name in ("q", "k", "v", "mask"))
        return f"Case(isa={self.isa!r}, {arrays}, {kwargs})"


def randn(rng, dtype):
    return lambda shape: rng.standard_normal(shape).astype(dtype)


def quantized_float_mask(rng, dtype, hidden):
    """Multiples of 1/64 in [-4, 4], about `hidden` of them -inf: adding an integer of magnitude
    below 2^10 to them is exact in float32."""
    def fill(shape):
        mask = np.asarray(np.round(rng.uniform(-4, 4, shape) * 64) / 64)
        mask[rng.random(shape) < hidden] = -np.inf
        return mask.astype(dtype)
    return fill


def bool_mask(rng, hidden):
    return lambda shape: rng.random(shape) >= hidden


@st.composite
def attention_cases(draw, positional=True, mask_dtypes=(None, bool, np.float32, np.float64), dtypes=DTYPES):
    """q, k, v, mask and keywords for fastattn.attention. positional=False leaves out the keywords
    that depend on key positions (causal, align, window, alibi_slopes, kv_lengths)."""
    isa = draw(st.sampled_from(SUPPORTED_ISAS))
    dtype = draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=3)))
    heads_k, heads_v = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    group = draw(st.one_of(st.integers(1, 4), st.sampled_from(GROUPS)))
    heads_q = math.lcm(heads_k, heads_v) * group
    # Half the cases aim at the decode kernel: query rows per key/value head up to a little past 16
    # (a group of g query heads per key head has g * L rows), k and v with unit column strides.
    decode = draw(st.booleans())
    seqlen_q = draw(rarely_zero(st.integers(1, 17 // group + 1)) if decode else seqlens(ROW_COUNTS))
    seqlen_k = draw(seqlens(KEY_COUNTS))
    head_dim, head_dim_v = draw(head_dims()), draw(head_dims())
    assume(math.prod(batch) * heads_q * seqlen_q * seqlen_k * (head_dim + head_dim_v) <= WORK_BUDGET)

    shapes = [operand_shape(draw, batch, heads_q, seqlen_q, head_dim),
              operand_shape(draw, batch, heads_k, seqlen_k, head_dim),
              operand_shape(draw, batch, heads_v, seqlen_k, head_dim_v)]
    q, k, v = operands(draw, rng, dtype, shapes, unit_columns=decode)
    # The batch the operands give: the dims some operand has (a dim no operand has is not there).
    batch = np.broadcast_shapes(*(shape[:-3] for shape in shapes))

    mask = None
    mask_dtype = draw(st.sampled_from(mask_dtypes))
    if mask_dtype is not None:
        hidden = draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))
        fill = bool_mask(rng, hidden) if mask_dtype is bool else quantized_float_mask(rng, mask_dtype, hidden)
        shape = broadcast_shape(draw, batch + (heads_q, seqlen_q, seqlen_k))
        mask = arrange(fill, shape, draw(layouts(len(shape))))

    kwargs = {"scale": draw(scales(head_dim))}
    if draw(st.booleans()):
        kwargs["softcap"] = draw(st.sampled_from([0.5, 3.0, 30.0]))
    if positional:
        kwargs["causal"] = draw(st.booleans())
        kwargs["align"] = draw(st.sampled_from(["top_left", "bottom_right"]))
        if draw(st.booleans()):
            side = st.one_of(st.none(), st.integers(-2, seqlen_k + 2))
            kwargs["window"] = (draw(side), draw(side))
        if draw(st.booleans()):
            shape = draw(st.sampled_from([(heads_q,), batch + (heads_q,)]))
            slope_dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
            kwargs["alibi_slopes"] = rng.uniform(-0.2, 1.0, shape).astype(slope_dtype)
        if draw(st.booleans()):
            length_dtype = draw(st.sampled_from([np.int64, np.int32, np.uint16]))
            kwargs["kv_lengths"] = np.asarray(rng.integers(0, seqlen_k + 1, batch), dtype=length_dtype)
    return Case(isa, q, k, v, mask, kwargs)


@contextmanager
def using_isa(name):
    chosen = fastattn.cpu_info()["isa"]
    fastattn.set_isa(name)
    assert fastattn.cpu_info()["isa"] == name
    try:
        yield
    finally:
        fastattn.set_isa(chosen)


def call_unmodified(function, *args, **kwargs):
    """function(*args, **kwargs), checking that no array argument (out= aside) changed."""
    arrays = [x for x in (*args, *kwargs.values()) if isinstance(x, np.ndarray) and x is not kwargs.get("out")]
    before = [x.copy() for x in arrays]
    result = function(*args, **kwargs)
    for x, x_before in zip(arrays, before):
        assert x.tobytes() == x_before.tobytes(), "an input was modified"
    return result


def kernel_path(q, k, v):
    """Which kernel fastattn runs: "decode" for at most 16 query rows per key/value head (counted as
    the decode kernel counts them) with unit column strides in k and v, else "tile"."""
    heads_q, heads_k, heads_v = (x.shape[-3] if x.ndim > 2 else 1 for x in (q, k, v))
    rows = math.gcd(heads_q // heads_k, heads_q // heads_v) * q.shape[-2]
    unit_columns = all(x.strides[-1] == x.itemsize for x in (k, v))
    return "decode" if rows <= 16 and unit_columns else "tile"


def attend(case, **kwargs):
    """fastattn.attention on the case with its ISA; kwargs add to or replace the case's. Counts the
    kernel, ISA, dtype and keywords in hypothesis's statistics."""
    kwargs = dict(case.kwargs, **kwargs)
    event(f"{kernel_path(case.q, case.k, case.v)} kernel, {case.isa}, {case.q.dtype}")
    event(f"mask {'none' if case.mask is None else case.mask.dtype}")
    for name, value in kwargs.items():
        if value is not None and value is not False and name != "scale":
            event(f"keyword {name}")
    with using_isa(case.isa):
        return call_unmodified(fastattn.attention, case.q, case.k, case.v, case.mask, **kwargs)


def for_reference(q, k, v, kwargs):
    """q, k, v and keywords with the same meaning, in the form fastattn.reference handles: q, k, v
    viewed with a head dim and the batch dims they share, and kv_lengths as int64. The reference
    takes the scores' batch and head dims from q and k only: dims only v has were missing from its
    lse and broke its kv_lengths, and 2-D q and k broke its kv_lengths and gave a 3-D output with
    alibi_slopes. Unsigned kv_lengths wrapped around in its lengths - L (align="bottom_right").
    A result of 2-D inputs then needs the head dim too: as_compared."""
    batch = np.broadcast_shapes(*(x.shape[:-3] for x in (q, k, v)))
    q, k, v = (np.broadcast_to(x, batch + (x.shape[-3:] if x.ndim > 2 else (1,) + x.shape)) for x in (q, k, v))
    if kwargs.get("kv_lengths") is not None:
        kwargs = dict(kwargs, kv_lengths=kwargs["kv_lengths"].astype(np.int64))
    return q, k, v, kwargs


def as_compared(out, lse):
    """out and lse (or None) of 2-D inputs with the head dim for_reference gave them."""
    if out.ndim == 2:
        return out[np.newaxis], None if lse is None else lse[np.newaxis]
    return out, lse


def exact_dtype(dtype):
    """The precision a result of `dtype` is measured against."""
    return np.float64 if dtype == np.float32 else np.longdouble


# --- against the reference --------------------------------------------------------------------


def result_shape(q, k, v):
    """fastattn.attention's output shape: batch + (Hq, L, Ev), or (L, Ev) when every input is 2-D."""
    batch = np.broadcast_shapes(*(x.shape[:-3] for x in (q, k, v)))
    shape = batch + (q.shape[-3] if q.ndim > 2 else 1, q.shape[-2], v.shape[-1])
    return shape if max(x.ndim for x in (q, k, v)) > 2 else shape[1:]


@examples(1.0)
@given(attention_cases(), st.booleans(), st.booleans(), st.data())
def test_attention_matches_reference(case, return_lse, give_out, data):
    """Every keyword of fastattn.attention, together, on random shapes and layouts; out= with any
    strides but zero ones (a broadcast array is read-only)."""
    out = None
    if give_out:
        shape = result_shape(case.q, case.k, case.v)
        layout = data.draw(layouts(len(shape), allow_broadcast=False), label="out layout")
        out = arrange(lambda shape: np.full(shape, np.nan, case.q.dtype), shape, layout)
    result = attend(case, return_lse=return_lse, out=out)
    result, lse = result if return_lse else (result, None)
    if out is not None:
        assert result is out
    else:
        assert result.flags.c_contiguous
    assert result.dtype == case.q.dtype
    assert result.shape == result_shape(case.q, case.k, case.v)
    assert lse is None or (lse.dtype == result.dtype and lse.shape == result.shape[:-1])
    q, k, v, kwargs = for_reference(case.q, case.k, case.v, case.kwargs)
    result, lse = as_compared(result, lse)
    assert_accurate(result, q, k, v, case.mask, **kwargs)
    if return_lse:
        assert_lse_accurate(lse, q, k, v, dict(kwargs, mask=case.mask))


@examples(0.3)
@given(attention_cases(mask_dtypes=(None, bool, np.float32, *HALF_DTYPES), dtypes=HALF_DTYPES))
def test_half_precision_matches_reference(case):
    """float16 and bfloat16 with every keyword, masks of half dtypes too, on every ISA: within
    test_half_precision's 4 units of the output dtype's rounding of the reference, plus on avx512bf16
    and amx what rounding the probabilities to bfloat16 may add."""
    result = attend(case)
    assert result.dtype == case.q.dtype
    assert result.shape == result_shape(case.q, case.k, case.v)
    q, k, v, kwargs = for_reference(case.q, case.k, case.v, case.kwargs)
    result, _ = as_compared(result, None)
    slack = 0
    tile = kernel_path(case.q, case.k, case.v) == "tile"
    if case.isa in BF16_PRODUCT_ISAS and case.q.dtype.name == "bfloat16" and tile:
        # VDPBF16PS and AMX multiply V by the probabilities rounded to bfloat16, each p_j off by up to
        # u p_j: up to u * sum_j p_j |v_j| / sum_j p_j more, the reference on |v|. Where a row's
        # values cancel, that is many units of the output itself (README: 117 at Ev = 1).
        slack = unit_roundoff(result.dtype) * reference.attention(q, k, np.abs(v), case.mask, **kwargs)
    assert_within_half_rounding(result, reference.attention(q, k, v, case.mask, **kwargs), slack=slack)


@st.composite
def sdpa_cases(draw):
    """Inputs for scaled_dot_product_attention: without enable_gqa the heads broadcast like batch dims
    (each operand has H heads or 1), with it Hq is a multiple of Hk = Hv."""
    isa = draw(st.sampled_from(SUPPORTED_ISAS))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    enable_gqa = draw(st.booleans())
    if enable_gqa:
        heads_k = draw(st.integers(1, 3))
        heads = [heads_k * draw(st.one_of(st.integers(1, 3), st.sampled_from(GROUPS))), heads_k, heads_k]
    else:
        count = draw(st.integers(1, 4))
        heads = [draw(st.sampled_from([1, count])) for _ in range(3)]
    seqlen_q, seqlen_k = draw(seqlens(ROW_COUNTS)), draw(seqlens(KEY_COUNTS))
    head_dim, head_dim_v = draw(head_dims()), draw(head_dims())
    assume(math.prod(batch) * max(heads) * seqlen_q * seqlen_k * (head_dim + head_dim_v) <= WORK_BUDGET)
    shapes = [batch + (heads[0], seqlen_q, head_dim), batch + (heads[1], seqlen_k, head_dim),
              batch + (heads[2], seqlen_k, head_dim_v)]
    q, k, v = operands(draw, rng, dtype, shapes)
    is_causal = draw(st.booleans())
    mask = None
    if not is_causal and draw(st.booleans()):
        mask_dtype = draw(st.sampled_from([bool, np.float32, dtype]))
        fill = bool_mask(rng, 0.3) if mask_dtype is bool else quantized_float_mask(rng, mask_dtype, 0.3)
        shape = broadcast_shape(draw, batch + (max(heads), seqlen_q, seqlen_k))
        mask = arrange(fill, shape, draw(layouts(len(shape))))
    scale = draw(scales(head_dim))
    return isa, q, k, v, mask, dict(is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


@examples(0.3)
@given(sdpa_cases())
def test_sdpa_matches_reference(case):
    isa, q, k, v, mask, kwargs = case
    with using_isa(isa):
        out = call_unmodified(fastattn.scaled_dot_product_attention, q, k, v, mask, **kwargs)
    if not kwargs["enable_gqa"]:  # the reference's heads are grouped: give it the broadcast heads
        heads = max(x.shape[-3] for x in (q, k, v))
        q, k, v = (np.broadcast_to(x, x.shape[:-3] + (heads,) + x.shape[-2:]) for x in (q, k, v))
    assert out.flags.c_contiguous and out.dtype == q.dtype
    assert_accurate(out, q, k, v, mask, causal=kwargs["is_causal"], scale=kwargs["scale"])


# --- identities -----------------------------------------------------------------------------------
# Each transforms the inputs in a way that leaves the exact answer unchanged. The kernel's result on
# the transformed inputs is held to the exact answer for the original inputs, within twice the
# rounding error of the naive implementation on the transformed inputs (against their own exact
# answer) plus the floor: a transformation that changed the answer leaves that rounding error small
# and fails.


def assert_identity(out, exact, naive_transformed, exact_transformed):
    """assert_within_naive_error(out, exact, naive) with naive - exact = naive_transformed -
    exact_transformed, the rounding error of the naive implementation on the transformed inputs."""
    naive = np.asarray(naive_transformed, np.longdouble) - exact_transformed + np.asarray(exact, np.longdouble)
    assert_within_naive_error(out, exact, naive)


def assert_identity_lse(lse, exact, naive_transformed, exact_transformed):
    """The same for the log-sum-exp, whose -inf (rows that see no key) must match exactly."""
    unseen = np.isneginf(exact)
    np.testing.assert_array_equal(np.isneginf(lse), unseen, err_msg="-inf positions of the lse differ")
    np.testing.assert_array_equal(np.isneginf(exact_transformed), unseen)
    assert_identity(lse[~unseen], exact[~unseen], naive_transformed[~unseen], exact_transformed[~unseen])


def key_slice(x, start, stop, axis):
    """x's keys [start, stop) on `axis` (counted from the end); a mask without a key axis, or with
    one key column (broadcast), serves every slice as it is."""
    if x is None or x.ndim < -axis or (axis == -1 and x.shape[axis] == 1):
        return x
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, stop)
    return x[tuple(index)]


def merge_in(dtype, parts):
    """merge_states' formula evaluated in `dtype`: the test's own, so that a fault in merge_states
    cannot hide in the naive error it is compared with."""
    outs = np.stack([np.asarray(out, dtype) for out, _ in parts])
    lses = np.stack([np.asarray(lse, dtype) for _, lse in parts])
    top = lses.max(axis=0)
    top = np.where(np.isneginf(top), 0, top)
    weights = np.exp(lses - top)
    total = weights.sum(axis=0)
    seen = total > 0
    out = np.where(seen[..., None], (weights[..., None] * outs).sum(axis=0) / np.where(seen, total, 1)[..., None], 0)
    lse = np.where(seen, top + np.log(np.where(seen, total, 1)), -np.inf)
    return out.astype(dtype), lse.astype(dtype)


@examples(0.5)
@given(attention_cases(positional=False), st.data())
def test_merged_key_splits_equal_the_whole(case, data):
    """merge_states of the results over keys [0, c) and [c, S) is attention over all keys."""
    seqlen_k = case.k.shape[-2]
    cut = data.draw(st.integers(0, seqlen_k), label="cut")
    ranges = ((0, cut), (cut, seqlen_k))

    def split(q, k, v, mask):
        return [(q, key_slice(k, a, b, -2), key_slice(v, a, b, -2), key_slice(mask, a, b, -1))
                for a, b in ranges]

    out, lse = fastattn.merge_states([
        attend(case._replace(k=k, v=v, mask=mask), return_lse=True) for _, k, v, mask in split(*case[1:5])])
    q, k, v, kwargs = for_reference(case.q, case.k, case.v, case.kwargs)
    out, lse = as_compared(out, lse)
    dtype = q.dtype.type

    def merged_in(dtype):  # the split and merge evaluated in `dtype`
        parts = split(q, k, v, case.mask)
        return merge_in(dtype, [attention_in(dtype, *part, return_lse=True, **kwargs) for part in parts])

    exact_out, exact_lse = attention_in(exact_dtype(dtype), q, k, v, case.mask, return_lse=True, **kwargs)
    (naive_out, naive_lse), (split_out, split_lse) = merged_in(dtype), merged_in(exact_dtype(dtype))
    assert out.dtype == lse.dtype == dtype
    assert_identity(out, exact_out, naive_out, split_out)
    assert_identity_lse(lse, exact_lse, naive_lse, split_lse)


@examples(0.5)
@given(attention_cases(positional=False), st.randoms(use_true_random=False))
def test_permuting_keys_with_values_changes_nothing(case, random):
    """The keys (with their value rows and mask columns) in any order give the same result."""
    order = list(range(case.k.shape[-2]))
    random.shuffle(order)

    def permuted(x, axis):
        return x if x is None or x.ndim < -axis or x.shape[axis] == 1 else np.take(x, order, axis=axis)

    shuffled = case._replace(k=permuted(case.k, -2), v=permuted(case.v, -2), mask=permuted(case.mask, -1))
    out, lse = attend(shuffled, return_lse=True)
    q, k, v, kwargs = for_reference(case.q, case.k, case.v, case.kwargs)
    out, lse = as_compared(out, lse)
    exact_out, exact_lse = attention_in(exact_dtype(q.dtype), q, k, v, case.mask, return_lse=True, **kwargs)
    shuffled_inputs = (*for_reference(shuffled.q, shuffled.k, shuffled.v, {})[:3], shuffled.mask)
    naive_out, naive_lse = attention_in(q.dtype.type, *shuffled_inputs, return_lse=True, **kwargs)
    shuffled_out, shuffled_lse = attention_in(exact_dtype(q.dtype), *shuffled_inputs, return_lse=True, **kwargs)
    assert_identity(out, exact_out, naive_out, shuffled_out)
    assert_identity_lse(lse, exact_lse, naive_lse, shuffled_lse)


@examples(0.5)
@given(attention_cases(mask_dtypes=(np.float32, np.float64)), st.data())
def test_constant_added_to_float_mask_row_changes_nothing(case, data):
    """mask + c, with c constant along each row (all keys of one query of one head), gives the same
    output and the log-sum-exp plus c. The mask's values are multiples of 1/64 in [-4, 4] and c an
    integer below 2^10 in magnitude, so mask + c is exact even in float32."""
    mask = case.mask
    rows = result_shape(case.q, case.k, case.v)[:-1]  # (batch..., Hq, L): one constant per row
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    shift = rng.integers(-1000, 1001, rows + (1,)).astype(mask.dtype)
    shifted = case._replace(mask=mask + shift)
    assert np.array_equal(shifted.mask - shift, np.broadcast_to(mask, shifted.mask.shape))
    out, lse = attend(shifted, return_lse=True)

    q, k, v, kwargs = for_reference(case.q, case.k, case.v, case.kwargs)
    out, lse = as_compared(out, lse)
    exact_out, exact_lse = attention_in(exact_dtype(q.dtype), q, k, v, mask, return_lse=True, **kwargs)
    naive_out, naive_lse = attention_in(q.dtype.type, q, k, v, shifted.mask, return_lse=True, **kwargs)
    shifted_out, shifted_lse = attention_in(exact_dtype(q.dtype), q, k, v, shifted.mask, return_lse=True, **kwargs)
    assert_identity(out, exact_out, naive_out, shifted_out)
    # The log-sum-exp moves by c, added in the exact precision.
    assert_identity_lse(lse, exact_lse + shift[..., 0].astype(exact_lse.dtype), naive_lse, shifted_lse)
