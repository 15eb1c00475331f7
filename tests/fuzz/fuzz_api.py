"""Fuzzes fastattn's argument checks and its binding with atheris (libFuzzer, coverage-guided).

Each input the fuzzer makes drives one call: fastattn.attention, scaled_dot_product_attention,
merge_states, or the compiled fastattn._core.attention_forward itself (which must stay
memory-safe whatever it is given). The arguments are drawn around a consistent problem (batch
dims, heads, L, S, E, Ev) and then bent: another shape or dtype, a list or a string for an
array, byte-swapped, misaligned, read-only, transposed, reversed, strided or stride-0 views,
arrays of raw bytes (NaN payloads, infinities, subnormals), out= overlapping an input, keyword
values of every wrong type and range.

Every outcome must be one of:
- ValueError, TypeError or NotImplementedError with a message;
- a result of the right shape and dtype that matches fastattn.reference when the inputs hold
  moderate finite values (raw bytes only have to give a result, whatever its values),
and no input may change. Anything else (another exception, a crash, a hang past -timeout) is a
finding: libFuzzer stops and saves the input as crash-*, which reproduces it when passed back:
`python tests/fuzz/fuzz_api.py crash-...`.

    python tests/fuzz/fuzz_api.py CORPUS_DIR -runs=100000 -seed=1 -timeout=20 -len_control=0 -max_len=2048
    python tests/fuzz/fuzz_api.py --replay CORPUS_DIR...    # each saved input once, no fuzzing

tests/fuzz/seeds/ keeps past findings (named for what they exercise); .ci/fuzz passes it as a second
corpus directory, so every run starts by checking them.

.ci/fuzz runs the first (about 2 minutes), .ci/sanitize the second on the sanitizer build.
"""

import math
import sys
from pathlib import Path

import atheris
import numpy as np

with atheris.instrument_imports():
    import fastattn
    from fastattn import _core, reference

from ml_dtypes import bfloat16

ERRORS = (ValueError, TypeError, NotImplementedError)
FLOATS = [np.float32, np.float64, np.float16, bfloat16]
OTHER_DTYPES = [np.bool_, np.int8, np.int32, np.int64, np.uint8, np.complex64, np.float128, object, "U2",
                np.dtype(">f4"), np.dtype(">f8")]
# Sizes at the kernels' edges (SIMD lanes, query tiles, key blocks), kept small so a call is quick.
SEQ = [0, 1, 2, 7, 8, 15, 16, 17, 33, 63, 64, 65, 97]
DIMS = [0, 1, 3, 4, 8, 15, 16, 17, 32, 33, 64]
# Tolerances against the float64 reference, relative to the largest |v|: a few units of the dtype's
# rounding for these sizes (values are moderate, under 100 keys).
TOLERANCE = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 2e-5, np.dtype(np.float16): 4e-3,
             np.dtype(bfloat16): 3e-2}

WRONG_SCALARS = [None, True, 0, -1, 2, 2.5, float("nan"), float("inf"), -float("inf"), 1e300, "1", b"x", [1], (2,),
                 np.float32(0.5), np.int64(3), np.array(1.0), np.array([1.0, 2.0]), 1j, object()]


class Draw:
    """The fuzzer's bytes as choices."""

    def __init__(self, data):
        self.fdp = atheris.FuzzedDataProvider(data)

    def pick(self, options):
        return options[self.fdp.ConsumeIntInRange(0, len(options) - 1)]

    def chance(self, one_in):
        # Exhausted data reads as 0: no, so that a short input is a plain valid call.
        return self.fdp.ConsumeIntInRange(0, one_in - 1) == one_in - 1

    def value(self, valid, wrong=None):
        """One of `valid`, or one time in four one of `wrong` (WRONG_SCALARS by default)."""
        return self.pick(WRONG_SCALARS if wrong is None else wrong) if self.chance(4) else self.pick(valid)

    def int(self, low, high):
        return self.fdp.ConsumeIntInRange(low, high)

    def bytes(self, n):
        return self.fdp.ConsumeBytes(n)


