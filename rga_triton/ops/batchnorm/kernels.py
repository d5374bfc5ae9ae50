"""Train-mode BatchNorm finalisation: one launch per BatchNorm, or per three alike ones.

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

from ...common.batchnorm import tracks_running_stats
from ...launch.space import STAT_SPLIT, n_splits

MAX_GROUP = 3
"""BatchNorms one launch finalises: the projection's three (theta, phi, gx), which its one
statistics pass measures together."""
FINALIZE_BLOCKS = dict(BLOCK_C=64, BLOCK_COLS=16)
FINALIZE_WARPS = 4
"""The finalize launch (untuned): block sizes and num_warps (num_stages: Triton's default, 3). 16 partial
columns at a time: 96 registers on sm_90, where 64 columns (a 64 x 64 tile of mean, M2 and deviations over
128 threads) took 255 and spilled 996 B."""


@triton.jit
def _finalize_rows(stats_ptr, weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr, scale_ptr, shift_ptr,
                   mean_ptr, inv_std_ptr, row0, rows_total, n_cols, channels, length, factor, eps, n_splits,
                   HAS_AFFINE: tl.constexpr, UPDATE: tl.constexpr, SPLIT: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """For channels c of one BatchNorm (rows row0 + c of the partials (2, rows_total, n_cols)):
    mean, var = merge of the partials; running stats updated when UPDATE; scale, shift, mean and
    1/sqrt(var + eps) written at row0 + c (backward needs the normalised value, which scale/shift
    cannot give when weight is 0). The BatchNorm's own tensors are indexed by c."""
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
    tl.store(mean_ptr + rows, mean, mask=c_mask)
    tl.store(inv_std_ptr + rows, inv_std, mask=c_mask)
    scale = inv_std
    shift = -mean * scale
    if HAS_AFFINE:
        weight = tl.load(weight_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        scale = scale * weight
        shift = shift * weight + bias
    tl.store(scale_ptr + rows, scale, mask=c_mask)
    tl.store(shift_ptr + rows, shift, mask=c_mask)


@triton.jit
def _bn_finalize_kernel(stats_ptr, weight0_ptr, bias0_ptr, running_mean0_ptr, running_var0_ptr,
                        weight1_ptr, bias1_ptr, running_mean1_ptr, running_var1_ptr,
                        weight2_ptr, bias2_ptr, running_mean2_ptr, running_var2_ptr,
                        scale_ptr, shift_ptr, mean_ptr, inv_std_ptr, row0, rows_total, n_cols, channels, length,
                        factor0, factor1, factor2, eps0, eps1, eps2, n_splits,
                        HAS_AFFINE: tl.constexpr, UPDATE: tl.constexpr, SPLIT: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Up to three BatchNorms of ``channels`` rows each, stored one after the other from row0:
    BatchNorm g takes rows row0 + g * channels + c of the partials and of scale, shift, mean and
    inv_std (each float32 (rows_total,)), and its own weight, bias and running statistics
    (:func:`_finalize_rows`). Grid: (cdiv(channels, BLOCK_C), number of BatchNorms)."""
    g = tl.program_id(1)
    if g == 0:
        _finalize_rows(stats_ptr, weight0_ptr, bias0_ptr, running_mean0_ptr, running_var0_ptr, scale_ptr, shift_ptr,
                       mean_ptr, inv_std_ptr, row0, rows_total, n_cols, channels, length, factor0, eps0, n_splits,
                       HAS_AFFINE, UPDATE, SPLIT, BLOCK_C, BLOCK_COLS)
    elif g == 1:
        _finalize_rows(stats_ptr, weight1_ptr, bias1_ptr, running_mean1_ptr, running_var1_ptr, scale_ptr, shift_ptr,
                       mean_ptr, inv_std_ptr, row0 + channels, rows_total, n_cols, channels, length, factor1, eps1,
                       n_splits, HAS_AFFINE, UPDATE, SPLIT, BLOCK_C, BLOCK_COLS)
    else:
        _finalize_rows(stats_ptr, weight2_ptr, bias2_ptr, running_mean2_ptr, running_var2_ptr, scale_ptr, shift_ptr,
                       mean_ptr, inv_std_ptr, row0 + 2 * channels, rows_total, n_cols, channels, length, factor2,
                       eps2, n_splits, HAS_AFFINE, UPDATE, SPLIT, BLOCK_C, BLOCK_COLS)


def finalize_groups(placed: list[tuple[int, object]]) -> list[tuple[int, list]]:
    """(first row, BatchNorms) per ``bn_finalize`` launch, from (first row, BatchNorm) pairs in row
    order: runs of up to :data:`MAX_GROUP` BatchNorms that follow one another in the rows, of one
    width, alike in affine and in moving running statistics (what the kernel takes as constants)."""
    def kind(bn):
        return bn.num_features, bn.weight is not None, tracks_running_stats(bn)

    groups: list[tuple[int, list]] = []
    for start, bn in placed:
        if groups:
            first, members = groups[-1]
            if (len(members) < MAX_GROUP and kind(bn) == kind(members[0])
                    and start == first + len(members) * bn.num_features):
                members.append(bn)
                continue
        groups.append((start, [bn]))
    return groups


def bn_finalize(stats: torch.Tensor, row0: int, bns: list, length: int, factors: list[float],
                scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor) -> None:
    """Merge rows [row0, row0 + C * len(bns)) of ``stats`` (2, rows, B * splits) for ``bns`` (one launch:
    up to three BatchNorms of C channels, alike as :func:`finalize_groups` groups them); write their
    scale, shift, batch mean and 1/sqrt(batch var + eps) into those rows of the float32 (rows,)
    outputs. ``factors``: the running-average factor ``nn.BatchNorm2d`` would use this step, per BatchNorm.
    """
    if not 1 <= len(bns) <= MAX_GROUP:
        raise ValueError(f"bn_finalize takes 1 to {MAX_GROUP} BatchNorms, got {len(bns)}")
    channels, has_affine, update = bns[0].num_features, bns[0].weight is not None, tracks_running_stats(bns[0])
    n_cols = stats.shape[2]
    padded = [*bns, *bns[:1] * (MAX_GROUP - len(bns))]     # unused slots: never read (no program has their g)
    tensors = [t if t is not None and (has_affine if i < 2 else update) else scale
               for bn in padded for i, t in enumerate((bn.weight, bn.bias, bn.running_mean, bn.running_var))]
    factors = [float(f) for f in factors] + [0.0] * (MAX_GROUP - len(bns))
    eps = [float(bn.eps) for bn in padded]
    grid = (triton.cdiv(channels, FINALIZE_BLOCKS["BLOCK_C"]), len(bns))
    _bn_finalize_kernel[grid](
        stats, *tensors, scale, shift, mean, inv_std, row0, stats.shape[1], n_cols, channels, length,
        *factors, *eps, n_splits(length),
        HAS_AFFINE=has_affine, UPDATE=update, SPLIT=STAT_SPLIT, **FINALIZE_BLOCKS, num_warps=FINALIZE_WARPS)
