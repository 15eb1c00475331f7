"""Time fastattn against PyTorch's scaled_dot_product_attention and the NumPy reference.

Every implementation is first checked against the float64 reference; one that fails is not
timed and the script exits with status 1. The implementations then take turns (round robin,
the order rotating each repeat), one sample each after an idle pause, and the table reports the
median sample. Between shapes the script also samples the machine's ceilings: a NumPy GEMM of
2048^3 in the same dtype (sgemm or dgemm) and a streaming read of 256 MB with as many threads
as fastattn. GFLOP/s count 4*B*Hq*L*S*D (halved for causal with L = S; for a sliding window, 4*B*Hq*D
per visible score, and torch, which has no windows, gets the band as a mask); decode shapes (L = 1)
also report the K+V bytes read per second. "vs X" is X's time over fastattn's: above 1.00x
fastattn is faster. The last lines judge the issue's performance targets from this run; they
inform and do not change the exit status.

Peers: torch (SDPA with the kernel torch picks) and reference (fastattn.reference, float64
NumPy, timed where its score matrix is affordable); with --dtype float16 or bfloat16 also
fastattn-float32 (fastattn on the same values in float32: what half precision gains). --peers adds torch-math (SDPA pinned to
its unfused math backend, SDPBackend.MATH) and numpy-naive (softmax(QK^T)V with NumPy matmuls
in the input dtype).

Progress goes to stderr, the table and the targets to stdout.

--device cuda times fastattn's GPU path against torch on the GPU instead (gpu_compare.py).
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np

# An editable install rebuilds fastattn on import and says so on stdout, where it would end up
# in the output of `--markdown -`.
with contextlib.redirect_stdout(sys.stderr):
    import fastattn
    import harness

import ceilings
import report
import targets
from harness import Case

CASES = [
    Case(1, 8, 8, 512, 512, 64),
    Case(1, 8, 8, 512, 512, 64, causal=True),
    Case(1, 8, 8, 2048, 2048, 64),
    Case(1, 8, 8, 2048, 2048, 64, causal=True),
    Case(1, 16, 16, 1024, 1024, 128),
    Case(1, 16, 16, 1024, 1024, 128, causal=True),
    Case(4, 8, 8, 1024, 1024, 64),
    Case(32, 12, 12, 128, 128, 64, label="BERT-base"),
    Case(64, 12, 12, 197, 197, 64, label="ViT-B/16"),
    Case(1, 32, 32, 1, 8192, 128, label="decode"),
    Case(8, 8, 8, 1, 8192, 64, label="decode"),
    Case(1, 32, 8, 1024, 1024, 128, label="GQA"),
    Case(4, 32, 8, 1, 4096, 128, label="decode GQA"),
    # a key tail past 3 x 64, odd head counts, head_dim not a power of two
    Case(2, 6, 6, 197, 197, 80, label="odd sizes"),
    Case(1, 5, 5, 1000, 1000, 72, causal=True, label="odd sizes"),
    # a sliding window costs its band: compare with the full causal square of the same size
    Case(1, 8, 8, 8192, 8192, 64, causal=True, window=512, label="sliding window"),
    Case(1, 8, 8, 8192, 8192, 64, causal=True, label="full causal"),
]
# N=512 both ways, BERT, both decode kinds, an odd size: one of each target in about a minute
QUICK_CASES = [CASES[i] for i in (0, 1, 7, 9, 12, 13)]

BENCH_DIR = Path(__file__).resolve().parent
ENVIRONMENT_VARIABLES = ("OPENBLAS_", "OMP_", "GOMP_", "KMP_", "MKL_", "FASTATTN_")
# Ceiling samples further apart than this mean other work shared the machine during the run.
NOISY_SPREAD = 1.25


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


def run_case(case, args):
    q, k, v = harness.make_inputs(case, dtype=args.dtype)
    runners = harness.runners(case, q, k, v, extra_peers=args.peers)
    if not case.reference_affordable:
        del runners["reference"]
    return check_and_time(case, runners, runners, q, k, v, harness.tolerance(q.dtype), args.repeats)


def check_and_time(case, runners, checked, q, k, v, tolerance, repeats, **timing):
    """The case's record: every implementation's error (`checked` are `runners` returning NumPy
    arrays), then the timings of those within `tolerance` (harness.time_round_robin with `timing`)."""
    errors = check(case, checked, q, k, v)
    for name, error in errors.items():
        log(f"  {name:11} max |error| {error:.1e} {'ok' if error <= tolerance else 'FAIL'}")
    passed = {name: run for name, run in runners.items() if errors[name] <= tolerance}
    log(f"  timing {', '.join(passed)}: {repeats} repeats")
    samples = harness.time_round_robin(passed, repeats, **timing)
    results = {}
    for name in runners:
        ms = [1e3 * s for s in samples.get(name, [])]
        if ms:  # a wide spread means other load on the machine
            log(f"  {name:11} median {statistics.median(ms):.3f} ms, "
                f"min {min(ms):.3f}, max {max(ms):.3f}")
        results[name] = {
            "ok": name in passed,
            "max_error": errors[name],
            "median_ms": statistics.median(ms) if ms else None,
            "samples_ms": ms,
        }
    record = {"case": dataclasses.asdict(case), "flops": case.flops,
              "kv_bytes": case.kv_bytes(q.itemsize), "results": results}
    add_rates(record, case)
    return record


def add_rates(record, case):
    """GFLOP/s of every timed implementation, K+V GB/s for decode shapes, fastattn's speedups."""
    timed = {name: r["median_ms"] for name, r in record["results"].items() if r["median_ms"]}
    for name, ms in timed.items():
        result = record["results"][name]
        result["gflops"] = record["flops"] / ms / 1e6
        result["kv_gbps"] = record["kv_bytes"] / ms / 1e6 if case.is_decode else None
    fastattn_ms = timed.get("fastattn")
    record["speedup"] = {name: ms / fastattn_ms for name, ms in timed.items()
                         if fastattn_ms and name != "fastattn"}