def values(draw, shape, dtype):
    """(array of `shape` and `dtype`, tame) where tame means moderate finite values."""
    n = math.prod(shape)
    kind = draw.pick(["normal", "normal", "normal", "special", "raw"])
    if kind == "raw" and (dtype.kind == "f" or dtype == bfloat16):
        raw = draw.bytes(n * dtype.itemsize)
        raw += bytes(n * dtype.itemsize - len(raw))
        return np.frombuffer(raw, dtype).reshape(shape).copy(), False
    rng = np.random.default_rng(draw.int(0, 2**32 - 1))
    x = np.asarray(rng.standard_normal(shape) * draw.pick([1.0, 0.1, 3.0]))
    tame = True
    if kind == "special" and n:
        x.flat[rng.integers(0, n, size=draw.int(1, 3))] = draw.pick([np.nan, np.inf, -np.inf, 1e30, 1e-40, 0.0])
        tame = False
    with np.errstate(all="ignore"):
        if dtype == np.bool_:
            return x > -0.5, True
        if dtype.kind == "U" or dtype == object:
            return x.astype(str).astype(dtype), True
        return x.astype(dtype), tame


def layout(draw, x):
    """x with the same values in a bent memory layout (possibly a read-only or misaligned view)."""
    for _ in range(draw.int(0, 2)):
        how = "misaligned" if draw.chance(16) else draw.pick(["contiguous", "transposed", "strided", "reversed",
                                                              "broadcast", "readonly", "fortran"])
        if x.ndim == 0:
            return x
        axis = draw.int(0, x.ndim - 1)
        if how == "transposed":
            x = np.swapaxes(np.swapaxes(x, axis, -1).copy(), axis, -1)
        elif how == "strided":
            wide = np.zeros(x.shape[:axis] + (2 * x.shape[axis],) + x.shape[axis + 1:], x.dtype)
            index = (slice(None),) * axis + (slice(None, None, 2),)
            wide[index] = x
            x = wide[index]
        elif how == "reversed":
            index = (slice(None),) * axis + (slice(None, None, -1),)
            x = x[index].copy()[index]
        elif how == "broadcast" and x.shape[axis] > 0:
            # Stride 0 along `axis`: every entry there repeats the first one.
            first = x[(slice(None),) * axis + (slice(0, 1),)]
            x = np.broadcast_to(first, x.shape)
        elif how == "misaligned" and x.dtype.itemsize > 1 and x.dtype != object:
            buffer = np.zeros(x.nbytes + 1, np.uint8)
            x2 = np.frombuffer(buffer.data, x.dtype, count=x.size, offset=1).reshape(x.shape)
            x2[...] = x
            x = x2
        elif how == "readonly":
            x = x.view()
            x.flags.writeable = False
        elif how == "fortran":
            x = np.asfortranarray(x)
    return x


def array(draw, shape, dtype, *, bend=12):
    """An array argument: usually `shape` and `dtype`, one time in `bend` something else."""
    shape = list(shape)
    if draw.chance(bend):
        change = draw.pick(["dim", "ndim", "dtype", "byteorder", "not an array", "none"])
        if change == "dim" and shape:
            shape[draw.int(0, len(shape) - 1)] = draw.pick(SEQ)
        elif change == "ndim":
            shape = shape[draw.int(0, len(shape)):] if draw.chance(2) else [draw.pick([1, 2])] * draw.int(1, 6) + shape
        elif change == "dtype":
            dtype = draw.pick(OTHER_DTYPES + FLOATS)
        elif change == "byteorder":
            dtype = np.dtype(dtype).newbyteorder()
        elif change == "not an array":
            return draw.pick([[[1.0, 2.0]], 1.0, "q", b"\x00" * 8, memoryview(b"\x00" * 8)]), False
        else:
            return None, True
    dtype = np.dtype(dtype)
    if math.prod(shape) > 200_000:
        shape = [min(n, 4) for n in shape]
    x, tame = values(draw, tuple(shape), dtype)
    return layout(draw, x), tame


def keywords(draw, hq, batch):
    """attention's keyword arguments: valid values mostly, wrong ones often enough."""
    kw, tame = {}, True
    if draw.chance(3):
        kw["causal"] = draw.value([False, True, np.bool_(True)])
    if draw.chance(3):
        kw["scale"] = draw.value([None, 0.5, 0.125, -1.0, 0.0, np.float32(0.25), 3])
    if draw.chance(3):
        kw["align"] = draw.value(["top_left", "bottom_right"], ["bottom-right", "TOP_LEFT", None, 1])
    if draw.chance(3):
        kw["window"] = draw.value([None, (1, 0), (3, 2), (-1, 4), (0, -1), (None, 2), [2, 2], (2**40, 1),
                                   (-(2**62), 2**62), (np.int64(2), np.int32(1))],
                                  [(1.5, 2), (1,), (1, 2, 3), "1,2", (True, False), 3])
    if draw.chance(3):
        kw["softcap"] = draw.value([None, 1.0, 30.0, 5, np.float32(2.0), 1e-30])
    if draw.chance(3):
        shape = draw.value([(hq,), tuple(batch) + (hq,)], [(hq + 1,), (1,), ()])
        slopes, tame = array(draw, shape, draw.pick([np.float64, np.float32, np.float16, bfloat16]))
        kw["alibi_slopes"] = slopes
    if draw.chance(3):
        kw["return_lse"] = draw.value([True, False], [1, None, "yes"])
    return kw, tame


