"""The ``"triton"`` backend when gradients are wanted, and under ``torch.compile``: the block as custom ops.

One branch is the ops of ``ops.py`` in a row: ``projection`` (x -> theta, phi, gx_mean),
``relation`` and ``gate_logit`` (-> the logit before the last BatchNorm), after
``projection_norm`` and ``relation_norm`` measure the batch statistics in train mode; that
one-channel BatchNorm and the sigmoid are PyTorch (a (B, L) tensor); ``apply_gates``
writes the output. Autograd composes the branches in any ``order``, the
spatial gate feeding the channel branch's projection included, so each op only
differentiates its own step:

- ``gate_logit`` runs the forward kernels and the backward kernels of
  ``kernels/relation_backward.py``: the whole attention network and the relation BatchNorm
  per position tile, plus four batched matmuls for dA, dtp and the relation weight. Z
  (B, R, L: R L floats per image, never L x L) is either materialised once in forward (one
  batched matmul, A tp) and read by every later pass, or, where its reduction is short
  (:data:`RECOMPUTE_Z_MAX_K2`), rebuilt tile by tile from A and tp in each pass.
- ``projection`` has the backward kernels of ``kernels/projection_backward.py`` (P recomputed
  with BatchNorm and ReLU backward in the epilogue, then grad x and dW3 as matmuls with
  epilogues); ``apply_gates`` has a backward kernel.
- x's gradient lives in one buffer in eager training: x is threaded through the projections
  (each hands the next reader of x a view of it, :class:`_ThreadedProjection`), so each
  projection's backward adds its share into the gradient the later readers left.

BatchNorm buffers move once, in forward (the ``*_norm`` ops), exactly as nn.BatchNorm2d
moves them; backward uses the statistics forward normalised with. Every backward reduction
has a fixed order, so gradients are bitwise repeatable run to run.

Without gradients (``wants_grad=False``, under torch.compile) the same ops run without
materialising Z, reading A and tp as the inference path does.

Eager mode calls the ops' implementations and backward formulas directly (``ops.eager``), not
through the dispatcher, which costs 80 to 90 us per call on a 2-core CPU: with kernels that do
nothing, an RGA-SC train forward at C=64, 16x8 took 1.9 ms of host time instead of 2.5 ms.
Whatever traces or intercepts the calls (torch.compile, a dispatch mode, a tensor subclass)
gets the registered ops, one per step (:func:`_ops`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .batchnorm import batch_norm, uses_batch_stats
from . import ops as _ops_module
from .ops import batchnorm_args, float32_backward, projection_grads
from .triton_path import branch_algorithm, compose_gates, compute_dtype, folded, mergeable

COMPILED = torch.ops.rga_triton
"""The registered custom ops: what torch.compile traces."""
EAGER = _ops_module.eager
"""The same implementations and backward formulas called without the dispatcher, for eager mode."""


def _ops(x: torch.Tensor):
    """The registered ops wherever something traces or intercepts PyTorch calls (torch.compile, make_fx,
    a dispatch mode, a tensor subclass such as FakeTensor), so that it sees one op per step; else the
    same implementations called directly."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor or torch._C._len_torch_dispatch_stack():
        return COMPILED
    return EAGER


def _detached(t):
    return t.detach() if t is not None else None


def _affine_rows(bns, like: torch.Tensor):
    """The BatchNorms' weights and biases concatenated (rows,), differentiable; ones and zeros where not affine."""
    def rows(attr, fill):
        return torch.cat([getattr(bn, attr) if getattr(bn, attr) is not None else
                          like.new_full((bn.num_features,), fill, dtype=torch.float32) for bn in bns])

    return rows("weight", 1.0), rows("bias", 0.0)


def _norm(bns, measure) -> torch.Tensor:
    """The norm (4, rows) of a BatchNorm group: ``measure()``, an op that mutates the running
    statistics, when one of them normalises with the batch; else their running statistics
    folded in PyTorch (memoised in eager mode, fused by inductor), mutating nothing."""
    if any(uses_batch_stats(bn) for bn in bns):
        return measure()
    return torch.stack(folded(bns))


def projection_inputs(x, in_gate, w3, bn_weight, bn_bias, bns, view: str, dtype) -> tuple:
    """The arguments of ``ops.projection`` for the ``view`` branch reading x (scaled by in_gate (B, Cin)
    where given) through w3 (3K, Cin) and the affine rows bn_weight, bn_bias (3K,) of ``bns``
    (theta's, phi's and gx's BatchNorm): measures the batch statistics first where one of them
    uses them (moving its running statistics in train mode), keeping P for ``ops.projection``."""
    kept = {}           # P, where the statistics pass measured (and stored) it

    def measure():
        norm, kept["p"] = _ops(x).projection_norm(x.detach(), _detached(in_gate), w3.detach(), view, dtype,
                                                  **batchnorm_args(bns))
        return norm

    norm = _norm(bns, measure)
    return x, in_gate, w3, bn_weight, bn_bias, norm, view, dtype, [uses_batch_stats(bn) for bn in bns], kept.get("p")


def project(x, in_gate, w3, bn_weight, bn_bias, bns, view: str, dtype):
    """tp = [theta; phi] float32 (B, 2K, L), gx_mean float32 (B, L) (:func:`projection_inputs`);
    differentiable in x, in_gate, w3, bn_weight and bn_bias."""
    return _ops(x).projection(*projection_inputs(x, in_gate, w3, bn_weight, bn_bias, bns, view, dtype))


