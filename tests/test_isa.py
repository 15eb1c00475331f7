"""Run-time ISA dispatch: every compiled kernel is selectable, and the built module runs on CPUs
without AVX-512 or without AVX (emulated with qemu-user), which proves no wider instruction
leaked into the baseline code."""

import shutil
import textwrap

import numpy as np
import pytest

import fastattn
from conftest import run_python
from fastattn import reference


def test_cpu_info_reports_the_isa_in_use():
    info = fastattn.cpu_info()
    assert info["isa"] in info["supported_isas"]
    assert info["supported_isas"][0] == "scalar"
    assert isinstance(info["features"], dict)


def test_best_isa_is_the_default():
    code = "import fastattn; i = fastattn.cpu_info(); print(i['isa'] == i['supported_isas'][-1])"
    result = run_python(code, env_remove=["FASTATTN_ISA"])
    assert result.stdout.split()[-1] == "True"


@pytest.mark.parametrize("isa", fastattn.cpu_info()["supported_isas"])
def test_environment_variable_forces_an_isa(isa):
    result = run_python("import fastattn; print(fastattn.cpu_info()['isa'])", env_update={"FASTATTN_ISA": isa})
    assert result.stdout.split()[-1] == isa


def test_unknown_isa_is_refused():
    with pytest.raises(ValueError, match="ISA 'sse9'"):
        fastattn.set_isa("sse9")
    result = run_python("import fastattn", env_update={"FASTATTN_ISA": "sse9"}, check=False)
    assert result.returncode != 0 and "FASTATTN_ISA" in result.stderr


def test_every_isa_gives_the_reference_result(isa):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 3, 70, 24)).astype(np.float32)
    k = rng.standard_normal((2, 3, 90, 24)).astype(np.float32)
    v = rng.standard_normal((2, 3, 90, 40)).astype(np.float32)
    out = fastattn.attention(q, k, v, causal=True)
    assert fastattn.cpu_info()["isa"] == isa
    np.testing.assert_allclose(out, reference.attention(q, k, v, causal=True), rtol=0, atol=2e-6)


EMULATED_CHECK = textwrap.dedent("""
    import numpy as np, fastattn
    from fastattn import reference
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 70, 24)).astype(np.float32)
    k = rng.standard_normal((1, 2, 90, 24)).astype(np.float32)
    v = rng.standard_normal((1, 2, 90, 24)).astype(np.float32)
    for causal in (False, True):
        err = np.abs(fastattn.attention(q, k, v, causal=causal) - reference.attention(q, k, v, causal=causal)).max()
        assert err < 2e-6, err
    print(fastattn.cpu_info()["isa"])
""")


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None,
                    reason="qemu-x86_64 not installed (Debian: apt-get install qemu-user)")
@pytest.mark.parametrize("cpu, expected_isa", [("Haswell", "avx2"), ("Nehalem", "scalar")])
def test_runs_on_older_cpus_under_qemu(cpu, expected_isa):
    # NumPy's OpenBLAS runs the kernel for the emulated CPU: an OPENBLAS_CORETYPE set for this
    # machine (Haswell on some hosts) would stop it with an illegal instruction on Nehalem.
    result = run_python(EMULATED_CHECK, env_remove=["FASTATTN_ISA"], env_update={"OPENBLAS_CORETYPE": cpu},
                        launcher=["qemu-x86_64", "-cpu", cpu], check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == expected_isa
