"""What the benchmarks share: the shape of a case, its inputs, the implementations being
compared, the check of their results against the float64 reference, and the timing loop."""

import contextlib
import dataclasses
import math
import time

import ml_dtypes
import numpy as np

import fastattn
from fastattn import reference

try:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:
    torch = None

# Inputs are N(0, 1), so outputs are O(1) weighted averages of v. PyTorch's float32 SDPA stays
# within 1.2e-6 of the reference on every shape used here, while one dropped key among 4096 or
# a scale 1% off moves some output by more than 1e-3. In float64 every implementation stays
# within about 1e-14, while a float32 step anywhere on the way costs about 1e-7.
# Half precision: 4 units of the dtype's rounding (2^-11, 2^-8) at outputs of magnitude 2, the
# accuracy fastattn's tests demand; torch stays within 1.5 units.
TOLERANCES = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10,
              np.dtype(np.float16): 4e-3, np.dtype(ml_dtypes.bfloat16): 3e-2}
HALF_DTYPES = ("float16", "bfloat16")

# The reference materialises float64 scores: beyond this many (B * Hq * L * S) it is not timed
# and checks only an evenly spaced sample of query rows.
REFERENCE_MAX_SCORES = 3e7

# NumPy's OpenBLAS threads keep spinning for 0.1-0.2 s after a call (measured here: torch SDPA
# ran 2.5x slower right after a NumPy matmul) and OpenMP threads for a few ms; an implementation
# timed meanwhile would share the cores with them.
IDLE_SECONDS = 0.25

# A call shorter than this is repeated inside one sample, so timer resolution, thread wake-up and
# the clock's ramp after the idle pause do not dominate the measurement (here the first call after
# the pause ran 15-25% slower than the fifth, for every implementation). A 2048^3 GEMM, the
# ceiling, lasts about this long in one call, so short shapes are now sampled as it is.
MIN_SAMPLE_SECONDS = 0.1

PEERS = ["torch", "reference"]
HALF_PEERS = ["fastattn-float32"]  # fastattn on the same values in float32, for half-precision runs
EXTRA_PEERS = ["torch-math", "numpy-naive"]  # compare.py --peers


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    causal: bool = False
    window: int | None = None  # with causal: each query also sees only the `window` keys before it
    label: str = dataclasses.field(default="", compare=False)  # "BERT-base", "decode", ...

    @property
    def shape(self):
        return ",".join(str(n) for n in dataclasses.astuple(self)[:6])

    @property
    def id(self):
        return (self.shape.replace(",", "x") + ("-causal" if self.causal else "")
                + (f"-window{self.window}" if self.window is not None else ""))

    @property
    def attention_kwargs(self):
        """fastattn.attention's keywords for this case."""
        return dict(causal=self.causal, window=None if self.window is None else (self.window, 0))

    def visible(self, rows):
        """Which keys the given query rows see: bool (len(rows), S), or None when all."""
        if not self.causal:
            return None
        offset = np.arange(self.seqlen_k) - np.asarray(rows)[:, None]  # j - i
        return (offset <= 0) & (offset >= -self.window if self.window is not None else True)

    @property
    def flops(self):
        """QK^T and PV, 2*D per visible score each; causal with L == S sees half of the scores, a
        window of w keys about L * (w + 1)."""
        per_score = 4 * self.batch * self.heads_q * self.head_dim
        if self.window is not None:
            seen = np.minimum(np.arange(self.seqlen_q), self.window) + 1
            return per_score * int(seen.sum())
        flops = per_score * self.seqlen_q * self.seqlen_k
        return flops // 2 if self.causal and self.seqlen_q == self.seqlen_k else flops

    @property
    def is_decode(self):
        """One query row per head: reading K and V bounds the time, not arithmetic."""
        return self.seqlen_q == 1

    def kv_bytes(self, itemsize):
        return 2 * self.batch * self.heads_kv * self.seqlen_k * self.head_dim * itemsize

    @property
    def num_scores(self):
        return self.batch * self.heads_q * self.seqlen_q * self.seqlen_k

    @property
    def reference_affordable(self):
        return self.num_scores <= REFERENCE_MAX_SCORES


def numpy_dtype(name):
    """A dtype name of compare.py's --dtype as a NumPy dtype (bfloat16: ml_dtypes')."""
    return np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)


def is_half(dtype):
    return np.dtype(dtype).itemsize == 2


def make_inputs(case, dtype=np.float32, seed=0):
    """N(0, 1) inputs; half precision is drawn in float32 and rounded (NumPy draws no halves)."""
    dtype = numpy_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    rng = np.random.default_rng(seed)
    drawn = np.float32 if is_half(dtype) else dtype
    shapes = [(case.batch, case.heads_q, case.seqlen_q, case.head_dim),
              (case.batch, case.heads_kv, case.seqlen_k, case.head_dim),
              (case.batch, case.heads_kv, case.seqlen_k, case.head_dim)]
    return tuple(rng.standard_normal(shape, dtype=drawn).astype(dtype, copy=False) for shape in shapes)


def set_num_threads(count):
    fastattn.set_num_threads(count)
    if torch is not None:
        torch.set_num_threads(count)


def wait_for_idle_threads():
    time.sleep(IDLE_SECONDS)


