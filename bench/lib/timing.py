"""Timing and peak memory of one step.

GPU: ``triton.testing.do_bench`` (L2 flushed before every run, gradients reset outside the
timed region) asked for quantiles (0.5, 0.2, 0.8); the same signature works on Triton 3.0
through 3.9. Without Triton, if its signature lacks ``quantiles``, or for steps slower than
DO_BENCH_MAX_MS, CUDA events around each call.
CPU: ``time.perf_counter`` after a warm-up call; peak memory from the live tensors (``live_memory.py``).
"""
from __future__ import annotations

import gc
import inspect
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from bench.lib.live_memory import peak_tensor_bytes

# No row spends much more than this timing (slow reference cases); at least MIN_RUNS runs.
BUDGET_S = 3.0
MIN_RUNS = 3
# Slower steps skip do_bench (its 5 estimation calls and L2 flush cost time and change nothing there).
DO_BENCH_MAX_MS = 100.0


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int


def _reset(tensors: Sequence[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def _summary(times_ms: list[float]) -> Timing:
    a = np.asarray(times_ms, dtype=np.float64)
    return Timing(float(np.median(a)), float(np.percentile(a, 20)), float(np.percentile(a, 80)), len(a))


def _do_bench():
    """``triton.testing.do_bench`` if it takes ``quantiles`` and ``grad_to_none``, else None."""
    try:
        from triton.testing import do_bench
    except Exception:   # noqa: BLE001 - no Triton, or a broken install: fall back to CUDA events
        return None
    params = inspect.signature(do_bench).parameters
    return do_bench if {"quantiles", "grad_to_none", "warmup", "rep"} <= params.keys() else None


def _runs(repeat: int, estimate_ms: float) -> int:
    """How many timed runs: ``repeat``, fewer for slow steps (time budget), never under MIN_RUNS."""
    return max(MIN_RUNS, min(repeat, int(BUDGET_S * 1e3 / max(estimate_ms, 1e-3))))


def time_fn(fn: Callable[[], object], device: torch.device, repeat: int,
            grad_to_none: Sequence[torch.Tensor] | None = None, estimate_ms: float | None = None) -> Timing:
    """Median, 20th and 80th percentile wall time of ``fn()`` in ms; ``fn`` is called at least once first.

    ``estimate_ms`` (a previous measurement of one call) saves an estimation call on the CPU.
    """
    if device.type == "cuda":
        return _time_cuda(fn, repeat, grad_to_none, estimate_ms)
    if estimate_ms is None:
        _reset(grad_to_none)
        start = time.perf_counter()
        fn()
        estimate_ms = (time.perf_counter() - start) * 1e3
    _reset(grad_to_none)
    fn()   # warm-up (caches, allocator)
    times = []
    for _ in range(_runs(repeat, estimate_ms)):
        _reset(grad_to_none)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return _summary(times)


def _time_cuda(fn, repeat, grad_to_none, estimate_ms) -> Timing:
    if estimate_ms is None:
        _reset(grad_to_none)
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        estimate_ms = (time.perf_counter() - start) * 1e3
    runs = _runs(repeat, estimate_ms)
    do_bench = _do_bench() if estimate_ms < DO_BENCH_MAX_MS else None
    if do_bench is not None:
        # do_bench re-estimates the time itself and runs about rep / estimate times.
        rep = max(1.0, runs * estimate_ms)
        q = do_bench(fn, warmup=min(25.0, max(1.0, 2 * estimate_ms)), rep=rep,
                     grad_to_none=list(grad_to_none) if grad_to_none else None, quantiles=[0.5, 0.2, 0.8])
        return Timing(float(q[0]), float(q[1]), float(q[2]), runs)
    _reset(grad_to_none)
    fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for s, e in zip(starts, ends):
        _reset(grad_to_none)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return _summary([s.elapsed_time(e) for s, e in zip(starts, ends)])


HOST_CALLS = 5
"""Calls timed back to back by :func:`host_ms` (their launches must fit the GPU's launch queue)."""
SPIN_CYCLES = 100_000_000
"""GPU cycles of the spin kernel that keeps the GPU busy while the host issues a step (~50 ms)."""


def host_ms(fn: Callable[[], object], device: torch.device,
            grad_to_none: Sequence[torch.Tensor] | None = None) -> float | None:
    """The host's time to issue one ``fn()`` on CUDA, in ms: Python, dispatch and kernel launches,
    measured while a spin kernel (``torch.cuda._sleep``) keeps the GPU busy, so no launch waits
    for the GPU. A step whose host time reaches its GPU time is host-bound: timed alone, the GPU
    idles between its kernels; inside a model, earlier work queued on the GPU hides that.
    None on the CPU, without the spin kernel, or when the call waited for the GPU anyway (a
    synchronising step: its host time cannot be told from the spin's)."""
    if device.type != "cuda" or not hasattr(torch.cuda, "_sleep"):
        return None
    _reset(grad_to_none)
    fn()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    torch.cuda._sleep(SPIN_CYCLES)
    torch.cuda.synchronize(device)
    spin_ms = (time.perf_counter() - start) * 1e3
    times = []
    for _ in range(HOST_CALLS):
        _reset(grad_to_none)
        torch.cuda._sleep(SPIN_CYCLES)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize(device)
    host = float(np.median(times))
    return host if host < 0.5 * spin_ms else None


def peak_memory(fn: Callable[[], object], device: torch.device,
                grad_to_none: Sequence[torch.Tensor] | None = None,
                held: Sequence[torch.Tensor] | None = None) -> tuple[float | None, float]:
    """(peak MB the step allocates beyond what was allocated before it, wall ms of the call).

    On CUDA: ``max_memory_allocated`` minus ``memory_allocated`` before the call (inputs,
    parameters and anything else alive). Gradients are reset first, so a train step's
    peak includes the gradients it creates. On the CPU: the peak bytes of live tensors that
    ATen ops return (``live_memory.py``), beyond ``held`` (the inputs, parameters and
    buffers); None where ``held`` is None (a compiled step, whose kernels ATen never sees).
    """
    _reset(grad_to_none)
    gc.collect()
    if device.type != "cuda":
        start = time.perf_counter()
        if held is None:
            fn()
            return None, (time.perf_counter() - start) * 1e3
        peak = peak_tensor_bytes(fn, held)
        return peak / 2 ** 20, (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize(device)
    elapsed = (time.perf_counter() - start) * 1e3
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2 ** 20, elapsed
