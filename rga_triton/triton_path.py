"""The ``"triton"`` backend: orchestration of the kernels for one RGA block, and its entry point.

Eval forward of RGA-SC reads x three times and writes the output once: the spatial
projection reads x; the channel projection reads x scaled by the spatial gate on the fly
(no gated copy); ``apply_gates`` reads x and writes x * spatial_gate * channel_gate. Train
mode adds one statistics pass per projection, and recomputes Z from the small A and
[theta; phi] for the statistics of the relation and hidden BatchNorms. Everything the
kernels hand each other is O(K L + R K) per image, never O(L^2).

This module runs the forward when no gradient is wanted, in eager mode; ``triton_autograd``
runs the same kernels, and the backward kernels, as the custom ops of ``ops.py``: when a
gradient is wanted, and always under ``torch.compile``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from .algorithm import branch_dims, choose
from .backend import on_device_of
from .batchnorm import (check_batch_size, scale_shift, step_momentum, tracks_running_stats, update_running_stats,
                        uses_batch_stats)
from .cache import memo
from .kernels.batchnorm import bn_finalize, finalize_groups
from .kernels.gating import apply_gates, mergeable
from .kernels.projection import projection_apply, projection_stats
from .kernels.relation import (RelationOperands, gate_logit, hidden_stats, relation_a, relation_z_tiled,
                               z_stats)
from .torch_path import Branch, rga_forward as torch_forward


class Norm(NamedTuple):
    """BatchNorm rows as used by one call, float32 (rows,): bn(z) = z * scale + shift, and the
    statistics it normalised with (z_hat = (z - mean) * inv_std), which backward needs."""

    scale: torch.Tensor
    shift: torch.Tensor
    mean: torch.Tensor
    inv_std: torch.Tensor


def folded(bns) -> Norm:
    """The :class:`Norm` of BatchNorms that all normalise with their running statistics (eval),
    folded once per change of their parameters or buffers in eager mode."""
    fold = lambda: _affines(bns, None, None, 0)  # noqa: E731
    # views rebuilt inside an op (ops.py) hold nothing lasting; torch.compile cannot trace memo's data_ptr
    if not isinstance(bns[0], nn.Module) or torch.compiler.is_compiling():
        return fold()
    # num_batches_tracked: every train step bumps its version; kernels and F.batch_norm move the statistics unseen
    sources = [t for bn in bns for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.weight, bn.bias)]
    return memo(bns[0], ("affine", len(bns)), sources, fold)


def normalizers(bns, partials, count: int, shape, length: int) -> Norm:
    """The :class:`Norm` of the rows of ``bns`` (concatenated in order).

    ``partials()`` launches the kernel that measures per-split (mean, M2) of those rows;
    it runs only if a BatchNorm normalises with the batch, and ``bn_finalize`` launches (one
    per run of up to three alike BatchNorms: :func:`finalize_groups`) then merge them and move
    the running statistics as nn.BatchNorm2d does. In eval the running statistics fold
    (:func:`folded`).
    """
    if not any(uses_batch_stats(bn) for bn in bns):
        return folded(bns)
    if count <= 1 and tracks_running_stats(bns[0]):
        step_momentum(bns[0])       # nn.BatchNorm2d counts the batch before F.batch_norm refuses it
    check_batch_size(count, shape)
    stats = partials()
    starts = [0]
    for bn in bns:
        starts.append(starts[-1] + bn.num_features)
    table = torch.empty((4, starts[-1]), device=stats.device, dtype=torch.float32)    # the Norm's rows
    batch = [(start, bn) for start, bn in zip(starts, bns) if uses_batch_stats(bn)]
    for start, group in finalize_groups(batch):
        factors = [step_momentum(bn) if tracks_running_stats(bn) else 0.0 for bn in group]
        bn_finalize(stats, start, group, length, factors, table[0], table[1], table[2], table[3])
    with torch.no_grad():       # constants for the kernels, as the finalised rows are
        for start, bn in zip(starts, bns):
            if not uses_batch_stats(bn):
                table[:, start:start + bn.num_features] = torch.stack(_fold(bn, bn.running_mean, bn.running_var))
    return Norm(*table)


def _fold(bn, mean: torch.Tensor, var: torch.Tensor) -> Norm:
    scale, shift = scale_shift(bn, mean, var)
    return Norm(scale, shift, mean.float(), torch.rsqrt(var.float() + bn.eps))


@torch.no_grad()
def _affines(bns, batch_mean, batch_var, count: int) -> Norm:
    parts, start = [], 0
    for bn in bns:
        rows = slice(start, start + bn.num_features)
        start += bn.num_features
        if uses_batch_stats(bn):
            mean, var = batch_mean[rows], batch_var[rows]
            update_running_stats(bn, mean, var, count)
        else:
            mean, var = bn.running_mean, bn.running_var
        parts.append(_fold(bn, mean, var))
    return Norm(*(torch.cat(t).contiguous() for t in zip(*parts)))


def weight_matrix(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (stack of) 1x1-conv weight(s) as one contiguous (rows, in) matrix in ``dtype``, detached."""
    return weight.detach().flatten(1).to(dtype).contiguous()