def add_percent_of_ceilings(record, machine):
    """fastattn against the run's GEMM (compute-bound shapes) or streaming read (decode)."""
    fastattn_result = record["results"]["fastattn"]
    record["percent_of_gemm"] = record["percent_of_read"] = None
    if fastattn_result["median_ms"] is None:
        return
    if Case(**record["case"]).is_decode:
        record["percent_of_read"] = 100 * fastattn_result["kv_gbps"] / machine["read"]["gbps"]
    else:
        record["percent_of_gemm"] = 100 * fastattn_result["gflops"] / machine["gemm"]["gflops"]


def environment(args):
    return {
        "dtype": args.dtype,
        "threads": args.threads,
        "repeats": args.repeats,
        "quick": args.quick,
        "fastattn": getattr(fastattn, "__version__", "unknown"),
        "fastattn isa": fastattn.cpu_info()["isa"],
        "numpy": np.__version__,
        "torch": harness.torch.__version__ if harness.torch is not None else None,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        # the reference's BLAS; the GEMM ceiling's (a worker process's) is in the ceilings
        "openblas": ceilings.openblas_info(),
        "environment variables": {name: value for name, value in sorted(os.environ.items())
                                  if name.startswith(ENVIRONMENT_VARIABLES)},
        # the timings mean little if something else is running
        "load average": load_average(),
    }


def load_average():
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


def cpu_name():
    try:
        with open("/proc/cpuinfo") as file:
            names = [line.split(":", 1)[1].strip()
                     for line in file if line.startswith("model name")]
        return names[0]
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


def warn_about(env, blas_threads_set):
    for name in ceilings.SLOWING_OPENBLAS_VARIABLES:
        if name in env["environment variables"]:
            log(f"note: {name} is set: the {ceilings.gemm_name(env['dtype'])} ceiling runs in a process "
                f"without it, the NumPy reference with it")
    if not blas_threads_set:
        log("warning: NumPy's BLAS is not OpenBLAS: its GEMM ran with its own thread count")
    if os.getloadavg()[0] > 0.5:
        log(f"warning: load average {env['load average']}: other processes are running, "
            f"the timings will be noisy")


