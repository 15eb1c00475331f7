"""The GPU path on a real NVIDIA GPU: launches through Numba device arrays, CuPy arrays and PyTorch CUDA
tensors, zero-copy, results against the NumPy reference and the CPU kernel, no recompilation on
repeated calls, and the benchmark comparison against torch's GPU SDPA.

Every test here is skipped, with the reason, on a machine without a CUDA GPU and driver (the CUDA
simulator does not count: tests/test_cuda_sim.py covers it).
"""

import importlib.util
import json
import os
import subprocess
import sys

import cuda_sim_variants
import numpy as np
import pytest
from cuda_sim_cases import CASES, run_case, tolerance_check

import fastattn


def _gpu_reason():
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "NUMBA_ENABLE_CUDASIM=1: the simulator is not a GPU (tests/test_cuda_sim.py covers it)"
    if importlib.util.find_spec("numba") is None or importlib.util.find_spec("numba.cuda") is None:
        return "numba-cuda is not installed (pip install 'fastattn[cuda]')"
    from numba import cuda
    if not cuda.is_available():
        return "no CUDA GPU and driver on this machine"
    return None


GPU_REASON = _gpu_reason()
pytestmark = pytest.mark.skipif(GPU_REASON is not None, reason=GPU_REASON or "")


def _torch_cuda():
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA support in this build")
    return torch


def _cupy():
    try:
        import cupy
        cupy.zeros(1)
    except Exception as error:  # not installed, or no usable device for CuPy
        pytest.skip(f"CuPy is unusable here: {error}")
    return cupy


@pytest.mark.parametrize("name", [c["name"] for c in cuda_sim_variants.CASES if "out" not in c["kwargs"]])
def test_variant_cases_on_the_gpu(name):
    """The simulator's end-to-end variant cases (align, window, softcap, ALiBi, kv_lengths, lse) on the
    hardware; the out= case builds its strided view the simulator's way and is left to the simulator."""
    from numba import cuda

    c = next(c for c in cuda_sim_variants.CASES if c["name"] == name)
    problem = cuda_sim_variants.run_case(c, np.random.default_rng(cuda_sim_variants.SEED), cuda, fastattn)
    assert problem is None, problem


@pytest.mark.parametrize("name", [c["name"] for c in CASES])
def test_launcher_cases_on_the_gpu(name):
    """The simulator's cases, on the hardware: the same launcher, the real compiled kernel."""
    from numba import cuda

    from fastattn.cuda import launcher
    case = next(c for c in CASES if c["name"] == name)
    _, _, problem = run_case(case, cuda, launcher, np.random.default_rng(0))
    assert problem is None, f"{name}: {problem}"


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(1, 4096), (7, 65), (65, 7), (197, 197), (1000, 1000)])
@pytest.mark.parametrize("head_dim", [16, 64, 80, 128, 256])
def test_numba_device_arrays_match_reference(seqlen_q, seqlen_k, head_dim, causal, dtype):
    from numba import cuda
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 4, n, head_dim)).astype(dtype) for n in (seqlen_q, seqlen_k, seqlen_k))
    out = fastattn.attention(cuda.to_device(q), cuda.to_device(k), cuda.to_device(v), causal=causal)
    assert cuda.is_cuda_array(out), f"Numba in should give Numba out, got {type(out).__name__}"
    host = out.copy_to_host()
    assert host.dtype == dtype
    _, _, problem = tolerance_check(host, q, k, v, None, causal, None)
    assert problem is None, problem


def test_float32_agrees_with_the_cpu_kernel():
    from numba import cuda
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 8, 300, 64)).astype(np.float32) for _ in range(3))
    mask = rng.random((300, 300)) > 0.2
    gpu = fastattn.attention(*(cuda.to_device(x) for x in (q, k, v)), cuda.to_device(mask), causal=True)
    cpu = fastattn.attention(q, k, v, mask, causal=True)
    np.testing.assert_allclose(gpu.copy_to_host(), cpu, rtol=1e-4, atol=1e-5)


def test_repeated_calls_do_not_recompile():
    from numba import cuda

    from fastattn.cuda import launcher
    q = cuda.to_device(np.ones((1, 2, 70, 64), np.float32))
    fastattn.attention(q, q, q, causal=True)
    counts = launcher.compiled_specialisations()
    for _ in range(3):
        fastattn.attention(q, q, q, causal=True)
    assert launcher.compiled_specialisations() == counts


def test_torch_tensors_in_torch_out_zero_copy():
    torch = _torch_cuda()
    q = torch.randn(2, 300, 8, 64, device="cuda").transpose(1, 2)  # (B, H, L, E) view of (B, L, H, E)
    k = torch.randn(2, 8, 300, 64, device="cuda")
    v = torch.randn(2, 8, 300, 64, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.cuda.synchronize()
    assert isinstance(out, torch.Tensor) and out.device == q.device and out.dtype == q.dtype
    # Only the output was allocated: the non-contiguous query was read in place, not copied.
    assert torch.cuda.memory_allocated() - before <= out.numel() * out.element_size() + 4096
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_torch_float16_with_broadcast_mask():
    torch = _torch_cuda()
    q, k, v = (torch.randn(2, 8, 128, 80, device="cuda", dtype=torch.float16) for _ in range(3))
    mask = torch.rand(1, 1, 128, 128, device="cuda") > 0.3
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    # float16 output: its rounding, 2^-11 relative, plus the float32 computation's error.
    torch.testing.assert_close(out.float(), expected, rtol=2e-3, atol=2e-3)


def test_cupy_in_cupy_out():
    cupy = _cupy()
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((4, 100, 32)).astype(np.float32) for _ in range(3))
    out = fastattn.attention(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v))
    assert isinstance(out, cupy.ndarray)
    _, _, problem = tolerance_check(cupy.asnumpy(out), q, k, v, None, False, None)
    assert problem is None, problem


def test_mixing_host_and_device_inputs_raises():
    from numba import cuda
    q = np.ones((2, 8, 16), np.float32)
    with pytest.raises(TypeError):
        fastattn.attention(cuda.to_device(q), q, q)


def test_compare_script_times_fastattn_against_torch(tmp_path, monkeypatch):
    """compare.py --device cuda --quick: every shape checked ok and timed, torch too when it has CUDA."""
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    monkeypatch.syspath_prepend(bench)
    import compare
    import harness
    from harness import Case

    results = tmp_path / "results.json"
    command = [sys.executable, os.path.join(bench, "compare.py"), "--device", "cuda", "--quick", "--json", str(results)]
    run = subprocess.run(command, check=False, capture_output=True, text=True, timeout=1800, cwd="/")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    records = json.loads(results.read_text())["records"]
    assert [Case(**record["case"]) for record in records] == compare.QUICK_CASES
    timed = ["fastattn"] + (["torch"] if harness.torch is not None and harness.torch.cuda.is_available() else [])
    for record in records:
        for name in timed:
            result = record["results"][name]
            assert result["ok"] and result["median_ms"] > 0, (name, record)
