"""BatchNorm on the Triton path, host side: what a kernel normalises with, and how the modules move.

A :class:`Norm` holds a group of BatchNorms' rows (their channels concatenated) as one call uses
them: bn(z) = z * scale + shift, plus the mean and 1/std it normalised with (backward reads those).
A call site normalises in straight lines: in eval the running statistics fold (:func:`folded`); in
train it checks the batch (:func:`check_batch`), a kernel measures per-split (mean, M2) partials,
and :func:`finalized` merges them and moves the running statistics exactly as ``nn.BatchNorm2d`` does.
A synchronised group (``group``: its process group's name, ``sync.py``) merges them over the group's ranks.

Inside a custom op the BatchNorm modules are rebuilt from the op's arguments as
:class:`BatchNormView` objects (:func:`batchnorm_args` / :func:`batchnorm_views`), which every
helper here and ``common/batchnorm.py`` read like the modules.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ...common.batchnorm import (
    check_batch_size,
    scale_shift,
    step_momentum,
    tracks_running_stats,
    update_running_stats,
    uses_batch_stats,
)
from ...launch.space import n_splits
from . import sync
from .kernels import bn_finalize, finalize_groups


class Norm(NamedTuple):
    """BatchNorm rows as used by one call, float32 (rows,): bn(z) = z * scale + shift, and the
    statistics it normalised with (z_hat = (z - mean) * inv_std), which backward needs."""

    scale: torch.Tensor
    shift: torch.Tensor
    mean: torch.Tensor
    inv_std: torch.Tensor


def as_norm(rows: Tensor) -> Norm:
    """A norm tensor (4, rows), as the ops pass it, read as a :class:`Norm`."""
    return Norm(*rows.contiguous())


def folded(bns) -> Norm:
    """The :class:`Norm` of BatchNorms that all normalise with their running statistics (eval), folded
    on every call: no memo key sees every change (``.data`` updates bump no version; eps is an attribute)."""
    return _affines(bns, None, None, 0)


def batch_normalised(bns) -> bool:
    """Whether one of ``bns`` normalises with the batch: its call must measure statistics first."""
    return any(uses_batch_stats(bn) for bn in bns)


def check_batch(bns, count: int, shape, group: str = "") -> None:
    """Refuse a batch of ``count`` values per channel as nn.BatchNorm2d does, before anything is
    measured; like it, count the batch first (``num_batches_tracked``) for a group that tracks.
    A synchronised group (``group`` named) is checked on the group's count, once gathered."""
    if group:
        return
    if count <= 1 and tracks_running_stats(bns[0]):
        step_momentum(bns[0])       # nn.BatchNorm2d counts the batch before F.batch_norm refuses it
    check_batch_size(count, shape)


def finalized(bns, stats: Tensor, length: int, group: str = "") -> Norm:
    """The :class:`Norm` of the rows of ``bns`` (concatenated in order), from the per-split (mean, M2)
    partials ``stats`` a kernel measured over them: ``bn_finalize`` (one launch per run of up to three
    alike BatchNorms, ``finalize_groups``) merges them and moves the running statistics as
    nn.BatchNorm2d does; rows of a BatchNorm in eval fold its running statistics. Call
    :func:`check_batch` before measuring. ``group``: the process group a synchronised group of
    BatchNorms merges over, by name (``sync.py``: one all_gather), or "" for this rank's batch alone."""
    if group:
        count, mean, m2 = sync.local_moments(stats, length)
        batch = stats.shape[2] // n_splits(length)
        total, mean, var = sync.gathered_moments(bns, count, mean, m2, group, (batch, stats.shape[1], length))
        return _affines(bns, mean, var, total)
    starts = [0]
    for bn in bns:
        starts.append(starts[-1] + bn.num_features)
    table = torch.empty((4, starts[-1]), device=stats.device, dtype=torch.float32)    # the Norm's rows
    batch = [(start, bn) for start, bn in zip(starts, bns) if uses_batch_stats(bn)]
    for start, alike in finalize_groups(batch):
        factors = [step_momentum(bn) if tracks_running_stats(bn) else 0.0 for bn in alike]
        bn_finalize(stats, start, alike, length, factors, table[0], table[1], table[2], table[3])
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