def kv_lengths(draw, batch, seqlen_k):
    shape = draw.value([tuple(batch)], [(1,), (), tuple(batch) + (1,)])
    dtype = draw.value([np.int64, np.int32, np.uint8, np.uint64, np.int16], [np.float64, np.bool_, np.float32])
    rng = np.random.default_rng(draw.int(0, 2**32 - 1))
    low, high = draw.value([(0, seqlen_k)], [(-3, seqlen_k + 3), (-(2**40), 2**40)])
    lengths = rng.integers(low, high, size=shape, endpoint=True)
    with np.errstate(all="ignore"):
        return layout(draw, lengths.astype(dtype))


def problem(draw):
    """A consistent attention problem's arrays, each possibly bent."""
    batch = [draw.pick([1, 2, 3]) for _ in range(draw.int(0, 2))]
    hk = draw.pick([1, 2, 3])
    hq = hk * draw.pick([1, 2, 4])
    seqlen_q, seqlen_k = draw.pick(SEQ), draw.pick(SEQ)
    head_dim, head_dim_v = draw.pick(DIMS), draw.pick(DIMS + [None])
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    dtype = draw.pick(FLOATS)
    two_d = draw.chance(8)
    heads = lambda h: [] if two_d else batch + [h]  # noqa: E731
    q, tame_q = array(draw, heads(hq) + [seqlen_q, head_dim], dtype)
    k, tame_k = array(draw, heads(hk) + [seqlen_k, head_dim], dtype)
    v, tame_v = array(draw, heads(hk) + [seqlen_k, head_dim_v], dtype)
    mask, tame_m = None, True
    if draw.chance(2):
        full = heads(hq) + [seqlen_q, seqlen_k]
        shape = full[draw.int(0, len(full)):]  # broadcast from any trailing part
        shape = [1 if draw.chance(3) else n for n in shape]
        mask, tame_m = array(draw, shape, draw.pick([np.bool_, np.float32, np.float64, np.float16, bfloat16]))
    return dict(q=q, k=k, v=v, mask=mask, batch=batch if not two_d else [], hq=1 if two_d else hq,
                seqlen_k=seqlen_k, tame=tame_q and tame_k and tame_v and tame_m)


class Refused(Exception):
    """The call under test raised one of ERRORS with a message: a correct outcome, nothing to check."""


def attempt(function, *args, **kwargs):
    """function(*args, **kwargs), its ERRORS turned into Refused (an error raised later, while
    checking the result against the reference, is a finding)."""
    try:
        return function(*args, **kwargs)
    except ERRORS as error:
        if not str(error):
            raise AssertionError(f"{type(error).__name__} without a message") from error
        raise Refused from error


def snapshot(args):
    return [(x, x.tobytes()) for x in args if isinstance(x, np.ndarray) and x.dtype != object]


def check_unchanged(saved):
    for x, before in saved:
        if x.tobytes() != before:
            raise AssertionError("an input array was modified")


def check_close(result, expected, naive, dtype, magnitude, score_rounding=0.0):
    """result against the float64 reference `expected`: within the dtype's TOLERANCE relative to
    `magnitude` (the largest |v|) plus 8 times the error of `naive`, the same math in float32 (what
    float32 rounding of large scores costs any implementation), plus `score_rounding` (per row, from
    score_rounding() below: naive's own rounding of large scores can happen to cancel)."""
    result = np.asarray(result)
    if result.shape != expected.shape or result.dtype != dtype:
        raise AssertionError(f"result {result.shape} {result.dtype}, expected {expected.shape} {dtype}")
    result = result.astype(np.float64)
    same = (result == expected) | (np.isnan(result) & np.isnan(expected))  # infinities equal, NaN where NaN
    finite = np.isfinite(result) & np.isfinite(expected)
    if not (same | finite).all():
        raise AssertionError(f"result {result[~(same | finite)]} where the reference has {expected[~(same | finite)]}")
    naive_error = np.max(np.abs(naive - expected), where=finite & np.isfinite(naive), initial=0)
    excess = np.abs(result - expected) - (TOLERANCE[np.dtype(dtype)] * max(1.0, magnitude) + 8 * naive_error
                                          + score_rounding)
    if np.any(excess > 0, where=finite):
        error = np.max(np.abs(result - expected), where=finite, initial=0)
        raise AssertionError(f"result differs from the reference by {error} (float32 math by {naive_error})")


