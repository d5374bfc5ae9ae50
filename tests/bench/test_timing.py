"""Interleaved CPU timing (bench/lib/timing.py): paired ratios survive load that moves between rounds;
a ratio whose median stays uncertain is marked noisy. A fake clock: no step really runs."""
from __future__ import annotations

import random

import pytest

from bench.lib import timing


class FakeMachine:
    """A clock, and steps that advance it by their cost times the load of the moment."""

    def __init__(self, load):
        self.now, self.calls, self.load = 0.0, 0, load

    def clock(self) -> float:
        return self.now

    def step(self, seconds: float):
        def fn():
            self.now += seconds * self.load(self.calls)
            self.calls += 1
        return fn, None


def test_paired_ratios_cancel_load_that_moves_between_rounds():
    rng = random.Random(0)
    factors = [rng.choice((1.0, 3.0, 20.0)) for _ in range(1000)]
    m = FakeMachine(lambda call: factors[call // 2])        # one load per round of the two steps
    steps = {"reference": m.step(0.010), "torch": m.step(0.004)}
    out, errors = timing.interleaved(steps, "reference", min_rounds=5, budget_s=100.0, clock=m.clock)
    assert not errors
    t = out["torch"]
    assert t.ratio_median == pytest.approx(2.5) and t.ci_low == pytest.approx(2.5) and t.ci_high == pytest.approx(2.5)
    assert not t.noisy and t.runs == 5                       # settled: stopped at the least number of rounds
    # its times alone are spread over a factor of 20: a ratio of two medians taken apart would be anything
    assert t.p80_ms / t.p20_ms > 2


def test_a_ratio_that_stays_uncertain_is_noisy_and_one_that_settles_is_not():
    rng = random.Random(1)
    factors = [rng.uniform(1.0, 10.0) for _ in range(10_000)]
    # the load changes with every call for "busy" (ratios scatter), never for the others
    steps = {}
    m = FakeMachine(lambda call: factors[call] if call % 3 == 1 else 1.0)
    steps = {"reference": m.step(0.010), "busy": m.step(0.004), "steady": m.step(0.005)}
    out, _ = timing.interleaved(steps, "reference", min_rounds=5, budget_s=1e9, max_rounds=40, clock=m.clock)
    assert out["busy"].noisy and out["busy"].runs == 40      # it never settled; the cap ended it
    assert out["steady"].ratio_median == pytest.approx(2.0) and not out["steady"].noisy
    assert out["reference"].ratio_median is None and out["reference"].noisy is False


def test_the_budget_ends_the_rounds_but_never_before_min_runs():
    m = FakeMachine(lambda call: 1.0 + (call % 5))
    steps = {"reference": m.step(1.0), "torch": m.step(1.0)}
    out, _ = timing.interleaved(steps, "reference", min_rounds=50, budget_s=0.5, clock=m.clock)
    assert out["torch"].runs == timing.MIN_RUNS


def test_a_step_that_raises_leaves_the_rotation_and_is_reported():
    m = FakeMachine(lambda call: 1.0)
    calls = []

    def broken():
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("boom")
    steps = {"reference": m.step(0.01), "broken": (broken, None), "torch": m.step(0.005)}
    out, errors = timing.interleaved(steps, "reference", min_rounds=5, budget_s=1.0, clock=m.clock)
    assert isinstance(errors["broken"], RuntimeError) and len(calls) == 3
    assert out["torch"].ratio_median == pytest.approx(2.0)


def test_median_interval_narrows_with_runs():
    wide = timing.median_ci([1, 2, 3, 4, 5])
    assert wide == (1, 5)
    values = [float(v % 10 + 1) for v in range(1000)]
    lo, hi = timing.median_ci(values)
    assert 5 <= lo <= hi <= 6
