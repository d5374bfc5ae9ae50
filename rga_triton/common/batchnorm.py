"""BatchNorm bookkeeping shared by every path, mirroring ``nn.BatchNorm2d.forward`` exactly.

The fast paths compute batch statistics inside kernels; these helpers make sure the
module's buffers (``running_mean``, ``running_var``, ``num_batches_tracked``) then move
exactly as ``nn.BatchNorm2d`` would move them, ``momentum=None`` (cumulative average)
included.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """True when ``bn`` normalises with the statistics of the batch it sees."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def tracks_running_stats(bn: nn.BatchNorm2d) -> bool:
    """True when a forward of ``bn`` would update its running statistics."""
    return bn.training and bn.track_running_stats and bn.running_mean is not None


def step_momentum(bn: nn.BatchNorm2d) -> float:
    """Advance ``num_batches_tracked`` as ``nn.BatchNorm2d`` does; return the averaging factor."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return factor


def batch_norm(z: torch.Tensor, bn: nn.BatchNorm2d, update_running_stats: bool = True) -> torch.Tensor:
    """``bn`` applied to a (B, C, L) tensor, as ``bn(z.unsqueeze(-1)).squeeze(-1)`` would.

    With ``update_running_stats=False`` a train-mode call normalises with batch statistics
    but leaves every buffer alone (used when backward recomputes the forward).
    """
    if z.dtype in (torch.float16, torch.bfloat16):      # under autocast: statistics in float32
        return batch_norm(z.float(), bn, update_running_stats).to(z.dtype)
    if synchronised(bn):
        return _sync_batch_norm(z, bn, update_running_stats)
    batch_stats = uses_batch_stats(bn)
    update = update_running_stats and tracks_running_stats(bn)
    factor = step_momentum(bn) if update else 0.0
    keep_running = update or not batch_stats
    mean, var = (bn.running_mean, bn.running_var) if keep_running else (None, None)
    weight, bias = bn.weight, bn.bias
    wider = mean is not None and mean.dtype != z.dtype
    if wider:           # z is computed wider than the module's half-precision buffers
        mean, var = mean.to(z.dtype), var.to(z.dtype)
    if weight is not None and weight.dtype != z.dtype:
        weight, bias = weight.to(z.dtype), bias.to(z.dtype)
    out = F.batch_norm(z, mean, var, weight, bias, batch_stats, factor, bn.eps)
    if wider and update:
        with torch.no_grad():       # rounded once into the buffers, as nn.BatchNorm2d's own update rounds
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    return out


def distributed() -> bool:
    """True when a torch.distributed process group exists (SyncBatchNorm can only synchronise then)."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def synchronised(bn: nn.BatchNorm2d) -> bool:
    """True for a train-mode ``nn.SyncBatchNorm`` whose process group has more than one rank."""
    if not (isinstance(bn, nn.SyncBatchNorm) and bn.training and distributed()):
        return False
    import torch.distributed as dist
    return dist.get_world_size(bn.process_group or dist.group.WORLD) > 1


def process_group_name(bn: nn.SyncBatchNorm) -> str:
    """The name of the process group a synchronised ``bn`` reduces over (``ProcessGroup.group_name``)."""
    import torch.distributed as dist
    return (bn.process_group or dist.group.WORLD).group_name


class _GroupSum(torch.autograd.Function):
    """Sum of ``tensor`` over the ranks of ``group``, differentiable (twice too): the gradient of
    a sum all-reduce is the sum all-reduce of the output gradients. The same function as the
    deprecated ``torch.distributed.nn.functional.all_reduce``, without its FutureWarning."""

    @staticmethod
    def forward(ctx, tensor, group):
        import torch.distributed as dist
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return _GroupSum.apply(grad, ctx.group), None


def _sync_batch_norm(z: torch.Tensor, bn: nn.SyncBatchNorm, update: bool) -> torch.Tensor:
    """SyncBatchNorm over (B, C, L): statistics of the whole process group, differentiable.

    Two all-reduces (the sum, then the squared deviations from the global mean) keep the
    variance free of cancellation; ``_GroupSum`` carries the gradient across ranks as
    SyncBatchNorm's own backward does.
    """
    import torch.distributed as dist

    group = bn.process_group or dist.group.WORLD
    count = torch.tensor([z.shape[0] * z.shape[2]], dtype=z.dtype, device=z.device)
    dist.all_reduce(count, group=group)
    total = int(count.item())
    check_batch_size(total, z.shape)
    mean = _GroupSum.apply(z.sum(dim=(0, 2)), group) / total
    dev = z - mean[None, :, None]
    var = _GroupSum.apply((dev * dev).sum(dim=(0, 2)), group) / total
    if update:
        update_running_stats(bn, mean.detach(), var.detach(), total)
    out = dev * torch.rsqrt(var + bn.eps)[None, :, None]
    if bn.weight is not None:
        out = out * bn.weight[None, :, None] + bn.bias[None, :, None]
    return out


@torch.no_grad()
def update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """Fold one batch's ``mean`` and biased ``var`` (over ``count`` values) into ``bn``'s buffers."""
    if not tracks_running_stats(bn):
        return
    factor = step_momentum(bn)
    unbiased = var * (count / (count - 1))
    bn.running_mean.mul_(1.0 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
    bn.running_var.mul_(1.0 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


def check_batch_size(count: int, shape) -> None:
    """Raise the error ``F.batch_norm`` raises when a channel sees a single value in training."""
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {torch.Size(shape)}")


def scale_shift(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor):
    """Per-channel (scale, shift) in float32 with bn(z) == z * scale + shift."""
    inv_std = torch.rsqrt(var.float() + bn.eps)
    scale = inv_std if bn.weight is None else bn.weight.float() * inv_std
    shift = -mean.float() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    return scale.contiguous(), shift.contiguous()
