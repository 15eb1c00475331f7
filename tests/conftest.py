"""Shared helpers: random inputs and the accuracy criterion every kernel result is held to."""

import os
import subprocess
import sys

import numpy as np
import pytest

from fastattn import api, reference

SEED = 20250601

# Every CPU kernel this machine can run: the files that compare the kernel with the spec use
# the isa fixture, so each compiled ISA runs the same cases. "avx512bf16" and "amx" run the avx512
# kernels for every dtype but bfloat16, so only the half_isa fixture (tests/test_half_precision.py)
# includes them. Their bfloat16 prefill multiplies pairs of bfloat16 (VDPBF16PS, AMX tiles): the
# probabilities are rounded to bfloat16 before they multiply V, and bfloat16 subnormals read as zero.
SUPPORTED_ISAS = api.cpu_info()["supported_isas"] if hasattr(api, "cpu_info") else ["default"]
BF16_PRODUCT_ISAS = {"avx512bf16", "amx"}
ISAS = [name for name in SUPPORTED_ISAS if name not in BF16_PRODUCT_ISAS]


def _use_isa(name):
    if name == "default":
        yield name
        return
    chosen = api.cpu_info()["isa"]
    api.set_isa(name)
    try:
        yield name
    finally:
        api.set_isa(chosen)


@pytest.fixture(params=ISAS)
def isa(request):
    yield from _use_isa(request.param)


@pytest.fixture(params=SUPPORTED_ISAS)
def half_isa(request):
    yield from _use_isa(request.param)


def run_python(code, *args, env_update=None, env_remove=(), launcher=(), check=True, timeout=600):
    """Run `code` in a fresh interpreter outside the source tree, so it imports the installed
    fastattn (from the repository root, `fastattn/` would shadow it without its compiled module)."""
    env = {k: v for k, v in os.environ.items() if k not in env_remove}
    env.update(env_update or {})
    return subprocess.run([*launcher, sys.executable, "-c", code, *args], env=env, cwd="/",
                          capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture
def rng():
    return np.random.default_rng(SEED)


def randn(rng, shape, dtype):
    return rng.standard_normal(shape, dtype=dtype)


def qkv(rng, dtype, q_shape, k_shape, v_shape):
    return randn(rng, q_shape, dtype), randn(rng, k_shape, dtype), randn(rng, v_shape, dtype)


def float_mask(rng, shape, hidden=0.3):
    """Additive mask: moderate values, with about `hidden` of the entries set to -inf."""
    mask = rng.standard_normal(shape)
    mask[rng.random(shape) < hidden] = -np.inf
    return mask


def bool_mask(rng, shape, hidden=0.3):
    return rng.random(shape) >= hidden


def make_mask(rng, shape, dtype):
    """A bool mask, or a float mask of `dtype` with -inf entries."""
    return bool_mask(rng, shape) if dtype is bool else float_mask(rng, shape).astype(dtype)


def attention_in(dtype, q, k, v, mask=None, causal=False, scale=None, **variants):
    """The reference's math evaluated in `dtype`: in float32 the naive implementation a kernel's
    error is compared with; in np.longdouble the exact answer a float64 kernel is measured against.
    variants: fastattn.attention's other keywords (align, window, ...)."""
    return reference.attention(q, k, v, mask, causal=causal, scale=scale, dtype=dtype, **variants)


def assert_within_naive_error(out, exact, naive):
    """Assert max|out - exact| <= 2 * max|naive - exact| + floor.

    This is FlashAttention's test criterion: a fused kernel may round differently from a naive
    softmax(q k^T) v in the same precision, but must not be more than twice as wrong. The floor,
    8 eps of out's dtype relative to the output's magnitude, covers cases where the naive
    result happens to be exact (one key, one-hot weights) while the kernel still rounds a few
    times more (the online-softmax rescaling, its exp approximation and the final 1/l).
    NaN must appear exactly where the exact result has NaN.
    """
    exact = np.asarray(exact, dtype=np.longdouble)
    nan = np.isnan(exact)
    np.testing.assert_array_equal(np.isnan(out), nan, err_msg="NaN positions differ")
    if exact.size == 0:
        return
    err = np.max(np.abs(np.where(nan, 0, out - exact)))
    naive_err = np.max(np.abs(np.where(nan, 0, naive - exact)))
    magnitude = np.max(np.abs(np.where(nan, 0, exact)), initial=0)
    floor = 8 * np.finfo(out.dtype).eps * max(1.0, float(magnitude))
    bound = 2 * naive_err + floor
    assert err <= bound, f"max error {float(err):.3g} > bound {float(bound):.3g} (naive error {float(naive_err):.3g})"


def check_against_reference(out, q, k, v, mask=None, causal=False, scale=None):
    """Check a fastattn.attention result: a C-contiguous array of q's dtype, as accurate as
    assert_accurate demands."""
    q = np.asarray(q)
    assert isinstance(out, np.ndarray)
    assert out.dtype == q.dtype
    assert out.flags.c_contiguous
    assert_accurate(out, q, k, v, mask, causal, scale)


def assert_accurate(out, q, k, v, mask=None, causal=False, scale=None, **variants):
    """Compare out's shape and values with fastattn.reference, the spec.

    float32 results are held to the float32 naive implementation's error against the float64
    reference. For float64 results the reference itself is the naive implementation and the
    exact answer is the same math in extended precision (np.longdouble).
    """
    q = np.asarray(q)
    ref = reference.attention(q, k, v, mask, causal=causal, scale=scale, **variants)
    assert out.shape == ref.shape
    if q.dtype == np.float32:
        exact, naive = ref, attention_in(np.float32, q, k, v, mask, causal, scale, **variants)
    else:
        exact, naive = attention_in(np.longdouble, q, k, v, mask, causal, scale, **variants), ref
    assert_within_naive_error(out, exact, naive)
