"""What compare.py and test_bench.py share: the shape of a case, its inputs, the implementations
being compared, and the check of their results against the float64 reference."""

import dataclasses
import time

import numpy as np

import fastattn
from fastattn import reference

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None

# Inputs are N(0, 1), so outputs are O(1) weighted averages of v. PyTorch's float32 SDPA stays
# within 1.2e-6 of the reference on every shape used here, while one dropped key among 4096 or
# a scale 1% off moves some output by more than 1e-3.
TOLERANCE = 1e-4

# The reference materialises float64 scores: beyond this many (B * Hq * L * S) it is not timed
# and checks only an evenly spaced sample of query rows.
REFERENCE_MAX_SCORES = 3e7

# NumPy's OpenBLAS threads keep spinning for 0.1-0.2 s after a call (measured here: torch SDPA
# ran 2.5x slower right after a NumPy matmul) and OpenMP threads for a few ms; an implementation
# timed meanwhile would share the cores with them.
IDLE_SECONDS = 0.25


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    causal: bool = False

    @property
    def shape(self):
        return ",".join(str(n) for n in dataclasses.astuple(self)[:6])

    @property
    def id(self):
        return self.shape.replace(",", "x") + ("-causal" if self.causal else "")

    @property
    def flops(self):
        """QK^T and PV, 2*L*S*D each per head; causal with L == S needs half of the scores."""
        flops = 4 * self.batch * self.heads_q * self.seqlen_q * self.seqlen_k * self.head_dim
        return flops // 2 if self.causal and self.seqlen_q == self.seqlen_k else flops

    @property
    def num_scores(self):
        return self.batch * self.heads_q * self.seqlen_q * self.seqlen_k

    @property
    def reference_affordable(self):
        return self.num_scores <= REFERENCE_MAX_SCORES


def make_inputs(case, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((case.batch, case.heads_q, case.seqlen_q, case.head_dim), dtype=dtype)
    k = rng.standard_normal((case.batch, case.heads_kv, case.seqlen_k, case.head_dim), dtype=dtype)
    v = rng.standard_normal((case.batch, case.heads_kv, case.seqlen_k, case.head_dim), dtype=dtype)
    return q, k, v


def set_num_threads(count):
    fastattn.set_num_threads(count)
    if torch is not None:
        torch.set_num_threads(count)


def wait_for_idle_threads():
    time.sleep(IDLE_SECONDS)


def runners(case, q, k, v):
    """A zero-argument callable per available implementation, each returning a NumPy array."""
    found = {
        "fastattn": lambda: fastattn.attention(q, k, v, causal=case.causal),
        # answers in the input's dtype like the others; the cast is small next to the scores
        "reference": lambda: reference.attention(q, k, v, causal=case.causal).astype(q.dtype),
    }
    if torch is not None:
        found["torch"] = torch_runner(case, q, k, v)
    return found


def torch_runner(case, q, k, v):
    q_t, k_t, v_t = (torch.from_numpy(x) for x in (q, k, v))  # shares memory, no copy

    def run():
        with torch.inference_mode():
            out = F.scaled_dot_product_attention(
                q_t, k_t, v_t, is_causal=case.causal, enable_gqa=case.heads_q != case.heads_kv
            )
        return out.numpy()

    return run


def expected_rows(case, q, k, v):
    """The query rows to check and the reference output on them: all rows when affordable."""
    rows = np.arange(case.seqlen_q)
    if not case.reference_affordable:
        count = int(REFERENCE_MAX_SCORES // (case.batch * case.heads_q * case.seqlen_k))
        rows = np.unique(np.linspace(0, case.seqlen_q - 1, max(count, 1)).round().astype(int))
    # `causal` would count the sampled rows from 0, so give the reference their own mask.
    visible = rows[:, None] >= np.arange(case.seqlen_k) if case.causal else None
    return rows, reference.attention(q[..., rows, :], k, v, mask=visible)


def max_error(output, q, rows, expected):
    """Largest absolute difference from the reference on the checked rows (inf when the shape or
    dtype differs from the query's)."""
    if output.shape != q.shape or output.dtype != q.dtype:
        return np.inf
    return float(np.abs(output[..., rows, :] - expected).max())
