"""Registers, spilled bytes and shared memory of every kernel config, for a CUDA architecture, without a GPU.

A thread has at most 255 registers; what does not fit spills to local memory, which is cached but
far slower than registers. A config that spills in a kernel's inner loop is a slow config, and a
kernel whose space spills everywhere needs smaller tiles or more warps. Triton lowers each config to
PTX, and the ptxas Triton bundles reports per kernel "Used N registers" and "X bytes spill stores"
(``ptxas -v``). The configs are each tuned kernel's whole autotune space (block sizes x num_warps x
num_stages), with float32 operands and 3xTF32 dots (the heaviest case), the usual constexpr switches
(``bench/lib/compile_kernels.py``) and, where a kernel has a hidden layer, also the widest one. The
numbers are this Triton's and its ptxas's; a GPU machine's Triton may allocate a little differently.

    python bench/studies/kernel_resources.py                      # sm_90, every kernel, CSV + per-kernel summary
    python bench/studies/kernel_resources.py --arch 80 --kernels _gate_logit_kernel --out /tmp/r.csv
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
from rga_triton.launch import tuned  # noqa: E402

COLUMNS = ["kernel", "variant", "blocks", "num_warps", "num_stages", "registers", "spill_store_bytes",
           "spill_load_bytes", "shared_bytes", "error"]
UNTUNED_LAUNCH = (4, 3)
"""num_warps, num_stages of the kernels launched without autotuning (Triton's defaults)."""


def ptxas(arch: int) -> str:
    """The ptxas Triton itself runs for ``arch`` (newer Triton: one per architecture family)."""
    from triton.backends.nvidia import compiler
    if hasattr(compiler, "get_ptxas"):
        return compiler.get_ptxas(arch).path
    import triton
    return triton.knobs.nvidia.ptxas.path


def launch_settings(name: str, blocks: dict) -> list[tuple[int, int]]:
    """(num_warps, num_stages) pairs the kernel's space holds for these block sizes."""
    if name not in tuned.KERNELS:
        return [UNTUNED_LAUNCH]
    return [(w, s) for b, w, s in tuned.KERNELS[name].allowed if b == {k: blocks[k] for k in b}]


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


def measure(names: list[str], arch: int, quiet: bool = False) -> list[dict]:
    tool = ptxas(arch)
    rows, start = [], time.perf_counter()
    for name in names:
        space_keys = set(compile_kernels.kernel(name)[1][0])
        for variant, constexprs in compile_kernels.config_variants(name):
            blocks = {k: v for k, v in constexprs.items() if k in space_keys}
            for warps, stages in launch_settings(name, blocks):
                row = dict(kernel=name, variant=variant.removeprefix(name + "-"),
                           blocks=" ".join(f"{k}={v}" for k, v in sorted(blocks.items())),
                           num_warps=warps, num_stages=stages)
                try:
                    compiled = compile_kernels.compile_case(name, constexprs, False, arch, warps, stages)
                    row.update(usage(compiled.asm["ptx"], arch, tool), shared_bytes=compiled.metadata.shared)
                except Exception as exc:  # noqa: BLE001 - a row per config, whatever happens
                    row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                rows.append(row)
                if not quiet:
                    spill = row.get("spill_store_bytes")
                    print(f"[{len(rows)}] {name} {row['variant']} w{warps} s{stages}: "
                          + (f"{row['registers']} registers, {spill} B spilled, {row['shared_bytes']} B shared"
                             if "error" not in row else row["error"])
                          + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    return rows


def summary(rows: list[dict]) -> list[str]:
    """Per kernel: configs that spill nothing, the worst spill, and whether the first config (the one a
    pinned launch takes) spills."""
    lines = ["| kernel | configs spilling nothing | most spilled (B) | first config spills (B) |", "|---|---|---|---|"]
    for name in dict.fromkeys(r["kernel"] for r in rows):
        mine = [r for r in rows if r["kernel"] == name and "error" not in r]
        free = sum(r["spill_store_bytes"] == 0 for r in mine)
        worst = max((r["spill_store_bytes"] for r in mine), default=0)
        first = mine[0]["spill_store_bytes"] if mine else "-"
        lines.append(f"| {name} | {free} / {len(mine)} | {worst} | {first} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: Hopper)")
    parser.add_argument("--kernels", default="", help="comma-separated kernel names (default: all)")
    parser.add_argument("--out", default=None,
                        help="CSV path (default bench/results/kernel_resources_sm<arch>_triton<version>.csv)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    known = compile_kernels.kernel_names()
    names = [n.strip() for n in args.kernels.split(",") if n.strip()] or known
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"--kernels: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    rows = measure(names, args.arch, args.quiet)
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
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
