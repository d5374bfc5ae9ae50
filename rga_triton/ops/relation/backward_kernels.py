"""Backward of the relation embedding and the attention network, without the L x L affinity.

Forward per image (``kernels.py``): Z = A tp (R, L), rel = ReLU(BN_z(Z)),
h = W1 [gx_mean; rel] (Hd, L), logit = w2 . ReLU(BN_1(h)) (L,), the last BatchNorm
applied by the caller. Each BatchNorm arrives as six float32 rows
(mean, inv_std, weight, bias, c_b, c_g): x_hat = (x - mean) * inv_std is what it normalised
with, and c_b, c_g are the batch-statistics terms of its backward (0 in eval). Given
dlogit (B, L), the gradient at the logit before the last BatchNorm:

    dy1 = (w2 dlogit) * [BN_1(h) > 0]                              (Hd, L)
    dh  = weight_1 inv_std_1 (dy1 - c_b - h_hat c_g),   c_b = sum(dy1) / M, c_g = sum(dy1 h_hat) / M
    [dgx_mean; drel] = W1^T dh
    dyz = drel * [BN_z(Z) > 0]                                     (R, L)
    dZ  = weight_z inv_std_z (dyz - c_b - z_hat c_g)               with Z's own c_b, c_g

where M = B L values per channel, and sums run over images and positions. The parameter
gradients are those sums: dw2 = sum dlogit ReLU(BN_1(h)), dweight_1 = sum dy1 h_hat,
dbias_1 = sum dy1, dW1 = sum dh [gx_mean; rel]^T, dweight_z = sum dyz z_hat, dbias_z = sum dyz.

Two kernels, each launched for its reductions (SUMS), its per-position output (WRITE), or
both at once when the BatchNorm it crosses uses running statistics (eval):

- ``_hidden_backward_kernel``, programs over (split of positions, image): recomputes h,
  reduces dy1's sums and dw2; writes dh (B, Hd, L), dgx_mean, and dW1's pooled column.
- ``_relation_backward_kernel``, programs over (block of R, group of (image, position tile)):
  recomputes its Z tile (or reads Z), reads dh; reduces dyz's sums and dW1's relation columns;
  writes dZ (B, R, L), from which two batched matmuls give dA and dtp.

Every reduction lands in per-program partials summed in a fixed order afterwards: results
are bitwise repeatable run to run (no atomics), as ``torch.use_deterministic_algorithms`` asks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...launch import space
from ...launch.tuned import tuned
from ..batchnorm.stats import load_bn_rows
from .kernels import RelationOperands, _block_h, _hidden_tile, _z_tile

GROUPS = 128
"""(image, position tile) groups of the relation backward: its partials are at most (GROUPS, Hd, R)
whatever the batch and resolution, and GROUPS times the R blocks keeps a GPU busy."""


# First (pinned) config: 16 x 32 x 32 at 8 warps, the one that spills nothing on sm_90 and sm_80 with room to
# spare (225 / 230 registers); 32 x 32 x 64 at 4 warps spilled 476 B (docs/tuning.md). Beside h and the Z tile
# this kernel holds dh, the BatchNorm rows and four sums: 32 x 32 x 64, 64 x 32 x 64 and 32 x 64 x 128 spilled in
# every num_warps x num_stages on sm_90 (16 to 4208 B, 3xTF32), so the other tiles take A 16 columns at a time.
# 64-row tiles (whose Z product lowers to wgmma) fit only at 32 positions: 64 x 16 x 64 spilled 24 B at 8 warps.
_HIDDEN_SPACE = [dict(BLOCK_R=16, BLOCK_K=32, BLOCK_L=32), dict(BLOCK_R=32, BLOCK_K=16, BLOCK_L=64),
                 dict(BLOCK_R=16, BLOCK_K=16, BLOCK_L=64), dict(BLOCK_R=32, BLOCK_K=16, BLOCK_L=32),
                 dict(BLOCK_R=64, BLOCK_K=16, BLOCK_L=32)]


@tuned(_HIDDEN_SPACE, key=["R", "K2", "L", "HIDDEN", "Z_IN_MEMORY", "SUMS", "WRITE", "DOT_PRECISION"], warps=(8, 4))
@triton.jit
def _hidden_backward_kernel(a_ptr, tp_ptr, z_ptr, w1_ptr, z_scale_ptr, z_shift_ptr, gx_mean_ptr, h_bn_ptr, w2_ptr,
                            dlogit_ptr, sums_ptr, dh_ptr, dgx_ptr, pool_ptr, R, K2, L, HIDDEN, n_cols,
                            Z_IN_MEMORY: tl.constexpr, SUMS: tl.constexpr, WRITE: tl.constexpr,
                            SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
    """SUMS: sums[:, j, col] = (sum dy1, sum dy1 h_hat, sum dlogit ReLU(BN_1(h))) of hidden channel j;
    WRITE: dh[b] (Hd, L), dgx[b] (L,) and pool[j, col] = sum dh[j] gx_mean, all float32.

    Grid: (splits, B); col = b * splits + split. h_bn: float32 (6, Hd).
    """
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < HIDDEN
    mean, inv_std, weight, bias, c_b, c_g = load_bn_rows(h_bn_ptr, offs_h, h_mask, HIDDEN)
    w2 = tl.load(w2_ptr + offs_h, mask=h_mask, other=0.0)
    w_pool = tl.load(w1_ptr + offs_h * (R + 1), mask=h_mask, other=0.0)
    sum_b = tl.zeros((BLOCK_H,), dtype=tl.float32)
    sum_g = tl.zeros((BLOCK_H,), dtype=tl.float32)
    sum_w2 = tl.zeros((BLOCK_H,), dtype=tl.float32)
    sum_pool = tl.zeros((BLOCK_H,), dtype=tl.float32)
    end = tl.minimum(L, (pid_s + 1) * SPLIT)
    for l0 in range(pid_s * SPLIT, end, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        l_mask = offs_l < end
        valid = h_mask[:, None] & l_mask[None, :]
        h = _hidden_tile(a_ptr, tp_ptr, z_ptr, w1_ptr, z_scale_ptr, z_shift_ptr, gx_mean_ptr, b, offs_l, l_mask,
                         R, K2, L, HIDDEN, Z_IN_MEMORY, DOT_PRECISION, BLOCK_H, BLOCK_R, BLOCK_K, BLOCK_L)
        h_hat = (h - mean[:, None]) * inv_std[:, None]
        y1 = h_hat * weight[:, None] + bias[:, None]
        dlogit = tl.load(dlogit_ptr + b * L + offs_l, mask=l_mask, other=0.0)
        dy1 = tl.where(valid & (y1 > 0), w2[:, None] * dlogit[None, :], 0.0)
        if SUMS:
            hidden = tl.maximum(y1, 0.0, propagate_nan=tl.PropagateNan.ALL)
            sum_b += tl.sum(dy1, axis=1)
            sum_g += tl.sum(tl.where(valid, dy1 * h_hat, 0.0), axis=1)
            sum_w2 += tl.sum(tl.where(valid, dlogit[None, :] * hidden, 0.0), axis=1)
        if WRITE:
            dh = (weight * inv_std)[:, None] * (dy1 - c_b[:, None] - h_hat * c_g[:, None])
            dh = tl.where(valid, dh, 0.0)
            tl.store(dh_ptr + b * HIDDEN * L + offs_h[:, None] * L + offs_l[None, :], dh, mask=valid)
            tl.store(dgx_ptr + b * L + offs_l, tl.sum(w_pool[:, None] * dh, axis=0), mask=l_mask)
            gx = tl.load(gx_mean_ptr + b * L + offs_l, mask=l_mask, other=0.0)
            sum_pool += tl.sum(dh * gx[None, :], axis=1)
    col = b * tl.num_programs(0) + pid_s
    if SUMS:
        tl.store(sums_ptr + offs_h * n_cols + col, sum_b, mask=h_mask)
        tl.store(sums_ptr + (HIDDEN + offs_h) * n_cols + col, sum_g, mask=h_mask)
        tl.store(sums_ptr + (2 * HIDDEN + offs_h) * n_cols + col, sum_w2, mask=h_mask)
    if WRITE:
        tl.store(pool_ptr + offs_h * n_cols + col, sum_pool, mask=h_mask)


# First (pinned) config: 16 x 32 x 32 at 8 warps, which spills nothing on sm_90 (docs/tuning.md). Every tile
# takes 32 positions at a time: beside the Z tile and its 3xTF32 halves it holds dh (BLOCK_H x BLOCK_L), W1's
# columns, dW1's accumulator and the BatchNorm rows, and every BLOCK_L=64 or 128 tile spilled on sm_90, in every
# num_warps x num_stages (60 to 3724 B, 3xTF32). 64 x 16 x 32 lowers Z's product to wgmma without spilling.
# At BLOCK_H=128 with Z in memory, the 16- and 32-row tiles fit the 99 KiB of shared memory per block of
# sm_86/sm_89 (RTX 30xx/40xx, A10, L4, L40; 50 to 72 KiB under Triton 3.9), the 64- and 128-row ones (104 and
# 176 KiB) only sm_80/sm_90: the tuner's pruning drops them where they do not fit (docs/tuning.md).
@tuned([dict(BLOCK_R=16, BLOCK_K=32, BLOCK_L=32), dict(BLOCK_R=32, BLOCK_K=16, BLOCK_L=32),
        dict(BLOCK_R=64, BLOCK_K=16, BLOCK_L=32), dict(BLOCK_R=32, BLOCK_K=32, BLOCK_L=32),
        dict(BLOCK_R=128, BLOCK_K=16, BLOCK_L=32)],
       key=["R", "K2", "L", "HIDDEN", "Z_IN_MEMORY", "SUMS", "WRITE", "DOT_PRECISION"], warps=(8, 4))
@triton.jit
def _relation_backward_kernel(a_ptr, tp_ptr, z_ptr, w1_ptr, z_bn_ptr, dh_ptr, dz_ptr, sums_ptr, dw1_ptr,
                              R, K2, L, HIDDEN, B,
                              Z_IN_MEMORY: tl.constexpr, SUMS: tl.constexpr, WRITE: tl.constexpr,
                              DOT_PRECISION: tl.constexpr, BLOCK_H: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
    """SUMS: sums[:, r, g] = (sum dyz, sum dyz z_hat) and dw1[g, :, r] = sum dh rel^T over group g;
    WRITE: dz[b, r, l] = dZ, float32 (B, R, L).

    Grid: (cdiv(R, BLOCK_R), groups). Group g takes the units g, g + groups, ... of the
    B * cdiv(L, BLOCK_L) (image, position tile) units. z_bn: float32 (6, R).
    """
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    group = tl.program_id(1)
    r_mask = offs_r < R
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < HIDDEN
    mean, inv_std, weight, bias, c_b, c_g = load_bn_rows(z_bn_ptr, offs_r, r_mask, R)
    # W1's relation columns, transposed: (BLOCK_R, BLOCK_H)
    w1_t = tl.load(w1_ptr + offs_h[None, :] * (R + 1) + 1 + offs_r[:, None],
                   mask=r_mask[:, None] & h_mask[None, :], other=0.0)
    sum_b = tl.zeros((BLOCK_R,), dtype=tl.float32)
    sum_g = tl.zeros((BLOCK_R,), dtype=tl.float32)
    dw1 = tl.zeros((BLOCK_H, BLOCK_R), dtype=tl.float32)
    l_tiles = tl.cdiv(L, BLOCK_L)
    for unit in range(group, B * l_tiles, tl.num_programs(1)):
        b = (unit // l_tiles).to(tl.int64)
        offs_l = (unit % l_tiles) * BLOCK_L + tl.arange(0, BLOCK_L)
        l_mask = offs_l < L
        valid = r_mask[:, None] & l_mask[None, :]
        z = _z_tile(a_ptr, tp_ptr, z_ptr, b, offs_r, r_mask, offs_l, l_mask, R, K2, L,
                    Z_IN_MEMORY, DOT_PRECISION, BLOCK_R, BLOCK_K, BLOCK_L)
        z_hat = (z - mean[:, None]) * inv_std[:, None]
        yz = z_hat * weight[:, None] + bias[:, None]
        dh = tl.load(dh_ptr + b * HIDDEN * L + offs_h[:, None] * L + offs_l[None, :],
                     mask=h_mask[:, None] & l_mask[None, :], other=0.0)
        drel = tl.dot(w1_t, dh, input_precision=DOT_PRECISION)
        dyz = tl.where(valid & (yz > 0), drel, 0.0)
        if SUMS:
            sum_b += tl.sum(dyz, axis=1)
            sum_g += tl.sum(tl.where(valid, dyz * z_hat, 0.0), axis=1)
            rel = tl.where(valid, tl.maximum(yz, 0.0, propagate_nan=tl.PropagateNan.ALL), 0.0)
            dw1 = tl.dot(dh, tl.trans(rel), dw1, input_precision=DOT_PRECISION)
        if WRITE:
            dz = (weight * inv_std)[:, None] * (dyz - c_b[:, None] - z_hat * c_g[:, None])
            tl.store(dz_ptr + b * R * L + offs_r[:, None] * L + offs_l[None, :], dz, mask=valid)
    if SUMS:
        groups = tl.num_programs(1)
        tl.store(sums_ptr + offs_r * groups + group, sum_b, mask=r_mask)
        tl.store(sums_ptr + (R + offs_r) * groups + group, sum_g, mask=r_mask)
        tl.store(dw1_ptr + group * HIDDEN * R + offs_h[:, None] * R + offs_r[None, :], dw1,
                 mask=h_mask[:, None] & r_mask[None, :])


# ---- launchers -----------------------------------------------------------------------------------------

def hidden_backward(ops: RelationOperands, w1, z_scale, z_shift, h_bn, w2, dlogit, sums: bool, write: bool):
    """Launch ``_hidden_backward_kernel``; returns (sums (3, Hd) or None, dh, dgx_mean, dW1's pooled column).

    w1: float32 (Hd, 1 + R); h_bn: float32 (6, Hd); w2: float32 (Hd,); dlogit: float32 (B, L).
    The outputs of the part not asked for are None.
    """
    hidden = w1.shape[0]
    cols = ops.batch * space.n_splits(ops.length)
    new = lambda *shape: torch.empty(shape, device=ops.tp.device, dtype=torch.float32)  # noqa: E731
    partial_sums = new(3, hidden, cols) if sums else dlogit
    dh = new(ops.batch, hidden, ops.length) if write else dlogit
    dgx = new(ops.batch, ops.length) if write else dlogit
    pool = new(hidden, cols) if write else dlogit
    grid = (space.n_splits(ops.length), ops.batch)
    _hidden_backward_kernel[grid](ops.a, ops.tp, ops.z, w1, z_scale, z_shift, ops.gx_mean, h_bn, w2, dlogit,
                                  partial_sums, dh, dgx, pool, ops.r, ops.k2, ops.length, hidden, cols,
                                  Z_IN_MEMORY=ops.z_in_memory, SUMS=sums, WRITE=write, SPLIT=space.STAT_SPLIT,
                                  DOT_PRECISION=ops.precision, BLOCK_H=_block_h(hidden))
    if not write:
        return partial_sums.sum(dim=2), None, None, None
    return (partial_sums.sum(dim=2) if sums else None), dh, dgx, pool.sum(dim=1)


def relation_backward(ops: RelationOperands, w1, z_bn, dh, sums: bool, write: bool):
    """Launch ``_relation_backward_kernel``; returns (sums (2, R) or None, dW1's relation columns (Hd, R)
    or None, dZ (B, R, L) or None). z_bn: float32 (6, R); dh: float32 (B, Hd, L)."""
    hidden = w1.shape[0]
    groups = min(GROUPS, ops.batch * triton.cdiv(ops.length, 64))     # any count is correct; idle ones store 0
    new = lambda *shape: torch.empty(shape, device=ops.tp.device, dtype=torch.float32)  # noqa: E731
    partial_sums = new(2, ops.r, groups) if sums else dh
    dw1 = new(groups, hidden, ops.r) if sums else dh
    dz = new(ops.batch, ops.r, ops.length) if write else dh
    grid = lambda meta: (triton.cdiv(ops.r, meta["BLOCK_R"]), groups)  # noqa: E731
    _relation_backward_kernel[grid](ops.a, ops.tp, ops.z, w1, z_bn, dh, dz, partial_sums, dw1,
                                    ops.r, ops.k2, ops.length, hidden, ops.batch,
                                    Z_IN_MEMORY=ops.z_in_memory, SUMS=sums, WRITE=write,
                                    DOT_PRECISION=ops.precision, BLOCK_H=_block_h(hidden))
    if not sums:
        return None, None, dz
    return partial_sums.sum(dim=2), dw1.sum(dim=0), (dz if write else None)
