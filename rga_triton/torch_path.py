"""The ``"torch"`` backend: RGA computed with the reassociated algebra, in plain PyTorch.

Both branches share one shape of computation. A branch sees ``feats`` of shape
(B, Cin, L): Cin channels over L positions (spatial: x as (B, C, N); channel: x read as
(B, N, C)). With theta, phi in R^{K x L} the relation embedding's pre-activation is

    Z = W_in G^T + W_out G = (W_in phi^T) theta + (W_out theta^T) phi,   G = theta^T phi,

so no L x L tensor is ever formed, forward or backward (autograd differentiates the
right-hand side). Each step's formula lives beside its kernels (``ops/projection/pytorch.py``,
``ops/relation/pytorch.py``); this module composes them into a block. Every BatchNorm goes
through ``common/batchnorm.batch_norm``, which behaves exactly as ``nn.BatchNorm2d``.
"""
from __future__ import annotations

import torch

from .common.branch import Branch
from .ops.projection.pytorch import relation_inputs
from .ops.relation.pytorch import relation_gate_logit, relation_preactivation  # noqa: F401  (re-exported)


def gate_logit(branch: Branch, feats: torch.Tensor, update: bool = True) -> torch.Tensor:
    """Pre-sigmoid attention logit (B, L) of one branch for ``feats`` (B, Cin, L): the projection's
    formula, then the relation gate's."""
    theta, phi, pooled = relation_inputs(branch, feats, update)
    return relation_gate_logit(branch, theta, phi, pooled, update)


def rga_forward(module, x: torch.Tensor, branches: dict, update: bool = True) -> torch.Tensor:
    """The RGA block's output for x (B, C, H, W), its ``branches`` (``module.branches()``) composed in
    ``module.order``.

    float16/bfloat16 inputs are computed in float32 and the output rounded once: the
    half-precision reference rounds every intermediate, and rounding the reassociated
    products (whose sums cancel) would cost more than that, forward and above all backward.
    Under torch.autocast the same holds (autocast off inside, float32 x gives a float32
    output): with the channel branch's gated input rounded to bfloat16 for its product,
    grad x missed 2e-2 (3.6e-2, 64x16x8, train).
    """
    if _autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return rga_forward(module, x, branches, update)
    if x.dtype in (torch.float16, torch.bfloat16):
        return _forward(module, x.float(), branches, update).to(x.dtype)
    return _forward(module, x, branches, update)


def _autocast_enabled(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _forward(module, x: torch.Tensor, branches: dict, update: bool) -> torch.Tensor:
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)

    def spatial_gate(feats):
        return torch.sigmoid(gate_logit(branches["spatial"], feats, update)).unsqueeze(1)     # (B, 1, N)

    def channel_gate(feats):
        return torch.sigmoid(gate_logit(branches["channel"], feats.transpose(1, 2), update)).unsqueeze(2)

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
