"""The single dispatch point: NumPy arrays go to the CPU kernels without importing Numba, GPU arrays to
the CUDA kernel (exercised here with Numba's simulator, in its own process), and mixing them is refused."""

import textwrap

import pytest

from conftest import run_python


def test_cpu_calls_never_import_numba():
    run_python(textwrap.dedent("""
        import sys
        import numpy as np
        import fastattn
        x = np.ones((2, 3, 8), np.float32)
        fastattn.attention(x, x, x, causal=True)
        fastattn.scaled_dot_product_attention(x, x, x)
        assert "numba" not in sys.modules, "fastattn imported numba for a CPU call"
    """))


SIMULATED = textwrap.dedent("""
    import numpy as np, fastattn
    from numba import cuda
    from fastattn import reference
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 5, 16)).astype(np.float32)
    k = rng.standard_normal((1, 1, 7, 16)).astype(np.float32)
    v = rng.standard_normal((1, 1, 7, 8)).astype(np.float32)
    mask = rng.random((5, 7)) > 0.3
    out = fastattn.attention(cuda.to_device(q), cuda.to_device(k), cuda.to_device(v), cuda.to_device(mask),
                             causal=True)
    assert type(out) is type(cuda.to_device(q)), type(out)
    assert out.shape == (1, 2, 5, 8)
    np.testing.assert_allclose(out.copy_to_host(), reference.attention(q, k, v, mask, causal=True), atol=1e-5)
    out = fastattn.scaled_dot_product_attention(cuda.to_device(q[0, 0]), cuda.to_device(k[0, 0]),
                                                cuda.to_device(v[0, 0]))
    assert out.shape == (5, 8)
    np.testing.assert_allclose(out.copy_to_host(), reference.attention(q[0, 0], k[0, 0], v[0, 0]), atol=1e-5)
    for args in ((cuda.to_device(q), k, v), (q, cuda.to_device(k), v), (q, k, v, cuda.to_device(mask))):
        try:
            fastattn.attention(*args)
        except TypeError as error:
            assert "GPU" in str(error) or "device" in str(error), error
        else:
            raise AssertionError("mixing host and device arrays was accepted")
    print("ok")
""")


def test_device_arrays_go_to_the_gpu_path_under_the_simulator():
    pytest.importorskip("numba.cuda", reason="numba-cuda not installed (pip install fastattn[cuda])")
    result = run_python(SIMULATED, env_update={"NUMBA_ENABLE_CUDASIM": "1"})
    assert result.stdout.split()[-1] == "ok"