def score_rounding(lse, seqlen_k, dtype, magnitude):
    """Per output row, what the rounding of its scores in the kernel's float type can move it by: the
    scores that carry weight lie within log(S) of the log-sum-exp, so they are held to u (|lse| + log S);
    scores that move by d move the output by up to 2 d max|v|; 8 rather than 2 for the rounding of the
    products and sums that make a score. Negligible for moderate scores (u |lse| << TOLERANCE)."""
    u = np.finfo(np.float64 if np.dtype(dtype) == np.float64 else np.float32).eps / 2
    held = np.where(np.isfinite(lse), np.abs(lse), 0) + math.log1p(seqlen_k)
    return (8 * u * held * max(1.0, magnitude))[..., None]


def references(*args, **kwargs):
    """fastattn.reference's result and log-sum-exp, in float64 and in float32."""
    return (reference.attention(*args, **kwargs, return_lse=True),
            reference.attention(*args, **kwargs, return_lse=True, dtype=np.float32))


def largest(x):
    return float(np.max(np.abs(x.astype(np.float64)), initial=0))


def call_attention(draw, p):
    kw, tame = keywords(draw, p["hq"], p["batch"])
    if draw.chance(3):
        kw["kv_lengths"] = kv_lengths(draw, p["batch"], p["seqlen_k"])
    out_choice = draw.pick([None, None, "fresh", "q", "k", "v", "mask", "view of q"])
    if out_choice == "fresh":
        shape = np.shape(p["q"])[:-1] + np.shape(p["v"])[-1:]
        kw["out"], _ = array(draw, shape, getattr(p["q"], "dtype", np.float32), bend=6)
    elif out_choice is not None and isinstance(p.get(out_choice.split()[-1]), np.ndarray):
        x = p[out_choice.split()[-1]]
        kw["out"] = x[..., ::-1, :] if out_choice == "view of q" and x.ndim > 1 else x
    mask = p["mask"]
    saved = snapshot([p["q"], p["k"], p["v"], mask] + [kw.get(name) for name in ("alibi_slopes", "kv_lengths")])
    result = attempt(fastattn.attention, p["q"], p["k"], p["v"], mask, **kw)
    check_unchanged(saved)
    if not (p["tame"] and tame):
        return
    want = {name: kw[name] for name in ("causal", "scale", "align", "window", "softcap", "alibi_slopes",
                                        "kv_lengths") if name in kw}
    (expected, expected_lse), (naive, naive_lse) = references(p["q"], p["k"], p["v"], mask, **want)
    if kw.get("return_lse"):
        out, lse = result
        check_close(lse, expected_lse, naive_lse, np.float64 if p["q"].dtype == np.float64 else np.float32,
                    largest(expected_lse[np.isfinite(expected_lse)]))
    else:
        out = result
    magnitude = largest(p["v"])
    check_close(out, expected, naive, p["q"].dtype, magnitude,
                score_rounding(expected_lse, np.shape(p["k"])[-2], p["q"].dtype, magnitude))
    if kw.get("out") is not None and out is not kw["out"]:
        raise AssertionError("out= was not the array returned")


