"""Shared test helpers: module pairs with identical parameters, the error metric, comparisons."""
from __future__ import annotations

import contextlib
import copy

import torch

import rga_triton
from reference import RGA_Module
from rga_triton.common.settings import interpreting
from rga_triton.testing import TOLERANCE, TOLERANCE_TF32, rel_err, tolerance  # noqa: F401  (re-exported)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""Where the tests run: the GPU when there is one, else the CPU (kernels through Triton's interpreter)."""
TRITON_RUNS = DEVICE == "cuda" or interpreting()
"""Whether the Triton kernels can run here; ``@pytest.mark.needs_triton`` skips a test where they cannot."""


@contextlib.contextmanager
def one_thread():
    """Tiny models take many small ops; on a busy machine each waits for a descheduled second thread, so one
    thread is far faster there (~50x for the convergence runs) and no slower when idle."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def float32_tolerance(device) -> float:
    """The contract's float32 bound where a test does not pin TF32 off: 1e-5 on the CPU, 1e-4 on CUDA."""
    return tolerance(torch.float32, tf32=torch.device(device).type != "cpu")


def randomize_batchnorm(module: torch.nn.Module, x: torch.Tensor, generator: torch.Generator) -> None:
    """Give every BatchNorm realistic but non-trivial running statistics and affine parameters.

    Running statistics come from one train pass on ``x`` (momentum 1) and are then
    perturbed, so eval-mode gates are neither saturated nor the batch statistics.
    """
    bns = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(0.5 + torch.rand(bn.weight.shape, generator=generator, dtype=bn.weight.dtype))
            bn.bias.copy_(0.2 * torch.randn(bn.bias.shape, generator=generator, dtype=bn.bias.dtype))
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.momentum = 1.0
        was_training = module.training
        module.train()(x)
        module.train(was_training)
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
            std = bn.running_var.sqrt()
            bn.running_mean.add_(0.2 * std * torch.randn(std.shape, generator=generator, dtype=std.dtype))
            bn.running_var.mul_(0.7 + 0.6 * torch.rand(std.shape, generator=generator, dtype=std.dtype))
            bn.num_batches_tracked.fill_(int(torch.randint(0, 5, (1,), generator=generator)))


def make_pair(c, h, w, batch=2, use_spatial=True, use_channel=True, cha_ratio=8, spa_ratio=8, down_ratio=8,
              dtype=torch.float32, device="cpu", backend="torch", seed=0, order="sc"):
    """(reference in float64 on the CPU, RGAModule in ``dtype`` on ``device``, x in float64) sharing parameters.

    x and every parameter and buffer are values exactly representable in ``dtype``: both
    modules see the same inputs, so the comparison measures arithmetic, not the rounding
    of the inputs (which alone moves some bfloat16 gradients by 4e-2 at these sizes).
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    args = (c, h * w, use_spatial, use_channel, cha_ratio, spa_ratio, down_ratio)
    ref = RGA_Module(*args, order=order).double()
    x = torch.randn(batch, c, h, w, generator=gen, dtype=torch.float64)
    randomize_batchnorm(ref, x, gen)
    x = x.to(dtype).double()
    ref.load_state_dict({k: v.to(dtype).to(v.dtype) if v.is_floating_point() else v
                         for k, v in ref.state_dict().items()})
    fast = rga_triton.RGAModule(*args, backend=backend, order=order).to(device=device, dtype=dtype)
    fast.load_state_dict(ref.state_dict(), strict=True)   # exact: every value is representable
    return ref, fast, x


def step(module, x, grad_out, dtype=None, device="cpu"):
    """One forward + backward; returns (out, grad_x, {name: grad}) in float64 on the CPU."""
    xin = x.to(device=device, dtype=dtype or x.dtype).detach().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(xin)
    out.backward(grad_out.to(out))
    grads = {n: p.grad.detach().double().cpu() for n, p in module.named_parameters()}
    return out.detach().double().cpu(), xin.grad.detach().double().cpu(), grads


def assert_close(actual, expected, tol, what):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"
    return err


def step_input(x: torch.Tensor, k: int) -> torch.Tensor:
    """The input of step ``k``: x rolled along W and scaled by (-1/2)^k. Exact in every dtype x
    is representable in, and a different batch each step, so BatchNorm statistics that went
    stale (last step's batch, or the first) cannot pass."""
    return x.roll(k, dims=-1) * (-0.5) ** k if k else x


def grad_error(actual: torch.Tensor, expected: torch.Tensor, whole: torch.Tensor) -> float:
    """||actual - expected|| / max(||expected||, 1e-2 ||whole||): a parameter gradient's error, where
    ``whole`` is the reference's whole parameter gradient (why the floor: :func:`compare_steps`).
    Against 1 when both are zero (saturated gates pass no gradient at all)."""
    scale = max(float(expected.norm()), 1e-2 * float(whole.norm())) or 1.0
    return float((actual.double().cpu() - expected.double().cpu()).norm()) / scale


def allowance(tol: float, reference_error: float, dtype: torch.dtype) -> float:
    """What a result may miss the float64 reference by: ``tol``, or 4x the error of the reference
    run in ``dtype`` where that is larger, up to 2x ``tol`` in half precision (why: :func:`compare_steps`)."""
    cap = 2 * tol if dtype in (torch.float16, torch.bfloat16) else float("inf")
    return max(tol, min(4 * reference_error, cap))


def compare_steps(ref, fast, x, train, tol, dtype, device="cpu", steps=1, seed=1, grads=True):
    """Run ``steps`` forward/backward steps on both modules, each on its own input
    (:func:`step_input`); compare everything after each.

    Outputs and running statistics must meet ``tol``. Gradients must meet ``tol`` too, or,
    where rounding dominates (a sum with heavy cancellation such as the one-element weight
    of the last BatchNorm), be no worse than 4x the error the reference itself makes when
    run in ``dtype`` on the same inputs: no implementation in that dtype can do better than
    its rounding allows. In half precision that allowance stops at 2x ``tol``: the
    half-precision reference rounds G and every intermediate, and its errors (up to 2 on
    some gradients) would accept a wrong answer; our paths compute in float32. A gradient
    under 1e-2 of the whole parameter gradient is measured against that 1e-2 instead of its
    own norm.
    """
    gen = torch.Generator().manual_seed(seed)
    low = copy.deepcopy(ref).to(dtype) if dtype != torch.float64 else None
    for module in (ref, fast, low):
        if module is not None:
            module.train(train)
    worst = 0.0
    for k in range(steps):
        xk = step_input(x, k)
        # representable in dtype, as x is: every module sees the same upstream gradient
        grad_out = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype).double()
        r_out, r_gx, r_grads = step(ref, xk, grad_out)
        f_out, f_gx, f_grads = step(fast, xk, grad_out, dtype=dtype, device=device)
        _, l_gx, l_grads = step(low, xk, grad_out, dtype=dtype) if low is not None else (None, None, None)
        worst = max(worst, assert_close(f_out, r_out, tol, f"output, step {k}"))
        gx_allowed = allowance(tol, rel_err(l_gx, r_gx) if l_gx is not None else 0.0, dtype)
        if grads:
            worst = max(worst, assert_close(f_gx, r_gx, gx_allowed, f"grad x, step {k}"))
        assert r_grads.keys() == f_grads.keys()
        whole = torch.cat([g.flatten() for g in r_grads.values()])
        for name in (r_grads if grads else ()):
            # A gradient under 1e-2 of the whole parameter gradient lies along a direction the
            # loss is (almost) invariant to, e.g. a conv feeding a train-mode BatchNorm of
            # width 1 (exactly invariant but for eps): its value is a cancellation residue, so
            # its error is measured against 1e-2 of the whole gradient instead of itself.
            # (1e-3 was below float32's reach: on RGA-C at 20x6x10, seeds 0-5, the float32
            # reference itself missed W_channel.3.weight by up to 3.5e-5 of 1e-3 |whole|, and
            # so did every float32 path, each seed a different one.)
            # (whole == 0: saturated gates pass no gradient at all; then absolute error, against 1)
            err = grad_error(f_grads[name], r_grads[name], whole)
            low_err = grad_error(l_grads[name], r_grads[name], whole) if l_grads is not None else 0.0
            assert err <= allowance(tol, low_err, dtype), (
                f"grad {name}, step {k}: relative error {err:.3e} > {tol:.0e} "
                f"(and > 4x the {dtype} reference's {low_err:.3e})")
            worst = max(worst, min(err, tol))
        r_state, f_state = ref.state_dict(), fast.state_dict()
        for name, value in r_state.items():
            if name.endswith("num_batches_tracked"):
                assert int(f_state[name]) == int(value), f"{name}, step {k}: {int(f_state[name])} != {int(value)}"
            elif "running" in name:
                worst = max(worst, assert_close(f_state[name], value, tol, f"{name}, step {k}"))
    return worst


