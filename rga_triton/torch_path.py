"""The ``"torch"`` backend: RGA computed with the reassociated algebra, in plain PyTorch.

Both branches share one shape of computation. A branch sees ``feats`` of shape
(B, Cin, L): Cin channels over L positions (spatial: x as (B, C, N); channel: x read as
(B, N, C)). With theta, phi in R^{K x L} the relation embedding's pre-activation is

    Z = W_in G^T + W_out G = (W_in phi^T) theta + (W_out theta^T) phi,   G = theta^T phi,

so no L x L tensor is ever formed, forward or backward (autograd differentiates the
right-hand side). Every BatchNorm goes through :func:`rga_triton.batchnorm.batch_norm`,
which behaves exactly as ``nn.BatchNorm2d``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batchnorm import batch_norm


class Branch(NamedTuple):
    """The five submodules of one RGA branch (spatial or channel)."""

    theta: nn.Sequential
    phi: nn.Sequential
    gx: nn.Sequential
    gg: nn.Sequential
    W: nn.Sequential


def _conv_weight(conv: nn.Conv2d, like: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv's weight as a (out, in) matrix in ``like``'s dtype (differentiable cast)."""
    return conv.weight.flatten(1).to(like.dtype)


def relation_inputs(branch: Branch, feats: torch.Tensor, update: bool = True):
    """theta, phi (B, K, L) and the channel-mean of the gx embedding (B, 1, L)."""
    weights = [branch.theta[0].weight, branch.phi[0].weight, branch.gx[0].weight]
    k = weights[0].shape[0]
    projected = torch.matmul(torch.cat(weights).flatten(1).to(feats.dtype), feats)   # one read of feats
    theta, phi, gx = (
        F.relu(batch_norm(z, seq[1], update))
        for z, seq in zip(projected.split(k, dim=1), (branch.theta, branch.phi, branch.gx))
    )
    return theta, phi, gx.mean(dim=1, keepdim=True)


def relation_preactivation(gg_weight: torch.Tensor, theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Z = (W_in phi^T) theta + (W_out theta^T) phi, shape (B, R, L), without forming G, in theta's dtype
    (float32 or wider: :func:`rga_forward` computes half precision and autocast in float32)."""
    length = theta.shape[-1]
    w = gg_weight.flatten(1).to(theta.dtype)
    w_in, w_out = w[:, :length], w[:, length:]
    a = torch.cat([torch.matmul(w_in, phi.transpose(1, 2)), torch.matmul(w_out, theta.transpose(1, 2))], dim=2)
    return torch.matmul(a, torch.cat([theta, phi], dim=1))


def gate_logit(branch: Branch, feats: torch.Tensor, update: bool = True) -> torch.Tensor:
    """Pre-sigmoid attention logit (B, L) of one branch for ``feats`` (B, Cin, L)."""
    theta, phi, pooled = relation_inputs(branch, feats, update)
    z = relation_preactivation(branch.gg[0].weight, theta, phi)
    relation = F.relu(batch_norm(z, branch.gg[1], update))
    conv1, bn1, _, conv2, bn2 = branch.W
    y = torch.cat([pooled, relation], dim=1)
    hidden = F.relu(batch_norm(torch.matmul(_conv_weight(conv1, y), y), bn1, update))
    return batch_norm(torch.matmul(_conv_weight(conv2, hidden), hidden), bn2, update).squeeze(1)


def rga_forward(module, x: torch.Tensor, update: bool = True) -> torch.Tensor:
    """The RGA block's output for x (B, C, H, W), its branches composed in ``module.order``.

    float16/bfloat16 inputs are computed in float32 and the output rounded once: the
    half-precision reference rounds every intermediate, and rounding the reassociated
    products (whose sums cancel) would cost more than that, forward and above all backward.
    Under torch.autocast the same holds (autocast off inside, float32 x gives a float32
    output): with the channel branch's gated input rounded to bfloat16 for its product,
    grad x missed 2e-2 (3.6e-2, 64x16x8, train).
    """
    if _autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return rga_forward(module, x, update)
    if x.dtype in (torch.float16, torch.bfloat16):
        return _forward(module, x.float(), update).to(x.dtype)
    return _forward(module, x, update)


def _autocast_enabled(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _forward(module, x: torch.Tensor, update: bool) -> torch.Tensor:
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)

    def spatial_gate(feats):
        return torch.sigmoid(gate_logit(module.branch("spatial"), feats, update)).unsqueeze(1)     # (B, 1, N)

    def channel_gate(feats):
        return torch.sigmoid(gate_logit(module.branch("channel"), feats.transpose(1, 2), update)).unsqueeze(2)

    both = module.use_spatial and module.use_channel
    if both and module.order == "parallel":
        out = flat * spatial_gate(flat) * channel_gate(flat)
    elif both and module.order == "cs":
        flat = channel_gate(flat) * flat
        out = spatial_gate(flat) * flat
    else:       # "sc", or a single branch
        if module.use_spatial:
            flat = spatial_gate(flat) * flat
        if module.use_channel:
            flat = channel_gate(flat) * flat
        out = flat
    return out.view(b, c, h, w)
