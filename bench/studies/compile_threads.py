"""How well Triton compilation scales over threads: the premise of ``rga_triton/launch/precompile.py``.

    python bench/studies/compile_threads.py --cases 16 --threads 2

Compiles the first ``--cases`` kernel variants of ``bench/lib/compile_kernels.py`` for sm_90 (no GPU
needed) serially, then on a pool of ``--threads`` threads, each time into an empty Triton
cache, and prints both times. Run without TRITON_INTERPRET. A ratio near the thread count
means compilation runs outside the GIL, so precompiling a kernel's configs concurrently
before autotuning pays.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def timed_compile(cases, threads: int) -> float:
    """Seconds to compile ``cases`` into a fresh cache with ``threads`` threads (1: serially)."""
    from bench.lib import compile_kernels
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="rga_compile_")
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda case: compile_kernels.compile_case(*case[1:]), cases))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=16, help="kernel variants to compile (default 16)")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    from rga_triton.common.settings import interpreting

    if interpreting():
        parser.error("run without TRITON_INTERPRET: the interpreter compiles nothing")
    if args.cases < 1 or args.threads < 1:
        parser.error(f"--cases and --threads must be positive, got {args.cases} and {args.threads}")
    from bench.lib import compile_kernels
    cases = [case for case in compile_kernels.cases() if case[4] == 90][:args.cases]
    serial = timed_compile(cases, 1)
    pooled = timed_compile(cases, args.threads)
    print(f"{len(cases)} kernel variants for sm_90: {serial:.1f} s serially, {pooled:.1f} s on "
          f"{args.threads} threads (x{serial / pooled:.2f}; {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
