"""Timing and peak memory of one step.

GPU: ``triton.testing.do_bench`` (L2 flushed before every run, gradients reset outside the
timed region) asked for quantiles (0.5, 0.2, 0.8); the same signature works on Triton 3.0
through 3.9. Without Triton, if its signature lacks ``quantiles``, or for steps slower than
DO_BENCH_MAX_MS, CUDA events around each call.
CPU: ``time.perf_counter``; peak memory from the live tensors (``live_memory.py``). The
implementations of one case are timed interleaved (:func:`interleaved`): one call of each per
round, so every implementation sees the same load, and each speed-up is the median of the
per-round ratios (less the rounds a load spike hit), not a ratio of two medians taken minutes
apart on a machine whose load moved.
"""
from __future__ import annotations

import gc
import inspect
import math
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


# Interleaved CPU timing: each implementation's ratio comes from its rounds paired with the
# baseline's, less the pairs a load spike hit (pair time above SPIKE_FACTOR x the CLEAN_QUANTILE-th
# percentile of pair times). Rounds stop early once the 95 % confidence interval of every median
# ratio (or time, without one) spans at most SETTLED_SPREAD (high / low); one still wider than NOISY_SPREAD when
# the case's budget runs out, or one left with fewer than MIN_PAIRS pairs (too few for a 95 %
# interval), marks its row noisy. Without samples (do_bench on a GPU) the row's p80 / p20 stands in
# for the interval.
SETTLED_SPREAD = 1.1
NOISY_SPREAD = 1.5
SPIKE_FACTOR = 2.0
CLEAN_QUANTILE = 10
MIN_PAIRS = 6
# ...and a row whose kept pair ratios' middle half (p75 / p25) spans more than PAIRS_SPREAD is noisy
# however narrow its median's interval: its pairs disagree (a ratio with two values, or load that
# no spike filter removes), so the median depends on their mix, not on the code alone.
PAIRS_SPREAD = 2.0
CASE_BUDGET_S = BUDGET_S
"""Seconds of interleaved rounds per timed implementation of a case (3 implementations: 9 s)."""
BUDGET_STRETCH = 4.0
"""A case that would leave a row noisy when its budget ends (a busy machine: too few pairs, or too
wide an interval or middle half) goes on until none would, up to this many times its budget."""


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
    # Paired timing only: the rounds the ratio comes from (``runs`` less those a load spike hit), and
    # the p75 / p25 of their ratios.
    pairs: int | None = None
    pairs_spread: float | None = None


def spread(p20: float | None, p80: float | None) -> float | None:
    """p80 / p20: 1 for identical runs, 1.5 when the 80th percentile is 50 % above the 20th."""
    return p80 / p20 if p20 and p80 and p20 > 0 else None


def median_ci(values: Sequence[float]) -> tuple[float, float]:
    """95 % confidence interval of the median of ``values`` (order statistics, no assumption on the
    distribution): the sorted values a[k] and a[n-1-k] for the largest k whose interval holds the median
    with probability 1 - 2 P(Binomial(n, 1/2) <= k) >= 95 %. Narrows as runs accumulate, however wide the
    spread of single runs on a busy machine. Under 6 values no interval reaches 95 %: (min, max)."""
    a = sorted(values)
    n = len(a)
    k, tail = 0, 0.0
    for j in range(n // 2):
        tail += math.exp(math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) - n * math.log(2))
        if 1 - 2 * tail < 0.95:
            break
        k = j
    return a[k], a[n - 1 - k]


def paired_ratios(base_ms: Sequence[float], ms: Sequence[float]) -> list[float]:
    """The baseline's time over the step's, round by round, less the rounds a load spike hit: those whose
    pair time (baseline + step) exceeds SPIKE_FACTOR x the CLEAN_QUANTILE-th percentile of the pair times.
    A paired ratio is about the code, so a pair the machine stalled says nothing about it. The yardstick is
    the fastest rounds, not the median one: on a busy machine most rounds are hit, the median pair is a hit
    one, and a median yardstick keeps a mix of hit and clean pairs whose ratios disagree by up to the load
    factor. The fastest tenth are the rounds the load left alone, when any were; when none were, few pairs
    stay, and the row is noisy (:func:`is_noisy`)."""
    totals = [b + t for b, t in zip(base_ms, ms)]
    if not totals:
        return []
    limit = SPIKE_FACTOR * float(np.percentile(totals, CLEAN_QUANTILE))
    return [b / t for b, t, total in zip(base_ms, ms, totals) if t > 0 and total <= limit]


