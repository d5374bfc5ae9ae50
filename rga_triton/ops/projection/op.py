"""The projection step as custom ops: x -> tp = [theta; phi], gx_mean, forward and backward.

    projection_norm  (train: mutates BatchNorm buffers)  x -> norm (4, 3K)[, P]
    projection       x, norm -> tp (B, 2K, L), gx_mean (B, L)          (differentiated)
    projection_backward                                                  (the kernels of backward)

The math, shapes and grids are in this folder's README.md.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...common import settings
from ...common.layout import branch_length, empty_like_merged, input_views, mergeable, weight_matrix
from ..batchnorm.norm import SCHEMA, as_norm, batch_normalised, batchnorm_views, bn_rows, check_batch, finalized, folded
from ..registry import IMPLS, backward_op, custom_op, eager_function, float32_backward
from . import backward_kernels
from .kernels import projection_apply, projection_stats
from .pytorch import projection_grads_torch


@custom_op("projection_norm", mutates_args=("bn_buffers",),
           schema=f"(Tensor x, Tensor? in_gate, Tensor w3, str view, ScalarType compute_dtype, {SCHEMA}) "
                  f"-> (Tensor, Tensor)")
def projection_norm(x, in_gate, w3, view, compute_dtype, bn_affine, bn_buffers, bn_settings, bn_group):
    """(norm (4, 3K) of the theta, phi and gx BatchNorms, P float32 (B, 3K, L)) for P = W3 (X * in_gate),
    called when one of them is in train mode (in eval the wrapper folds the running statistics in
    PyTorch, mutating nothing; P is then empty (0,)). ``projection`` reads P instead of multiplying again.

    x: (B, C, H, W), read as the ``view`` branch's X (B, Cin, L); in_gate: float32 (B, Cin)
    or None; w3: (3K, Cin[, 1, 1]). Train-mode BatchNorms measure P's batch statistics and
    move their running statistics, as nn.BatchNorm2d does (over the ranks of ``bn_group`` where it
    names a process group, as nn.SyncBatchNorm does: ``ops/batchnorm/sync.py``).
    """
    x = mergeable(x)
    shape, strides = input_views(x)[view]
    w3c = weight_matrix(w3, compute_dtype)
    k = w3c.shape[0] // 3
    in_gate = in_gate.contiguous() if in_gate is not None else None
    bns = batchnorm_views([k] * 3, bn_affine, bn_buffers, bn_settings)
    if not batch_normalised(bns):
        return torch.stack(folded(bns)), x.new_empty((0,), dtype=torch.float32)
    batch, _, length = shape
    check_batch(bns, batch * length, (batch, k, length), bn_group)
    stats, p = projection_stats(x, shape, strides, w3c, in_gate, keep_p=True)
    return torch.stack(finalized(bns, stats, length, bn_group)), p


@projection_norm.register_fake
def _(x, in_gate, w3, view, compute_dtype, bn_affine, bn_buffers, bn_settings, bn_group):
    rows = w3.shape[0]
    measured = batch_normalised(batchnorm_views([rows // 3] * 3, bn_affine, bn_buffers, bn_settings))
    p_shape = (x.shape[0], rows, branch_length(x, view)) if measured else (0,)
    return x.new_empty((4, rows), dtype=torch.float32), x.new_empty(p_shape, dtype=torch.float32)


@custom_op("projection", mutates_args=())
def projection(x: Tensor, in_gate: Optional[Tensor], w3: Tensor, bn_weight: Tensor, bn_bias: Tensor, norm: Tensor,
               view: str, compute_dtype: torch.dtype, batch_stats: list[bool],
               p: Optional[Tensor] = None, sync_group: str = "") -> tuple[Tensor, Tensor]:
    """tp = [theta; phi] float32 (B, 2K, L) and gx_mean float32 (B, L), normalised with ``norm``.

    bn_weight, bn_bias: (3K,) the three BatchNorms' affine rows (ones and zeros where not
    affine); batch_stats: per BatchNorm, whether ``norm`` holds batch statistics. Both
    only matter to backward, as does sync_group (the process group whose ranks' batch ``norm``
    measured, by name, or ""). p: P as ``projection_norm`` kept it, or None or empty (P is multiplied here).
    """
    x = mergeable(x)
    shape, strides = input_views(x)[view]
    in_gate = in_gate.contiguous() if in_gate is not None else None
    norm = as_norm(norm)
    return projection_apply(x, shape, strides, weight_matrix(w3, compute_dtype), norm.scale, norm.shift, in_gate,
                            p.contiguous() if p is not None and p.numel() else None)


@projection.register_fake
def _(x, in_gate, w3, bn_weight, bn_bias, norm, view, compute_dtype, batch_stats, p=None, sync_group=""):
    batch, length, k = x.shape[0], branch_length(x, view), w3.shape[0] // 3
    return (x.new_empty((batch, 2 * k, length), dtype=torch.float32),
            x.new_empty((batch, length), dtype=torch.float32))


def _projection_setup(ctx, inputs, output):
    x, in_gate, w3, bn_weight, bn_bias, norm, view, compute_dtype, batch_stats, _, sync_group = inputs
    ctx.save_for_backward(x, in_gate, w3, bn_weight, bn_bias, norm)
    ctx.view, ctx.compute_dtype, ctx.batch_stats, ctx.device_type = view, compute_dtype, batch_stats, x.device.type
    ctx.sync_group = sync_group


def projection_grads(x, in_gate, w3, bn_weight, bn_bias, norm, view, compute_dtype, batch_stats, dtp, dgx_mean,
                     needs=(True, True, True), dx: Optional[Tensor] = None, sync_group: str = ""):
    """The gradients of ``projection`` from its inputs and its outputs' gradients (dtp, dgx_mean):
    (dx, d_in_gate, dw3, d_bn_weight, d_bn_bias), with None for x, in_gate or w3 where ``needs``
    (three flags, in that order) says no. ``dx``: an x-shaped gradient to add x's gradient into,
    in place (the block's backward sums every branch's share in one buffer); else dx is new.
    ``sync_group``: the process group over whose ranks the batch statistics were measured (by name):
    their backward terms are then the group's sums (one all_reduce, ``ops/batchnorm/sync.py``).

    Kernels (see ``backward_kernels.py``): dP (B, 3K, L) is the one temporary of the projection's
    size; X is read through its strides (no transposed or gated copy of x). With
    ``RGA_TRITON_PROJECTION_BACKWARD=torch`` (``common/settings.py``) the PyTorch formula of
    ``pytorch.py`` runs instead.
    """
    if settings.projection_backward() == "torch":
        return projection_grads_torch(x, in_gate, w3, bn_weight, bn_bias, norm, view, compute_dtype, batch_stats,
                                      dtp, dgx_mean, needs, dx, sync_group)
    need_x, need_gate, need_w3 = needs
    x = mergeable(x)
    shape, strides = input_views(x)[view]
    batch, _, length = shape
    wc = weight_matrix(w3, compute_dtype)                               # (3K, Cin), as forward multiplied
    k = wc.shape[0] // 3
    rows = bn_rows(bn_weight.detach(), bn_bias.detach(), as_norm(norm))
    in_gate = in_gate.detach().contiguous() if in_gate is not None else None
    dtp = dtp.contiguous() if dtp is not None else x.new_zeros((batch, 2 * k, length), dtype=torch.float32)
    dgx_mean = dgx_mean.contiguous() if dgx_mean is not None else x.new_zeros((batch, length), dtype=torch.float32)
    dp, sums = backward_kernels.projection_dp(x, shape, strides, wc, in_gate, rows, batch_stats, dtp, dgx_mean,
                                              sync_group)
    del dtp, dgx_mean
    dw3 = None
    if need_w3:
        dw3 = backward_kernels.weight_grad(x, shape, strides, wc, dp, in_gate)
        dw3 = dw3.to(w3.dtype).view(w3.shape)
    d_gate = None
    if need_x or (need_gate and in_gate is not None):
        accumulate = dx is not None
        if need_x and dx is None:
            dx = empty_like_merged(x)
        d_gate = backward_kernels.input_grad(
            x, shape, strides, wc.float(), dp, in_gate, dx if need_x else None,
            input_views(dx)[view][1] if need_x else None, accumulate)
    return (dx if need_x else None), (d_gate if need_gate else None), dw3, sums[1].to(bn_weight.dtype), \
        sums[0].to(bn_bias.dtype)


@custom_op("projection_backward", mutates_args=())
def projection_backward(x: Tensor, in_gate: Optional[Tensor], w3: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                        norm: Tensor, view: str, compute_dtype: torch.dtype, batch_stats: list[bool],
                        dtp: Optional[Tensor], dgx_mean: Optional[Tensor],
                        needs: list[bool], sync_group: str = "") -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`projection_grads` with the kernels, as an op (torch.compile traces the backward formula):
    (dx, d_in_gate, dw3, d_bn_weight, d_bn_bias), each empty (0,) where ``needs`` says no."""
    dx, d_gate, dw3, d_weight, d_bias = projection_grads(x, in_gate, w3, bn_weight, bn_bias, norm, view,
                                                         compute_dtype, batch_stats, dtp, dgx_mean, needs,
                                                         sync_group=sync_group)
    empty = x.new_empty((0,))
    # d_weight and d_bias are rows of one tensor of sums, and an op's outputs may not alias each other
    return (dx if dx is not None else empty, d_gate if d_gate is not None else empty,
            dw3 if dw3 is not None else empty, d_weight.clone(), d_bias.clone())


