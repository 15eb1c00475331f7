"""Resource check of the GPU kernels, no GPU needed: compiles every shipped specialisation to PTX for
sm_80 (A100) and sm_90 (H100) with numba-cuda (front end once, NVVM per arch), assembles it with
`ptxas -v -warn-spills -Werror`, and prints registers, static shared memory, spills and the resulting
occupancy per SM. Exits non-zero if any kernel spills, fails to assemble, or needs more than the
48 KB of static shared memory a block may have without an opt-in.

    python bench/gpu_resources.py [--arch sm_80 sm_90] [--jobs N] [--markdown]

Needs numba-cuda and a ptxas of the same CUDA release as its NVVM (pip install 'fastattn[gpu-dev]').
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

# Per-SM limits (CUDA C Programming Guide, "Compute Capabilities" table; ptxas reports per thread).
ARCHS = {
    "sm_80": dict(cc=(8, 0), registers=65536, threads=2048, blocks=32, shared=164 * 1024),
    "sm_90": dict(cc=(9, 0), registers=65536, threads=2048, blocks=32, shared=228 * 1024),
}
REGISTER_UNIT = 256  # registers are allocated per warp, in units of 256
RESERVED_SHARED_PER_BLOCK = 1024  # sm_80 and later keep 1 KB of each block's shared memory
STATIC_SHARED_LIMIT = 48 * 1024


def find_ptxas():
    try:
        from cuda import pathfinder
        found = pathfinder.find_nvidia_binary_utility("ptxas")
        if found:
            return found
    except ImportError:
        pass
    return shutil.which("ptxas")


def occupancy(arch, registers, shared, threads):
    """(blocks per SM, warps per SM, limiting resource) for one kernel."""
    limits = ARCHS[arch]
    warps = -(-threads // 32)
    registers_per_warp = -(-max(registers, 1) * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by = {
        "registers": (limits["registers"] // registers_per_warp) // warps,
        "shared memory": limits["shared"] // (shared + RESERVED_SHARED_PER_BLOCK),
        "threads": limits["threads"] // threads,
        "blocks": limits["blocks"],
    }
    limiter = min(by, key=by.get)
    return by[limiter], by[limiter] * warps, limiter


def compile_for_archs(function, signature, archs, launch_bounds):
    """PTX of one kernel for each arch. numba-cuda's front end (typing, lowering to LLVM IR), most of
    compile_ptx's time, looks at the compute capability only for tanh's fast path (>= 7.5) and float64
    atomics (>= 6.0), the same for every arch here: so it runs once and only NVVM runs per arch, where
    compile_ptx would redo everything. _compile_pyfunc_with_fixup is private; the package pins
    numba-cuda's version."""
    from numba.cuda.compiler import _compile_pyfunc_with_fixup

    capabilities = [ARCHS[arch]["cc"] for arch in archs]
    assert all(cc >= (7, 5) for cc in capabilities), capabilities
    library, _ = _compile_pyfunc_with_fixup(function, signature, device=False, abi="numba", cc=capabilities[0],
                                            launch_bounds=launch_bounds)
    return {arch: library.get_asm_strs(cc=cc)[0] for arch, cc in zip(archs, capabilities)}


def check(task):
    """Compile one specialisation for every arch and assemble it; returns a result row per arch."""
    archs, (dtype, bucket, mask_kind, mask_dtype, windowed), ptxas, folder = task
    from fastattn.cuda import kernel

    config = kernel.TILE_CONFIGS[bucket]
    threads = kernel.threads_per_block(config)
    function = kernel.make_attention_kernel(config, mask_kind, windowed, mask_dtype)
    ptxes = compile_for_archs(function, kernel.kernel_signature(dtype, mask_dtype), archs,
                              kernel.launch_bounds(config))
    name = f"{dtype}_d{bucket}_{mask_kind}{'_' + mask_dtype if mask_kind == 'additive' else ''}{'_windowed' if windowed else ''}"
    return [assemble(arch, name, ptx, threads, ptxas, folder) for arch, ptx in ptxes.items()]


def assemble(arch, name, ptx, threads, ptxas, folder):
    """ptxas -v of one kernel's PTX for one arch: its registers, shared memory, spills and occupancy."""
    path = os.path.join(folder, f"{name}_{arch}.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    run = subprocess.run([ptxas, f"-arch={arch}", "-v", "-warn-spills", "-Werror", "-o", os.devnull, path],
                         capture_output=True, text=True)
    report = run.stdout + run.stderr
    used = re.search(r"Used (\d+) registers.*?(\d+) bytes smem", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    registers, shared = (int(used.group(1)), int(used.group(2))) if used else (0, 0)
    stores, loads = (int(spills.group(1)), int(spills.group(2))) if spills else (0, 0)
    blocks, warps, limiter = occupancy(arch, registers, shared, threads)
    problems = []
    if run.returncode != 0:
        problems.append("ptxas failed: " + " ".join(line.strip() for line in report.splitlines()
                                                     if "error" in line.lower())[:300])
    if stores or loads:
        problems.append(f"spills {stores}/{loads} bytes")
    if shared > STATIC_SHARED_LIMIT:
        problems.append(f"{shared} bytes of static shared memory > {STATIC_SHARED_LIMIT}")
    return dict(arch=arch, kernel=name, threads=threads, registers=registers, shared=shared,
                spill_stores=stores, spill_loads=loads, blocks=blocks, warps=warps,
                occupancy=warps / (ARCHS[arch]["threads"] // 32), limiter=limiter, problems=problems)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)

    ptxas = find_ptxas()
    if ptxas is None:
        print("ptxas not found: pip install 'fastattn[gpu-dev]' (cuda-toolkit[nvcc] provides it)", file=sys.stderr)
        return 2
    from fastattn.cuda import kernel  # imports numba; the workers compile

    with tempfile.TemporaryDirectory() as folder:
        archs = list(dict.fromkeys(args.arch))
        tasks = [(archs, spec, ptxas, folder) for spec in kernel.specialisations()]
        with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            per_spec = list(pool.map(check, tasks))
    rows = sorted((row for rows in per_spec for row in rows), key=lambda row: archs.index(row["arch"]))

    header = ("arch", "kernel", "threads", "regs", "smem B", "spill st/ld", "blocks/SM", "warps/SM", "occupancy", "limited by")
    lines = [(r["arch"], r["kernel"], str(r["threads"]), str(r["registers"]), str(r["shared"]),
              f"{r['spill_stores']}/{r['spill_loads']}", str(r["blocks"]), str(r["warps"]),
              f"{r['occupancy']:.0%}", r["limiter"]) for r in rows]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for line in lines:
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))

    failed = [r for r in rows if r["problems"]]
    for r in failed:
        print(f"FAIL {r['arch']} {r['kernel']}: {'; '.join(r['problems'])}", file=sys.stderr)
    print(f"{len(rows)} kernels checked, {len(failed)} failed (spills, ptxas errors or > {STATIC_SHARED_LIMIT} "
          f"bytes of static shared memory)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