def _weight(owner, tag, dtype, weights):
    """The 1x1-conv weights stacked as one (rows, in) matrix in ``dtype``, memoised."""
    return memo(owner, (tag, dtype), weights, lambda: weight_matrix(torch.cat([w.detach() for w in weights]), dtype))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matrix products run in: x's, or the autocast dtype for float32 x under autocast."""
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def measure_projection(bns, x: torch.Tensor, shape, strides, w3: torch.Tensor, in_gate=None):
    """(:class:`Norm` of theta's, phi's and gx's BatchNorms ``bns``, P or None) for P = W3 (X * in_gate).

    Where a BatchNorm normalises with the batch, the statistics pass keeps P (B, 3K, L) float32,
    and the apply pass reads it instead of multiplying W3 and X a second time: one matmul fewer
    per branch in train mode (the channel branch's is 51 GFLOP at RGA-Net's first stage, B=64),
    for a P-sized tensor (3K/Cin of x in float32) that lives from one pass to the next.
    """
    batch, _, length = shape
    kept = []

    def partials():
        stats, p = projection_stats(x, shape, strides, w3, in_gate, keep_p=True)
        kept.append(p)
        return stats

    norm = normalizers(bns, partials, batch * length, (batch, w3.shape[0] // 3, length), length)
    return norm, (kept[0] if kept else None)


def branch_gate(branch: Branch, x: torch.Tensor, shape, strides, in_gate=None, algorithm="reassociated"):
    """Sigmoid gate (B, L), float32, of one branch reading X (shape (B, Cin, L), ``strides`` into x)."""
    batch, _, length = shape
    count = batch * length
    dtype = compute_dtype(x)
    embeds = (branch.theta, branch.phi, branch.gx)
    w3 = _weight(branch.theta[0], "w3", dtype, [seq[0].weight for seq in embeds])
    norm, p = measure_projection([seq[1] for seq in embeds], x, shape, strides, w3, in_gate)
    tp, gx_mean = projection_apply(x, shape, strides, w3, norm.scale, norm.shift, in_gate, p)
    del p

    wg = _weight(branch.gg[0], "wg", dtype, [branch.gg[0].weight])
    r = wg.shape[0]
    if algorithm == "tiled":
        ops = RelationOperands(tp, gx_mean, None, relation_z_tiled(tp, wg), r)
    else:
        ops = RelationOperands(tp, gx_mean, relation_a(tp, wg), None, r)
    z_scale, z_shift, *_ = normalizers([branch.gg[1]], lambda: z_stats(ops), count, (batch, r, length), length)

    conv1, bn1, _, conv2, bn2 = branch.W
    w1 = _weight(conv1, "w1", torch.float32, [conv1.weight])
    h_scale, h_shift, *_ = normalizers([bn1], lambda: hidden_stats(ops, w1, z_scale, z_shift),
                                    count, (batch, w1.shape[0], length), length)
    w2 = _weight(conv2, "w2", torch.float32, [conv2.weight])
    if not uses_batch_stats(bn2):    # eval: the kernel applies the last BN and the sigmoid itself
        out_scale, out_shift, *_ = normalizers([bn2], None, count, (batch, 1, length), length)
        return gate_logit(ops, w1, z_scale, z_shift, h_scale, h_shift, w2, out_scale, out_shift)
    logit = gate_logit(ops, w1, z_scale, z_shift, h_scale, h_shift, w2)

    check_batch_size(count, (batch, 1, length))
    var, mean = torch.var_mean(logit, unbiased=False)     # one channel: a single small reduction
    out_scale, out_shift, *_ = _affines([bn2], mean.view(1), var.view(1), count)
    return torch.sigmoid(logit * out_scale + out_shift)


def input_views(x: torch.Tensor) -> dict:
    """(shape, strides) of x (B, C, H, W) read as the spatial (B, C, N) and the channel (B, N, C) input."""
    b, c, h, w = x.shape
    sb, sc, sn = x.stride(0), x.stride(1), x.stride(3)
    return {"spatial": ((b, c, h * w), (sb, sc, sn)), "channel": ((b, h * w, c), (sb, sn, sc))}


def compose_gates(module, gate):
    """(spatial gate or None, channel gate or None) composed in ``module.order``.

    ``gate(name, in_gate)`` computes one branch's gate reading x scaled by ``in_gate`` (the
    other branch's gate, or None): "sc" feeds the spatial gate to the channel branch, "cs"
    the reverse, "parallel" reads x in both.
    """
    both = module.use_spatial and module.use_channel
    if both and module.order == "parallel":
        return gate("spatial"), gate("channel")
    if both and module.order == "cs":
        channel = gate("channel")
        return gate("spatial", channel), channel
    spatial = gate("spatial") if module.use_spatial else None
    return spatial, (gate("channel", spatial) if module.use_channel else None)


def branch_algorithm(module, name: str, dtype: torch.dtype, device: torch.device, grad_pass: str) -> str:
    """The algorithm that builds the ``name`` branch's Z with products in ``dtype``: the module's
    setting, or for ``"auto"`` the branch's measured or cheapest one (``rga_triton.algorithm.choose``)."""
    if module.algorithm != "auto":
        return module.algorithm
    return choose(*branch_dims(module, name), dtype, grad_pass, device)


def fused_forward(module, x: torch.Tensor) -> torch.Tensor:
    """The block's output (B, C, H, W) from the kernels; updates BatchNorm buffers in train mode."""
    x = mergeable(x)
    views = input_views(x)

    def gate(name, in_gate=None):       # in_gate: the other branch's gate, applied where x is read
        algorithm = branch_algorithm(module, name, compute_dtype(x), x.device, "forward")
        return branch_gate(module.branch(name), x, *views[name], in_gate, algorithm)

    spatial, channel = compose_gates(module, gate)
    return apply_gates(x, spatial, channel)


def rga_forward(module, x: torch.Tensor) -> torch.Tensor:
    """Entry point of the ``"triton"`` backend for ``RGAModule.forward``."""
    if x.numel() == 0:          # nothing to launch; BatchNorm bookkeeping as nn.BatchNorm2d does it
        return torch_forward(module, x)
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))
    with on_device_of(x):
        # torch.compile traces the custom ops (ops.py); fused_forward reads modules and memoises by data_ptr
        if wants_grad or torch.compiler.is_compiling():
            from .triton_autograd import autograd_forward      # imports this module
            return autograd_forward(module, x, wants_grad)
        return fused_forward(module, x)
