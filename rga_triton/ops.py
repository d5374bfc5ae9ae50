"""The Triton path's steps as PyTorch custom operators (namespace ``rga_triton``).

``torch.compile`` cannot trace the Triton launchers: they take nn.Modules, go through the
autotuning wrapper of ``kernels/tuned.py`` and branch on BatchNorm state on the host. Each
step is therefore a ``torch.library.custom_op``: an opaque call whose arguments are
tensors, lists of tensors and scalars, with a fake (shapes-only) implementation for tracing.

Why ``custom_op`` and not ``torch.library.triton_op`` + ``wrap_triton``: triton_op needs
dynamo to trace each launcher down to ``kernel[grid](...)``, and ours pass through
``TunedKernel`` (configuration-file lookup, autotuning, recording the winner) and through
``triton_path.normalizers`` (momentum=None reads num_batches_tracked on the host). Opaque ops
keep that code as it is; inductor cannot fuse into them, and has nothing to fuse there.

Two rules shape the ops. An op that moves BatchNorm running statistics mutates its buffer
arguments (declared in ``mutates_args``, so functionalization copies the updates back when
it hands the op copies), and an op with an autograd formula must be functional. So a
BatchNorm group with a train-mode member is measured by its own op (``*_norm``, on
detached inputs), which moves the running statistics; the differentiated op then computes
from those statistics, and its backward formula contains the batch-statistics terms itself,
as nn.BatchNorm2d's does. In eval no op mutates: the wrapper folds the running statistics
in PyTorch (``triton_path.folded``). Per branch, then ``apply_gates``:

    projection_norm (train: mutates BatchNorm buffers) -> norm
    projection                    x, norm -> tp = [theta; phi], gx_mean     (differentiated)
    relation                           tp -> a[, z]                         (gate_logit differentiates through them)
    relation_norm   (train: mutates BatchNorm buffers) -> norm
    gate_logit        tp, gx_mean, a, z, norm -> logit                      (differentiated)

A norm is float32 (4, rows) over a group's BatchNorms, their rows concatenated: scale, shift
(bn(v) = v * scale + shift), and the mean and 1/std it normalised with; the differentiated
op takes the group's affine rows (bn_weight, bn_bias) as inputs. ``gate_logit``'s and
``projection``'s backward run kernels, so they are ops too (``gate_logit_backward``,
``projection_backward``); the rest of the backward formulas are PyTorch, traced into the
compiled backward. Every group of BatchNorms is passed as the same
three arguments (:func:`batchnorm_args`), rebuilt inside the op as :class:`BatchNormView`
objects, which ``triton_path.normalizers`` and ``batchnorm.py`` read like the modules.

Who calls them: ``triton_autograd`` when a gradient is wanted, and every call under
torch.compile (eager calls without gradients keep ``triton_path.fused_forward``, which
memoises folded BatchNorms on the modules). In eager mode ``triton_autograd`` calls the same
implementations and backward formulas without the dispatcher (:data:`eager`). What runs
before them traces: RGAModule.forward's checks (``checks.py``, ``backend.resolve``) read
module attributes and tensor metadata, which dynamo guards on; a GPU's compute capability and
the fallback warning are asked while tracing (marked ``assume_constant_result`` in ``backend.py``,
see ``tracing.py``). The last BatchNorm of each gate runs in PyTorch, so ``momentum=None`` there
breaks fullgraph exactly as it breaks nn.BatchNorm2d (1 / num_batches_tracked is a
data-dependent float); inside the ops it is fine.
"""
import functools
import math
import os
from types import SimpleNamespace
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .batchnorm import uses_batch_stats
from .kernels import relation as relation_kernels
from .kernels import gating
from .kernels import projection_backward as projection_backward_kernels
from .kernels.projection import projection_apply
from .kernels.relation_backward import hidden_backward, relation_backward
from .projection_torch_backward import batch_slices, projection_grads_torch
from .triton_path import Norm, input_views, measure_projection, mergeable, normalizers, weight_matrix

CUMULATIVE = math.nan
"""``momentum`` in ``bn_settings`` for ``momentum=None`` (nn.BatchNorm2d's cumulative average)."""


