"""The machine's ceilings, measured in the same run as the attention timings: a NumPy GEMM for
arithmetic and a multi-threaded streaming read for memory. Comparing with these rather than with
datasheet figures cancels what the run shares with them: clock speed, heat, other load."""

import ctypes
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import harness

GEMM_SIZE = 2048
GEMM_FLOPS = 2 * GEMM_SIZE**3

# Far larger than the 32 MiB L3 here, so every pass reads DRAM.
READ_BYTES = 256 * 2**20

# Either one makes current NumPy's OpenBLAS run a slower GEMM: a kernel or blocking meant for
# another CPU (on this project's Zen 5 machine OPENBLAS_CORETYPE=Haswell gives sgemm 2048^3 about
# 200 GFLOP/s, against 400 with the SkylakeX kernel OpenBLAS picks itself). The ceiling is the
# fastest GEMM NumPy does here, so it runs in a worker process started without them; the
# implementations being compared keep the environment they were given.
SLOWING_OPENBLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def gemm_name(dtype):
    """dgemm for float64; sgemm for float32 and for half precision, which is computed in float32."""
    return "dgemm" if np.dtype(dtype) == np.float64 else "sgemm"


def gemm_runner(dtype):
    """GEMM_SIZE^3 matmul in NumPy (its BLAS, OpenBLAS in the PyPI wheels)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((GEMM_SIZE, GEMM_SIZE), dtype=dtype)
    b = rng.standard_normal((GEMM_SIZE, GEMM_SIZE), dtype=dtype)
    out = np.empty_like(a)
    return lambda: np.matmul(a, b, out=out)


def streaming_read_runner(pool, threads):
    """Reads READ_BYTES of float32, an equal part in each of `threads` threads of `pool`; NumPy
    releases the GIL inside the reduction, so the parts are read in parallel."""
    array = np.ones(READ_BYTES // 4, dtype=np.float32)  # ones: pages touched now, not when timed
    parts = np.array_split(array, threads)
    # max, not sum: NumPy's pairwise float32 sum runs at about 8 GB/s per core even from L2
    # here, below memory speed, while max is a plain SIMD loop at 25-30 GB/s from L2.
    return lambda: list(pool.map(np.max, parts))


def read_pool(threads):
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="streaming-read")


class GemmWorker:
    """A child process that times the GEMM on request, its OpenBLAS having chosen its kernel
    without SLOWING_OPENBLAS_VARIABLES. `info` is that choice (openblas_info), None for another BLAS."""

    def __init__(self, dtype, threads):
        env = {name: value for name, value in os.environ.items() if name not in SLOWING_OPENBLAS_VARIABLES}
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--gemm-worker", np.dtype(dtype).name, str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        try:
            self.info = json.loads(self._answer())
        except BaseException:
            self.close()
            raise

    def sample(self):
        """Seconds per GEMM, one sample (harness.take_sample) in the worker."""
        self.process.stdin.write("sample\n")
        self.process.stdin.flush()
        return float(self._answer())

    def close(self):
        """Ends the worker: it stops at the end of its input, or is killed if it does not."""
        try:
            self.process.stdin.close()
        except OSError:  # the worker is gone already
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _answer(self):
        """The worker's next answer; other output (an editable install's rebuild log) is skipped."""
        for line in self.process.stdout:
            if line.startswith(ANSWER):
                return line[len(ANSWER):]
        raise RuntimeError(f"the GEMM worker stopped (exit status {self.process.wait()})")


ANSWER = "gemm-worker: "


def serve_gemm_samples(dtype, threads):
    """The worker's side: its OpenBLAS info, then one sample per line read."""
    set_blas_threads(threads)
    run = gemm_runner(dtype)
    calls = harness.calls_per_sample(run)
    print(ANSWER + json.dumps(openblas_info()), flush=True)
    for _ in sys.stdin:
        print(ANSWER + str(harness.take_sample(run, calls)), flush=True)


class Ceilings:
    """Samples of the machine's GEMM and streaming-read speed, one of each before the first case
    and after every case, so they see the same drift as the attention timings."""

    def __init__(self, dtype, threads, pool, gemm_worker):
        self.gemm = gemm_name(dtype)
        self.threads = threads
        self.gemm_worker = gemm_worker
        self.read = streaming_read_runner(pool, threads)
        self.read_calls = harness.calls_per_sample(self.read)
        self.samples = {self.gemm: [], "read": []}

    def sample(self):
        self.samples[self.gemm].append(self.gemm_worker.sample())
        self.samples["read"].append(harness.take_sample(self.read, self.read_calls))

    def latest(self):
        return f"{self.gemm} {self.gemm_gflops(-1):.0f} GFLOP/s, read {self.read_gbps(-1):.1f} GB/s"

    def gemm_gflops(self, sample=None):
        return GEMM_FLOPS / self._seconds(self.gemm, sample) / 1e9

    def read_gbps(self, sample=None):
        return READ_BYTES / self._seconds("read", sample) / 1e9

    def _seconds(self, name, sample):
        """One sample's seconds per call, or the median of all samples."""
        samples = self.samples[name]
        return statistics.median(samples) if sample is None else samples[sample]

    def summary(self):
        samples_ms = {name: [1e3 * s for s in samples] for name, samples in self.samples.items()}
        return {
            "gemm": {"name": self.gemm, "size": GEMM_SIZE, "gflops": self.gemm_gflops(),
                     "samples_ms": samples_ms[self.gemm], "openblas": self.gemm_worker.info},
            "read": {"name": "streaming read", "bytes": READ_BYTES, "threads": self.threads,
                     "gbps": self.read_gbps(), "samples_ms": samples_ms["read"]},
        }


def numpy_openblas():
    """NumPy's OpenBLAS (already loaded by NumPy) as a ctypes library, or None for another BLAS."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    except OSError:
        return None
    paths = sorted(paths, key=lambda path: "numpy" not in path)  # NumPy's own copy first
    return ctypes.CDLL(paths[0]) if paths else None


def openblas_function(library, name):
    """OpenBLAS's `openblas_<name>`, under the names plain and scipy-openblas64 builds give it."""
    for symbol in (f"openblas_{name}", f"scipy_openblas_{name}64_", f"openblas_{name}64_"):
        if hasattr(library, symbol):
            return getattr(library, symbol)
    return None


def set_blas_threads(count):
    """Give NumPy's GEMM the thread count the attention implementations get; False if unknown."""
    library = numpy_openblas()
    set_threads = openblas_function(library, "set_num_threads") if library else None
    if set_threads is None:
        return False
    set_threads(count)
    return True


def openblas_info():
    """Which kernel OpenBLAS chose for this CPU and with how many threads (None if not OpenBLAS):
    OPENBLAS_CORETYPE, for one, can make it pick a slower one."""
    library = numpy_openblas()
    if library is None:
        return None
    info = {}
    for name, restype in (("get_corename", ctypes.c_char_p), ("get_config", ctypes.c_char_p),
                          ("get_num_threads", ctypes.c_int)):
        function = openblas_function(library, name)
        if function is not None:
            function.restype = restype
            value = function()
            info[name.removeprefix("get_")] = value.decode() if isinstance(value, bytes) else value
    return info


if __name__ == "__main__" and sys.argv[1:2] == ["--gemm-worker"]:
    serve_gemm_samples(np.dtype(sys.argv[2]), int(sys.argv[3]))
