"""bench/compare.py --device cuda on a machine without a GPU: end to end on Numba's CUDA simulator
(its tiny shapes checked against the reference and timed), and the refusals when nothing can run it.
tests/test_cuda_gpu.py runs it on a real GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cuda_gpu import GPU_REASON
from test_cuda_sim import needs_numba_cuda

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_compare(*args, simulator=False):
    """compare.py in a fresh interpreter outside the source tree, with or without the simulator."""
    env = {name: value for name, value in os.environ.items() if name != "NUMBA_ENABLE_CUDASIM"}
    if simulator:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    return subprocess.run([sys.executable, str(BENCH / "compare.py"), *args], cwd="/", env=env, check=False,
                          capture_output=True, text=True, timeout=600)


@needs_numba_cuda
def test_simulated_run_checks_and_times_every_tiny_case(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_compare
    from harness import Case

    results = tmp_path / "results.json"
    run = run_compare("--device", "cuda", "--repeats", "2", "--json", str(results), simulator=True)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "timings mean nothing" in run.stderr
    records = json.loads(results.read_text())["records"]
    assert [Case(**record["case"]) for record in records] == gpu_compare.SIMULATOR_CASES
    for record in records:
        fastattn = record["results"]["fastattn"]
        assert fastattn["ok"] and fastattn["max_error"] <= 1e-4, record
        assert len(fastattn["samples_ms"]) == 2 and fastattn["median_ms"] > 0, record
    assert len(run.stdout.splitlines()) == 2 + len(records)  # title, header, one row per case


@pytest.mark.skipif(GPU_REASON is None or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
                    reason="this machine may have a CUDA GPU, on which the script would run")
def test_without_a_gpu_it_says_what_is_missing():
    run = run_compare("--device", "cuda", "--json", "")
    assert run.returncode == 2, run.stdout + run.stderr
    assert "--device cuda needs" in run.stderr and "pip install 'fastattn[cuda]'" in run.stderr
    assert run.stdout == ""


def test_gpu_run_refuses_bfloat16():
    run = run_compare("--device", "cuda", "--dtype", "bfloat16", "--json", "")
    assert run.returncode == 2
    assert "--dtype bfloat16 needs --device cpu" in run.stderr
