"""Shared pieces of the per-step backward tests (test_op_*.py) and test_triton_backward.py: a float64
module with non-trivial BatchNorms, per-BatchNorm modes, gradients and their comparison."""
import torch

import rga_triton
import rga_triton.ops.relation.op

from helpers import TOLERANCE, rel_err

TOL = TOLERANCE[torch.float32]


def _module(c=20, h=6, w=10, seed=0, **kw):
    """A float64 RGAModule with random weights and non-trivial BatchNorm parameters and statistics."""
    torch.manual_seed(seed)
    args = dict(use_spatial=True, use_channel=True, cha_ratio=3, spa_ratio=8, down_ratio=4)
    args.update(kw)
    module = rga_triton.RGAModule(c, h * w, backend="torch", **args).double()
    with torch.no_grad():
        for bn in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.running_mean.normal_(0.0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return module


def _set_modes(branch, modes):
    """Train (True) or eval (False) per BatchNorm of the branch: theta, phi, gx, gg, W[1]."""
    for seq, train in zip((branch.theta, branch.phi, branch.gx, branch.gg), modes):
        seq[1].train(train)
    branch.W[1].train(modes[4])


def _grads(outputs, inputs, grad_outputs):
    return torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)


def _assert_grads_close(actual, expected, names):
    for name, a, e in zip(names, actual, expected, strict=True):
        assert rel_err(a.double().cpu(), e) <= TOL, f"{name}: {rel_err(a.double().cpu(), e):.2e}"


MODES = [(True,) * 5, (False,) * 5, (True, False, True, False, True), (False, True, False, True, False)]


