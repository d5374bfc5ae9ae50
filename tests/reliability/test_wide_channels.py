"""Wide channels over a tiny map (issue 26): C=2048 on a 2x4 map, B=2, RGA-SC, train mode.

There the torch path's grad x missed the float64 reference by 1.9e-4 on one seed, where the
float32 reference missed by 5.6e-6; on other seeds the float32 reference misses by 1e-3 and
we by 1e-6. No step of the path loses accuracy: every miss over 1e-5 comes from a ReLU whose
input lies within float32 rounding (~1e-6) of 0, which float32 then sends to the other side
of the kink than float64 does. The gradient is discontinuous there, so that one element's
gradient changes by its whole value. The channel branch's ReLUs see about 2 x 10^6 values per
step at this shape, so on about half the seeds one or two of them sit that close to 0, in
every float32 implementation, the reference included (docs/numerics.md, "ReLU kinks").

What this test holds, against the torch path run in float64 (the reference's function to
1e-14, ``tests/block/test_torch_path.py``; running the reference itself here would cost
seconds):
- with every ReLU decision of the float64 run imposed on the float32 run, grad x meets the
  float32 contract (1e-5): the arithmetic is as accurate as the contract asks;
- where no ReLU input changes sign between float32 and float64, grad x meets it unaided.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import rga_triton
import rga_triton.ops.projection.pytorch as projection_pytorch
import rga_triton.ops.relation.pytorch as relation_pytorch

from helpers import TOLERANCE, randomize_batchnorm, rel_err

SHAPE = (2048, 2, 4, 2)           # C, H, W, B
RATIOS = (8, 1, 1)                # cha_ratio, spa_ratio, down_ratio (down_ratio 8 leaves the W network no channel)


class Kinks:
    """``F.relu`` for the torch path's op modules. "off" is F.relu, "record" keeps every call's sign pattern,
    "compare" counts the values whose sign differs from the recorded pattern, "impose" applies
    the recorded pattern (the gradient is then the recorded mask's)."""

    def __init__(self):
        self.masks, self.mode, self.at, self.flips = [], "off", 0, 0

    def relu(self, v, inplace=False):
        if self.mode == "off":
            return F.relu(v)
        if self.mode == "record":
            self.masks.append(v.detach() > 0)
            return F.relu(v)
        mask = self.masks[self.at]
        self.at += 1
        if self.mode == "compare":
            self.flips += int(((v.detach() > 0) != mask).sum())
            return F.relu(v)
        return v * mask.to(v.dtype)

    def start(self, mode):
        if mode == "record":
            self.masks.clear()
        self.mode, self.at, self.flips = mode, 0, 0


@pytest.fixture
def kinks(monkeypatch):
    shim = Kinks()
    for module in (projection_pytorch, relation_pytorch):
        monkeypatch.setattr(module, "F", SimpleNamespace(relu=shim.relu))
    return shim


def _block(seed):
    """An RGA-SC torch block in float64 with randomised BatchNorms, its parameters and x exactly
    representable in float32 (as ``helpers.make_pair`` makes them), and an upstream gradient."""
    c, h, w, b = SHAPE
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    block = rga_triton.RGAModule(c, h * w, True, True, *RATIOS, backend="torch").double()
    x = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    randomize_batchnorm(block, x, gen)
    with torch.no_grad():
        for value in block.state_dict().values():
            if value.is_floating_point():
                value.copy_(value.float())
    grad_out = torch.randn(x.shape, generator=gen, dtype=torch.float64).float().double()
    return block, x.float().double(), grad_out


def _grad_x(block, x, grad_out, dtype):
    block = copy.deepcopy(block).to(dtype).train()
    xin = x.to(dtype, copy=True).requires_grad_(True)
    block(xin).backward(grad_out.to(dtype))
    return xin.grad.double()


def test_wide_channels_grad_x_is_exact_up_to_relu_kinks(kinks, request):
    """Seed 1 is the issue's case here: on an x86 CPU with MKL one ReLU input of the channel
    branch's W network flips sign, and grad x misses by 1.5e-4 unaided, 1.2e-6 with float64's
    decisions. Which seeds flip depends on the BLAS's rounding; the assertions do not: with no
    flip the contract must hold unaided. (Seeds 0-7 here: flips on 0, 1, 4, 7, grad x 1.5e-4
    to 2.6e-3 unaided and 7.5e-7 to 9.0e-6 imposed; 0.8e-6 to 1.4e-6 on the others.)"""
    block, x, grad_out = _block(1)
    kinks.start("record")
    expected = _grad_x(block, x, grad_out, torch.float64)
    kinks.start("compare")
    err = rel_err(_grad_x(block, x, grad_out, torch.float32), expected)
    flips = kinks.flips
    request.node.user_properties.append(("relu sign flips", flips))
    request.node.user_properties.append(("grad x error", err))
    if flips == 0:
        assert err <= TOLERANCE[torch.float32], f"grad x, no ReLU flipped: relative error {err:.3e} > 1e-5"
        return
    kinks.start("impose")
    err_imposed = rel_err(_grad_x(block, x, grad_out, torch.float32), expected)
    assert err_imposed <= TOLERANCE[torch.float32], (
        f"grad x with float64's ReLU decisions ({flips} differed): relative error {err_imposed:.3e} > 1e-5")
