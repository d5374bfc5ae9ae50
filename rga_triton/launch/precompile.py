"""Compile every config of an autotune space at once, before the autotuner times them one by one.

Triton's autotuner compiles each config the first time it times it, serially: with 16 to 32
configs per kernel and shape, a new shape costs one to two minutes of compilation on an H100
(bench/results/nvidia_h100_80gb_hbm3/NOTES.md). Compilation spends most of its time outside
the GIL (MLIR passes, LLVM, ptxas), so compiling the configs on a thread pool first, through
Triton's ``AsyncCompileMode`` (Triton >= 3.4), leaves the autotuner only cache hits to time.

This is an optimisation and nothing depends on it: where ``AsyncCompileMode`` is missing,
or a compile fails here, the autotuner compiles as it always does.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import triton

_failed_once: list[str] = []


def compile_threads() -> int:
    """Threads for concurrent compilation: ``RGA_TRITON_COMPILE_THREADS``, else up to 8 (0 or 1: off)."""
    value = os.environ.get("RGA_TRITON_COMPILE_THREADS")
    if value is None:
        return min(8, os.cpu_count() or 1)
    try:
        return max(0, int(value))
    except ValueError:
        raise ValueError(f"RGA_TRITON_COMPILE_THREADS must be an integer, got {value!r}") from None


def config_kwargs(config: triton.Config) -> dict:
    """A config's launch keyword arguments: block sizes plus num_warps, num_stages and the rest."""
    if hasattr(config, "all_kwargs"):
        return config.all_kwargs()
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _async_mode(mode, pool):
    """``AsyncCompileMode`` that drops a config failing to compile (the autotuner then meets it
    itself); Triton releases before ``ignore_errors`` existed raise at the end instead."""
    try:
        return mode(pool, ignore_errors=True)
    except TypeError:
        return mode(pool)


def precompile(fn, configs: list[triton.Config], grid, args: tuple, kwargs: dict) -> int:
    """Compile ``fn`` for each config with these arguments, concurrently; returns how many were submitted.

    Nothing is launched. Returns 0 (and the autotuner compiles by itself) when there is at most
    one config, one thread, or no ``AsyncCompileMode`` in this Triton.
    """
    mode = getattr(triton, "AsyncCompileMode", None)
    threads = min(compile_threads(), len(configs))
    if mode is None or threads < 2:
        return 0
    try:
        with ThreadPoolExecutor(threads) as pool, _async_mode(mode, pool):
            for config in configs:
                fn.warmup(*args, **kwargs, **config_kwargs(config), grid=grid)
    except Exception as exc:  # noqa: BLE001 - the autotuner compiles serially instead
        if not _failed_once:
            _failed_once.append(repr(exc))
            warnings.warn(f"rga_triton: concurrent compilation failed ({exc!r}); configs compile one by one",
                          stacklevel=3)
        return 0
    return len(configs)
