"""Thread safety: many Python threads calling fastattn.attention at once (the kernels release the GIL),
with the thread count and the ISA changed under them by other threads, get results bit-identical to
serial calls of the same inputs: the kernels' results do not depend on the thread count, and each
call keeps the settings it started with."""

import threading

import numpy as np
import pytest

import fastattn

from conftest import SUPPORTED_ISAS, bool_mask, float_mask, randn

PYTHON_THREADS = 8
ROUNDS = 8


def make_calls(rng):
    """(args, kwargs) of calls of every kind: the tile and decode kernels, float32 and float64, masks,
    grouped heads, strided inputs, the variants, log-sum-exp and out=. kwargs["out"] is a shape: each
    call gets a buffer of its own."""
    def inputs(dtype, q_shape, k_shape, v_shape):
        return randn(rng, q_shape, dtype), randn(rng, k_shape, dtype), randn(rng, v_shape, dtype)

    calls = []
    q, k, v = inputs(np.float32, (2, 4, 97, 64), (2, 2, 200, 64), (2, 2, 200, 40))
    calls.append(((q, k, v), dict(causal=True)))
    calls.append(((q, k, v, bool_mask(rng, (2, 1, 97, 200))), dict(window=(30, 5), align="bottom_right")))
    q, k, v = inputs(np.float64, (3, 65, 17), (3, 130, 17), (3, 130, 9))
    calls.append(((q, k, v, float_mask(rng, (65, 130))), dict(softcap=2.0, return_lse=True)))
    # Decode: one query row per head, keys over more than one 512-key split.
    q, k, v = inputs(np.float32, (2, 8, 1, 128), (2, 2, 1100, 128), (2, 2, 1100, 128))
    calls.append(((q, k, v), dict(kv_lengths=np.array([700, 1100]), align="bottom_right", causal=True)))
    calls.append(((q, k, v), dict(alibi_slopes=rng.uniform(0.01, 0.5, 8), return_lse=True)))
    q, k, v = inputs(np.float64, (1, 6, 3, 40), (1, 3, 600, 40), (1, 3, 600, 33))
    calls.append(((q, k, v, float_mask(rng, (3, 600)).astype(np.float32)), {}))
    # Strided: (B, L, H, E) buffers viewed as (B, H, L, E), reversed keys, out= a transposed buffer.
    q, k, v = (x.transpose(0, 2, 1, 3) for x in inputs(np.float32, (2, 150, 3, 24), (2, 70, 3, 24), (2, 70, 3, 24)))
    calls.append(((q, k[:, :, ::-1], v[:, :, ::-1]), dict(out=(2, 150, 3, 24), causal=True)))
    q, k, v = inputs(np.float32, (5, 63, 32), (5, 64, 32), (5, 64, 32))
    calls.append(((q, k, v), dict(scale=0.3)))
    return calls


def run(call):
    args, kwargs = call
    if "out" in kwargs:  # a (B, L, H, D) buffer viewed as (B, H, L, D), new for each call
        kwargs = dict(kwargs, out=np.empty(kwargs["out"], args[0].dtype).transpose(0, 2, 1, 3))
    result = fastattn.attention(*args, **kwargs)
    return tuple(np.ascontiguousarray(x) for x in (result if isinstance(result, tuple) else (result,)))


def assert_bitwise_equal(results, expected):
    assert len(results) == len(expected)
    for got, want in zip(results, expected):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes(), "a concurrent result differs from the serial one"


@pytest.fixture
def restore_settings():
    threads, isa = fastattn.get_num_threads(), fastattn.cpu_info()["isa"]
    yield
    fastattn.set_num_threads(threads)
    fastattn.set_isa(isa)


def run_concurrently(calls, change_settings):
    """Each of PYTHON_THREADS threads makes every call ROUNDS times, starting at a different call,
    all released together by a barrier; threads with an even index call change_settings(rng) after
    each call. Returns {call index: [results]} and re-raises a thread's exception; checks that calls
    did overlap."""
    barrier = threading.Barrier(PYTHON_THREADS)
    results = {index: [] for index in range(len(calls))}
    errors = []
    lock = threading.Lock()
    in_flight = [0, 0]  # calls running now, most at once

    def worker(thread):
        rng = np.random.default_rng(thread)
        try:
            barrier.wait()
            for step in range(ROUNDS * len(calls)):
                index = (thread + step) % len(calls)
                with lock:
                    in_flight[0] += 1
                    in_flight[1] = max(in_flight)
                results[index].append(run(calls[index]))
                with lock:
                    in_flight[0] -= 1
                if thread % 2 == 0:
                    change_settings(rng)
        except BaseException as error:  # noqa: BLE001 (reported by the main thread)
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(thread,)) for thread in range(PYTHON_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    assert in_flight[1] > 1, "no two calls ran at once"
    assert all(len(found) == PYTHON_THREADS * ROUNDS for found in results.values())
    return results


def test_concurrent_calls_with_changing_thread_counts_match_serial(isa, restore_settings):
    calls = make_calls(np.random.default_rng(7))
    fastattn.set_num_threads(1)
    serial = [run(call) for call in calls]
    results = run_concurrently(calls, lambda rng: fastattn.set_num_threads(int(rng.integers(1, 5))))
    for index, found in results.items():
        for result in found:
            assert_bitwise_equal(result, serial[index])


@pytest.mark.skipif(len(SUPPORTED_ISAS) < 2, reason="needs two ISAs to switch between")
def test_concurrent_calls_while_the_isa_changes(restore_settings):
    """set_isa from other threads: every call runs one ISA's kernel throughout, so its result is
    bit-identical to the serial result of one of the ISAs."""
    calls = make_calls(np.random.default_rng(8))
    serial = {}
    for name in SUPPORTED_ISAS:
        fastattn.set_isa(name)
        serial[name] = [run(call) for call in calls]
    results = run_concurrently(calls, lambda rng: fastattn.set_isa(str(rng.choice(SUPPORTED_ISAS))))
    for index, found in results.items():
        for result in found:
            matches = [name for name in SUPPORTED_ISAS
                       if all(got.tobytes() == want.tobytes() for got, want in zip(result, serial[name][index]))]
            assert matches, f"call {index}: the result matches no ISA's serial result"
