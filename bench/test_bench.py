"""pytest-benchmark benchmarks: each implementation on a few small shapes.

    pytest bench/ --benchmark-disable -q    # check the results only
    pytest bench/                           # check, then time; one table per shape

Every benchmark checks its result against the float64 reference before it is timed.
GFLOP/s = extra_info["flops"] / time; bench/compare.py prints it with the ratios.
"""

import functools

import pytest

import fastattn
import harness
from harness import Case

CASES = [
    Case(1, 8, 8, 512, 512, 64),
    Case(1, 8, 8, 512, 512, 64, causal=True),
    Case(4, 12, 12, 128, 128, 64),  # BERT-base, smaller batch
    Case(1, 8, 2, 256, 256, 64),  # grouped-query attention
    Case(1, 32, 32, 1, 1024, 128),  # decoding one token
    Case(2, 16, 4, 1, 1000, 64),  # decoding with grouped-query heads, a key tail
    Case(2, 6, 6, 197, 197, 80),  # ViT: a key tail past 3 x 64, head_dim not a power of two
]


@pytest.fixture(scope="module", autouse=True)
def same_thread_count():
    harness.set_num_threads(fastattn.get_num_threads())


@functools.cache
def prepared(case):
    """Inputs and the reference output, computed once per case for all implementations."""
    q, k, v = harness.make_inputs(case)
    rows, expected = harness.expected_rows(case, q, k, v)
    return (q, k, v), rows, expected


@pytest.mark.parametrize("implementation", ["fastattn", *harness.PEERS, *harness.EXTRA_PEERS])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_attention(benchmark, case, implementation):
    if implementation.startswith("torch"):
        pytest.importorskip("torch")
    (q, k, v), rows, expected = prepared(case)
    run = harness.runners(case, q, k, v, extra_peers=True)[implementation]

    error = harness.max_error(run(), q, rows, expected)
    tolerance = harness.tolerance(q.dtype)
    assert error <= tolerance, f"{implementation} is {error:.1e} off the reference"

    benchmark.group = case.id
    benchmark.extra_info.update(flops=case.flops, case=case.id, implementation=implementation)
    if benchmark.enabled:
        harness.wait_for_idle_threads()  # of the previous benchmark
    benchmark(run)
