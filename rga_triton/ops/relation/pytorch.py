"""The relation gate in plain PyTorch, as the ``"torch"`` backend runs it (autograd differentiates it).

Z = W_in G^T + W_out G = (W_in phi^T) theta + (W_out theta^T) phi, G = theta^T phi: no L x L
tensor is ever formed, forward or backward.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...common.batchnorm import batch_norm


def _conv_weight(conv: nn.Conv2d, like: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv's weight as a (out, in) matrix in ``like``'s dtype (differentiable cast)."""
    return conv.weight.flatten(1).to(like.dtype)


def relation_preactivation(gg_weight: torch.Tensor, theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Z = (W_in phi^T) theta + (W_out theta^T) phi, shape (B, R, L), without forming G, in theta's dtype
    (float32 or wider: ``torch_path.rga_forward`` computes half precision and autocast in float32)."""
    length = theta.shape[-1]
    w = gg_weight.flatten(1).to(theta.dtype)
    w_in, w_out = w[:, :length], w[:, length:]
    a = torch.cat([torch.matmul(w_in, phi.transpose(1, 2)), torch.matmul(w_out, theta.transpose(1, 2))], dim=2)
    return torch.matmul(a, torch.cat([theta, phi], dim=1))


def relation_gate_logit(branch, theta: torch.Tensor, phi: torch.Tensor, pooled: torch.Tensor,
                        update: bool = True) -> torch.Tensor:
    """Pre-sigmoid attention logit (B, L) of one branch (its gg and W submodules) from the projection's
    theta, phi (B, K, L) and pooled gx (B, 1, L): relation embedding, BatchNorm, ReLU, then the
    attention network conv -> BN -> ReLU -> conv -> BN."""
    z = relation_preactivation(branch.gg[0].weight, theta, phi)
    relation = F.relu(batch_norm(z, branch.gg[1], update))
    conv1, bn1, _, conv2, bn2 = branch.W
    y = torch.cat([pooled, relation], dim=1)
    hidden = F.relu(batch_norm(torch.matmul(_conv_weight(conv1, y), y), bn1, update))
    return batch_norm(torch.matmul(_conv_weight(conv2, hidden), hidden), bn2, update).squeeze(1)