class BatchNormView(NamedTuple):
    """The attributes of an nn.BatchNorm2d that the BatchNorm bookkeeping reads, rebuilt inside an
    op from its arguments: the tensors are the op's, so running-statistics updates land in them."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor]
    momentum: Optional[float]
    eps: float
    training: bool
    track_running_stats: bool
    num_features: int


def batchnorm_args(bns) -> dict:
    """The op keyword arguments that describe the BatchNorm modules ``bns``, three per group of BatchNorms
    (few arguments: custom-op dispatch costs grow with their number):

    - bn_affine: weight, bias per BatchNorm (None where not affine), detached: the op does not differentiate;
    - bn_buffers: running_mean, running_var, num_batches_tracked per BatchNorm (None where absent), mutated;
    - bn_settings: momentum (CUMULATIVE for None), eps, training, track_running_stats per BatchNorm.
    """
    def detached(t):
        return t.detach() if t is not None else None

    return dict(bn_affine=[detached(t) for bn in bns for t in (bn.weight, bn.bias)],
                bn_buffers=[t for bn in bns for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)],
                bn_settings=[float(v) for bn in bns for v in (CUMULATIVE if bn.momentum is None else bn.momentum,
                                                              bn.eps, bn.training, bn.track_running_stats)])


def batchnorm_views(sizes, bn_affine, bn_buffers, bn_settings) -> list:
    """The :class:`BatchNormView` of each BatchNorm described by an op's arguments; ``sizes``: their widths."""
    views = []
    for i, size in enumerate(sizes):
        momentum, eps, training, track = bn_settings[4 * i:4 * i + 4]
        views.append(BatchNormView(*bn_affine[2 * i:2 * i + 2], *bn_buffers[3 * i:3 * i + 3],
                                   None if math.isnan(momentum) else momentum, eps, bool(training), bool(track),
                                   size))
    return views


def _norm(rows: Tensor) -> Norm:
    return Norm(*rows.contiguous())


def _operands(tp, gx_mean, a, z) -> relation_kernels.RelationOperands:
    """The gate kernels' operands: Z from memory when it was materialised, else A and tp."""
    z = z if z.numel() else None
    r = z.shape[1] if z is not None else a.shape[1]
    return relation_kernels.RelationOperands(tp.contiguous(), gx_mean.contiguous(),
                                             None if z is not None else a.contiguous(),
                                             z.contiguous() if z is not None else None, r)


def _branch_length(x: Tensor, view: str) -> int:
    """L of a branch reading x (B, C, H, W): H*W positions (spatial) or C channels (channel)."""
    return x.shape[2] * x.shape[3] if view == "spatial" else x.shape[1]


def float32_backward(backward):
    """Run a backward formula with autocast off: its products stay float32, as in eager backward
    (torch.compile traces backward under the forward's autocast state). ctx.device_type: set in setup or forward."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        if not torch.is_autocast_enabled(ctx.device_type):     # eager backward: nothing to switch off
            return backward(ctx, *grads)
        with torch.autocast(ctx.device_type, enabled=False):
            return backward(ctx, *grads)
    return run


_BN = "Tensor?[] bn_affine, Tensor(a!)?[] bn_buffers, float[] bn_settings"     # see batchnorm_args

IMPLS: dict[str, Callable] = {}
"""Each op's Python implementation, by op name. Eager autograd calls them directly (see
:data:`eager`): the dispatcher costs 80 to 90 us per call of ours on a 2-core CPU, a third of
a small block's host time; torch.compile traces the registered ops."""


def _op(name: str, **kwargs):
    """``torch.library.custom_op("rga_triton::<name>", ...)`` that also keeps the function in :data:`IMPLS`."""
    def register(fn):
        IMPLS[name] = fn
        return torch.library.custom_op(f"rga_triton::{name}", **kwargs)(fn)
    return register


def _backward_op(ctx, name: str):
    """The op a backward formula calls: its implementation under an eager Function (``ctx.eager``),
    else the registered op, which a compiled backward traces."""
    return IMPLS[name] if getattr(ctx, "eager", False) else getattr(torch.ops.rga_triton, name)