def call_sdpa(draw, p):
    kw = {}
    if draw.chance(3):
        kw["is_causal"] = draw.value([False, True])
    if draw.chance(3):
        kw["scale"] = draw.value([None, 0.5, 2])
    if draw.chance(3):
        kw["dropout_p"] = draw.value([0.0, 0], [0.1, -1.0, float("nan"), "0", None])
    if draw.chance(2):
        kw["enable_gqa"] = draw.value([True, False], [1, None])
    saved = snapshot([p["q"], p["k"], p["v"], p["mask"]])
    result = attempt(fastattn.scaled_dot_product_attention, p["q"], p["k"], p["v"], p["mask"], **kw)
    check_unchanged(saved)
    if not p["tame"]:
        return
    q, k, v = p["q"], p["k"], p["v"]
    if not kw.get("enable_gqa"):  # PyTorch then broadcasts the head dim with the batch dims
        batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        q, k, v = (np.broadcast_to(x, batch + x.shape[-2:]) for x in (q, k, v))
    (expected, expected_lse), (naive, _) = references(q, k, v, p["mask"], causal=bool(kw.get("is_causal")),
                                                      scale=kw.get("scale"))
    magnitude = largest(v)
    check_close(result, expected, naive, q.dtype, magnitude, score_rounding(expected_lse, np.shape(k)[-2], q.dtype, magnitude))


def call_merge(draw, p):
    parts = []
    for _ in range(draw.int(0, 3) if draw.chance(8) else draw.int(1, 3)):
        if draw.chance(8):
            parts.append(draw.pick([None, (1, 2), [p["q"]], (p["q"], p["k"], p["v"]), "parts"]))
            continue
        dtype = draw.pick(FLOATS)
        out, _ = array(draw, np.shape(p["q"]), dtype)
        lse_dtype = np.float64 if dtype == np.float64 else np.float32
        lse, _ = array(draw, np.shape(p["q"])[:-1], lse_dtype)
        parts.append((out, lse))
    saved = snapshot([x for part in parts if isinstance(part, tuple) for x in part])
    out, lse = attempt(fastattn.merge_states, iter(parts) if draw.chance(4) else parts)
    check_unchanged(saved)
    if out.shape != parts[0][0].shape or lse.shape != parts[0][1].shape:
        raise AssertionError("merge_states returned the wrong shapes")


def call_binding(draw, p):
    """The compiled entry point, given whatever the fuzzer makes: it must check what it reads."""
    q, k, v = p["q"], p["k"], p["v"]
    dtype = getattr(q, "dtype", np.float32)
    shape = np.shape(q)[:-1] + np.shape(v)[-1:]
    out, _ = array(draw, shape, dtype, bend=4)
    kw = {}
    if draw.chance(3):
        kw["alibi_slopes"], _ = array(draw, tuple(p["batch"]) + (p["hq"],), np.float64, bend=3)
    if draw.chance(3):
        kw["kv_lengths"] = kv_lengths(draw, p["batch"], p["seqlen_k"])
    if draw.chance(3):
        kw["lse"], _ = array(draw, np.shape(q)[:-1], np.float64 if dtype == np.float64 else np.float32, bend=3)
    if draw.chance(3):
        kw["window_left"], kw["window_right"] = draw.int(-(2**62), 2**62), draw.pick([-1, 0, 1, 2**62])
    if draw.chance(3):
        kw["softcap"] = draw.pick([0.0, 1.0, -1.0, float("nan"), float("inf")])
    mask = p["mask"]
    if isinstance(mask, np.ndarray) and draw.chance(2):
        try:
            mask = np.broadcast_to(mask, np.shape(q)[:-1] + np.shape(k)[-2:-1])
        except ValueError:
            pass
    scale = draw.pick([0.5, float("nan"), float("inf"), -1e300])
    attempt(_core.attention_forward, q, k, v, out, mask, scale, draw.pick([False, True]), draw.pick([1, 2, 0, -1]),
                            align_bottom_right=draw.pick([False, True]), **kw)


CALLS = [call_attention, call_attention, call_sdpa, call_merge, call_binding]


def one_input(data):
    draw = Draw(data)
    call = draw.pick(CALLS)
    fastattn.set_num_threads(draw.pick([1, 2]))
    fastattn.set_isa(draw.pick(_core.supported_isas()))
    p = problem(draw)
    try:
        with np.errstate(all="ignore"):
            call(draw, p)
    except Refused:
        pass


def replay(directories):
    """Runs every input saved in `directories` once, without libFuzzer: .ci/sanitize so replays the
    corpus that .ci/fuzz grew, and the seeds, on the extension built with AddressSanitizer, whose
    runtime takes the coverage hooks libFuzzer needs (it cannot fuzz there, only run)."""
    for directory in directories:
        paths = sorted(Path(directory).iterdir())
        for path in paths:
            one_input(path.read_bytes())
        print(f"replayed {len(paths)} inputs from {directory}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--replay"]:
        replay(sys.argv[2:])
    else:
        atheris.Setup(sys.argv, one_input)
        atheris.Fuzz()