BATCHNORM_VARIANTS = ("no-running-stats", "no-affine", "zero-weight")


def vary_batchnorms(modules, variant: str) -> None:
    """Give every BatchNorm of each module in ``modules`` the same non-default configuration.

    "no-running-stats": track_running_stats=False (batch statistics in eval too, no buffers);
    "no-affine": affine=False; "zero-weight": every other channel of every BatchNorm gets
    weight 0 (a width-1 BatchNorm: its only channel; the gradients must still arrive).
    """
    for module in modules:
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.BatchNorm2d):
                    continue
                if variant == "zero-weight":
                    with torch.no_grad():
                        child.weight[::2] = 0      # every other channel: their gradients must still arrive
                    continue
                keep = variant == "no-affine"
                new = torch.nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum,
                                           affine=not keep and child.affine, track_running_stats=keep)
                new = new.to(device=child.running_mean.device, dtype=child.running_mean.dtype)
                if keep:
                    new.load_state_dict({k: v for k, v in child.state_dict().items()
                                         if k in new.state_dict()})
                elif child.affine:
                    new.weight, new.bias = child.weight, child.bias
                new.train(child.training)
                setattr(parent, name, new)


def train_step(module, x, grad_out):
    """One forward + backward of ``module`` on a fresh leaf copy of x: (out, grad x, {name: grad}), the
    parameter names without torch.compile's ``_orig_mod.`` prefix."""
    xin = x.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(xin)
    out.backward(grad_out)
    return out.detach(), xin.grad, {n.removeprefix("_orig_mod."): p.grad for n, p in module.named_parameters()}


def spawn_ranks(worker, out_dir, world: int) -> None:
    """Run ``worker(rank, init_file, out_dir)`` in ``world`` processes that rendezvous through a file in
    ``out_dir`` (for ``init_process_group("gloo", init_method=f"file://{init_file}")``); skips the calling
    test where torch.distributed has no gloo."""
    import pytest
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(worker, args=(str(out_dir / "rendezvous"), str(out_dir)), nprocs=world, join=True)


def leave_worker() -> None:
    """End a spawned worker whose results are written. It skips interpreter finalisation: there, gloo's
    threads sometimes abort the process (SIGABRT, "terminate called without an active exception"; about
    1 run in 20 on a 2-core CPU machine, after destroy_process_group returned). An exception raised
    before this still reaches mp.spawn."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
