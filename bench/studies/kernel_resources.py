"""Registers, spilled bytes and shared memory of every kernel config, for a CUDA architecture, without a GPU.

A thread has at most 255 registers; what does not fit spills to local memory, which is cached but
far slower than registers. A config that spills in a kernel's inner loop is a slow config, and a
kernel whose space spills everywhere needs smaller tiles or more warps. Triton lowers each config to
PTX, and the ptxas Triton bundles reports per kernel "Used N registers" and "X bytes spill stores"
(``ptxas -v``). The configs are each tuned kernel's whole autotune space (block sizes x num_warps x
num_stages) with the usual constexpr switches (``bench/lib/compile_kernels.py``), in each precision
case launches use (:data:`PRECISIONS`: float32 operands with 3xTF32 dots, float32 with single TF32
dots, bfloat16 operands; a kernel without a ``DOT_PRECISION`` switch or half-precision operands has
fewer) and, where a kernel has a hidden layer, also the widest one (3xTF32 only). Each row also says

- ``occupancy_warps``: warps of this kernel resident per SM, limited by registers (allocated per warp
  in units of 256), shared memory (plus 1 KB reserved per block) and the SM's warp and block limits
  (:data:`SM_LIMITS`);
- ``dot_instruction``: what the kernel's ``tl.dot`` became in the PTX: ``wgmma`` (Hopper's warpgroup
  MMA), ``mma`` (``mma.sync``, Ampere's), ``fma`` (no tensor core), ``none`` (no dot in the kernel).

The numbers are this Triton's and its ptxas's; a GPU machine's Triton may allocate a little differently.

    python bench/studies/kernel_resources.py                      # sm_90, every kernel, CSV + per-kernel summary
    python bench/studies/kernel_resources.py --arch 80 --kernels _gate_logit_kernel --out /tmp/r.csv
    python bench/studies/kernel_resources.py --first --check      # first configs only; exit 1 on a spill
    python bench/studies/kernel_resources.py --jobs 4             # four compiles at a time (about 800 rows)
    python bench/studies/kernel_resources.py --summary bench/results/kernel_resources_sm90_triton3.9.0.csv
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)          # before Triton is imported: @triton.jit must compile
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from bench.lib import compile_kernels  # noqa: E402
from rga_triton.common.settings import MAX_HIDDEN  # noqa: E402
from rga_triton.launch import tuned  # noqa: E402

COLUMNS = ["kernel", "variant", "precision", "blocks", "num_warps", "num_stages", "registers", "spill_store_bytes",
           "spill_load_bytes", "shared_bytes", "occupancy_warps", "dot_instruction", "error"]
PRECISIONS = {"float32-3xtf32": ("tf32x3", False), "float32-tf32": ("tf32", False), "bfloat16": ("tf32x3", True)}
"""Precision case -> (DOT_PRECISION, half-precision operands)."""
SM_LIMITS = {90: dict(registers=65536, shared=233472, warps=64, blocks=32),
             80: dict(registers=65536, shared=167936, warps=64, blocks=32),
             86: dict(registers=65536, shared=102400, warps=48, blocks=16),
             89: dict(registers=65536, shared=102400, warps=48, blocks=24)}
"""Per SM: 32-bit registers, shared memory bytes, resident warps, resident blocks (CUDA occupancy tables)."""


def ptxas(arch: int) -> str:
    """The ptxas Triton itself runs for ``arch`` (newer Triton: one per architecture family)."""
    from triton.backends.nvidia import compiler
    if hasattr(compiler, "get_ptxas"):
        return compiler.get_ptxas(arch).path
    import triton
    return triton.knobs.nvidia.ptxas.path


def launch_settings(name: str, blocks: dict) -> list[tuple[int, int]]:
    """(num_warps, num_stages) pairs the kernel's space holds for these block sizes, in the space's order."""
    if name not in tuned.KERNELS:
        return [compile_kernels.untuned_launch(name)]
    return [(w, s) for b, w, s in tuned.KERNELS[name].allowed if b == {k: blocks[k] for k in b}]


def occupancy_warps(registers: int, shared: int, num_warps: int, arch: int) -> int:
    """Warps of one kernel resident per SM: whole blocks that fit the register file, the shared memory
    and the SM's warp and block limits."""
    limits = SM_LIMITS.get(arch, SM_LIMITS[80] if arch < 90 else SM_LIMITS[90])
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    blocks = min(limits["blocks"], limits["warps"] // num_warps, limits["registers"] // (per_warp * num_warps))
    if shared:
        blocks = min(blocks, limits["shared"] // (shared + 1024))
    return blocks * num_warps


def dot_instruction(ptx: str, ttir: str) -> str:
    """'wgmma', 'mma', 'fma' or 'none': what the kernel's dots lowered to."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "fma" if "tt.dot" in ttir else "none"


def precision_cases(name: str) -> list[str]:
    """The precision cases this kernel has: TF32 needs a DOT_PRECISION switch, bfloat16 half pointers."""
    jit = compile_kernels.kernel(name)[0]
    out = ["float32-3xtf32"]
    if "DOT_PRECISION" in compile_kernels.constexpr_args(jit):
        out.append("float32-tf32")
    if compile_kernels.has_half_operands(name):
        out.append("bfloat16")
    return out


def usage(ptx: str, arch: int, tool: str) -> dict:
    """ptxas -v's report on one kernel's PTX: registers and spilled bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run([tool, f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v", path,
                               "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    text = done.stdout + done.stderr
    if done.returncode:
        raise RuntimeError(text.strip()[-300:])
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return dict(registers=int(registers.group(1)), spill_store_bytes=int(spills.group(1)),
                spill_load_bytes=int(spills.group(2)))


def measure_one(name: str, variant: str, precision: str, constexprs: dict, warps: int, stages: int, arch: int,
                tool: str) -> dict:
    """One row: compile one (kernel, config, precision case) for ``arch`` and read what ptxas reports."""
    dot, half = PRECISIONS[precision]
    space_keys = set(compile_kernels.kernel(name)[1][0])
    blocks = {k: v for k, v in constexprs.items() if k in space_keys}
    values = dict(constexprs)
    if "DOT_PRECISION" in values:
        values["DOT_PRECISION"] = dot
    if half and "HAS_GATE" in values:       # a gated half-precision operand takes its own branch (hi + lo)
        values["HAS_GATE"] = True
    row = dict(kernel=name, variant=variant.removeprefix(name + "-"), precision=precision,
               blocks=" ".join(f"{k}={v}" for k, v in sorted(blocks.items())), num_warps=warps, num_stages=stages)
    try:
        compiled = compile_kernels.compile_case(name, values, half, arch, warps, stages)
        shared = compiled.metadata.shared
        row.update(usage(compiled.asm["ptx"], arch, tool), shared_bytes=shared)
        row["occupancy_warps"] = occupancy_warps(row["registers"], shared, warps, arch)
        row["dot_instruction"] = dot_instruction(compiled.asm["ptx"], compiled.asm.get("ttir", ""))
    except Exception as exc:  # noqa: BLE001 - a row per config, whatever happens
        row["error"] = f"{type(exc).__name__}: {exc}"[:200]
    return row


def _measure_task(task: tuple) -> dict:
    return measure_one(*task)


def measure(names: list[str], arch: int, quiet: bool = False, first: bool = False,
            precisions: list[str] | None = None, widest: bool = True, jobs: int = 1) -> list[dict]:
    """Rows for every (config, precision case) of each kernel; ``first``: the first config only (the one
    pinned and interpreted launches use), at the usual constexprs and hidden width. ``jobs``: compiles run
    in that many processes at once (rows in the same order)."""
    tool = ptxas(arch)
    tasks = []
    for name in names:
        space_keys = set(compile_kernels.kernel(name)[1][0])
        cases = [p for p in precision_cases(name) if precisions is None or p in precisions]
        variants = compile_kernels.config_variants(name)
        if first:
            variants = variants[:1]
        if not widest:
            variants = [(v, c) for v, c in variants if "BLOCK_H=" not in v]
        for variant, constexprs in variants:
            blocks = {k: v for k, v in constexprs.items() if k in space_keys}
            settings = launch_settings(name, blocks)
            for precision in cases if "BLOCK_H=" not in variant else cases[:1]:
                for warps, stages in settings[:1] if first else settings:
                    tasks.append((name, variant, precision, constexprs, warps, stages, arch, tool))
    rows, start = [], time.perf_counter()
    pool = None
    if jobs > 1:
        import concurrent.futures
        import multiprocessing
        pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"))
    try:
        for row in pool.map(_measure_task, tasks) if pool else map(_measure_task, tasks):
            rows.append(row)
            if not quiet:
                print(f"[{len(rows)}/{len(tasks)}] {row['kernel']} {row['variant']} {row['precision']} "
                      f"w{row['num_warps']} s{row['num_stages']}: "
                      + (f"{row['registers']} registers, {row['spill_store_bytes']} B spilled, "
                         f"{row['shared_bytes']} B shared, {row['occupancy_warps']} warps/SM, "
                         f"{row['dot_instruction']}" if "error" not in row else row["error"])
                      + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    finally:
        if pool:
            pool.shutdown()
    return rows


def tile_size(row: dict) -> int:
    """Elements of one program's block sizes multiplied: the work of one step of its inner loop."""
    size = 1
    for part in row["blocks"].split():
        size *= int(part.split("=")[1])
    return size


def best_spill_free(rows: list[dict]) -> dict | None:
    """The spill-free row a GPU is likeliest to pick, as far as registers tell: the largest tile, then wgmma
    over mma, then more resident warps, then fewer registers. Only a GPU's timing decides."""
    free = [r for r in rows if not r.get("error") and int(r["spill_store_bytes"]) == 0]
    return max(free, key=lambda r: (tile_size(r), r["dot_instruction"] == "wgmma", int(r["occupancy_warps"]),
                                    -int(r["registers"])), default=None)


def summary(rows: list[dict]) -> list[str]:
    """Per kernel and precision case (the widest hidden layer apart): configs that spill nothing, the worst
    spill, the first config (the one a pinned launch takes) and the best spill-free one
    (:func:`best_spill_free`): blocks, warps, stages, registers, warps/SM and dot instruction. Rows may come
    from :func:`measure` or from a CSV it wrote."""
    lines = ["| kernel | precision | configs spilling nothing | most spilled (B) | first config: registers, "
             "spilled (B), warps/SM, dot | best spill-free: blocks, warps, stages, registers, warps/SM, dot |",
             "|---|---|---|---|---|---|"]

    def case(r):
        return r["precision"] + (f", BLOCK_H={MAX_HIDDEN}" if "BLOCK_H=" in r["variant"] else "")

    for name in dict.fromkeys(r["kernel"] for r in rows):
        for label in dict.fromkeys(case(r) for r in rows if r["kernel"] == name):
            mine = [r for r in rows if r["kernel"] == name and case(r) == label and not r.get("error")]
            free = sum(int(r["spill_store_bytes"]) == 0 for r in mine)
            worst = max((int(r["spill_store_bytes"]) for r in mine), default=0)
            first = (f"{mine[0]['registers']}, {mine[0]['spill_store_bytes']}, {mine[0]['occupancy_warps']}, "
                     f"{mine[0]['dot_instruction']}" if mine else "-")
            best = best_spill_free(mine)
            best = (f"{best['blocks']}, {best['num_warps']}, {best['num_stages']}, {best['registers']}, "
                    f"{best['occupancy_warps']}, {best['dot_instruction']}" if best else "-")
            lines.append(f"| {name} | {label} | {free} / {len(mine)} | {worst} | {first} | {best} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: Hopper)")
    parser.add_argument("--kernels", default="", help="comma-separated kernel names (default: all)")
    parser.add_argument("--out", default=None,
                        help="CSV path (default bench/results/kernel_resources_sm<arch>_triton<version>.csv)")
    parser.add_argument("--precisions", default="",
                        help=f"comma-separated cases (default all: {', '.join(PRECISIONS)})")
    parser.add_argument("--first", action="store_true", help="only each kernel's first config (pinned launches)")
    parser.add_argument("--no-widest", action="store_true",
                        help=f"skip the BLOCK_H={MAX_HIDDEN} (widest hidden layer) variants")
    parser.add_argument("--check", action="store_true", help="exit 1 when a measured config spills")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes at once (default 1)")
    parser.add_argument("--summary", metavar="CSV", default=None,
                        help="print the summary of a CSV this study wrote, compiling nothing")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.summary:
        with open(args.summary, newline="") as f:
            print("\n".join(summary(list(csv.DictReader(f)))))
        return 0
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()] or None
    if precisions and set(precisions) - set(PRECISIONS):
        parser.error(f"--precisions: choose from {', '.join(PRECISIONS)}")
    known = compile_kernels.kernel_names()
    names = [n.strip() for n in args.kernels.split(",") if n.strip()] or known
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"--kernels: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    rows = measure(names, args.arch, args.quiet, args.first, precisions, widest=not args.no_widest,
                   jobs=args.jobs)
    import triton
    out = args.out or os.path.join(ROOT, "bench", "results",
                                   f"kernel_resources_sm{args.arch}_triton{triton.__version__}.csv")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print("\n".join(summary(rows)))
    print(f"wrote {out}")
    spilled = [r for r in rows if r.get("spill_store_bytes")]
    if args.check and spilled:
        print("spilling: " + "; ".join(f"{r['kernel']} {r['variant']} {r['precision']} w{r['num_warps']} "
                                       f"s{r['num_stages']}: {r['spill_store_bytes']} B" for r in spilled))
    return 1 if any("error" in r for r in rows) or (args.check and spilled) else 0


if __name__ == "__main__":
    sys.exit(main())
