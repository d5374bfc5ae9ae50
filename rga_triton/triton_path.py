"""The ``"triton"`` backend: one RGA block composed from the steps of ``ops/``.

A branch reads X (B, Cin, L) (spatial: x as (B, C, N); channel: x read as (B, N, C)) and
computes its sigmoid gate (B, L) in three steps:

    projection   X -> tp = [theta; phi] (B, 2K, L), gx_mean (B, L)     ops/projection
    relation     tp -> A (B, R, 2K) or tiled Z (B, R, L)                ops/relation
    gate logit   A or Z, gx_mean -> BatchNorm -> attention network -> logit (B, L)

then the last one-channel BatchNorm and the sigmoid. The branches compose in ``module.order``
(:func:`compose_gates`: in "sc" the spatial gate scales x where the channel branch's projection
reads it, no gated copy), and ``ops/gating`` writes out = x * spatial * channel in one pass.
Eval forward of RGA-SC reads x three times and writes the output once; everything the kernels
hand each other is O(K L + R K) per image, never O(L^2).

The branch has one composition in two forms, chosen by ``rga_triton.dispatch`` (``plan.route``):

- :func:`branch_gate_kernels` (route ``"kernels"``: eager, no gradient): the launchers
  themselves, BatchNorms folded and weights stacked from the modules on each call, the eval gate's
  last BatchNorm and sigmoid inside the gate kernel.
- :func:`branch_gate_ops` (routes ``"eager-ops"`` and ``"registered-ops"``: a gradient is
  wanted, or something traces or intercepts the calls): the same kernels as the custom ops of
  ``ops/``, each differentiating its own step. Eager autograd calls their implementations and
  formulas directly (:data:`EAGER`: the dispatcher costs 80 to 90 us per call on a 2-core CPU;
  with kernels that do nothing, an RGA-SC train forward at C=64, 16x8 took 1.9 ms of host time
  instead of 2.5 ms); torch.compile, make_fx, a dispatch mode or a tensor subclass get the
  registered ops (:data:`REGISTERED`), one per step.

Why two forms and not one: the ops run the last BatchNorm and the sigmoid as PyTorch ops instead
of in the gate kernel, and pay the custom-op dispatcher per step. With the kernels stubbed out
(``bench/studies/host_overhead.py``'s
``host_ms``, RGA-SC 64x16x8, B=2, 2-core CPU, median of five processes of 200 calls), an eval
no-grad call took 0.31 ms of host time in the kernels form and 0.53 ms through the ops form.

In eager training x is threaded through the projections (``ops/projection/op.ThreadedProjection``):
each hands the next reader of x a view of it, so x's gradient lives in one buffer.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import torch

from .common.batchnorm import batch_norm, uses_batch_stats
from .common.layout import input_views, weight_matrix
from .common.tracing import intercepted
from .ops.batchnorm.norm import (
    Norm,
    affine_rows,
    batch_normalised,
    batchnorm_args,
    check_batch,
    finalized,
    folded,
    one_channel_affine,
)
from .ops.batchnorm.sync import SyncedBatchNorm
from .ops.gating.kernels import apply_gates
from .ops.gating.op import eager_apply_gates
from .ops.projection.kernels import projection_apply, projection_stats
from .ops.projection.op import ThreadedProjection, eager_projection
from .ops.registry import IMPLS
from .ops.relation.kernels import RelationOperands, gate_logit, hidden_stats, relation_a, relation_z_tiled, z_stats
from .ops.relation.op import eager_gate_logit

REGISTERED = torch.ops.rga_triton
"""The registered custom ops: what torch.compile traces."""
EAGER = SimpleNamespace(
    projection_norm=IMPLS["projection_norm"], relation=IMPLS["relation"], relation_norm=IMPLS["relation_norm"],
    projection=eager_projection, gate_logit=eager_gate_logit, apply_gates=eager_apply_gates)
"""The same implementations and backward formulas called without the dispatcher, for eager autograd
(the ops that move BatchNorm buffers, or that nothing differentiates, as plain functions)."""


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


def forward(module, x: torch.Tensor, plan) -> torch.Tensor:
    """The block's output (B, C, H, W) for x, whose H and W merge (``common.layout.mergeable``);
    updates BatchNorm buffers in train mode.

    ``plan`` (``rga_triton.dispatch.Plan``): the branches and compute dtype, the route, the
    algorithm and whether Z stays in memory per branch, and whether x is threaded through the projections.
    """
    if plan.route == "kernels":
        views = input_views(x)

        def gate(name, in_gate=None):       # in_gate: the other branch's gate, applied where x is read
            held = plan.frozen.setdefault((name, plan.dtype), {}) if plan.frozen is not None else None
            return branch_gate_kernels(plan.branches[name], x, *views[name], in_gate, plan.algorithms[name],
                                       plan.dtype, held, plan.sync_group)

        return apply_gates(x, *compose_gates(module, gate))

    ops = REGISTERED if plan.route == "registered-ops" else EAGER
    reader = [x]        # the tensor the next reader of x reads: x, or the last projection's view of it

    def gate(name, in_gate=None):
        sigmoid_gate, reader[0] = branch_gate_ops(ops, plan.branches[name], reader[0], name, in_gate, plan)
        return sigmoid_gate

    spatial, channel = compose_gates(module, gate)
    return ops.apply_gates(reader[0], spatial, channel)


# ---- the branch without autograd: the launchers themselves ------------------------------------------------

def _weight(dtype, weights):
    """The 1x1-conv weights stacked as one (rows, in) matrix in ``dtype``, from the parameters as they
    are now (derived per call: see docs/design.md, "Nothing derived outlives a call")."""
    return weight_matrix(torch.cat([w.detach() for w in weights]), dtype)


class Derived(NamedTuple):
    """What a branch's no-grad call derives from its modules: the stacked weights, and in eval the
    folded BatchNorms (None where a BatchNorm normalises with the batch)."""

    w3: torch.Tensor
    wg: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    embed: Norm | None
    z: Norm | None
    hidden: Norm | None
    out: Norm | None


def derive(branch, dtype) -> Derived:
    """The :class:`Derived` constants of ``branch`` with products in ``dtype``, as the modules are now."""
    embed_bns = [seq[1] for seq in (branch.theta, branch.phi, branch.gx)]
    _, bn1, _, _, bn2 = branch.W

    def fold(bns):
        return None if batch_normalised(bns) else folded(bns)

    return Derived(_weight(dtype, [seq[0].weight for seq in (branch.theta, branch.phi, branch.gx)]),
                   _weight(dtype, [branch.gg[0].weight]), _weight(torch.float32, [branch.W[0].weight]),
                   _weight(torch.float32, [branch.W[3].weight]),
                   fold(embed_bns), fold([branch.gg[1]]), fold([bn1]), fold([bn2]))


def branch_gate_kernels(branch, x: torch.Tensor, shape, strides, in_gate, algorithm: str, dtype,
                        held: dict | None = None, group: str = "") -> torch.Tensor:
    """Sigmoid gate (B, L), float32, of one branch reading X (shape (B, Cin, L), ``strides`` into x),
    products in ``dtype``. Each BatchNorm in straight lines: check the batch, measure, finalize
    (train), or the folded running statistics (eval); then the pass that applies it. ``held``: the
    branch's table under ``rga_triton.frozen()``, where an eval call's :class:`Derived` is kept; ``group``:
    the process group train-mode BatchNorms synchronise over, by name ("" for none)."""
    batch, _, length = shape
    count = batch * length
    if held is not None and "derived" in held:
        d = held["derived"]
    else:
        d = derive(branch, dtype)
        if held is not None and None not in (d.embed, d.z, d.hidden, d.out):   # eval: every BatchNorm folds
            held["derived"] = d
    embed_bns = [seq[1] for seq in (branch.theta, branch.phi, branch.gx)]
    k = d.w3.shape[0] // 3
    p = None            # P = W3 X, kept by the statistics pass for the apply pass
    embed = d.embed
    if embed is None:
        check_batch(embed_bns, count, (batch, k, length), group)
        stats, p = projection_stats(x, shape, strides, d.w3, in_gate, keep_p=True)
        embed = finalized(embed_bns, stats, length, group)
    tp, gx_mean = projection_apply(x, shape, strides, d.w3, embed.scale, embed.shift, in_gate, p)
    del p

    r = d.wg.shape[0]
    if algorithm == "tiled":
        operands = RelationOperands(tp, gx_mean, None, relation_z_tiled(tp, d.wg), r)
    else:
        operands = RelationOperands(tp, gx_mean, relation_a(tp, d.wg), None, r)
    z_norm = d.z
    if z_norm is None:
        check_batch([branch.gg[1]], count, (batch, r, length), group)
        z_norm = finalized([branch.gg[1]], z_stats(operands), length, group)

    _, bn1, _, _, bn2 = branch.W
    h_norm = d.hidden
    if h_norm is None:
        check_batch([bn1], count, (batch, d.w1.shape[0], length), group)
        h_norm = finalized([bn1], hidden_stats(operands, d.w1, z_norm.scale, z_norm.shift), length, group)
    if d.out is not None:    # eval: the kernel applies the last BN and the sigmoid itself
        return gate_logit(operands, d.w1, z_norm.scale, z_norm.shift, h_norm.scale, h_norm.shift, d.w2,
                          d.out.scale, d.out.shift)
    logit = gate_logit(operands, d.w1, z_norm.scale, z_norm.shift, h_norm.scale, h_norm.shift, d.w2)
    out = one_channel_affine(bn2, logit, count, group)
    return torch.sigmoid(logit * out.scale + out.shift)


# ---- the branch as custom ops, differentiable -------------------------------------------------------------

def _detached(t):
    return t.detach() if t is not None else None


def projection_inputs(ops, x, in_gate, w3, bn_weight, bn_bias, bns, view: str, dtype, group: str = "") -> tuple:
    """The arguments of the ``projection`` op for the ``view`` branch reading x (scaled by in_gate (B, Cin)
    where given) through w3 (3K, Cin) and the affine rows bn_weight, bn_bias (3K,) of ``bns`` (theta's,
    phi's and gx's BatchNorm): the ``projection_norm`` op measures the batch statistics first where one
    of them uses them (moving its running statistics in train mode) and keeps P for the projection;
    else the running statistics fold here, mutating nothing. ``group``: the process group the batch
    statistics are measured over, by name ("" for this rank's batch)."""
    p = None
    if batch_normalised(bns):
        norm, p = ops.projection_norm(x.detach(), _detached(in_gate), w3.detach(), view, dtype,
                                      **batchnorm_args(bns, group))
    else:
        norm = torch.stack(folded(bns))
    return x, in_gate, w3, bn_weight, bn_bias, norm, view, dtype, [uses_batch_stats(bn) for bn in bns], p, group


def project(x, in_gate, w3, bn_weight, bn_bias, bns, view: str, dtype, ops=None, group: str = ""):
    """tp = [theta; phi] float32 (B, 2K, L), gx_mean float32 (B, L) (:func:`projection_inputs`);
    differentiable in x, in_gate, w3, bn_weight and bn_bias."""
    ops = ops or _ops_for(x)
    return ops.projection(*projection_inputs(ops, x, in_gate, w3, bn_weight, bn_bias, bns, view, dtype, group))


def relation_gate(tp, gx_mean, wg, w1, w2, bn_weight, bn_bias, bns, tiled: bool, dtype, wants_grad: bool = True,
                  keep_z: bool = False, ops=None, group: str = ""):
    """The logit (B, L) before the last BatchNorm, from tp (B, 2K, L) and gx_mean (B, L), differentiable in
    both, in the weights wg, w1, w2 and in the affine rows bn_weight, bn_bias (R + Hd,) of ``bns`` (the
    relation and the hidden BatchNorm, whose running statistics move in train mode). ``wants_grad=False``
    keeps neither A nor Z for backward; ``keep_z`` keeps Z (``dispatch.keeps_z``); ``group``: the process
    group the batch statistics are measured over, by name ("" for this rank's batch)."""
    ops = ops or _ops_for(tp)
    a, z = ops.relation(tp.detach(), wg.detach(), tiled, wants_grad, wants_grad and keep_z, dtype)
    if batch_normalised(bns):
        norm = ops.relation_norm(tp.detach(), gx_mean.detach(), a, z, w1.detach(), **batchnorm_args(bns, group))
    else:
        norm = torch.stack(folded(bns))
    return ops.gate_logit(tp, gx_mean, wg, w1, w2, bn_weight, bn_bias, a, z, norm,
                          [uses_batch_stats(bn) for bn in bns], dtype, group)


def _ops_for(t: torch.Tensor):
    return REGISTERED if intercepted(t) else EAGER


def branch_gate_ops(ops, branch, x: torch.Tensor, view: str, in_gate, plan):
    """(sigmoid gate (B, L) float32, x) of one branch through ``ops`` (:data:`EAGER` or :data:`REGISTERED`),
    differentiable in x, in_gate and every parameter: :func:`project`, :func:`relation_gate`, then the
    last BatchNorm and the sigmoid. With ``plan.threaded`` the x returned is the view that the block's
    next reader of x must read; else it is x."""
    dtype = plan.dtype
    embeds = (branch.theta, branch.phi, branch.gx)
    embed_bns = [seq[1] for seq in embeds]
    w3 = torch.cat([seq[0].weight.flatten(1) for seq in embeds])         # (3K, Cin)
    affine = affine_rows(embed_bns, x)
    if plan.threaded:
        inputs = projection_inputs(ops, x, in_gate, w3, *affine, embed_bns, view, dtype, plan.sync_group)
        tp, gx_mean, x = ThreadedProjection.apply(ops is REGISTERED, *inputs)
    else:
        tp, gx_mean = project(x, in_gate, w3, *affine, embed_bns, view, dtype, ops, plan.sync_group)
    conv1, bn1, _, conv2, bn2 = branch.W
    gate_bns = [branch.gg[1], bn1]
    logit = relation_gate(tp, gx_mean, branch.gg[0].weight, conv1.weight, conv2.weight, *affine_rows(gate_bns, x),
                          gate_bns, plan.algorithms[view] == "tiled", dtype, plan.wants_grad, plan.keep_z[view], ops,
                          plan.sync_group)
    if plan.sync_group and ops is EAGER:    # one collective per pass (compiled graphs trace batch_norm's formula)
        out = SyncedBatchNorm.apply(logit.unsqueeze(1), bn2.weight, bn2.bias, bn2, plan.sync_group)
    else:
        out = batch_norm(logit.unsqueeze(1), bn2)
    return torch.sigmoid(out.squeeze(1)), x
