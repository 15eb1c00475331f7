"""compare.py --device cuda: time fastattn's GPU path against PyTorch's scaled_dot_product_attention on
the same GPU.

Inputs are made on the host as for the CPU run (float16 ones are the float32 ones rounded) and
copied to the device once, before any timing: fastattn gets Numba device arrays, torch CUDA tensors.
Every implementation's output is copied back and checked against the float64 reference; one that
fails is not timed and the script exits with status 1. The implementations then take turns as on
the CPU (round robin, the order rotating each repeat) and the table reports the median sample.
Launches return before the GPU has finished, so a sample synchronizes the device before it starts
the clock and after its last call; calls are repeated within a sample until it lasts at least
harness.MIN_SAMPLE_SECONDS. numba.cuda.synchronize() waits for every stream of the device's primary
context, which torch uses too.

Peers: torch (SDPA with the kernel torch picks; the sliding window passed as a bool mask) when torch
has CUDA, and with --peers torch-math. The NumPy reference only checks, it is not timed. GFLOP/s and
K+V GB/s count as in compare.py.

Needs numba-cuda and a CUDA GPU (exit status 2 otherwise). Under NUMBA_ENABLE_CUDASIM=1 it runs
SIMULATOR_CASES on Numba's simulator instead: a check that the script works, its timings meaningless.
"""

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import time
from pathlib import Path

import compare
import harness
import numpy as np
import report
from harness import Case

import fastattn

try:
    from numba import cuda
except ImportError:  # main() says what is missing
    cuda = None

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

# The simulator runs every GPU thread as a Python thread, 2-3 s per thread block of these shapes here
# (a 512x512 case would take hours): GQA, causal and decode in one or two blocks each.
SIMULATOR_CASES = [
    Case(1, 2, 1, 16, 24, 16, label="GQA"),
    Case(1, 1, 1, 24, 24, 16, causal=True),
    Case(1, 1, 1, 1, 40, 16, label="decode"),
]

# float32: as on the CPU. float16 results are rounded once, by half a unit in the last place: at most
# 2^-9 = 2.0e-3 for outputs below 8 in magnitude (averages of N(0, 1) values, none of which reach 8).
# 4e-3, 4 eps at 1.0, is that rounding and as much again for torch's fused kernels, which also round
# the softmax weights to float16 before P V. In float64 on four of the quick shapes, rounding the exact
# output to float16 cost at most 9e-4, while dropping one key moved some output by 5.7e-3 to 0.2.
TOLERANCES = {"float32": harness.tolerance(np.float32), "float16": 4e-3}


def main(args):
    if cuda is None:
        return missing("numba-cuda is not installed: --device cuda needs it (pip install 'fastattn[cuda]')")
    if not cuda.is_available():
        return missing("no CUDA GPU and driver: --device cuda needs one (pip install 'fastattn[cuda]'); "
                       "NUMBA_ENABLE_CUDASIM=1 tries the script on Numba's simulator, with tiny shapes")
    if SIMULATOR:
        compare.log("warning: NUMBA_ENABLE_CUDASIM=1: Numba's CUDA simulator runs the kernel in Python "
                    "threads, so these timings mean nothing; tiny shapes only (--repeats 2 takes a minute)")
        cases = SIMULATOR_CASES
    else:
        cases = compare.QUICK_CASES if args.quick else compare.CASES
    env = environment(args)
    compare.log(", ".join(f"{key} {value}" for key, value in env.items()))

    records = []
    for index, case in enumerate(cases, 1):
        compare.log(f"[{index}/{len(cases)}] {case.id} {case.label}".rstrip())
        records.append(run_case(case, args))
    env["load average at the end"] = compare.load_average()

    print(title(env))
    print(report.aligned_text(report.table_rows(records)))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "records": records}, indent=1) + "\n")
        compare.log(f"wrote {args.json}")

    failed = [r["case"] for r in records if not all(x["ok"] for x in r["results"].values())]
    if failed:
        compare.log(f"FAIL: {len(failed)} shape(s) gave wrong results, see above")
    return 1 if failed else 0


def missing(reason):
    compare.log(reason)
    return 2