@projection_backward.register_fake
def _(x, in_gate, w3, bn_weight, bn_bias, norm, view, compute_dtype, batch_stats, dtp, dgx_mean, needs,
      sync_group=""):
    empty = x.new_empty((0,))
    need_x, need_gate, need_w3 = needs
    return (empty_like_merged(mergeable(x)) if need_x else empty,
            torch.empty_like(in_gate) if need_gate and in_gate is not None else empty,
            torch.empty_like(w3) if need_w3 else empty, torch.empty_like(bn_weight), torch.empty_like(bn_bias))


@float32_backward
def _projection_backward(ctx, dtp, dgx_mean):
    x, in_gate, w3, bn_weight, bn_bias, norm = ctx.saved_tensors
    args = (x, in_gate, w3, bn_weight, bn_bias, norm, ctx.view, ctx.compute_dtype, ctx.batch_stats, dtp, dgx_mean,
            list(ctx.needs_input_grad[:3]))
    if settings.projection_backward() == "torch":      # PyTorch ops: traced into the compiled backward
        grads = projection_grads_torch(*args, sync_group=ctx.sync_group)
    else:
        dx, d_gate, dw3, d_weight, d_bias = backward_op(ctx, "projection_backward")(*args, ctx.sync_group)
        need_x, need_gate, need_w3 = ctx.needs_input_grad[:3]
        grads = (dx if need_x else None, d_gate if need_gate and in_gate is not None else None,
                 dw3 if need_w3 else None, d_weight, d_bias)
    return (*grads, None, None, None, None, None, None)


