"""Time fastattn against PyTorch's scaled_dot_product_attention and the NumPy reference.

    python bench/compare.py [--quick] [--threads N] [--repeats N] [--json PATH]

Every implementation is first checked against the float64 reference; one that fails is not
timed and the script exits with status 1. The implementations then take turns, one sample each
per repeat after an idle pause, and the table reports the median sample. Progress goes to
stderr, the table to stdout.
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

import fastattn
import harness
from harness import Case

CASES = [
    Case(1, 8, 8, 512, 512, 64),
    Case(1, 8, 8, 512, 512, 64, causal=True),
    Case(1, 8, 8, 2048, 2048, 64),
    Case(1, 16, 16, 1024, 1024, 128),
    Case(32, 12, 12, 128, 128, 64),  # BERT-base
    Case(1, 8, 2, 1024, 1024, 64),  # grouped-query attention
    Case(1, 32, 32, 1, 4096, 128),  # decoding one token
    Case(2, 6, 6, 197, 197, 80),  # ViT: a key tail past 3 x 64, head_dim not a power of two
]
QUICK_CASES = [CASES[i] for i in (0, 1, 5, 6, 7)]

# A call shorter than this is repeated inside one sample, so timer resolution and thread
# wake-up do not dominate the measurement.
MIN_SAMPLE_SECONDS = 0.02


def log(message):
    print(message, file=sys.stderr, flush=True)


def check(case, runners, q, k, v):
    """Each implementation's largest error against the reference (inf if it raised)."""
    rows, expected = harness.expected_rows(case, q, k, v)
    errors = {}
    for name, run in runners.items():
        try:
            errors[name] = harness.max_error(run(), q, rows, expected)
        except Exception as error:  # one broken implementation should not hide the other figures
            log(f"  {name} raised {type(error).__name__}: {error}")
            errors[name] = math.inf
    return errors


def calls_per_sample(run):
    """Warm up, then count the calls that make one sample last MIN_SAMPLE_SECONDS."""
    harness.wait_for_idle_threads()
    run()  # warm-up: first-touch allocations, thread pool start, lazy dispatch
    start = time.perf_counter()
    run()
    return max(1, math.ceil(MIN_SAMPLE_SECONDS / (time.perf_counter() - start)))


def time_round_robin(runners, repeats):
    """Seconds per call, one sample of every implementation per repeat, so that drift (clock
    speed, heat, other load) affects them all alike."""
    calls = {name: calls_per_sample(run) for name, run in runners.items()}
    samples = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            harness.wait_for_idle_threads()
            start = time.perf_counter()
            for _ in range(calls[name]):
                run()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return samples


def run_case(case, repeats):
    q, k, v = harness.make_inputs(case)
    runners = harness.runners(case, q, k, v)
    if not case.reference_affordable:
        del runners["reference"]
    errors = check(case, runners, q, k, v)
    for name, error in errors.items():
        log(f"  {name:9} max |error| {error:.1e} {'ok' if error <= harness.TOLERANCE else 'FAIL'}")
    passed = {name: run for name, run in runners.items() if errors[name] <= harness.TOLERANCE}
    log(f"  timing {', '.join(passed)}: {repeats} repeats")
    samples = time_round_robin(passed, repeats)
    results = {}
    for name in runners:
        ms = [1e3 * s for s in samples.get(name, [])]
        if ms:  # a wide spread means other load on the machine
            log(f"  {name:9} median {statistics.median(ms):.3f} ms, min {min(ms):.3f}, max {max(ms):.3f}")
        results[name] = {
            "ok": name in passed,
            "max_error": errors[name],
            "median_ms": statistics.median(ms) if ms else None,
            "samples_ms": ms,
        }
    return {"case": dataclasses.asdict(case), "flops": case.flops, "results": results}


def format_row(record):
    case = Case(**record["case"])
    results = record["results"]  # implementations that ran: not torch when absent
    median_ms = {name: r["median_ms"] for name, r in results.items() if r["ok"]}

    def time_cell(name):
        if name not in results:
            return "-"
        return f"{median_ms[name]:.3f}" if name in median_ms else "FAIL"

    def gflops_cell(name):
        return f"{record['flops'] / median_ms[name] / 1e6:.1f}" if name in median_ms else "-"

    def speedup_cell(peer):
        if peer in median_ms and "fastattn" in median_ms:
            return f"{median_ms[peer] / median_ms['fastattn']:.2f}x"
        return "-"

    return [
        case.shape, "yes" if case.causal else "no",
        time_cell("fastattn"), gflops_cell("fastattn"),
        time_cell("torch"), gflops_cell("torch"), speedup_cell("torch"),
        time_cell("reference"), speedup_cell("reference"),
    ]


HEADER = [
    "shape B,Hq,Hk,L,S,D", "causal", "fastattn ms", "GFLOP/s", "torch ms", "torch GFLOP/s",
    "speedup vs torch", "reference ms", "speedup vs reference",
]


def print_table(records):
    rows = [HEADER] + [format_row(record) for record in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    for row in rows:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [text.rjust(width) for text, width in zip(row[2:], widths[2:])]
        print("  ".join(cells).rstrip())


def environment(args):
    return {
        "threads": args.threads,
        "repeats": args.repeats,
        "fastattn": getattr(fastattn, "__version__", "unknown"),
        "numpy": np.__version__,
        "torch": harness.torch.__version__ if harness.torch is not None else None,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        # the timings mean little if something else is running
        "load average": " ".join(f"{load:.2f}" for load in os.getloadavg()),
    }


def cpu_name():
    try:
        with open("/proc/cpuinfo") as file:
            names = [line.split(":", 1)[1].strip() for line in file if line.startswith("model name")]
        return names[0]
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--threads", type=int, default=fastattn.get_num_threads(),
                        help="threads for fastattn and torch (default: %(default)s)")
    parser.add_argument("--repeats", type=int, help="timed samples per implementation "
                        "(default: 15, or 5 with --quick)")
    parser.add_argument("--json", metavar="PATH", help="also write all samples to this file")
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 5 if args.quick else 15
    return args


def main():
    args = parse_args()
    harness.set_num_threads(args.threads)
    env = environment(args)
    log(", ".join(f"{key} {value}" for key, value in env.items()))
    cases = QUICK_CASES if args.quick else CASES
    records = []
    for index, case in enumerate(cases, 1):
        log(f"[{index}/{len(cases)}] {case.id}")
        records.append(run_case(case, args.repeats))
    print_table(records)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"environment": env, "records": records}, file, indent=1)
    failed = [r["case"] for r in records if not all(x["ok"] for x in r["results"].values())]
    if failed:
        print(f"FAIL: {len(failed)} shape(s) gave wrong results, see stderr", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