def warn_about_spread(machine):
    for ceiling in machine.values():
        fastest, slowest = min(ceiling["samples_ms"]), max(ceiling["samples_ms"])
        if slowest > NOISY_SPREAD * fastest:
            log(f"warning: the {ceiling['name']} samples took {fastest:.1f} to "
                f"{slowest:.1f} ms: the machine was busy, so the percentages of it are rough")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: fastattn's GPU path against torch on the GPU, see gpu_compare.py "
                        "(default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="about a minute: 6 shapes instead of 15, 5 repeats instead of 15")
    parser.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16"], default="float32",
                        help="inputs for every implementation; float64 and bfloat16 with --device cpu "
                        "only (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=fastattn.get_num_threads(),
                        help="threads for fastattn, torch, NumPy's BLAS and the streaming read "
                        "(default: %(default)s)")
    parser.add_argument("--repeats", type=int, help="timed samples per implementation "
                        "(default: 15, or 5 with --quick)")
    parser.add_argument("--peers", action="store_true",
                        help="also time torch-math and numpy-naive (see above)")
    parser.add_argument("--json", metavar="PATH",
                        help="write every sample, the ceilings and the environment here "
                        "(default: bench/results.json, or results-cuda.json with --device cuda; "
                        "'' for none)")
    parser.add_argument("--png", metavar="PATH", default=str(BENCH_DIR / "results.png"),
                        help="draw fastattn's speedup over torch per shape here, for --device cpu "
                        "(default: bench/results.png; '' for none)")
    parser.add_argument("--markdown", metavar="PATH",
                        help="write the table and targets as Markdown to PATH, or with '-' to "
                        "stdout instead of the plain table (which then goes to stderr)")
    args = parser.parse_args()
    if args.device == "cuda" and args.dtype in ("float64", "bfloat16"):
        parser.error(f"--dtype {args.dtype} needs --device cpu: the GPU kernel takes float32 and float16")
    if args.device == "cuda" and args.markdown:
        parser.error("--markdown is for --device cpu only")
    if args.json is None:
        args.json = str(BENCH_DIR / ("results.json" if args.device == "cpu" else "results-cuda.json"))
    if args.repeats is None:
        args.repeats = 5 if args.quick else 15
    return args


def measure(cases, args):
    """The records of every case and the ceilings measured between them."""
    with ceilings.read_pool(args.threads) as pool:
        log("ceilings: warming up")
        # Half precision is computed in float32: sgemm is its ceiling too.
        gemm_dtype = "float32" if args.dtype in harness.HALF_DTYPES else args.dtype
        gemm_worker = ceilings.GemmWorker(gemm_dtype, args.threads)
        try:
            kernel = (gemm_worker.info or {}).get("corename")
            by = f"OpenBLAS's {kernel} kernel" if kernel else "NumPy's BLAS"
            log(f"  {ceilings.gemm_name(gemm_dtype)} by {by}")
            machine = ceilings.Ceilings(gemm_dtype, args.threads, pool, gemm_worker)
            machine.sample()
            log(f"  {machine.latest()}")
            records = []
            for index, case in enumerate(cases, 1):
                log(f"[{index}/{len(cases)}] {case.id} {case.label}".rstrip())
                records.append(run_case(case, args))
                machine.sample()
                log(f"  {machine.latest()}")
        finally:
            gemm_worker.close()
    return records, machine.summary()


def write_outputs(args, env, records, machine, verdicts):
    title = report.title(env, machine)
    text = report.text_table(records, machine) + "\n\n" + report.text_targets(machine, verdicts)
    markdown = report.markdown(title, records, machine, verdicts)
    if args.markdown == "-":
        log(text)
        print(markdown)
    else:
        print(text)
        if args.markdown:
            Path(args.markdown).write_text(markdown + "\n")
            log(f"wrote {args.markdown}")
    if args.json:
        results = {"environment": env, "ceilings": machine, "records": records,
                   "targets": [dataclasses.asdict(verdict) for verdict in verdicts]}
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        log(f"wrote {args.json}")
    if args.png:
        write_chart(args.png, title, records)


def write_chart(path, title, records):
    try:
        if report.write_chart(path, title, records):
            log(f"wrote {path}")
    except ImportError:
        log("no chart: matplotlib is not installed (pip install matplotlib)")


def main():
    args = parse_args()
    if args.device == "cuda":
        import gpu_compare  # imports Numba, which the CPU run does without

        return gpu_compare.main(args)
    harness.set_num_threads(args.threads)
    blas_threads_set = ceilings.set_blas_threads(args.threads)
    env = environment(args)
    log(", ".join(f"{key} {value}" for key, value in env.items()))
    warn_about(env, blas_threads_set)

    records, machine = measure(QUICK_CASES if args.quick else CASES, args)
    for record in records:
        add_percent_of_ceilings(record, machine)
    env["load average at the end"] = load_average()
    warn_about_spread(machine)
    verdicts = targets.judge(records, machine, args.dtype)
    write_outputs(args, env, records, machine, verdicts)

    failed = [r["case"] for r in records if not all(x["ok"] for x in r["results"].values())]
    if failed:
        log(f"FAIL: {len(failed)} shape(s) gave wrong results, see above")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