def quartile_spread(values: Sequence[float]) -> float:
    """p75 / p25 of positive ``values``: how far the middle half of the pairs' ratios spreads."""
    return float(np.percentile(values, 75) / np.percentile(values, 25))


def log_ratio_ci(ratios: Sequence[float]) -> tuple[float, float, float]:
    """(median, low, high) of ``ratios``: the median and its 95 % interval (:func:`median_ci`), taken on
    log-ratios (the same order statistics; logs make x2 and x0.5 equally far from x1)."""
    logs = [math.log(r) for r in ratios]
    low, high = median_ci(logs)
    return math.exp(float(np.median(logs))), math.exp(low), math.exp(high)


def is_noisy(t: Timing) -> bool:
    """A row whose median stayed uncertain: the confidence interval of its paired ratio's (or time's) median
    spans more than NOISY_SPREAD (the ratio is known to no better than about +-20 %), or its ratio rests on
    fewer than MIN_PAIRS unspiked pairs (too few for a 95 % interval), or the middle half of those pairs'
    ratios spans more than PAIRS_SPREAD; without samples, its p80 / p20 decides."""
    if t.pairs is not None and t.pairs < MIN_PAIRS:
        return True
    if t.pairs_spread is not None and t.pairs_spread > PAIRS_SPREAD:
        return True
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


def interleaved(steps: dict[str, tuple[Callable[[], object], Sequence[torch.Tensor] | None]],
                baseline: str | None, min_rounds: int, budget_s: float, max_rounds: int = 1000,
                clock: Callable[[], float] = time.perf_counter) -> tuple[dict[str, Timing], dict[str, BaseException]]:
    """Time ``steps`` (name -> (fn, tensors whose .grad to reset)) on the CPU, interleaved.

    One untimed call of each, then rounds of one timed call of each, in forward order and
    reversed order on alternate rounds (no step always runs right after the same one). Each
    round pairs every step with the ``baseline``; its ratio is the median of the baseline's time over
    the step's in the pairs no load spike hit (:func:`paired_ratios`), with its 95 % interval
    (:func:`log_ratio_ci`). Rounds go on until at least ``min_rounds`` (and MIN_RUNS) are done and every
    ratio rests on MIN_PAIRS pairs with an interval spanning at most SETTLED_SPREAD, or until
    ``budget_s`` seconds have passed (never under MIN_RUNS rounds; while a row would be noisy, rounds
    go on up to BUDGET_STRETCH x ``budget_s``), or ``max_rounds``. Without a baseline (or for the
    baseline itself) the interval of the median time decides. Returns ({name: Timing with the ratio's
    median, p20, p80, interval, pairs and ``noisy``}, {name: exception} for steps that raised; those
    leave the rotation).
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
    # name -> the rounds both it and the baseline ran: (baseline ms, its ms)
    pairs: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names if n != baseline}

    def ratios(name: str) -> list[float]:
        return paired_ratios(*pairs[name])

    def settled() -> bool:
        paired = baseline in names and len(names) > 1
        for n in names:
            if paired and n == baseline:
                continue          # its times carry the load; the pairs cancel it
            values = ratios(n) if paired else times[n]
            if paired and (len(values) < MIN_PAIRS or quartile_spread(values) > PAIRS_SPREAD):
                return False
            if values and (spread(*median_ci(values)) or 1.0) > SETTLED_SPREAD:
                return False
        return True

    def decided() -> bool:
        """No row would be noisy now: the budget may end the rounds without a stretch."""
        if baseline not in names:
            return True
        for n in names:
            if n != baseline:
                values = ratios(n)
                if len(values) < MIN_PAIRS or (spread(*median_ci(values)) or 1.0) > NOISY_SPREAD \
                        or quartile_spread(values) > PAIRS_SPREAD:
                    return False
        return True

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
                if n != baseline:
                    pairs[n][0].append(this[baseline])
                    pairs[n][1].append(ms)
        if rounds >= max(min_rounds, MIN_RUNS) and settled():
            break
        elapsed = clock() - start
        if rounds >= MIN_RUNS and elapsed > budget_s and (decided() or elapsed > BUDGET_STRETCH * budget_s):
            break
    out = {}
    for n in list(times):
        if not times[n]:
            continue
        t = _summary(times[n])
        kept = ratios(n) if n in pairs else []
        if kept:
            t.ratio_median, t.ci_low, t.ci_high = log_ratio_ci(kept)
            t.ratio_p20, t.ratio_p80 = (float(np.percentile(kept, q)) for q in (20, 80))
            t.pairs = len(kept)
            t.pairs_spread = quartile_spread(kept)
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