def run_case(case, args):
    q, k, v = (x.astype(args.dtype) for x in harness.make_inputs(case))  # NumPy draws no float16
    runners = device_runners(case, q, k, v, args.peers)
    checked = {name: on_host(run) for name, run in runners.items()}
    return compare.check_and_time(case, runners, checked, q, k, v, TOLERANCES[args.dtype], args.repeats,
                                  sample=take_sample, count_calls=calls_per_sample)


def device_runners(case, q, k, v, extra_peers):
    """A zero-argument callable per implementation, each returning its result on the device: fastattn,
    and torch (plus torch-math if asked for) when torch can use this GPU."""
    q_d, k_d, v_d = (cuda.to_device(x) for x in (q, k, v))
    found = {"fastattn": lambda: fastattn.attention(q_d, k_d, v_d, **case.attention_kwargs)}
    # Under the simulator, torch would run on a real GPU that numba.cuda.synchronize() does not wait for.
    if harness.torch is not None and harness.torch.cuda.is_available() and not SIMULATOR:
        found["torch"] = torch_runner(case, q, k, v)
        if extra_peers:
            found["torch-math"] = torch_runner(case, q, k, v, backend=harness.SDPBackend.MATH)
    return found


def torch_runner(case, q, k, v, backend=None):
    """harness.torch_runner on CUDA tensors copied from the host arrays once, returning the tensor."""
    torch = harness.torch
    q_t, k_t, v_t = (torch.from_numpy(x).cuda() for x in (q, k, v))
    band = (torch.from_numpy(case.visible(np.arange(case.seqlen_q))).cuda()
            if case.window is not None else None)

    def run():
        pinned = harness.sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
        with torch.inference_mode(), pinned:
            return harness.F.scaled_dot_product_attention(
                q_t, k_t, v_t, attn_mask=band, is_causal=case.causal and band is None,
                enable_gqa=case.heads_q != case.heads_kv
            )

    return run


def on_host(run):
    """`run` with its device result copied to a NumPy array, for the check."""
    def run_and_copy():
        out = run()
        return out.copy_to_host() if hasattr(out, "copy_to_host") else out.cpu().numpy()

    return run_and_copy


def take_sample(run, calls):
    """Seconds per call over `calls` calls, from an idle device to the end of the last call's work."""
    harness.wait_for_idle_threads()  # the reference's BLAS threads would slow the launches
    cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    cuda.synchronize()
    return (time.perf_counter() - start) / calls


def calls_per_sample(run):
    """The calls that make one sample last harness.MIN_SAMPLE_SECONDS. No warm-up: the check ran every
    implementation once, so the kernel is compiled and torch has chosen its own."""
    calls = math.ceil(harness.MIN_SAMPLE_SECONDS / take_sample(run, 1))
    if calls > 1:  # one call's time includes a synchronization's latency: measure again over many
        calls = max(calls, math.ceil(harness.MIN_SAMPLE_SECONDS / take_sample(run, calls)))
    return calls


def environment(args):
    torch = harness.torch
    return {
        "device": "cuda",
        "dtype": args.dtype,
        "repeats": args.repeats,
        "quick": args.quick,
        "simulator": SIMULATOR,
        **gpu_info(),
        "fastattn": getattr(fastattn, "__version__", "unknown"),
        "numba": package_version("numba"),
        "numba-cuda": package_version("numba-cuda"),  # None: numba's own, older CUDA target
        "numpy": np.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "torch cuda": torch.version.cuda if torch is not None else None,
        "python": platform.python_version(),
        "cpu": compare.cpu_name(),
        "load average": compare.load_average(),
    }


def gpu_info():
    """The GPU's name and compute capability, the driver's CUDA version and NVRTC's."""
    if SIMULATOR:
        return {"gpu": "Numba's CUDA simulator"}
    from numba.cuda.cudadrv import driver

    device = cuda.get_current_device()
    name = device.name.decode() if isinstance(device.name, bytes) else device.name
    return {"gpu": name, "compute capability": "{}.{}".format(*device.compute_capability),
            "cuda driver": "{}.{}".format(*driver.get_version()),
            "nvrtc": "{}.{}".format(*cuda.runtime.get_version())}


def package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def title(env):
    where = env["gpu"] + (f" (compute capability {env['compute capability']})"
                          if "compute capability" in env else ", timings meaningless")
    return f"fastattn {env['fastattn']}, {env['dtype']}, {where}"
