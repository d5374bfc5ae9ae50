"""The relation gate as custom ops: tp, gx_mean -> the gate's logit, forward and backward.

    relation          tp -> a[, z]                       (gate_logit differentiates through them)
    relation_norm     (train: mutates BatchNorm buffers) -> norm (4, R + Hd)
    gate_logit        tp, gx_mean, a, z, norm -> logit   (differentiated)
    gate_logit_backward                                   (the kernels of backward)

The math, shapes and grids are in this folder's README.md.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...common.layout import batch_slices, weight_matrix
from ..batchnorm import sync
from ..batchnorm.norm import SCHEMA, as_norm, batch_normalised, batchnorm_views, bn_rows, check_batch, finalized, folded
from ..registry import backward_op, custom_op, eager_function, float32_backward
from . import kernels
from .backward_kernels import hidden_backward, relation_backward


def kept(t: Tensor) -> bool:
    """Whether ``relation`` kept this one of (a, z): the placeholder of one not kept is (0,), while a kept one
    is 3-D, empty too for an empty batch (a synchronised rank with no image)."""
    return t.dim() == 3


def _operands(tp, gx_mean, a, z) -> kernels.RelationOperands:
    """The gate kernels' operands: Z from memory when it was materialised, else A and tp."""
    z = z if kept(z) else None
    r = z.shape[1] if z is not None else a.shape[1]
    return kernels.RelationOperands(tp.contiguous(), gx_mean.contiguous(), None if z is not None else a.contiguous(),
                                    z.contiguous() if z is not None else None, r)


