"""The GPU kernel on Numba's CUDA simulator: every case of tests/cuda_sim_cases.py (the launcher) and
tests/cuda_sim_variants.py (fastattn.attention's variants, end to end) against the NumPy reference.

NUMBA_ENABLE_CUDASIM must be set before Numba is imported, so the cases run in fresh interpreters
(two, in parallel: the simulator is single-threaded and slow) started outside the source tree, and
report one JSON line per case; each case is then one test here, so a failure names its case.
The simulator runs the very kernel that ships: same tile sizes, same code path (it has no warp
shuffles, and the kernel uses none).
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import cuda_sim_cases
import cuda_sim_variants
import pytest
from conftest import run_python

CASE_NAMES = [c["name"] for c in cuda_sim_cases.CASES]
VARIANT_NAMES = [c["name"] for c in cuda_sim_variants.CASES]
PROCESSES = 2

needs_numba_cuda = pytest.mark.skipif(
    importlib.util.find_spec("numba") is None or importlib.util.find_spec("numba.cuda") is None,
    reason="numba-cuda is not installed (pip install 'fastattn[gpu-dev]' to run the simulator tests)")


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    scripts = [(os.path.abspath(cuda_sim_cases.__file__), CASE_NAMES),
               (os.path.abspath(cuda_sim_variants.__file__), VARIANT_NAMES)]
    jobs = [(script, names[i::PROCESSES]) for script, names in scripts for i in range(PROCESSES)]
    runs = [subprocess.Popen([sys.executable, script, *share], cwd="/", env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for script, share in jobs]
    reported = {}
    for run in runs:
        stdout, stderr = run.communicate(timeout=900)
        for line in stdout.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                reported[record["name"]] = record
        reported.setdefault("_stderr", []).append(stderr[-4000:])
    return reported


@needs_numba_cuda
@pytest.mark.parametrize("name", CASE_NAMES + VARIANT_NAMES)
def test_simulated_kernel_matches_reference(results, name):
    if name not in results:
        pytest.fail(f"case {name} reported nothing; the simulator's stderr ends with:\n" + "\n".join(results["_stderr"]))
    record = results[name]
    assert record["ok"], f"{name}: {record['problem']} (max error {record.get('max_error')}, bound {record.get('bound')})"


# A tiny kernel that sums a shared array every thread wrote one element of. np.empty made slow forces
# a thread switch where numba-cuda's simulator looks up a shared array and stores a new one: without
# fastattn's lock around that (launcher.py), each thread keeps an array of its own and sums 1.
SHARED_ARRAY_RACE = textwrap.dedent("""
    import time
    import numpy as np
    from numba import cuda, float32
    import fastattn

    x = cuda.to_device(np.ones((1, 4, 16), np.float32))
    fastattn.attention(x, x, x)  # the first launch makes the simulator's shared arrays thread-safe

    @cuda.jit
    def total(out):
        tile = cuda.shared.array(32, float32)
        tile[cuda.threadIdx.x] = 1
        cuda.syncthreads()
        s = float32(0)
        for i in range(32):
            s += tile[i]
        out[cuda.threadIdx.x] = s

    empty = np.empty
    def slow_empty(*args, **kwargs):
        time.sleep(0.01)
        return empty(*args, **kwargs)
    np.empty = slow_empty
    out = np.zeros(32, np.float32)
    total[1, 32](out)
    print(sorted(set(out.tolist())))
""")


@needs_numba_cuda
def test_simulated_threads_share_shared_arrays():
    result = run_python(SHARED_ARRAY_RACE, env_update={"NUMBA_ENABLE_CUDASIM": "1"})
    assert result.stdout.strip().splitlines()[-1] == "[32.0]", result.stdout[-2000:]


def test_fastattn_imports_no_numba_and_knows_device_arrays():
    """A CPU-only user never pays for Numba: neither importing fastattn nor asking whether something
    is a device array imports it."""
    code = ("import sys, numpy as np, fastattn, fastattn.cuda as fc; "
            "assert not fc.is_device_array(np.zeros(3)); "
            "print(sorted(m for m in sys.modules if m == 'numba' or m.startswith('numba.')))")
    run = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout  # last line: an editable install may log