def calls_per_sample(run):
    """Warm up, then count the calls that make one sample last MIN_SAMPLE_SECONDS."""
    wait_for_idle_threads()
    run()  # warm-up: first-touch allocations, thread pool start, lazy dispatch
    start = time.perf_counter()
    run()
    return max(1, math.ceil(MIN_SAMPLE_SECONDS / (time.perf_counter() - start)))


def take_sample(run, calls):
    """Seconds per call over `calls` calls, after the previous work's threads went idle."""
    wait_for_idle_threads()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - start) / calls


def time_round_robin(runners, repeats, sample=take_sample, count_calls=calls_per_sample):
    """Seconds per call, one sample of every implementation per repeat, so that drift (clock
    speed, heat, other load) affects them all alike. The order rotates so that no implementation
    always finds the caches as the same predecessor left them. `sample` and `count_calls` default
    to the CPU's; the GPU run passes its own, which synchronize the device."""
    calls = {name: count_calls(run) for name, run in runners.items()}
    samples = {name: [] for name in runners}
    names = list(runners)
    if not names:  # every implementation failed its check
        return samples
    for repeat in range(repeats):
        turn = repeat % len(names)
        for name in names[turn:] + names[:turn]:
            samples[name].append(sample(runners[name], calls[name]))
    return samples


def runners(case, q, k, v, extra_peers=False):
    """A zero-argument callable per available implementation, each returning a NumPy array:
    fastattn and PEERS, plus EXTRA_PEERS if asked for."""
    found = {
        "fastattn": lambda: fastattn.attention(q, k, v, **case.attention_kwargs),
        # answers in the input's dtype like the others; the cast is small next to the scores
        "reference": lambda: reference.attention(q, k, v, **case.attention_kwargs).astype(q.dtype),
    }
    if is_half(q.dtype):
        wide = [x.astype(np.float32) for x in (q, k, v)]
        found["fastattn-float32"] = lambda: fastattn.attention(*wide, **case.attention_kwargs)
    if torch is not None:
        found["torch"] = torch_runner(case, q, k, v)
        if extra_peers:
            found["torch-math"] = torch_runner(case, q, k, v, backend=SDPBackend.MATH)
    if extra_peers:
        found["numpy-naive"] = numpy_naive_runner(case, q, k, v)
    return found


def torch_runner(case, q, k, v, backend=None):
    """torch SDPA on the same memory; `backend` pins one of its kernels, else torch chooses."""
    q_t, k_t, v_t = (to_torch(x) for x in (q, k, v))  # shares memory, no copy
    # torch has no windows: what its users do is pass the band as a mask (and pay for all keys)
    band = torch.from_numpy(case.visible(np.arange(case.seqlen_q))) if case.window is not None else None

    def run():
        pinned = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
        with torch.inference_mode(), pinned:
            out = F.scaled_dot_product_attention(
                q_t, k_t, v_t, attn_mask=band, is_causal=case.causal and band is None,
                enable_gqa=case.heads_q != case.heads_kv
            )
        return from_torch(out)

    return run


def to_torch(array):
    """A tensor sharing the array's memory (bfloat16 crosses as int16: NumPy has no bfloat16)."""
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def from_torch(tensor):
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def numpy_naive_runner(case, q, k, v):
    """softmax(Q K^T * scale) V in NumPy matmuls and the input's dtype: what a NumPy user writes."""
    groups = case.heads_q // case.heads_kv
    # [B, Hk, groups, L, D] against [B, Hk, 1, D, S]: query heads share their K/V head, no copy
    q_grouped = q.reshape(case.batch, case.heads_kv, groups, case.seqlen_q, case.head_dim)
    k_transposed = k[:, :, None].swapaxes(-1, -2)
    v_grouped = v[:, :, None]
    scale = q.dtype.type(1 / math.sqrt(case.head_dim))
    visible = case.visible(np.arange(case.seqlen_q))
    causal_bias = np.where(visible, 0, -np.inf).astype(q.dtype) if visible is not None else None

    def run():
        scores = q_grouped @ k_transposed
        scores *= scale
        if causal_bias is not None:
            scores += causal_bias
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        return (scores @ v_grouped).reshape(q.shape[:-1] + v.shape[-1:])

    return run


def expected_rows(case, q, k, v):
    """The query rows to check and the reference output on them: all rows when affordable."""
    rows = np.arange(case.seqlen_q)
    if not case.reference_affordable:
        count = int(REFERENCE_MAX_SCORES // (case.batch * case.heads_q * case.seqlen_k))
        rows = np.unique(np.linspace(0, case.seqlen_q - 1, max(count, 1)).round().astype(int))
    # `causal` would count the sampled rows from 0, so give the reference their own mask.
    return rows, reference.attention(q[..., rows, :], k, v, mask=case.visible(rows))


def max_error(output, q, rows, expected):
    """Largest absolute difference from the reference on the checked rows (inf when the shape
    differs from the query's or the dtype is narrower: fastattn-float32 answers half-precision
    inputs in float32)."""
    if output.shape != q.shape or output.dtype.itemsize < q.dtype.itemsize:
        return np.inf
    return float(np.abs(output[..., rows, :].astype(np.float64) - expected).max())


def tolerance(dtype):
    return TOLERANCES[np.dtype(dtype)]