RECOMPUTE_Z_MAX_K2 = 64
"""Z = A tp is rebuilt tile by tile in every pass, instead of kept in memory, when its reduction
is this short (2K <= 64): a tile then costs about what reading it back costs, and Z, R x L
per image, is where RGA-Net's memory goes (the spatial branch at stage 1 and the channel
branch at stages 3-4, 2K = 64 and 32, keep one to two copies of x's size otherwise)."""


def keeps_z(k2: int) -> bool:
    """Whether a train step keeps Z (B, R, L) in memory for the later passes, given 2K."""
    return k2 > RECOMPUTE_Z_MAX_K2


def relation_gate(tp, gx_mean, wg, w1, w2, bn_weight, bn_bias, bns, tiled: bool, dtype, wants_grad: bool = True):
    """The logit (B, L) before the last BatchNorm, from tp (B, 2K, L) and gx_mean (B, L), differentiable in
    both, in the weights wg, w1, w2 and in the affine rows bn_weight, bn_bias (R + Hd,) of ``bns`` (the
    relation and the hidden BatchNorm, whose running statistics move in train mode). ``wants_grad=False``
    keeps neither A nor Z for backward; with it, Z is kept where :func:`keeps_z`."""
    keep_z = wants_grad and keeps_z(tp.shape[1])
    ops = _ops(tp)
    a, z = ops.relation(tp.detach(), wg.detach(), tiled, wants_grad, keep_z, dtype)
    norm = _norm(bns, lambda: ops.relation_norm(tp.detach(), gx_mean.detach(), a, z, w1.detach(),
                                                **batchnorm_args(bns)))
    return ops.gate_logit(tp, gx_mean, wg, w1, w2, bn_weight, bn_bias, a, z, norm,
                          [uses_batch_stats(bn) for bn in bns], dtype)


class _ThreadedProjection(torch.autograd.Function):
    """``ops.projection`` that also hands x on, as a view, to the block's next reader of x.

    Eager backward only. x's readers form a chain (each projection, then ``apply_gates``), so
    x's gradient reaches each projection as one tensor, the later readers' sum, and backward
    adds this projection's share into it in place: one x-sized gradient buffer for the whole
    block. With x read by each op directly, every projection would hand autograd a new
    x-sized gradient to sum, and a train step would peak one x-sized tensor higher.
    """

    @staticmethod
    def forward(ctx, x, in_gate, w3, bn_weight, bn_bias, norm, view, dtype, batch_stats, p):
        # no autograd here: the implementation itself, or the op where something intercepts the calls
        project = COMPILED.projection if _ops(x) is COMPILED else _ops_module.IMPLS["projection"]
        tp, gx_mean = project(x, in_gate, w3, bn_weight, bn_bias, norm, view, dtype, batch_stats, p)
        ctx.save_for_backward(x, in_gate, w3, bn_weight, bn_bias, norm)
        ctx.settings = view, dtype, batch_stats
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
                                 needs=ctx.needs_input_grad[:3], dx=dx)
        return *grads, None, None, None, None, None


def branch_gate(branch, x: torch.Tensor, view: str, in_gate, tiled: bool, wants_grad: bool,
                threaded: bool = False):
    """(sigmoid gate (B, L) float32, x) of one branch, differentiable in x, in_gate and every parameter.
    ``threaded``: the projection is :class:`_ThreadedProjection`, and the x returned is the view that
    the block's next reader of x must read; else it is x."""
    dtype = compute_dtype(x)
    embeds = (branch.theta, branch.phi, branch.gx)
    embed_bns = [seq[1] for seq in embeds]
    w3 = torch.cat([seq[0].weight.flatten(1) for seq in embeds])         # (3K, Cin)
    projection = projection_inputs(x, in_gate, w3, *_affine_rows(embed_bns, x), embed_bns, view, dtype)
    if threaded:
        tp, gx_mean, x = _ThreadedProjection.apply(*projection)
    else:
        tp, gx_mean = _ops(x).projection(*projection)
    conv1, bn1, _, conv2, bn2 = branch.W
    gate_bns = [branch.gg[1], bn1]
    logit = relation_gate(tp, gx_mean, branch.gg[0].weight, conv1.weight, conv2.weight,
                          *_affine_rows(gate_bns, x), gate_bns, tiled, dtype, wants_grad)
    return torch.sigmoid(batch_norm(logit.unsqueeze(1), bn2).squeeze(1)), x


def autograd_forward(module, x: torch.Tensor, wants_grad: bool = True, threaded: Optional[bool] = None) -> torch.Tensor:
    """The block's output through the ops, differentiable; updates BatchNorm buffers in train mode.

    ``wants_grad=False`` skips what only backward reads (Z and A kept in memory). ``threaded``
    (default: when a gradient is wanted in eager mode; torch.compile traces the ops' own
    formulas) chains x through the projections (:class:`_ThreadedProjection`).
    """
    x = mergeable(x)
    grad_pass = "train" if wants_grad else "forward"
    if threaded is None:
        threaded = wants_grad and not torch.compiler.is_compiling()
    reader = [x]        # the tensor the next reader of x reads: x, or the last projection's view of it

    def gate(name, in_gate=None):
        tiled = branch_algorithm(module, name, compute_dtype(x), x.device, grad_pass) == "tiled"
        sigmoid_gate, reader[0] = branch_gate(module.branch(name), reader[0], name, in_gate, tiled, wants_grad,
                                              threaded)
        return sigmoid_gate

    spatial, channel = compose_gates(module, gate)
    return _ops(x).apply_gates(reader[0], spatial, channel)
