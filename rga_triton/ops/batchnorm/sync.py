"""SyncBatchNorm on the Triton path: a BatchNorm group's statistics over the ranks of a process group.

A train-mode ``nn.SyncBatchNorm`` in a process group of several ranks normalises with the
statistics of the whole group's batch. The Triton path does what it does, with one collective per
BatchNorm group (the rows one kernel measures: theta's, phi's and gx's BatchNorms together) and pass:

- forward (:func:`gathered_moments`): each rank merges its kernel's per-split partials into
  (count, mean, M2) per row (:func:`local_moments`); one ``all_gather`` of those rows; Chan's
  formula combines them. A rank with an empty batch sends count 0 and adds nothing, as in
  ``nn.SyncBatchNorm``; the running statistics move with the group's count (unbiased variance).
- backward (:func:`group_means`): one ``all_reduce`` of the per-row sums (sum dy, sum dy x_hat)
  with the rank's count; the batch-statistics terms are the group's sums over the group's count.
  The BatchNorm's own parameter gradients stay the rank's (DDP averages them), as in
  ``nn.SyncBatchNorm``.

The group travels through the custom ops as its name (``ProcessGroup.group_name``; "" for none):
a string is a schema argument, and :func:`process_group` resolves it where the collective runs.
The collectives run inside the ops, which torch.compile does not trace into, so compiled
graphs synchronise too.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...common.batchnorm import check_batch_size, step_momentum, tracks_running_stats


def process_group(name: str):
    """The process group called ``name`` (what functional collectives resolve their group names with)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def local_moments(stats: Tensor, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """(count (1,), mean (rows,), M2 (rows,)), float64, of one rank's rows from a kernel's per-split
    (mean, M2) partials ``stats`` (2, rows, B * splits) over positions of ``length`` (Chan's formula;
    mean and M2 are 0 for an empty batch)."""
    from ...launch.space import STAT_SPLIT, n_splits  # imports Triton: the torch path imports this module too

    splits = n_splits(length)
    cols = torch.arange(stats.shape[2], device=stats.device)
    counts = torch.clamp(length - (cols % splits) * STAT_SPLIT, max=STAT_SPLIT).double()     # (B * splits,)
    part_mean, part_m2 = stats.double()
    count = counts.sum()
    mean = (part_mean * counts).sum(dim=1) / count.clamp(min=1)
    m2 = (part_m2 + (part_mean - mean[:, None]) ** 2 * counts).sum(dim=1)
    return count.view(1), mean, m2


def moments(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(count (1,), mean (C,), M2 (C,)), float64, of one rank's z (B, C, L) measured in PyTorch (mean and
    M2 are 0 for an empty batch), for :func:`gathered_moments`."""
    zd = z.detach().double()
    count = zd.shape[0] * zd.shape[2]
    mean = zd.sum(dim=(0, 2)) / max(count, 1)
    return zd.new_full((1,), count), mean, ((zd - mean[:, None]) ** 2).sum(dim=(0, 2))


def gathered_moments(bns, count: Tensor, mean: Tensor, m2: Tensor, group: str, shape) -> tuple[int, Tensor, Tensor]:
    """(the group's count, mean (rows,) and biased var (rows,), float32) of the rows of ``bns`` from
    each rank's (count, mean, M2) (:func:`local_moments`): one all_gather. Refuses a group batch of
    one value per channel as nn.BatchNorm2d does (after counting it, as it does); ``shape``: this
    rank's (B, rows, L), for the message."""
    import torch.distributed as dist

    pg = process_group(group)
    mine = torch.cat([count.double(), mean.double(), m2.double()])
    ranks = [torch.empty_like(mine) for _ in range(dist.get_world_size(pg))]
    dist.all_gather(ranks, mine, group=pg)
    every = torch.stack(ranks)                                         # (world, 1 + 2 rows)
    counts, means, m2s = every[:, :1], every[:, 1:1 + mean.numel()], every[:, 1 + mean.numel():]
    total = counts.sum()
    if total <= 1:
        for bn in bns:
            if tracks_running_stats(bn):
                step_momentum(bn)
        check_batch_size(int(total), shape)
    group_mean = (means * counts).sum(dim=0) / total                 # ranks with count 0 weigh nothing
    group_m2 = (m2s + (means - group_mean) ** 2 * counts).sum(dim=0)
    return int(total), group_mean.float(), (group_m2 / total).float()


def group_means(sums: Tensor, count: int, group: str) -> Tensor:
    """``sums`` (any shape, float32) summed over the ranks of ``group`` and divided by the group's count
    (each rank's ``count`` summed): one all_reduce. What backward's batch-statistics terms are."""
    import torch.distributed as dist

    both = torch.cat([sums.double().flatten(), sums.new_full((1,), count, dtype=torch.float64)])
    dist.all_reduce(both, group=process_group(group))
    return (both[:-1] / both[-1]).float().view(sums.shape)


class SyncedBatchNorm(torch.autograd.Function):
    """A train-mode BatchNorm ``bn`` over z (B, C, L) with the statistics of the ranks of ``group``, as
    ``nn.SyncBatchNorm`` computes it, one collective per pass: forward gathers (count, mean, M2) per
    channel (:func:`gathered_moments`), backward reduces (sum dy, sum dy z_hat) (:func:`group_means`).
    The Triton path's last, one-channel BatchNorm; z is float32. Differentiable once, in z, weight and
    bias (whose gradients stay the rank's, as nn.SyncBatchNorm's do)."""

    @staticmethod
    def forward(ctx, z: Tensor, weight, bias, bn, group: str) -> Tensor:
        from ...common.batchnorm import update_running_stats

        count, mean, m2 = moments(z)
        total, mean, var = gathered_moments([bn], count, mean, m2, group, z.shape)
        update_running_stats(bn, mean, var, total)
        inv_std = torch.rsqrt(var + bn.eps)
        z_hat = (z - mean[:, None]) * inv_std[:, None]
        ctx.save_for_backward(z_hat, inv_std, weight)
        ctx.count, ctx.group = int(count), group
        if weight is None:
            return z_hat
        return z_hat * weight[:, None] + bias[:, None]

    @staticmethod
    def backward(ctx, dy: Tensor):
        z_hat, inv_std, weight = ctx.saved_tensors
        sums = torch.stack([dy.sum(dim=(0, 2)), (dy * z_hat).sum(dim=(0, 2))])          # (2, C), this rank's
        mean_dy, mean_dy_z_hat = group_means(sums, ctx.count, ctx.group)
        scale = inv_std if weight is None else inv_std * weight
        dz = scale[:, None] * (dy - mean_dy[:, None] - z_hat * mean_dy_z_hat[:, None])
        grads = (None, None) if weight is None else (sums[1].to(weight.dtype), sums[0].to(weight.dtype))
        return dz, *grads, None, None
