"""Property tests (issue 8): every path computes the reference's function on random configurations.

Hypothesis draws small configurations: batch, channels, H and W, valid ratios (per
``rga_triton.common.checks.block_sizes``), branch flags and order, train/eval, dtype, the memory
layout of x, BatchNorm momentum and a seed for the parameters, random BatchNorm statistics
(``helpers.make_pair``) and the upstream gradient. Each case runs forward and backward on
the path under test and on the reference in float64: outputs, grad x, every parameter
gradient, running statistics and ``num_batches_tracked`` must meet the contract (rga_triton.testing)
(``helpers.TOLERANCE``): through ``helpers.compare_steps`` in float64, through
``compare_low_precision`` (same checks, gradients measured normwise, see there) below it.

The runs are derandomized (the same cases on every run) and small enough for CI under
Triton's interpreter. ``python -m pytest tests/reliability/test_reliability_properties.py -s`` prints
how many cases each path ran (the counts also go to the terminal summary).
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import DEVICE, TOLERANCE, assert_close, compare_steps, make_pair, rel_err, step

BRANCHES = [(True, True), (True, False), (False, True)]
ORDERS = ["sc", "cs", "parallel"]


def _channel_slice(x):
    """x as every other channel of a tensor twice as wide: stride(1) = 2 * H * W."""
    return torch.stack([x, torch.zeros_like(x)], dim=2).flatten(1, 2)[:, ::2]


def _padded_rows(x):
    """x as the first W columns of rows padded to W + 3: H and W do not merge into one axis."""
    return F.pad(x, (0, 3))[..., :x.shape[-1]]


# Differentiable views of x with the same values and another memory layout.
LAYOUTS = {
    "contiguous": lambda x: x,
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "channel_slice": _channel_slice,
    "padded_rows": _padded_rows,
    "hw_transposed": lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),
}

CASE_COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Case:
    """One drawn configuration; its repr is what hypothesis prints for a failing case."""

    c: int
    h: int
    w: int
    batch: int
    cha_ratio: int
    spa_ratio: int
    down_ratio: int
    use_spatial: bool
    use_channel: bool
    order: str
    train: bool
    dtype: torch.dtype
    layout: str
    momentum: float | None
    seed: int


def _max_down_ratio(c, n, cha_ratio, spa_ratio, use_spatial, use_channel, cap):
    """The largest down_ratio that leaves every used W network at least one hidden channel."""
    widths = [1 + n // spa_ratio] * use_spatial + [1 + c // cha_ratio] * use_channel
    return min(widths + [cap])


@st.composite
def cases(draw, dtype, max_c=24, max_side=6, max_batch=4):
    """Valid configurations: every embedding and W network has at least one channel, and every
    BatchNorm sees more than one value per channel (helpers.make_pair runs a train pass to set
    the running statistics, so eval cases need it too)."""
    use_spatial, use_channel = draw(st.sampled_from(BRANCHES))
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    c = draw(st.integers(1, max_c))
    n = h * w
    cha_ratio = draw(st.integers(1, min(c, 8)))
    spa_ratio = draw(st.integers(1, min(n, 8)))
    down_ratio = draw(st.integers(1, _max_down_ratio(c, n, cha_ratio, spa_ratio, use_spatial, use_channel, 8)))
    train = draw(st.booleans())
    batch = draw(st.integers(1, max_batch))
    # A train-mode BatchNorm needs two values per channel: spatial BNs see B*N, channel BNs B*C.
    if (use_spatial and batch * n < 2) or (use_channel and batch * c < 2):
        batch = 2
    order = draw(st.sampled_from(ORDERS)) if use_spatial and use_channel else "sc"
    return Case(c=c, h=h, w=w, batch=batch, cha_ratio=cha_ratio, spa_ratio=spa_ratio, down_ratio=down_ratio,
                use_spatial=use_spatial, use_channel=use_channel, order=order, train=train,
                dtype=dtype, layout=draw(st.sampled_from(sorted(LAYOUTS))),
                momentum=draw(st.sampled_from([0.1, 0.5, None])), seed=draw(st.integers(0, 2 ** 16 - 1)))


FLOOR_FACTOR = 4
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _floor(*errors: float) -> float:
    """FLOOR_FACTOR x the largest finite error of the dtype's own rounding (0 if none is
    finite: where the reference overflows in the dtype, the path must meet the contract)."""
    finite = [e for e in errors if math.isfinite(e)]
    return FLOOR_FACTOR * max(finite) if finite else 0.0


def _rounding_twin(ref, x, dtype: torch.dtype, gen: torch.Generator):
    """The float64 reference and x, every value moved by ~one rounding of ``dtype``: how far the
    exact result moves when its inputs are rounded, the error any algorithm in ``dtype`` can
    make (a single run of the reference in ``dtype`` can be luckily better than that)."""
    u = UNIT_ROUNDOFF[dtype]
    twin = copy.deepcopy(ref)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1 + u * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return twin, x * (1 + u * torch.randn(x.shape, generator=gen, dtype=x.dtype))


def compare_low_precision(ref, fast, x, train: bool, dtype: torch.dtype, steps: int, seed: int) -> None:
    """helpers.compare_steps' checks for float32/float16/bfloat16, gradients measured normwise.

    Outputs, grad x, parameter gradients and running statistics must meet the contract, or
    stay within 4x of what rounding to ``dtype`` costs on this case: the error of the
    reference run in ``dtype``, or of the float64 reference on inputs and parameters moved
    by one rounding (an ill-conditioned case; e.g. an eval BatchNorm with running_var 5e-4
    feeding the gate moves a float64 gradient by 7e-5 when x moves by 6e-8, so no float32
    implementation meets 1e-5 there). A parameter's gradient error is measured against the
    norm of the whole parameter gradient, the normwise error of backward. compare_steps
    measures a gradient against its own norm, floored at 1e-2 of the whole; on tiny random
    configurations that fails on rounding noise: gradients that are cancellation residues
    (a conv feeding a width-1 train-mode BatchNorm) missed 1e-5 by up to 6e-4 while their
    error was < 6e-7 of the whole gradient (see REGRESSIONS). A wrong gradient of any
    parameter whose gradient is over 1e-5 of the whole (2e-2 in half precision) still fails.
    """
    tol = TOLERANCE[dtype]
    gen = torch.Generator().manual_seed(seed)
    low = copy.deepcopy(ref).to(dtype)
    twin, x_twin = _rounding_twin(ref, x, dtype, torch.Generator().manual_seed(seed + 1))
    for module in (ref, fast, low, twin):
        module.train(train)
    for _ in range(steps):
        grad_out = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        r_out, r_gx, r_grads = step(ref, x, grad_out)
        f_out, f_gx, f_grads = step(fast, x, grad_out, dtype=dtype, device=DEVICE)
        l_out, l_gx, l_grads = step(low, x, grad_out, dtype=dtype)
        t_out, t_gx, t_grads = step(twin, x_twin, grad_out)
        assert_close(f_out, r_out, max(tol, _floor(rel_err(l_out, r_out), rel_err(t_out, r_out))), "output")
        assert_close(f_gx, r_gx, max(tol, _floor(rel_err(l_gx, r_gx), rel_err(t_gx, r_gx))), "grad x")
        assert f_grads.keys() == r_grads.keys()
        whole = float(torch.cat([g.flatten() for g in r_grads.values()]).norm()) or 1.0

        def normwise(grads, name):
            return float((grads[name] - r_grads[name]).norm()) / whole

        for name, expected in r_grads.items():
            assert torch.equal(torch.isfinite(f_grads[name]), torch.isfinite(expected)), f"grad {name}: non-finite"
            limit = max(tol, _floor(normwise(l_grads, name), normwise(t_grads, name)))
            err = normwise(f_grads, name)
            assert err <= limit, f"grad {name}: error {err:.3e} of the whole gradient > {limit:.1e}"
    r_state, f_state, l_state, t_state = ref.state_dict(), fast.state_dict(), low.state_dict(), twin.state_dict()
    for name, expected in r_state.items():
        if name.endswith("num_batches_tracked"):
            assert int(f_state[name]) == int(expected), name
        elif "running" in name:
            limit = max(tol, _floor(rel_err(l_state[name], expected), rel_err(t_state[name], expected)))
            assert_close(f_state[name], expected, limit, name)


def check_case(case: Case, backend: str, algorithm: str = "auto", steps: int = 1) -> None:
    """Run ``case`` on ``backend`` and on the float64 reference and compare everything:
    helpers.compare_steps (exact algebra, 1e-10) in float64, compare_low_precision below it."""
    ref, fast, x = make_pair(case.c, case.h, case.w, case.batch, case.use_spatial, case.use_channel,
                             case.cha_ratio, case.spa_ratio, case.down_ratio, dtype=case.dtype, device=DEVICE,
                             backend=backend, seed=case.seed, order=case.order)
    fast.algorithm = algorithm
    for module in (ref, fast):
        for bn in module.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.momentum = case.momentum
    layout = LAYOUTS[case.layout]
    fast.register_forward_pre_hook(lambda module, args: (layout(args[0]),))
    if case.dtype == torch.float64:
        compare_steps(ref, fast, x, case.train, TOLERANCE[case.dtype], case.dtype, device=DEVICE, steps=steps,
                      seed=case.seed + 1)
    else:
        compare_low_precision(ref, fast, x, case.train, case.dtype, steps, case.seed + 1)
    CASE_COUNTS[(backend, algorithm, case.dtype)] += 1


@pytest.fixture(scope="module", autouse=True)
def _report_case_counts(request):
    """Print the number of cases each path ran once the module's tests are done."""
    yield
    lines = [f"  {backend:6} {algorithm:12} {str(dtype):14} {count:3d} cases"
             for (backend, algorithm, dtype), count in sorted(CASE_COUNTS.items(), key=str)]
    text = "\n".join(["reliability property tests, cases run per path:"] + lines)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(text)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(text)