projection.register_autograd(_projection_backward, setup_context=_projection_setup)

eager_projection = eager_function("projection", _projection_setup, _projection_backward)
"""``projection`` for eager autograd, without the dispatcher (``registry.eager_function``)."""


class ThreadedProjection(torch.autograd.Function):
    """``projection`` that also hands x on, as a view, to the block's next reader of x.

    Eager backward only. x's readers form a chain (each projection, then ``apply_gates``), so
    x's gradient reaches each projection as one tensor, the later readers' sum, and backward
    adds this projection's share into it in place: one x-sized gradient buffer for the whole
    block. With x read by each op directly, every projection would hand autograd a new
    x-sized gradient to sum, and a train step would peak one x-sized tensor higher.
    ``registered``: call the registered op (something intercepts the calls), else the implementation.
    """

    @staticmethod
    def forward(ctx, registered, x, in_gate, w3, bn_weight, bn_bias, norm, view, dtype, batch_stats, p, sync_group):
        # no autograd here: the implementation itself, or the op where something intercepts the calls
        project = torch.ops.rga_triton.projection if registered else IMPLS["projection"]
        tp, gx_mean = project(x, in_gate, w3, bn_weight, bn_bias, norm, view, dtype, batch_stats, p, sync_group)
        ctx.save_for_backward(x, in_gate, w3, bn_weight, bn_bias, norm)
        ctx.settings = view, dtype, batch_stats
        ctx.sync_group = sync_group
        ctx.device_type = x.device.type
        ctx.set_materialize_grads(False)
        return tp, gx_mean, x.view_as(x)

    @staticmethod
    @once_differentiable
    @float32_backward
    def backward(ctx, dtp, dgx_mean, dx):
        # dx: the later readers' gradient, a buffer only this chain holds (the next projection's or
        # apply_gates' new tensor), so adding into it in place is safe
        grads = projection_grads(*ctx.saved_tensors, *ctx.settings, dtp, dgx_mean,
                                 needs=ctx.needs_input_grad[1:4], dx=dx, sync_group=ctx.sync_group)
        return None, *grads, None, None, None, None, None, None