def one_channel_affine(bn, logit: Tensor, count: int, group: str = "") -> Norm:
    """The :class:`Norm` of a one-channel train-mode BatchNorm over ``logit`` (B, L), measured in
    PyTorch (a single small reduction), its running statistics moved; over the ranks of ``group``
    where it names one (``sync.py``)."""
    shape = (logit.shape[0], 1, logit.shape[1])
    if group:
        total, mean, var = sync.gathered_moments([bn], *sync.moments(logit.unsqueeze(1)), group, shape)
        return _affines([bn], mean, var, total)
    check_batch_size(count, shape)
    var, mean = torch.var_mean(logit, unbiased=False)
    return _affines([bn], mean.view(1), var.view(1), count)


def affine_rows(bns, like: Tensor):
    """The BatchNorms' weights and biases concatenated (rows,), differentiable; ones and zeros where not affine."""
    def rows(attr, fill):
        return torch.cat([getattr(bn, attr) if getattr(bn, attr) is not None else
                          like.new_full((bn.num_features,), fill, dtype=torch.float32) for bn in bns])

    return rows("weight", 1.0), rows("bias", 0.0)


def bn_rows(weight: Tensor, bias: Tensor, norm: Norm) -> Tensor:
    """float32 (6, C): mean, inv_std, weight, bias, c_b, c_g (the last two set by backward), what the
    backward kernels read (``stats.load_bn_rows``)."""
    zeros = torch.zeros_like(norm.mean)
    return torch.stack([norm.mean, norm.inv_std, weight.float(), bias.float(), zeros, zeros])


# ---- BatchNorm modules as custom-op arguments -------------------------------------------------------------

CUMULATIVE = math.nan
"""``momentum`` in ``bn_settings`` for ``momentum=None`` (nn.BatchNorm2d's cumulative average)."""

SCHEMA = "Tensor?[] bn_affine, Tensor(a!)?[] bn_buffers, float[] bn_settings, str bn_group"
"""The four schema arguments that describe a BatchNorm group (:func:`batchnorm_args`)."""


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


def batchnorm_args(bns, group: str = "") -> dict:
    """The op keyword arguments that describe the BatchNorm modules ``bns``, four per group of BatchNorms
    (few arguments: custom-op dispatch costs grow with their number):

    - bn_affine: weight, bias per BatchNorm (None where not affine), detached: the op does not differentiate;
    - bn_buffers: running_mean, running_var, num_batches_tracked per BatchNorm (None where absent), mutated;
    - bn_settings: momentum (CUMULATIVE for None), eps, training, track_running_stats per BatchNorm;
    - bn_group: the process group the group synchronises over, by name ("" for none: ``sync.py``).
    """
    def detached(t):
        return t.detach() if t is not None else None

    return dict(bn_affine=[detached(t) for bn in bns for t in (bn.weight, bn.bias)],
                bn_buffers=[t for bn in bns for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)],
                bn_settings=[float(v) for bn in bns for v in (CUMULATIVE if bn.momentum is None else bn.momentum,
                                                              bn.eps, bn.training, bn.track_running_stats)],
                bn_group=group)


def batchnorm_views(sizes, bn_affine, bn_buffers, bn_settings) -> list:
    """The :class:`BatchNormView` of each BatchNorm described by an op's arguments; ``sizes``: their widths."""
    views = []
    for i, size in enumerate(sizes):
        momentum, eps, training, track = bn_settings[4 * i:4 * i + 4]
        views.append(BatchNormView(*bn_affine[2 * i:2 * i + 2], *bn_buffers[3 * i:3 * i + 3],
                                   None if math.isnan(momentum) else momentum, eps, bool(training), bool(track),
                                   size))
    return views
