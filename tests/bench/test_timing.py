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
    # settled within a few rounds of MIN_PAIRS clean ones: every 20x round's pair is left out
    assert not t.noisy and t.pairs >= timing.MIN_PAIRS and t.runs < 3 * timing.MIN_PAIRS
    assert t.runs - t.pairs >= factors[:t.runs].count(20.0)
    # its times alone are spread over a factor of 20: a ratio of two medians taken apart would be anything
    assert out["reference"].ci_high / out["reference"].ci_low == pytest.approx(20.0)


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


class SpikyMachine:
    """A clock, and steps whose calls a load spike hits now and then: the step is preempted and waits
    ``spike_ms`` on top of its own time (a busy machine's time slices)."""

    def __init__(self, seed: int, p_spike: float, spike_ms: tuple[float, float]):
        self.now, self.rng, self.p_spike, self.spike_ms = 0.0, random.Random(seed), p_spike, spike_ms

    def clock(self) -> float:
        return self.now

    def step(self, ms):
        def fn():
            own = ms() if callable(ms) else ms
            hit = self.rng.uniform(*self.spike_ms) if self.rng.random() < self.p_spike else 0.0
            self.now += (own * self.rng.uniform(0.97, 1.03) + hit) * 1e-3
        return fn, None


def test_load_spikes_leave_a_stable_ratio_settled_and_right():
    # A fifth of the calls wait 20 to 200 ms more (more than a third of the rounds have a spike):
    # the pairs they hit are left out, and the ratio of the others is the code's, x2.5.
    m = SpikyMachine(seed=2, p_spike=0.2, spike_ms=(20.0, 200.0))
    steps = {"reference": m.step(10.0), "torch": m.step(4.0)}
    out, _ = timing.interleaved(steps, "reference", min_rounds=5, budget_s=6.0, clock=m.clock)
    t = out["torch"]
    assert not t.noisy and t.ratio_median == pytest.approx(2.5, rel=0.03)
    assert t.ci_high / t.ci_low <= timing.SETTLED_SPREAD and t.pairs < t.runs
    # the dropped pairs are the spiked ones: their ratios were anything from x0.05 to x50
    assert timing.paired_ratios([10.0, 10.0, 10.0, 10.0, 210.0], [4.0, 4.0, 4.0, 204.0, 4.0]) == [2.5] * 3


def test_a_machine_busy_most_of_the_time_still_settles_on_its_clean_rounds():
    # Half of all calls are slowed 5 to 30 times (other jobs hold the cores): three rounds in four are
    # hit, so the median pair is a hit one. Its pairs' ratios range from x0.1 to x75; the clean rounds,
    # the fastest ones, still give the code's x2.5, and the row settles on them.
    rng = random.Random(5)
    factors = [rng.uniform(5.0, 30.0) if rng.random() < 0.5 else 1.0 for _ in range(10_000)]
    m = FakeMachine(lambda call: factors[call])
    ms = {"reference": [], "torch": []}          # every call's time, the warm-up first

    def timed(name, seconds):
        fn, _ = m.step(seconds)

        def run():
            start = m.now
            fn()
            ms[name].append((m.now - start) * 1e3)
        return run, None
    steps = {"reference": timed("reference", 0.010), "torch": timed("torch", 0.004)}
    out, _ = timing.interleaved(steps, "reference", min_rounds=5, budget_s=100.0, clock=m.clock)
    t = out["torch"]
    assert not t.noisy and t.ratio_median == pytest.approx(2.5) and t.ci_high / t.ci_low == pytest.approx(1.0)
    # the median pair time's yardstick keeps hit pairs too: their ratios disagree, and the median lands anywhere
    base, step = ms["reference"][1:], ms["torch"][1:]
    assert len(base) == len(step) == t.runs
    totals = [b + s for b, s in zip(base, step)]
    limit = timing.SPIKE_FACTOR * sorted(totals)[len(totals) // 2]
    mixed = [b / s for b, s, total in zip(base, step, totals) if total <= limit]
    assert timing.quartile_spread(mixed) > timing.PAIRS_SPREAD


def test_a_truly_bimodal_ratio_is_noisy():
    # The step itself runs at one of two speeds (4 or 9 ms against the baseline's 10: x2.5 or x1.11), as
    # code with two paths would; no pair is a spike, so none is dropped. Whichever speed the median lands
    # on, and however narrow its interval after many rounds, the pairs disagree: noisy.
    for share_fast in (0.5, 0.4, 0.6):
        rng = random.Random(3)
        m = SpikyMachine(seed=4, p_spike=0.0, spike_ms=(0.0, 0.0))
        steps = {"reference": m.step(10.0), "torch": m.step(lambda: 4.0 if rng.random() < share_fast else 9.0)}
        out, _ = timing.interleaved(steps, "reference", min_rounds=5, budget_s=3.0, max_rounds=300, clock=m.clock)
        t = out["torch"]
        assert t.noisy and t.pairs == t.runs and t.pairs_spread > timing.PAIRS_SPREAD, share_fast


def test_slow_rounds_stretch_the_budget_to_min_pairs():
    # rounds of 2 s against a 3 s budget: the case goes on to MIN_PAIRS rounds (12 s, within 4 x 3 s),
    # where the row is no longer noisy
    m = FakeMachine(lambda call: 1.0)
    steps = {"reference": m.step(1.5), "torch": m.step(0.5)}
    out, _ = timing.interleaved(steps, "reference", min_rounds=5, budget_s=3.0, clock=m.clock)
    assert out["torch"].runs == timing.MIN_PAIRS and not out["torch"].noisy
    # ...but no further than BUDGET_STRETCH x the budget (the first round past 12 s), and too few pairs
    # for a 95 % interval make the row noisy, however alike they are
    m = FakeMachine(lambda call: 1.0)
    steps = {"reference": m.step(3.0), "torch": m.step(1.0)}
    out, _ = timing.interleaved(steps, "reference", min_rounds=5, budget_s=3.0, clock=m.clock)
    t = out["torch"]
    assert t.runs == 4 < timing.MIN_PAIRS and t.noisy and t.ratio_median == pytest.approx(3.0)


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
    assert timing.median_ci([1, 2, 3, 4, 5]) == (1, 5)      # under 6 values, no 95 % interval: the range
    assert timing.median_ci(list(range(1, 10))) == (2, 8)   # 9 values: ranks 2 and 8 cover 96 %
    values = [float(v % 10 + 1) for v in range(1000)]
    lo, hi = timing.median_ci(values)
    assert 5 <= lo <= hi <= 6


def test_a_noisy_row_still_says_which_is_faster_when_its_interval_excludes_one():
    """Under load a row's ratio may stay unsettled in size but not in sign: the summary says so (report.direction)."""
    from bench.lib import report

    row = dict(impl="torch", speedup_p20=1.2, ci_low=1.16, ci_high=3.38, noisy=True)
    assert report.direction(row) == "faster"
    assert report.direction({**row, "ci_low": 0.4, "ci_high": 0.9}) == "slower"
    assert report.direction({**row, "ci_low": 0.9}) is None                 # spans x1: unsettled
    assert report.direction({**row, "impl": "reference"}) is None           # its interval is of a time