def _eager_function(name: str, setup_context, backward):
    """The differentiable op ``name`` as a ``torch.autograd.Function`` around its implementation: the same
    forward, saved tensors and backward formula as the registered op, without the dispatcher."""
    impl = IMPLS[name]

    class EagerOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = impl(*inputs)
            setup_context(ctx, inputs, output)
            ctx.eager = True
            return output

        @staticmethod
        @once_differentiable
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    EagerOp.__name__ = EagerOp.__qualname__ = f"{name}_eager"
    return EagerOp.apply


# ---- projection: x -> theta, phi (stacked as tp) and gx's channel mean ------------------------------------

@_op("projection_norm", mutates_args=("bn_buffers",),
     schema=f"(Tensor x, Tensor? in_gate, Tensor w3, str view, ScalarType compute_dtype, {_BN}) -> (Tensor, Tensor)")
def projection_norm(x, in_gate, w3, view, compute_dtype, bn_affine, bn_buffers, bn_settings):
    """(norm (4, 3K) of the theta, phi and gx BatchNorms, P float32 (B, 3K, L)) for P = W3 (X * in_gate),
    called when one of them is in train mode (in eval the wrapper folds the running statistics in
    PyTorch, mutating nothing; P is then empty (0,)). ``projection`` reads P instead of multiplying again.

    x: (B, C, H, W), read as the ``view`` branch's X (B, Cin, L); in_gate: float32 (B, Cin)
    or None; w3: (3K, Cin[, 1, 1]). Train-mode BatchNorms measure P's batch statistics and
    move their running statistics, as nn.BatchNorm2d does.
    """
    x = mergeable(x)
    shape, strides = input_views(x)[view]
    batch, _, length = shape
    w3c = weight_matrix(w3, compute_dtype)
    k = w3c.shape[0] // 3
    in_gate = in_gate.contiguous() if in_gate is not None else None
    bns = batchnorm_views([k] * 3, bn_affine, bn_buffers, bn_settings)
    norm, p = measure_projection(bns, x, shape, strides, w3c, in_gate)
    return torch.stack(norm), (p if p is not None else x.new_empty((0,), dtype=torch.float32))


