"""Timing and peak memory of one step.

GPU: ``triton.testing.do_bench`` (L2 flushed before every run, gradients reset outside the
timed region) asked for quantiles (0.5, 0.2, 0.8); the same signature works on Triton 3.0
through 3.9. Without Triton, if its signature lacks ``quantiles``, or for steps slower than
DO_BENCH_MAX_MS, CUDA events around each call.
CPU: ``time.perf_counter``; peak memory from the live tensors (``live_memory.py``). The
implementations of one case are timed interleaved (:func:`interleaved`): one call of each per
round, so every implementation sees the same load, and each speed-up is the median of the
per-round ratios, not a ratio of two medians taken minutes apart on a machine whose load moved.
"""
from __future__ import annotations

import gc
import inspect
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bench.lib.live_memory import peak_tensor_bytes

# No row spends much more than this timing (slow reference cases); at least MIN_RUNS runs.
BUDGET_S = 3.0
MIN_RUNS = 3
# Slower steps skip do_bench (its 5 estimation calls and L2 flush cost time and change nothing there).
DO_BENCH_MAX_MS = 100.0


# Interleaved CPU timing: rounds stop early once the 95 % confidence interval of every median
# (ratio, or time without one) spans at most SETTLED_SPREAD (high / low); one still wider than
# NOISY_SPREAD when the case's budget runs out marks its row noisy. Without samples (do_bench on
# a GPU) the row's p80 / p20 stands in for the interval.
SETTLED_SPREAD = 1.1
NOISY_SPREAD = 1.5
CASE_BUDGET_S = BUDGET_S
"""Seconds of interleaved rounds per timed implementation of a case (3 implementations: 9 s)."""


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int
    # Paired (interleaved) timing only: the baseline's time over this one's, round by round.
    ratio_median: float | None = None
    ratio_p20: float | None = None
    ratio_p80: float | None = None
    # 95 % confidence interval of the median ratio (paired), else of the median time; None without samples.
    ci_low: float | None = None
    ci_high: float | None = None
    noisy: bool | None = None


def spread(p20: float | None, p80: float | None) -> float | None:
    """p80 / p20: 1 for identical runs, 1.5 when the 80th percentile is 50 % above the 20th."""
    return p80 / p20 if p20 and p80 and p20 > 0 else None


def median_ci(values: Sequence[float]) -> tuple[float, float]:
    """95 % confidence interval of the median of ``values`` (order statistics, no assumption on the
    distribution): the sorted values at ranks n/2 -+ 0.98 sqrt(n). Narrows as runs accumulate, however
    wide the spread of single runs on a busy machine."""
    a = sorted(values)
    n = len(a)
    k = max(0, int((n - 1.96 * n ** 0.5) / 2))
    return a[k], a[n - 1 - k]


def is_noisy(t: Timing) -> bool:
    """A row whose median stayed uncertain: the confidence interval of its paired ratio's (or time's) median
    spans more than NOISY_SPREAD (the ratio is known to no better than about +-20 %); without samples, its
    p80 / p20 does."""
    s = spread(t.ci_low, t.ci_high) if t.ci_low is not None else spread(t.p20_ms, t.p80_ms)
    return s is not None and s > NOISY_SPREAD


def machine_load() -> tuple[float | None, int]:
    """(1-minute load average or None where the OS has none, logical cores)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    return load, os.cpu_count() or 1


def _reset(tensors: Sequence[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def _summary(times_ms: list[float]) -> Timing:
    a = np.asarray(times_ms, dtype=np.float64)
    return Timing(float(np.median(a)), float(np.percentile(a, 20)), float(np.percentile(a, 80)), len(a),
                  ci_low=median_ci(times_ms)[0], ci_high=median_ci(times_ms)[1])


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


def _percentiles(values: list[float]) -> tuple[float, float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(np.median(a)), float(np.percentile(a, 20)), float(np.percentile(a, 80))


def interleaved(steps: dict[str, tuple[Callable[[], object], Sequence[torch.Tensor] | None]],
                baseline: str | None, min_rounds: int, budget_s: float, max_rounds: int = 1000,
                clock: Callable[[], float] = time.perf_counter) -> tuple[dict[str, Timing], dict[str, BaseException]]:
    """Time ``steps`` (name -> (fn, tensors whose .grad to reset)) on the CPU, interleaved.

    One untimed call of each, then rounds of one timed call of each, in forward order and
    reversed order on alternate rounds (no step always runs right after the same one). Each
    round gives every step a ratio: the ``baseline``'s time in that round over the step's. Rounds
    go on until at least ``min_rounds`` (and MIN_RUNS) are done and the confidence interval of every
    median ratio spans at most SETTLED_SPREAD, or until ``budget_s`` seconds have passed (never under
    MIN_RUNS rounds), or ``max_rounds``. Without a baseline (or for the baseline itself) the interval
    of the median time decides. Returns ({name: Timing with the ratio's median, p20, p80, interval
    and ``noisy``},
    {name: exception} for steps that raised; those leave the rotation).
    """
    names = list(steps)
    errors: dict[str, BaseException] = {}
    times: dict[str, list[float]] = {n: [] for n in names}

    def call(name: str) -> float | None:
        fn, resets = steps[name]
        _reset(resets)
        try:
            start = clock()
            fn()
            return (clock() - start) * 1e3
        except Exception as exc:   # noqa: BLE001 - the row records it; the others go on
            errors[name] = exc
            names.remove(name)
            return None

    for name in list(names):      # warm-up
        call(name)
    ratios: dict[str, list[float]] = {n: [] for n in names if n != baseline}

    def spreads() -> list[float]:
        out = []
        paired = baseline in names and len(names) > 1
        for n in names:
            if paired and n == baseline:
                continue          # its times carry the load; the pairs cancel it
            values = ratios[n] if paired else times[n]
            out.append(spread(*median_ci(values)) or 1.0)
        return out

    start, rounds = clock(), 0
    while names and rounds < max_rounds:
        order = names if rounds % 2 == 0 else names[::-1]
        this = {}
        for name in list(order):
            ms = call(name)
            if ms is not None:
                this[name] = ms
                times[name].append(ms)
        rounds += 1
        if baseline in this:
            for n, ms in this.items():
                if n != baseline and ms > 0:
                    ratios[n].append(this[baseline] / ms)
        if rounds >= max(min_rounds, MIN_RUNS) and max(spreads(), default=1.0) <= SETTLED_SPREAD:
            break
        if rounds >= MIN_RUNS and clock() - start > budget_s:
            break
    out = {}
    for n in list(times):
        if not times[n]:
            continue
        t = _summary(times[n])
        if ratios.get(n):
            t.ratio_median, t.ratio_p20, t.ratio_p80 = _percentiles(ratios[n])
            t.ci_low, t.ci_high = median_ci(ratios[n])
        t.noisy = is_noisy(t)
        out[n] = t
    return out, errors


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
