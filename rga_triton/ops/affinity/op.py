"""G = theta^T phi by the blocked Triton kernel, differentiable. See this folder's README.md."""
from __future__ import annotations

import torch

from .kernels import affinity


class TritonAffinity(torch.autograd.Function):
    """G = theta^T phi by the Triton kernel; backward by two batched matmuls.

    dtheta = phi dG^T (B, K, M) and dphi = theta dG (B, K, N): the gradient of a product
    needs no kernel of its own, and G is not saved.
    """

    @staticmethod
    def forward(ctx, theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(theta, phi)
        return affinity(theta, phi)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        theta, phi = ctx.saved_tensors
        grad = grad.to(theta.dtype)
        d_theta = torch.matmul(phi, grad.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        d_phi = torch.matmul(theta, grad) if ctx.needs_input_grad[1] else None
        return d_theta, d_phi
