"""Gating as custom ops: out = x * spatial gate * channel gate, and its backward, one kernel pass each.
The math, shapes and grids are in this folder's README.md."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...common.layout import empty_like_merged, mergeable
from ..registry import backward_op, contiguous, custom_op, eager_function
from . import kernels


@custom_op("apply_gates", mutates_args=())
def apply_gates(x: Tensor, spatial: Optional[Tensor], channel: Optional[Tensor]) -> Tensor:
    """out = x * spatial[:, None, :] * channel[:, :, None] (x viewed as (B, C, N)), one kernel pass.

    x: (B, C, H, W) any strides; spatial float32 (B, H*W) or None; channel float32 (B, C) or None.
    The output has x's memory format where H and W merge into one axis, else it is contiguous.
    """
    return kernels.apply_gates(x, contiguous(spatial), contiguous(channel))


@apply_gates.register_fake
def _(x, spatial, channel):
    return empty_like_merged(mergeable(x))


@custom_op("apply_gates_backward", mutates_args=())
def apply_gates_backward(grad_out: Tensor, x: Tensor, spatial: Optional[Tensor],
                         channel: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, d_spatial, d_channel) of ``apply_gates`` in one kernel pass over grad_out and x; a gate's
    gradient is empty (0,) where the gate is None. dx has ``apply_gates``' output layout."""
    dx, d_spatial, d_channel = kernels.apply_gates_backward(grad_out, x, contiguous(spatial), contiguous(channel))
    empty = x.new_empty((0,), dtype=torch.float32)
    return dx, d_spatial if d_spatial is not None else empty, d_channel if d_channel is not None else empty


@apply_gates_backward.register_fake
def _(grad_out, x, spatial, channel):
    empty = x.new_empty((0,), dtype=torch.float32)
    return (empty_like_merged(mergeable(x)),
            torch.empty_like(spatial) if spatial is not None else empty,
            torch.empty_like(channel) if channel is not None else empty)


def _apply_gates_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _apply_gates_backward(ctx, grad_out):
    x, spatial, channel = ctx.saved_tensors
    dx, d_spatial, d_channel = backward_op(ctx, "apply_gates_backward")(grad_out, x, spatial, channel)
    needs = ctx.needs_input_grad
    return (dx if needs[0] else None, d_spatial if spatial is not None and needs[1] else None,
            d_channel if channel is not None and needs[2] else None)


apply_gates.register_autograd(_apply_gates_backward, setup_context=_apply_gates_setup)

eager_apply_gates = eager_function("apply_gates", _apply_gates_setup, _apply_gates_backward)
"""``apply_gates`` for eager autograd, without the dispatcher (``registry.eager_function``)."""