def _settings(max_examples: int):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# Example budget (interpreter, 2 cores): ~0.03 s a torch case, ~0.5 s a Triton case; ~40 s in all.
EXAMPLES = {"torch": {torch.float64: 100, torch.float32: 80},
            "triton": {torch.float32: 24, torch.float16: 12, torch.bfloat16: 12}}
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _case(**kw):
    defaults = dict(batch=2, cha_ratio=1, spa_ratio=1, down_ratio=1, use_spatial=True, use_channel=True,
                    order="sc", train=True, dtype=torch.float32, layout="contiguous", momentum=0.1, seed=0)
    return Case(**{**defaults, **kw})


# Cases hypothesis found failing under helpers.compare_steps' float32 criteria; each passes
# compare_low_precision (see its docstring) and stays here as a regression case.
REGRESSIONS = {
    "torch": [
        # grad theta_spatial.1.weight 1.4e-5 (float32 reference 1.3e-6; elsewhere it reaches 1.8e-4)
        _case(c=1, h=1, w=4, batch=1, down_ratio=2, use_channel=False, layout="channel_slice", seed=1),
        # grad gx_channel.1.weight 1.0e-4 (reference 2.8e-6 there, 2.5e-5 elsewhere); normwise,
        # grad gx_spatial.0.weight 2.7e-5 (reference 5.6e-6; the exact gradient moves by
        # 7e-5 when x moves by one float32 rounding)
        _case(c=19, h=1, w=1, cha_ratio=8, train=False, layout="channel_slice", momentum=0.5, seed=450),
        # grad theta_channel.0.weight 3.1e-5: a gradient 2.5e-7 of the whole
        _case(c=23, h=1, w=1, cha_ratio=3, order="parallel", layout="channels_last", seed=3),
        # grad gx_spatial.0.weight 3.4e-5, order "cs"
        _case(c=1, h=6, w=1, batch=4, spa_ratio=4, order="cs", layout="hw_transposed", seed=4),
    ],
    "triton": [
        # eval output 2.2e-5: gate logit -17.8 behind a BatchNorm with running_var 2e-5
        # (the float32 reference itself: 1.6e-5)
        _case(c=2, h=3, w=3, batch=1, spa_ratio=2, use_spatial=False, train=False, layout="channel_slice", seed=1),
        # gg_channel.1.running_var 7.8e-5: a BatchNorm over 2 values (C = 1, B = 2)
        _case(c=1, h=6, w=5, spa_ratio=5, down_ratio=2, order="parallel", layout="hw_transposed", momentum=0.5,
              seed=5),
        # grad gx_spatial.0.weight 5.8e-4 measured on 1e-3 of the whole gradient: a rounding residue
        _case(c=1, h=1, w=1, batch=4, use_channel=False, layout="padded_rows", momentum=None, seed=4),
    ],
}


def _property(backend: str, dtype: torch.dtype, run):
    """``run(case)`` as a derandomized hypothesis test over ``cases(dtype)`` plus the regressions."""
    for case in REGRESSIONS[backend]:
        if case.dtype == dtype:
            run = example(case=case)(run)
    return _settings(EXAMPLES[backend][dtype])(given(case=cases(dtype))(run))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_torch_path_matches_reference(dtype):
    """The "torch" backend equals the float64 reference over two steps: exactly (1e-10) in
    float64, within the contract in float32."""
    _property("torch", dtype, lambda case: check_case(case, "torch", steps=2))()


@pytest.mark.needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("algorithm", ["reassociated", "tiled"])
def test_triton_path_matches_reference(algorithm, dtype):
    """The "triton" backend, with both exact algorithms, equals the float64 reference."""
    _property("triton", dtype, lambda case: check_case(case, "triton", algorithm))()