@custom_op("relation", mutates_args=())
def relation(tp: Tensor, wg: Tensor, tiled: bool, for_backward: bool, keep_z: bool,
             compute_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(a, z) of one branch: a = [W_in phi^T | W_out theta^T] float32 (B, R, 2K), z = a tp float32 (B, R, L).

    tp: float32 (B, 2K, L); wg: (R, 2L[, 1, 1]). Either is empty (0,) where not kept: the
    reassociated algorithm keeps a, and z only with ``keep_z`` (else every pass rebuilds Z's
    tiles from a and tp); the tiled one keeps z (built with G on chip), and a too
    ``for_backward`` (backward reads it). Not differentiated: ``gate_logit``'s formula goes
    through a and z.
    """
    tp = tp.contiguous()
    wgc = weight_matrix(wg, compute_dtype)
    empty = tp.new_empty((0,))
    a = kernels.relation_a(tp, wgc) if for_backward or not tiled else empty
    if tiled:
        z = kernels.relation_z_tiled(tp, wgc)
    elif keep_z:
        with torch.autocast(tp.device.type, enabled=False):     # Z's sums cancel: float32 whatever autocast says
            z = torch.bmm(a, tp)
    else:
        z = empty
    return a, z


@relation.register_fake
def _(tp, wg, tiled, for_backward, keep_z, compute_dtype):
    batch, k2, length = tp.shape
    r = wg.shape[0]
    return (tp.new_empty((batch, r, k2) if for_backward or not tiled else (0,)),
            tp.new_empty((batch, r, length) if tiled or keep_z else (0,)))


@custom_op("relation_norm", mutates_args=("bn_buffers",),
           schema=f"(Tensor tp, Tensor gx_mean, Tensor a, Tensor z, Tensor w1, {SCHEMA}) -> Tensor")
def relation_norm(tp, gx_mean, a, z, w1, bn_affine, bn_buffers, bn_settings, bn_group):
    """The norm (4, R + Hd) of the relation BatchNorm (rows of Z), then of the hidden one (rows of h).

    (a, z) as ``relation`` returned them; gx_mean: float32 (B, L); w1: (Hd, 1 + R[, 1, 1]).
    Train-mode BatchNorms measure their batch statistics and move their running statistics (over
    the ranks of ``bn_group`` where it names a process group: ``ops/batchnorm/sync.py``).
    """
    ops = _operands(tp, gx_mean, a, z)
    w1f = weight_matrix(w1, torch.float32)
    count, r, hidden = ops.batch * ops.length, ops.r, w1f.shape[0]
    bn_z, bn_h = batchnorm_views([r, hidden], bn_affine, bn_buffers, bn_settings)
    if batch_normalised([bn_z]):
        check_batch([bn_z], count, (ops.batch, r, ops.length), bn_group)
        z_norm = finalized([bn_z], kernels.z_stats(ops), ops.length, bn_group)
    else:
        z_norm = folded([bn_z])
    if batch_normalised([bn_h]):
        check_batch([bn_h], count, (ops.batch, hidden, ops.length), bn_group)
        h_norm = finalized([bn_h], kernels.hidden_stats(ops, w1f, z_norm.scale, z_norm.shift), ops.length, bn_group)
    else:
        h_norm = folded([bn_h])
    return torch.cat([torch.stack(z_norm), torch.stack(h_norm)], dim=1)


@relation_norm.register_fake
def _(tp, gx_mean, a, z, w1, *rest):
    r = z.shape[1] if kept(z) else a.shape[1]
    return tp.new_empty((4, r + w1.shape[0]))


def _split_norm(norm: Tensor, r: int):
    """The relation BatchNorm's and the hidden BatchNorm's :class:`Norm` from their norm (4, R + Hd)."""
    return as_norm(norm[:, :r]), as_norm(norm[:, r:])


@custom_op("gate_logit", mutates_args=())
def gate_logit(tp: Tensor, gx_mean: Tensor, wg: Tensor, w1: Tensor, w2: Tensor, bn_weight: Tensor, bn_bias: Tensor,
               a: Tensor, z: Tensor, norm: Tensor, batch_stats: list[bool], compute_dtype: torch.dtype,
               sync_group: str = "") -> Tensor:
    """The gate's logit before the last BatchNorm, float32 (B, L), from ``relation``'s (a, z) and the norm
    (4, R + Hd) of the relation and hidden BatchNorms.

    w2: (1, Hd[, 1, 1]). wg, bn_weight, bn_bias (R + Hd,) (the two BatchNorms' affine rows,
    ones and zeros where not affine) and batch_stats (per BatchNorm, whether ``norm`` holds
    batch statistics) only matter to backward, as does sync_group (the process group whose ranks'
    batch ``norm`` measured, by name, or "").
    """
    ops = _operands(tp, gx_mean, a, z)
    z_norm, h_norm = _split_norm(norm, ops.r)
    return kernels.gate_logit(ops, weight_matrix(w1, torch.float32), z_norm.scale, z_norm.shift, h_norm.scale,
                              h_norm.shift, weight_matrix(w2, torch.float32).flatten())


@gate_logit.register_fake
def _(tp, gx_mean, *rest):
    return gx_mean.new_empty(gx_mean.shape, dtype=torch.float32)


DZ_SLICE_MIN_BYTES = 1 << 24
"""dZ (B, R, L), float32, is written and consumed a quarter of the batch at a time when the whole
would take at least this many bytes: at RGA-Net's stage 1 (spatial branch) and stages 3-4
(channel branch) it is as large as x or larger, and a train step's peak is where it lives."""


@custom_op("gate_logit_backward", mutates_args=())
def gate_logit_backward(dlogit: Tensor, tp: Tensor, gx_mean: Tensor, a: Tensor, z: Tensor, w1: Tensor, w2: Tensor,
                        bn_weight: Tensor, bn_bias: Tensor, norm: Tensor, batch_stats: list[bool],
                        sync_group: str = "") -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The kernel part of ``gate_logit``'s backward, all float32: dA = dZ tp^T (B, R, 2K), A^T dZ
    (B, 2K, L) (tp's gradient through Z's right factor), dgx_mean (B, L), dw1 (Hd, 1 + R), and
    sums (3, R + Hd) over the BatchNorms' rows (relation, then hidden): sum dy, sum dy v_hat, and
    in the hidden rows dw2. (a, z) as ``relation`` kept them: the kernels read Z from z, or
    rebuild its tiles from a and tp where z is empty.

    The attention network and the relation BatchNorm run per position tile in
    ``backward_kernels.py``; with batch statistics, a first pass measures the sums their
    correction terms need. dZ never leaves the op: it is written, and multiplied into dA and
    A^T dZ, a slice of the batch at a time (:data:`DZ_SLICE_MIN_BYTES`). ``sync_group``: the process
    group whose ranks' batch the BatchNorms normalised with (by name): their correction terms are then
    the group's sums over its count (one all_reduce per BatchNorm, ``ops/batchnorm/sync.py``).
    """
    ops = _operands(tp, gx_mean, a, z)
    r, (z_batch, h_batch) = ops.r, batch_stats
    count = ops.batch * ops.length
    w1f, w2f = weight_matrix(w1, torch.float32), weight_matrix(w2, torch.float32).flatten()
    z_norm, h_norm = _split_norm(norm, r)
    z_bn, h_bn = bn_rows(bn_weight[:r], bn_bias[:r], z_norm), bn_rows(bn_weight[r:], bn_bias[r:], h_norm)
    dlogit = dlogit.float().contiguous()

    args = (ops, w1f, z_norm.scale, z_norm.shift)
    if h_batch:     # the batch-statistics terms need dy1's sums before dh
        h_sums = hidden_backward(*args, h_bn, w2f, dlogit, sums=True, write=False)[0]
        h_bn[4:] = _terms(h_sums[:2], count, sync_group)
        _, dh, dgx_mean, dw1_pool = hidden_backward(*args, h_bn, w2f, dlogit, sums=False, write=True)
    else:
        h_sums, dh, dgx_mean, dw1_pool = hidden_backward(*args, h_bn, w2f, dlogit, sums=True, write=True)
    if z_batch:
        z_sums, dw1_rel, _ = relation_backward(ops, w1f, z_bn, dh, sums=True, write=False)
        z_bn[4:] = _terms(z_sums, count, sync_group)
    a, tp = a.contiguous(), ops.tp
    da = tp.new_empty((ops.batch, r, ops.k2))
    dtp = torch.empty_like(tp)
    dz_bytes = ops.batch * r * ops.length * 4
    parts = []
    with torch.autocast(tp.device.type, enabled=False):        # the products stay float32
        for rows in batch_slices(ops.batch, 4 if dz_bytes >= DZ_SLICE_MIN_BYTES else 1):
            part = _operands(tp[rows], gx_mean[rows], a[rows], z[rows] if kept(z) else z)
            sums_part, dw1_part, dz = relation_backward(part, w1f, z_bn, dh[rows], sums=not z_batch, write=True)
            parts.append((sums_part, dw1_part))
            torch.bmm(dz, tp[rows].transpose(1, 2), out=da[rows])
            torch.bmm(a[rows].transpose(1, 2), dz, out=dtp[rows])
            del dz
    if not z_batch:     # the slices' sums, added in a fixed order
        z_sums, dw1_rel = (torch.stack(t).sum(dim=0) for t in zip(*parts))
    sums = torch.cat([torch.cat([z_sums, torch.zeros_like(z_sums[:1])]), h_sums], dim=1)
    return da, dtp, dgx_mean, torch.cat([dw1_pool[:, None], dw1_rel], dim=1), sums


def _terms(sums: Tensor, count: int, sync_group: str) -> Tensor:
    """A BatchNorm's batch-statistics terms (c_b, c_g) from its sums (sum dy, sum dy v_hat) over ``count``
    values: this rank's means, or the synchronised group's."""
    return sync.group_means(sums, count, sync_group) if sync_group else sums / count


@gate_logit_backward.register_fake
def _(dlogit, tp, gx_mean, a, z, w1, w2, bn_weight, *rest):
    new = lambda *shape: tp.new_empty(shape, dtype=torch.float32)  # noqa: E731
    hidden, r = w1.shape[0], (z.shape[1] if kept(z) else a.shape[1])
    batch, k2, length = tp.shape
    return new(batch, r, k2), new(batch, k2, length), new(*gx_mean.shape), new(hidden, 1 + r), new(3, r + hidden)


def _gate_logit_setup(ctx, inputs, output):
    tp, gx_mean, wg, w1, w2, bn_weight, bn_bias, a, z, norm, batch_stats, compute_dtype, sync_group = inputs
    ctx.save_for_backward(tp, gx_mean, wg, w1, w2, bn_weight, bn_bias, a, z, norm)
    ctx.batch_stats, ctx.compute_dtype, ctx.device_type = batch_stats, compute_dtype, tp.device.type
    ctx.sync_group = sync_group


def gate_logit_grads(tp, gx_mean, wg, w1, w2, bn_weight, bn_bias, a, z, norm, batch_stats, compute_dtype, dlogit,
                     backward_kernels, sync_group: str = ""):
    """The gradients of ``gate_logit`` from its inputs and the logit's gradient: (dtp, dgx_mean, dwg,
    dw1, dw2, d_bn_weight, d_bn_bias). The kernels for the attention network and the relation
    BatchNorm, and the products through Z = A tp (``gate_logit_backward``), then PyTorch through
    A = [W_in phi^T | W_out theta^T]: two batched matmuls into tp's gradient, two for W_in, W_out.
    ``backward_kernels``: what runs ``gate_logit_backward`` (its op, or its implementation:
    ``registry.backward_op``); ``sync_group``: as ``gate_logit_backward`` takes it."""
    if not kept(a):
        raise RuntimeError("rga_triton::gate_logit: backward needs relation(for_backward=True)'s a")
    da, dtp, dgx_mean, dw1, sums = backward_kernels(
        dlogit, tp, gx_mean, a, z, w1, w2, bn_weight, bn_bias, norm, batch_stats, sync_group)
    batch, k2, length = tp.shape
    k, r = k2 // 2, da.shape[1]
    wf = weight_matrix(wg, compute_dtype).float()
    w_in, w_out = wf[:, :length], wf[:, length:]
    da_in, da_out = da[:, :, :k], da[:, :, k:]
    # tp's gradient through A's factors (theta, phi), added in place: dphi += dA_in^T W_in, dtheta += dA_out^T W_out
    dtp[:, k:].baddbmm_(da_in.transpose(1, 2), w_in.expand(batch, -1, -1))
    dtp[:, :k].baddbmm_(da_out.transpose(1, 2), w_out.expand(batch, -1, -1))
    dw_in = torch.einsum("brk,bkl->rl", da_in, tp[:, k:])
    dw_out = torch.einsum("brk,bkl->rl", da_out, tp[:, :k])
    dwg = torch.cat([dw_in, dw_out], dim=1).to(wg.dtype).view(wg.shape)
    return (dtp, dgx_mean, dwg, dw1.to(w1.dtype).view(w1.shape), sums[2, r:].to(w2.dtype).view(w2.shape),
            sums[1].to(bn_weight.dtype), sums[0].to(bn_bias.dtype))


@float32_backward
def _gate_logit_backward(ctx, dlogit):
    return (*gate_logit_grads(*ctx.saved_tensors, ctx.batch_stats, ctx.compute_dtype, dlogit,
                              backward_op(ctx, "gate_logit_backward"), ctx.sync_group),
            None, None, None, None, None, None)


gate_logit.register_autograd(_gate_logit_backward, setup_context=_gate_logit_setup)

eager_gate_logit = eager_function("gate_logit", _gate_logit_setup, _gate_logit_backward)
"""``gate_logit`` for eager autograd, without the dispatcher (``registry.eager_function``)."""