@projection_norm.register_fake
def _(x, in_gate, w3, view, compute_dtype, bn_affine, bn_buffers, bn_settings):
    rows = w3.shape[0]
    measured = any(uses_batch_stats(bn) for bn in batchnorm_views([rows // 3] * 3, bn_affine, bn_buffers, bn_settings))
    p_shape = (x.shape[0], rows, _branch_length(x, view)) if measured else (0,)
    return x.new_empty((4, rows), dtype=torch.float32), x.new_empty(p_shape, dtype=torch.float32)


@_op("projection", mutates_args=())
def projection(x: Tensor, in_gate: Optional[Tensor], w3: Tensor, bn_weight: Tensor, bn_bias: Tensor, norm: Tensor,
               view: str, compute_dtype: torch.dtype, batch_stats: list[bool],
               p: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """tp = [theta; phi] float32 (B, 2K, L) and gx_mean float32 (B, L), normalised with ``norm``.

    bn_weight, bn_bias: (3K,) the three BatchNorms' affine rows (ones and zeros where not
    affine); batch_stats: per BatchNorm, whether ``norm`` holds batch statistics. Both
    only matter to backward. p: P as ``projection_norm`` kept it, or None or empty (P is multiplied here).
    """
    x = mergeable(x)
    shape, strides = input_views(x)[view]
    in_gate = in_gate.contiguous() if in_gate is not None else None
    norm = _norm(norm)
    return projection_apply(x, shape, strides, weight_matrix(w3, compute_dtype), norm.scale, norm.shift, in_gate,
                            p.contiguous() if p is not None and p.numel() else None)


@projection.register_fake
def _(x, in_gate, w3, bn_weight, bn_bias, norm, view, compute_dtype, batch_stats, p=None):
    batch, length, k = x.shape[0], _branch_length(x, view), w3.shape[0] // 3
    return (x.new_empty((batch, 2 * k, length), dtype=torch.float32),
            x.new_empty((batch, length), dtype=torch.float32))


def _projection_setup(ctx, inputs, output):
    x, in_gate, w3, bn_weight, bn_bias, norm, view, compute_dtype, batch_stats, _ = inputs
    ctx.save_for_backward(x, in_gate, w3, bn_weight, bn_bias, norm)
    ctx.view, ctx.compute_dtype, ctx.batch_stats, ctx.device_type = view, compute_dtype, batch_stats, x.device.type


PROJECTION_BACKWARDS = ("kernels", "torch")
PROJECTION_BACKWARD = os.environ.get("RGA_TRITON_PROJECTION_BACKWARD", "kernels")
"""How the projection is differentiated: ``"kernels"`` (``kernels/projection_backward.py``, 3xTF32 on
CUDA) or ``"torch"`` (:func:`projection_grads_torch`, PyTorch's float32 matmuls), the formula the
kernels replaced, kept to measure them against (``RGA_TRITON_PROJECTION_BACKWARD=torch``)."""


def projection_grads(x, in_gate, w3, bn_weight, bn_bias, norm, view, compute_dtype, batch_stats, dtp, dgx_mean,
                     needs=(True, True, True), dx: Optional[Tensor] = None):
    """The gradients of ``projection`` from its inputs and its outputs' gradients (dtp, dgx_mean):
    (dx, d_in_gate, dw3, d_bn_weight, d_bn_bias), with None for x, in_gate or w3 where ``needs``
    (three flags, in that order) says no. ``dx``: an x-shaped gradient to add x's gradient into,
    in place (the block's backward sums every branch's share in one buffer); else dx is new.

    Kernels (see ``kernels/projection_backward.py``): dP (B, 3K, L) is the one temporary of
    the projection's size; X is read through its strides (no transposed or gated copy of x).
    """
    if PROJECTION_BACKWARD not in PROJECTION_BACKWARDS:
        raise ValueError(f"RGA_TRITON_PROJECTION_BACKWARD must be one of {PROJECTION_BACKWARDS}, "
                         f"got {PROJECTION_BACKWARD!r}")
    if PROJECTION_BACKWARD == "torch":
        return projection_grads_torch(x, in_gate, w3, bn_weight, bn_bias, norm, view, compute_dtype, batch_stats,
                                      dtp, dgx_mean, needs, dx)
    need_x, need_gate, need_w3 = needs
    x = mergeable(x)
    shape, strides = input_views(x)[view]
    batch, _, length = shape
    wc = weight_matrix(w3, compute_dtype)                               # (3K, Cin), as forward multiplied
    k = wc.shape[0] // 3
    rows = _bn_rows(bn_weight.detach(), bn_bias.detach(), _norm(norm))
    in_gate = in_gate.detach().contiguous() if in_gate is not None else None
    dtp = dtp.contiguous() if dtp is not None else x.new_zeros((batch, 2 * k, length), dtype=torch.float32)
    dgx_mean = dgx_mean.contiguous() if dgx_mean is not None else x.new_zeros((batch, length), dtype=torch.float32)
    dp, sums = projection_backward_kernels.projection_dp(x, shape, strides, wc, in_gate, rows, batch_stats, dtp,
                                                         dgx_mean)
    del dtp, dgx_mean
    dw3 = None
    if need_w3:
        dw3 = projection_backward_kernels.weight_grad(x, shape, strides, wc, dp, in_gate)
        dw3 = dw3.to(w3.dtype).view(w3.shape)
    d_gate = None
    if need_x or (need_gate and in_gate is not None):
        accumulate = dx is not None
        if need_x and dx is None:
            dx = gating.empty_like_merged(x)
        d_gate = projection_backward_kernels.input_grad(
            x, shape, strides, wc.float(), dp, in_gate, dx if need_x else None,
            input_views(dx)[view][1] if need_x else None, accumulate)
    return (dx if need_x else None), (d_gate if need_gate else None), dw3, sums[1].to(bn_weight.dtype), \
        sums[0].to(bn_bias.dtype)


@_op("projection_backward", mutates_args=())
def projection_backward(x: Tensor, in_gate: Optional[Tensor], w3: Tensor, bn_weight: Tensor, bn_bias: Tensor,
                        norm: Tensor, view: str, compute_dtype: torch.dtype, batch_stats: list[bool],
                        dtp: Optional[Tensor], dgx_mean: Optional[Tensor],
                        needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`projection_grads` with the kernels, as an op (torch.compile traces the backward formula):
    (dx, d_in_gate, dw3, d_bn_weight, d_bn_bias), each empty (0,) where ``needs`` says no."""
    dx, d_gate, dw3, d_weight, d_bias = projection_grads(x, in_gate, w3, bn_weight, bn_bias, norm, view,
                                                         compute_dtype, batch_stats, dtp, dgx_mean, needs)
    empty = x.new_empty((0,))
    # d_weight and d_bias are rows of one tensor of sums, and an op's outputs may not alias each other
    return (dx if dx is not None else empty, d_gate if d_gate is not None else empty,
            dw3 if dw3 is not None else empty, d_weight.clone(), d_bias.clone())


@projection_backward.register_fake
def _(x, in_gate, w3, bn_weight, bn_bias, norm, view, compute_dtype, batch_stats, dtp, dgx_mean, needs):
    empty = x.new_empty((0,))
    need_x, need_gate, need_w3 = needs
    return (_fake_gated(x) if need_x else empty,
            torch.empty_like(in_gate) if need_gate and in_gate is not None else empty,
            torch.empty_like(w3) if need_w3 else empty, torch.empty_like(bn_weight), torch.empty_like(bn_bias))


@float32_backward
def _projection_backward(ctx, dtp, dgx_mean):
    x, in_gate, w3, bn_weight, bn_bias, norm = ctx.saved_tensors
    args = (x, in_gate, w3, bn_weight, bn_bias, norm, ctx.view, ctx.compute_dtype, ctx.batch_stats, dtp, dgx_mean,
            list(ctx.needs_input_grad[:3]))
    if PROJECTION_BACKWARD == "torch":      # PyTorch ops: traced into the compiled backward
        grads = projection_grads_torch(*args)
    else:
        dx, d_gate, dw3, d_weight, d_bias = _backward_op(ctx, "projection_backward")(*args)
        need_x, need_gate, need_w3 = ctx.needs_input_grad[:3]
        grads = (dx if need_x else None, d_gate if need_gate and in_gate is not None else None,
                 dw3 if need_w3 else None, d_weight, d_bias)
    return (*grads, None, None, None, None, None)


projection.register_autograd(_projection_backward, setup_context=_projection_setup)


# ---- relation embedding and attention network: tp, gx_mean -> the gate's logit ---------------------------

@_op("relation", mutates_args=())
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
    a = relation_kernels.relation_a(tp, wgc) if for_backward or not tiled else empty
    if tiled:
        z = relation_kernels.relation_z_tiled(tp, wgc)
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


@_op("relation_norm", mutates_args=("bn_buffers",),
     schema=f"(Tensor tp, Tensor gx_mean, Tensor a, Tensor z, Tensor w1, {_BN}) -> Tensor")
def relation_norm(tp, gx_mean, a, z, w1, bn_affine, bn_buffers, bn_settings):
    """The norm (4, R + Hd) of the relation BatchNorm (rows of Z), then of the hidden one (rows of h).

    (a, z) as ``relation`` returned them; gx_mean: float32 (B, L); w1: (Hd, 1 + R[, 1, 1]).
    Train-mode BatchNorms measure their batch statistics and move their running statistics.
    """
    ops = _operands(tp, gx_mean, a, z)
    w1f = weight_matrix(w1, torch.float32)
    count, r, hidden = ops.batch * ops.length, ops.r, w1f.shape[0]
    bn_z, bn_h = batchnorm_views([r, hidden], bn_affine, bn_buffers, bn_settings)
    z_norm = normalizers([bn_z], lambda: relation_kernels.z_stats(ops), count, (ops.batch, r, ops.length),
                         ops.length)
    h_norm = normalizers([bn_h], lambda: relation_kernels.hidden_stats(ops, w1f, z_norm.scale, z_norm.shift),
                         count, (ops.batch, hidden, ops.length), ops.length)
    return torch.cat([torch.stack(z_norm), torch.stack(h_norm)], dim=1)


@relation_norm.register_fake
def _(tp, gx_mean, a, z, w1, *rest):
    r = z.shape[1] if z.numel() else a.shape[1]
    return tp.new_empty((4, r + w1.shape[0]))


def _split_norm(norm: Tensor, r: int):
    """The relation BatchNorm's and the hidden BatchNorm's :class:`Norm` from their norm (4, R + Hd)."""
    return _norm(norm[:, :r]), _norm(norm[:, r:])


@_op("gate_logit", mutates_args=())
def gate_logit(tp: Tensor, gx_mean: Tensor, wg: Tensor, w1: Tensor, w2: Tensor, bn_weight: Tensor, bn_bias: Tensor,
               a: Tensor, z: Tensor, norm: Tensor, batch_stats: list[bool], compute_dtype: torch.dtype) -> Tensor:
    """The gate's logit before the last BatchNorm, float32 (B, L), from ``relation``'s (a, z) and the norm
    (4, R + Hd) of the relation and hidden BatchNorms.

    w2: (1, Hd[, 1, 1]). wg, bn_weight, bn_bias (R + Hd,) (the two BatchNorms' affine rows,
    ones and zeros where not affine) and batch_stats (per BatchNorm, whether ``norm`` holds
    batch statistics) only matter to backward.
    """
    ops = _operands(tp, gx_mean, a, z)
    z_norm, h_norm = _split_norm(norm, ops.r)
    return relation_kernels.gate_logit(ops, weight_matrix(w1, torch.float32), z_norm.scale, z_norm.shift, h_norm.scale,
                                       h_norm.shift, weight_matrix(w2, torch.float32).flatten())


@gate_logit.register_fake
def _(tp, gx_mean, *rest):
    return gx_mean.new_empty(gx_mean.shape, dtype=torch.float32)


def _bn_rows(weight: Tensor, bias: Tensor, norm: Norm) -> Tensor:
    """float32 (6, C): mean, inv_std, weight, bias, c_b, c_g (the last two set by backward)."""
    zeros = torch.zeros_like(norm.mean)
    return torch.stack([norm.mean, norm.inv_std, weight.float(), bias.float(), zeros, zeros])


DZ_SLICE_MIN_BYTES = 1 << 24
"""dZ (B, R, L), float32, is written and consumed a quarter of the batch at a time when the whole
would take at least this many bytes: at RGA-Net's stage 1 (spatial branch) and stages 3-4
(channel branch) it is as large as x or larger, and a train step's peak is where it lives."""


@_op("gate_logit_backward", mutates_args=())
def gate_logit_backward(dlogit: Tensor, tp: Tensor, gx_mean: Tensor, a: Tensor, z: Tensor, w1: Tensor, w2: Tensor,
                        bn_weight: Tensor, bn_bias: Tensor, norm: Tensor,
                        batch_stats: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The kernel part of ``gate_logit``'s backward, all float32: dA = dZ tp^T (B, R, 2K), A^T dZ
    (B, 2K, L) (tp's gradient through Z's right factor), dgx_mean (B, L), dw1 (Hd, 1 + R), and
    sums (3, R + Hd) over the BatchNorms' rows (relation, then hidden): sum dy, sum dy v_hat, and
    in the hidden rows dw2. (a, z) as ``relation`` kept them: the kernels read Z from z, or
    rebuild its tiles from a and tp where z is empty.

    The attention network and the relation BatchNorm run per position tile in
    ``kernels/relation_backward.py``; with batch statistics, a first pass measures the sums
    their correction terms need. dZ never leaves the op: it is written, and multiplied into dA
    and A^T dZ, a slice of the batch at a time (:data:`DZ_SLICE_MIN_BYTES`).
    """
    ops = _operands(tp, gx_mean, a, z)
    r, (z_batch, h_batch) = ops.r, batch_stats
    count = ops.batch * ops.length
    w1f, w2f = weight_matrix(w1, torch.float32), weight_matrix(w2, torch.float32).flatten()
    z_norm, h_norm = _split_norm(norm, r)
    z_bn, h_bn = _bn_rows(bn_weight[:r], bn_bias[:r], z_norm), _bn_rows(bn_weight[r:], bn_bias[r:], h_norm)
    dlogit = dlogit.float().contiguous()

    args = (ops, w1f, z_norm.scale, z_norm.shift)
    if h_batch:     # the batch-statistics terms need dy1's sums before dh
        h_sums = hidden_backward(*args, h_bn, w2f, dlogit, sums=True, write=False)[0]
        h_bn[4:] = h_sums[:2] / count
        _, dh, dgx_mean, dw1_pool = hidden_backward(*args, h_bn, w2f, dlogit, sums=False, write=True)
    else:
        h_sums, dh, dgx_mean, dw1_pool = hidden_backward(*args, h_bn, w2f, dlogit, sums=True, write=True)
    if z_batch:
        z_sums, dw1_rel, _ = relation_backward(ops, w1f, z_bn, dh, sums=True, write=False)
        z_bn[4:] = z_sums / count
    a, tp = a.contiguous(), ops.tp
    da = tp.new_empty((ops.batch, r, ops.k2))
    dtp = torch.empty_like(tp)
    dz_bytes = ops.batch * r * ops.length * 4
    parts = []
    with torch.autocast(tp.device.type, enabled=False):        # the products stay float32
        for rows in batch_slices(ops.batch, 4 if dz_bytes >= DZ_SLICE_MIN_BYTES else 1):
            part = _operands(tp[rows], gx_mean[rows], a[rows], z[rows] if z.numel() else z)
            sums_part, dw1_part, dz = relation_backward(part, w1f, z_bn, dh[rows], sums=not z_batch, write=True)
            parts.append((sums_part, dw1_part))
            torch.bmm(dz, tp[rows].transpose(1, 2), out=da[rows])
            torch.bmm(a[rows].transpose(1, 2), dz, out=dtp[rows])
            del dz
    if not z_batch:     # the slices' sums, added in a fixed order
        z_sums, dw1_rel = (torch.stack(t).sum(dim=0) for t in zip(*parts))
    sums = torch.cat([torch.cat([z_sums, torch.zeros_like(z_sums[:1])]), h_sums], dim=1)
    return da, dtp, dgx_mean, torch.cat([dw1_pool[:, None], dw1_rel], dim=1), sums


@gate_logit_backward.register_fake
def _(dlogit, tp, gx_mean, a, z, w1, w2, bn_weight, *rest):
    new = lambda *shape: tp.new_empty(shape, dtype=torch.float32)  # noqa: E731
    hidden, r = w1.shape[0], (z.shape[1] if z.numel() else a.shape[1])
    batch, k2, length = tp.shape
    return new(batch, r, k2), new(batch, k2, length), new(*gx_mean.shape), new(hidden, 1 + r), new(3, r + hidden)


def _gate_logit_setup(ctx, inputs, output):
    tp, gx_mean, wg, w1, w2, bn_weight, bn_bias, a, z, norm, batch_stats, compute_dtype = inputs
    ctx.save_for_backward(tp, gx_mean, wg, w1, w2, bn_weight, bn_bias, a, z, norm)
    ctx.batch_stats, ctx.compute_dtype, ctx.device_type = batch_stats, compute_dtype, tp.device.type


def gate_logit_grads(tp, gx_mean, wg, w1, w2, bn_weight, bn_bias, a, z, norm, batch_stats, compute_dtype, dlogit,
                     kernels):
    """The gradients of ``gate_logit`` from its inputs and the logit's gradient: (dtp, dgx_mean, dwg,
    dw1, dw2, d_bn_weight, d_bn_bias). The kernels for the attention network and the relation
    BatchNorm, and the products through Z = A tp (``gate_logit_backward``), then PyTorch through
    A = [W_in phi^T | W_out theta^T]: two batched matmuls into tp's gradient, two for W_in, W_out.
    ``kernels``: what runs ``gate_logit_backward`` (its op, or its implementation: :func:`_backward_op`)."""
    if a.numel() == 0:
        raise RuntimeError("rga_triton::gate_logit: backward needs relation(for_backward=True)'s a")
    da, dtp, dgx_mean, dw1, sums = kernels(
        dlogit, tp, gx_mean, a, z, w1, w2, bn_weight, bn_bias, norm, batch_stats)
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
                              _backward_op(ctx, "gate_logit_backward")),
            None, None, None, None, None)


gate_logit.register_autograd(_gate_logit_backward, setup_context=_gate_logit_setup)


# ---- the output: x * spatial gate * channel gate --------------------------------------------------------

@_op("apply_gates", mutates_args=())
def apply_gates(x: Tensor, spatial: Optional[Tensor], channel: Optional[Tensor]) -> Tensor:
    """out = x * spatial[:, None, :] * channel[:, :, None] (x viewed as (B, C, N)), one kernel pass.

    x: (B, C, H, W) any strides; spatial float32 (B, H*W) or None; channel float32 (B, C) or None.
    The output has x's memory format where H and W merge into one axis, else it is contiguous.
    """
    return gating.apply_gates(x, _contiguous(spatial), _contiguous(channel))


def _fake_gated(x: Tensor) -> Tensor:
    """An empty tensor in the layout kernels/gating.py gives the output and dx."""
    out = torch.empty_like(mergeable(x))
    return out if out.stride(2) == out.shape[3] * out.stride(3) else torch.empty(x.shape, dtype=x.dtype,
                                                                                  device=x.device)


@apply_gates.register_fake
def _(x, spatial, channel):
    return _fake_gated(x)


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.contiguous() if t is not None else None


@_op("apply_gates_backward", mutates_args=())
def apply_gates_backward(grad_out: Tensor, x: Tensor, spatial: Optional[Tensor],
                         channel: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, d_spatial, d_channel) of ``apply_gates`` in one kernel pass over grad_out and x; a gate's
    gradient is empty (0,) where the gate is None. dx has ``apply_gates``' output layout."""
    dx, d_spatial, d_channel = gating.apply_gates_backward(grad_out, x, _contiguous(spatial), _contiguous(channel))
    empty = x.new_empty((0,), dtype=torch.float32)
    return dx, d_spatial if d_spatial is not None else empty, d_channel if d_channel is not None else empty


@apply_gates_backward.register_fake
def _(grad_out, x, spatial, channel):
    empty = x.new_empty((0,), dtype=torch.float32)
    return (_fake_gated(x),
            torch.empty_like(spatial) if spatial is not None else empty,
            torch.empty_like(channel) if channel is not None else empty)


def _apply_gates_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _apply_gates_backward(ctx, grad_out):
    x, spatial, channel = ctx.saved_tensors
    dx, d_spatial, d_channel = _backward_op(ctx, "apply_gates_backward")(grad_out, x, spatial, channel)
    needs = ctx.needs_input_grad
    return (dx if needs[0] else None, d_spatial if spatial is not None and needs[1] else None,
            d_channel if channel is not None and needs[2] else None)


apply_gates.register_autograd(_apply_gates_backward, setup_context=_apply_gates_setup)


eager = SimpleNamespace(
    projection_norm=IMPLS["projection_norm"], relation=IMPLS["relation"], relation_norm=IMPLS["relation_norm"],
    projection=_eager_function("projection", _projection_setup, _projection_backward),
    gate_logit=_eager_function("gate_logit", _gate_logit_setup, _gate_logit_backward),
    apply_gates=_eager_function("apply_gates", _apply_gates_setup, _apply_gates_backward))
"""The ops that ``triton_autograd`` composes, for eager mode: the same implementations and backward
formulas as ``torch.ops.rga_triton``'s, called directly (the ops that move BatchNorm buffers, or that
nothing differentiates, as plain functions; the differentiated ones as autograd Functions)."""
