"""Train-mode BatchNorm finalisation in one launch per BatchNorm.

The producing kernels leave per-split (mean, M2) partials; this kernel merges them
(Chan et al.'s parallel formula, float32), updates ``running_mean`` / ``running_var``
exactly as ``nn.BatchNorm2d`` does (momentum factor, unbiased variance), and writes the
(scale, shift) the consumer applies: bn(z) = z * scale + shift. It replaces some thirty
small PyTorch ops per BatchNorm on the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tuning import STAT_SPLIT, n_splits


@triton.jit
def _bn_finalize_kernel(stats_ptr, weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr, scale_ptr, shift_ptr,
                        mean_ptr, inv_std_ptr, row0, rows_total, n_cols, channels, length, factor, eps, n_splits,
                        HAS_AFFINE: tl.constexpr, UPDATE: tl.constexpr, SPLIT: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """For channels c of one BatchNorm (rows row0 + c of the partials (2, rows_total, n_cols)):
    mean, var = merge of the partials; running stats updated when UPDATE; scale, shift, mean and
    1/sqrt(var + eps) written at c (backward needs the normalised value, which scale/shift cannot give when weight is 0).
    Grid: (cdiv(channels, BLOCK_C),)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < channels
    rows = row0 + offs_c
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    count = 0.0
    for col0 in range(0, n_cols, BLOCK_COLS):
        cols = col0 + tl.arange(0, BLOCK_COLS)
        col_mask = cols < n_cols
        n_i = tl.where(col_mask, tl.minimum(SPLIT, length - (cols % n_splits) * SPLIT), 0).to(tl.float32)
        mask = c_mask[:, None] & col_mask[None, :]
        mean_i = tl.load(stats_ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
        m2_i = tl.load(stats_ptr + (rows_total + rows[:, None]) * n_cols + cols[None, :], mask=mask, other=0.0)
        n_chunk = tl.sum(n_i, axis=0)
        chunk_mean = tl.sum(mean_i * n_i[None, :], axis=1) / n_chunk
        dev = mean_i - chunk_mean[:, None]
        chunk_m2 = tl.sum(m2_i + dev * dev * n_i[None, :], axis=1)
        total = count + n_chunk
        delta = chunk_mean - mean
        mean = mean + delta * (n_chunk / total)
        m2 = m2 + chunk_m2 + delta * delta * (count * n_chunk / total)
        count = total
    var = m2 / count
    if UPDATE:
        old_mean = tl.load(running_mean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        old_var = tl.load(running_var_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        new_mean = (1.0 - factor) * old_mean + factor * mean
        new_var = (1.0 - factor) * old_var + factor * (var * (count / (count - 1.0)))
        tl.store(running_mean_ptr + offs_c, new_mean.to(running_mean_ptr.dtype.element_ty), mask=c_mask)
        tl.store(running_var_ptr + offs_c, new_var.to(running_var_ptr.dtype.element_ty), mask=c_mask)
    inv_std = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + offs_c, mean, mask=c_mask)
    tl.store(inv_std_ptr + offs_c, inv_std, mask=c_mask)
    scale = inv_std
    shift = -mean * scale
    if HAS_AFFINE:
        weight = tl.load(weight_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        scale = scale * weight
        shift = shift * weight + bias
    tl.store(scale_ptr + offs_c, scale, mask=c_mask)
    tl.store(shift_ptr + offs_c, shift, mask=c_mask)


def bn_finalize(stats: torch.Tensor, row0: int, bn, length: int, factor: float, update: bool,
                scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor) -> None:
    """Merge rows [row0, row0 + C) of ``stats`` (2, rows, B * splits) for ``bn``; write scale, shift,
    the batch mean and 1/sqrt(batch var + eps), each float32 (C,).

    ``factor`` is the running-average factor ``nn.BatchNorm2d`` would use this step.
    """
    channels = bn.num_features
    n_cols = stats.shape[2]
    has_affine = bn.weight is not None
    dummy = scale
    grid = (triton.cdiv(channels, 64),)
    _bn_finalize_kernel[grid](
        stats, bn.weight if has_affine else dummy, bn.bias if has_affine else dummy,
        bn.running_mean if update else dummy, bn.running_var if update else dummy, scale, shift,
        mean, inv_std, row0, stats.shape[1], n_cols, channels, length, float(factor), float(bn.eps), n_splits(length),
        HAS_AFFINE=has_affine, UPDATE=update, SPLIT=STAT_SPLIT, BLOCK_C=64, BLOCK_COLS=64, num_warps=4)
