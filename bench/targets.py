"""The issue's performance targets, judged from one run of compare.py against the peers and the
ceilings measured in that same run. They inform; they never change the exit status."""

import dataclasses
import math

from harness import Case

GEOMEAN_SPEEDUP = 1.3  # over torch, across every shape
MIN_SPEEDUP = 1.0  # over torch, on each shape
PERCENT_OF_GEMM = 90  # non-causal L = S >= 512
CAUSAL_512_SPEEDUP = 3.0  # torch computes the diagonal block at full width, so this is reachable
MODEL_SPEEDUP = 1.3  # the BERT and ViT shapes
PERCENT_OF_READ = 85  # decode
HALF_SPEEDUP = 1.6  # bfloat16 over torch bfloat16, non-causal shapes
HALF_OVER_FLOAT32 = 1.4  # bfloat16 over fastattn's own float32, non-causal shapes


@dataclasses.dataclass
class Verdict:
    status: str  # PASS, MISS, or n/a when the run timed no shape the target is about
    goal: str
    detail: str


def judge(records, machine, dtype):
    """One Verdict per target; in float64 the only target is beating torch on every shape. Sliding
    windows (torch has none; it pays for a full band mask) are judged apart: their cost against
    the full causal square of the same size."""
    windows = [r for r in records if Case(**r["case"]).window is not None]
    records = [r for r in records if Case(**r["case"]).window is None]
    speedups = [(r["speedup"]["torch"], r) for r in records if "torch" in r["speedup"]]
    window_verdicts = [window_cost(w, records) for w in windows]
    if dtype == "float64":
        goal = "faster than torch float64 on every shape"
        return [lowest(goal, speedups, MIN_SPEEDUP, "{:.2f}x")] + window_verdicts
    if dtype in ("bfloat16", "float16"):
        return half_precision(records, speedups, dtype) + window_verdicts

    gemm = f"{machine['gemm']['name']} ({machine['gemm']['gflops']:.0f} GFLOP/s)"
    read = f"the streaming read ({machine['read']['gbps']:.1f} GB/s)"
    large_square = [(r["percent_of_gemm"], r) for r in records
                    if r["percent_of_gemm"] is not None and is_large_square(r)]
    decode = [(r["percent_of_read"], r) for r in records if r["percent_of_read"] is not None]
    return [
        geometric_mean(speedups),
        lowest(f"no shape below {MIN_SPEEDUP:.1f}x torch", speedups, MIN_SPEEDUP, "{:.2f}x"),
        lowest(f"non-causal L=S>=512 at >= {PERCENT_OF_GEMM}% of {gemm}", large_square,
               PERCENT_OF_GEMM, "{:.0f}%"),
        lowest(f"causal N=512 >= {CAUSAL_512_SPEEDUP:.0f}x torch",
               [(s, r) for s, r in speedups if is_causal_512(r)], CAUSAL_512_SPEEDUP, "{:.2f}x"),
        lowest(f"BERT/ViT >= {MODEL_SPEEDUP}x torch",
               [(s, r) for s, r in speedups if is_bert_or_vit(r)], MODEL_SPEEDUP, "{:.2f}x"),
        lowest(f"decode >= {PERCENT_OF_READ}% of {read}", decode, PERCENT_OF_READ, "{:.0f}%"),
    ] + window_verdicts


def half_precision(records, speedups, dtype):
    """The issue's targets are bfloat16's (on the non-causal shapes); float16 is held to the same."""
    non_causal = [r for r in records if not Case(**r["case"]).causal]
    over_torch = [(s, r) for s, r in speedups if not Case(**r["case"]).causal]
    over_float32 = [(r["speedup"]["fastattn-float32"], r) for r in non_causal if "fastattn-float32" in r["speedup"]]
    return [
        geometric_mean(speedups),
        lowest(f"no shape below {MIN_SPEEDUP:.1f}x torch {dtype}", speedups, MIN_SPEEDUP, "{:.2f}x"),
        lowest(f"non-causal >= {HALF_SPEEDUP}x torch {dtype}", over_torch, HALF_SPEEDUP, "{:.2f}x"),
        lowest(f"non-causal >= {HALF_OVER_FLOAT32}x fastattn float32", over_float32, HALF_OVER_FLOAT32, "{:.2f}x"),
    ]


def window_cost(window, records):
    """A sliding window should cost about its share of the full causal square's work (at most
    1.5x that share: the tiles along the band's edges are partly wasted)."""
    case = Case(**window["case"])
    goal = f"window {case.window} at L=S={case.seqlen_q} costs its band, not the causal square"
    full = [r for r in records if Case(**r["case"]) == dataclasses.replace(case, window=None)]
    if not full:
        return Verdict("n/a", goal, "the full causal case was not timed")
    window_ms, full_ms = window["results"]["fastattn"]["median_ms"], full[0]["results"]["fastattn"]["median_ms"]
    if not (window_ms and full_ms):
        return Verdict("n/a", goal, "fastattn was not timed on both")
    share = case.flops / dataclasses.replace(case, window=None).flops
    cost = window_ms / full_ms
    status = "PASS" if cost <= 1.5 * share else "MISS"
    return Verdict(status, goal, f"{cost:.1%} of the full causal time for {share:.1%} of its scores")


def geometric_mean(speedups):
    goal = f"geometric-mean speedup over torch >= {GEOMEAN_SPEEDUP}x"
    if not speedups:
        return Verdict("n/a", goal, "torch not timed")
    mean = math.exp(sum(math.log(s) for s, _ in speedups) / len(speedups))
    status = "PASS" if mean >= GEOMEAN_SPEEDUP else "MISS"
    return Verdict(status, goal, f"{mean:.2f}x over {len(speedups)} shapes")


def lowest(goal, values, threshold, value_format):
    """PASS when the lowest of the (value, record) pairs reaches the threshold; names its shape."""
    if not values:
        return Verdict("n/a", goal, "no such shape timed")
    value, record = min(values, key=lambda pair: pair[0])
    status = "PASS" if value >= threshold else "MISS"
    detail = f"lowest {value_format.format(value)} at {describe(record)}"
    if len(values) > 1:
        detail += f" (of {len(values)} shapes)"
    return Verdict(status, goal, detail)


def describe(record):
    case = Case(**record["case"])
    return case.shape + (" causal" if case.causal else "")


def is_large_square(record):
    case = Case(**record["case"])
    return not case.causal and case.seqlen_q == case.seqlen_k >= 512


def is_causal_512(record):
    case = Case(**record["case"])
    return case.causal and case.seqlen_q == case.seqlen_k == 512


def is_bert_or_vit(record):
    return record["case"]["label"].startswith(("BERT", "ViT"))
