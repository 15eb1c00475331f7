"""Thread count control, and results that do not depend on threads at all."""

import os

import numpy as np
import pytest

import fastattn

from conftest import bool_mask, float_mask, randn, run_python


@pytest.fixture
def restore_threads():
    saved = fastattn.get_num_threads()
    yield
    fastattn.set_num_threads(saved)


def make_case(rng, dtype, q_shape, k_shape, v_shape, mask=None, causal=False):
    q, k, v = randn(rng, q_shape, dtype), randn(rng, k_shape, dtype), randn(rng, v_shape, dtype)
    if mask is not None:
        mask = mask(rng, (q_shape[-2], k_shape[-2]))
    return (q, k, v, mask), {"causal": causal}


CASES = {
    "full": (np.float32, (1, 8, 512, 64), (1, 8, 512, 64), (1, 8, 512, 64)),
    "causal": (np.float32, (2, 4, 197, 64), (2, 4, 197, 64), (2, 4, 197, 64), None, True),
    "causal L>S, float mask": (np.float32, (2, 3, 300, 80), (2, 3, 130, 80), (2, 3, 130, 80), float_mask, True),
    "bool mask, GQA": (np.float32, (1, 8, 65, 128), (1, 2, 1000, 128), (1, 2, 1000, 128), bool_mask),
    # One query row and few heads: a kernel may split the keys across threads here.
    "decode": (np.float32, (1, 8, 1, 128), (1, 2, 8192, 128), (1, 2, 8192, 128)),
    "decode, one head, mask": (np.float32, (1, 1, 1, 64), (1, 1, 20000, 64), (1, 1, 20000, 64), bool_mask),
    "float64": (np.float64, (2, 2, 200, 17), (2, 2, 333, 17), (2, 2, 333, 9), float_mask, True),
}


@pytest.mark.parametrize("case", CASES)
def test_one_and_two_threads_agree_bitwise(isa, rng, restore_threads, case):
    args, kwargs = make_case(rng, *CASES[case])
    fastattn.set_num_threads(1)
    single = fastattn.attention(*args, **kwargs)
    fastattn.set_num_threads(2)
    double = fastattn.attention(*args, **kwargs)
    np.testing.assert_array_equal(double, single)


@pytest.mark.parametrize("q_shape, kv_shape", [((1, 1, 20, 64), (1, 1, 300, 64)),  # one query tile
                                                 ((1, 1, 1, 64), (1, 1, 100, 64))])  # one decode split
def test_more_threads_than_work_items(isa, rng, restore_threads, q_shape, kv_shape):
    q, k, v = randn(rng, q_shape, np.float32), randn(rng, kv_shape, np.float32), randn(rng, kv_shape, np.float32)
    fastattn.set_num_threads(1)
    single = fastattn.attention(q, k, v)
    fastattn.set_num_threads(8)
    np.testing.assert_array_equal(fastattn.attention(q, k, v), single)


def test_set_get_roundtrip(restore_threads):
    for threads in (1, 2, 1):
        fastattn.set_num_threads(threads)
        assert fastattn.get_num_threads() == threads


def num_threads_in_fresh_process(env_value=None, cpus=None):
    script = "import os\n"
    if cpus is not None:
        script += f"os.sched_setaffinity(0, {sorted(cpus)})\n"
    script += "import fastattn\nprint(fastattn.get_num_threads())"
    env_update = {"FASTATTN_NUM_THREADS": env_value} if env_value is not None else None
    result = run_python(script, env_update=env_update, env_remove=["FASTATTN_NUM_THREADS"])
    return int(result.stdout.split()[-1])


@pytest.mark.parametrize("threads", [1, 3])
def test_env_var_sets_default(threads):
    assert num_threads_in_fresh_process(str(threads)) == threads


def test_default_is_cores_available_to_process():
    assert num_threads_in_fresh_process() == len(os.sched_getaffinity(0))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores to restrict to one")
def test_default_follows_cpu_affinity():
    one_core = {min(os.sched_getaffinity(0))}
    assert num_threads_in_fresh_process(cpus=one_core) == 1

