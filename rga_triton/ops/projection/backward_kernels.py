"""Backward of the projection, on tensor cores at float32 accuracy (3xTF32 on CUDA).

Forward (``kernels.py``), per image: P = W3 Xg (3K, L) with Xg = X * in_gate along Cin,
y = ReLU(BN(P)), theta and phi the first 2K rows of y, gx_mean = mean of its last K rows.
Each BatchNorm arrives as six float32 rows (mean, inv_std, weight, bias, c_b, c_g) per row of
W3, as in ``ops/relation/backward_kernels.py``: p_hat = (P - mean) inv_std is what forward normalised
with, c_b = sum(dy) / M and c_g = sum(dy p_hat) / M are the batch-statistics terms of the rows
whose BatchNorm used the batch (0 elsewhere), M = B L. Given dtp (B, 2K, L) and dgx_mean (B, L):

    dy = [BN(P) > 0] * (dtp for theta and phi's rows, dgx_mean / K for gx's)     (3K, L)
    dP = weight inv_std (dy - c_b - p_hat c_g)
    dW3 = sum_b dP[b] Xg[b]^T                                  (3K, Cin)
    dX[b] = in_gate[b] * (W3^T dP[b]),  d_in_gate[b] = sum_l X[b] * (W3^T dP[b])   (Cin, L), (Cin,)
    d_weight = sum dy p_hat, d_bias = sum dy                     (the BatchNorms' parameters)

Four kernels: ``_projection_grad_kernel`` recomputes P tile by tile (forward's own tile code),
reduces dy's sums, and stores dP, or P where batch statistics need the sums first;
``_projection_dp_kernel`` then turns P into dP in place. ``_input_grad_kernel`` writes dX in
x's layout (through X's strides, no transposed copy), adding into a gradient the block's later
readers of x left when asked, and reduces in_gate's gradient. ``_weight_grad_kernel`` reduces
dW3 over images and positions. PyTorch's float32 matmuls, which this replaces, run on CUDA
cores (TF32 off by default); 3xTF32 keeps their accuracy at about three times their rate.

Every reduction lands in per-program partials summed in a fixed order afterwards, so results
are bitwise repeatable run to run (no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...launch import space
from ...launch.tuned import tuned
from ..batchnorm import sync
from ..batchnorm.stats import load_bn_rows
from .kernels import _gate_args, _project_tile

DGATE_COLS_BLOCK = 64
"""The smallest BLOCK_L of ``_input_grad_kernel``'s space: in_gate's gradient has one partial
column per position tile of this width (wider tiles leave the rest 0)."""

WEIGHT_GRAD_PROGRAMS = 256
"""Programs ``_weight_grad_kernel`` aims for: dW3's (64 x 64) tiles times groups of images. A small
dW3 (the spatial branch's 3K x C at RGA-Net's first stages) splits the batch into groups, each
with its own partial dW3; a large one (the channel branch's 3K x N) has enough tiles alone and
keeps one copy. The partials stay under a quarter of dP's size (:func:`weight_grad_groups`)."""


@triton.jit
def _dy_tile(p, b, rows, row_mask, offs_l, l_mask, L, K, mean, inv_std, weight, bias, dtp_ptr, dgx_ptr):
    """(p_hat, dy) of a P tile (BLOCK_ROWS, BLOCK_L): dy 0 where ReLU was off and outside the tile."""
    p_hat = (p - mean[:, None]) * inv_std[:, None]
    active = row_mask[:, None] & l_mask[None, :] & (p_hat * weight[:, None] + bias[:, None] > 0)
    embeds = rows < 2 * K                           # theta's and phi's rows: their gradient is dtp's
    d_tp = tl.load(dtp_ptr + b * 2 * K * L + rows[:, None] * L + offs_l[None, :],
                   mask=active & embeds[:, None], other=0.0)
    d_gx = tl.load(dgx_ptr + b * L + offs_l, mask=l_mask, other=0.0) / K
    dy = tl.where(active, tl.where(embeds[:, None], d_tp, d_gx[None, :]), 0.0)
    return p_hat, dy


# Rows x C x L. Beside the recomputed P tile and its 3xTF32 operand halves this kernel holds dy, p_hat and the
# BatchNorm rows: on sm_90, 64 x 32 x 128 and 64 x 64 x 64 spilled in every num_warps x num_stages and precision
# case (20 to 3964 B), 32 x 64 x 128 in all but bfloat16's at 8 warps and 2 stages, 64 x 16 x 64 with 3xTF32 even
# at 8 warps (8 B; bench/studies/kernel_resources.py).
# The space takes 32 or 64 positions at a time instead: 32 x 16 x 64 and 16 x 32 x 64, and the 64- and 128-row
# tiles (their product lowers to Hopper's wgmma) at 32 positions, 64 x 16 x 32, 64 x 32 x 32 and 128 x 16 x 32,
# which spill nothing at 8 warps in every precision case. Every BLOCK_L divides STAT_SPLIT.
@tuned([dict(BLOCK_ROWS=32, BLOCK_C=32, BLOCK_L=64), dict(BLOCK_ROWS=32, BLOCK_C=16, BLOCK_L=64),
        dict(BLOCK_ROWS=16, BLOCK_C=32, BLOCK_L=64), dict(BLOCK_ROWS=64, BLOCK_C=32, BLOCK_L=32),
        dict(BLOCK_ROWS=128, BLOCK_C=16, BLOCK_L=32), dict(BLOCK_ROWS=64, BLOCK_C=16, BLOCK_L=32)],
       key=["Cin", "L", "ROWS", "HAS_GATE", "STORE_DP", "DOT_PRECISION"], warps=(8, 4))  # first: 8 warps, no spill
@triton.jit
def _projection_grad_kernel(x_ptr, gate_ptr, w_ptr, bn_ptr, dtp_ptr, dgx_ptr, p_ptr, sums_ptr,
                            Cin, L, ROWS, n_cols, stride_xb, stride_xc, stride_xl, stride_gb,
                            HAS_GATE: tl.constexpr, STORE_DP: tl.constexpr, SPLIT: tl.constexpr,
                            DOT_PRECISION: tl.constexpr,
                            BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """sums[:, r, b * splits + s] = (sum dy, sum dy p_hat) of row r over split s of image b's positions;
    p[b] (3K, L) float32 = dP (STORE_DP: no row needs batch-statistics terms, or they are in bn) or P.

    Grid: (splits, cdiv(ROWS, BLOCK_ROWS), B). bn: float32 (6, ROWS). w: (ROWS, Cin) in the compute dtype.
    """
    pid_s = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < ROWS
    mean, inv_std, weight, bias, c_b, c_g = load_bn_rows(bn_ptr, rows, row_mask, ROWS)
    sum_b = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    sum_g = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    end = tl.minimum(L, (pid_s + 1) * SPLIT)
    for l0 in range(pid_s * SPLIT, end, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        l_mask = offs_l < end
        p = _project_tile(x_ptr, gate_ptr, w_ptr, b, rows, row_mask, offs_l, l_mask, Cin,
                          stride_xb, stride_xc, stride_xl, stride_gb,
                          HAS_GATE, BLOCK_C, BLOCK_ROWS, BLOCK_L, DOT_PRECISION)
        p_hat, dy = _dy_tile(p, b, rows, row_mask, offs_l, l_mask, L, ROWS // 3, mean, inv_std, weight, bias,
                             dtp_ptr, dgx_ptr)
        sum_b += tl.sum(dy, axis=1)
        sum_g += tl.sum(dy * p_hat, axis=1)
        if STORE_DP:
            p = (weight * inv_std)[:, None] * (dy - c_b[:, None] - p_hat * c_g[:, None])
        tl.store(p_ptr + b * ROWS * L + rows[:, None] * L + offs_l[None, :], p,
                 mask=row_mask[:, None] & l_mask[None, :])
    col = b * tl.num_programs(0) + pid_s
    tl.store(sums_ptr + rows * n_cols + col, sum_b, mask=row_mask)
    tl.store(sums_ptr + (ROWS + rows) * n_cols + col, sum_g, mask=row_mask)


@triton.jit
def _projection_dp_kernel(p_ptr, bn_ptr, dtp_ptr, dgx_ptr, L, ROWS,
                          BLOCK_ROWS: tl.constexpr, BLOCK_L: tl.constexpr):
    """p[b] = dP from p[b] = P (3K, L) float32, in place; bn's c_b, c_g hold the batch-statistics terms.

    Grid: (cdiv(L, BLOCK_L), cdiv(ROWS, BLOCK_ROWS), B). Elementwise: launched with fixed blocks.
    """
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    row_mask, l_mask = rows < ROWS, offs_l < L
    mean, inv_std, weight, bias, c_b, c_g = load_bn_rows(bn_ptr, rows, row_mask, ROWS)
    ptrs = p_ptr + b * ROWS * L + rows[:, None] * L + offs_l[None, :]
    valid = row_mask[:, None] & l_mask[None, :]
    p = tl.load(ptrs, mask=valid, other=0.0)
    p_hat, dy = _dy_tile(p, b, rows, row_mask, offs_l, l_mask, L, ROWS // 3, mean, inv_std, weight, bias,
                         dtp_ptr, dgx_ptr)
    tl.store(ptrs, (weight * inv_std)[:, None] * (dy - c_b[:, None] - p_hat * c_g[:, None]), mask=valid)


@tuned([dict(BLOCK_C=64, BLOCK_L=64, BLOCK_R=32), dict(BLOCK_C=128, BLOCK_L=64, BLOCK_R=32),
        dict(BLOCK_C=64, BLOCK_L=128, BLOCK_R=32), dict(BLOCK_C=128, BLOCK_L=128, BLOCK_R=32),
        dict(BLOCK_C=64, BLOCK_L=64, BLOCK_R=64)],
       key=["Cin", "L", "ROWS", "HAS_GATE", "WRITE_DX", "ACCUMULATE", "DOT_PRECISION"], restore_value=["dx_ptr"])
@triton.jit
def _input_grad_kernel(wf_ptr, dp_ptr, x_ptr, gate_ptr, dx_ptr, dgate_ptr, Cin, L, ROWS, n_cols,
                       stride_xb, stride_xc, stride_xl, stride_gb, stride_db, stride_dc, stride_dl,
                       HAS_GATE: tl.constexpr, WRITE_DX: tl.constexpr, ACCUMULATE: tl.constexpr,
                       DOT_PRECISION: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr):
    """WRITE_DX: dx[b] (Cin, L) = in_gate[b] * (W3^T dP[b]), added to dx's contents with ACCUMULATE;
    HAS_GATE: dgate[b, c, pid_l] = sum over the tile's positions of X[b, c, l] (W3^T dP[b])[c, l].

    Grid: (cdiv(L, BLOCK_L), cdiv(Cin, BLOCK_C), B). wf: float32 (ROWS, Cin); dp: float32 (B, ROWS, L);
    x, dx: X's (B, Cin, L) view, read and written through their strides; dgate: float32 (B, Cin, n_cols).
    """
    pid_l = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    l_mask, c_mask = offs_l < L, offs_c < Cin
    acc = tl.zeros((BLOCK_C, BLOCK_L), dtype=tl.float32)
    for r0 in range(0, ROWS, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < ROWS
        w_t = tl.load(wf_ptr + offs_r[None, :] * Cin + offs_c[:, None], mask=c_mask[:, None] & r_mask[None, :],
                      other=0.0)
        dp = tl.load(dp_ptr + b * ROWS * L + offs_r[:, None] * L + offs_l[None, :],
                     mask=r_mask[:, None] & l_mask[None, :], other=0.0)
        acc = tl.dot(w_t, dp, acc, input_precision=DOT_PRECISION)
    valid = c_mask[:, None] & l_mask[None, :]
    if HAS_GATE:
        xt = tl.load(x_ptr + b * stride_xb + offs_c[:, None] * stride_xc + offs_l[None, :] * stride_xl,
                     mask=valid, other=0.0).to(tl.float32)
        tl.store(dgate_ptr + (b * Cin + offs_c) * n_cols + pid_l, tl.sum(acc * xt, axis=1), mask=c_mask)
        acc = acc * tl.load(gate_ptr + b * stride_gb + offs_c, mask=c_mask, other=0.0)[:, None]
    if WRITE_DX:
        dx_ptrs = dx_ptr + b * stride_db + offs_c[:, None] * stride_dc + offs_l[None, :] * stride_dl
        if ACCUMULATE:      # one rounding to dx's dtype, as out.add_(float32 value) does
            acc += tl.load(dx_ptrs, mask=valid, other=0.0).to(tl.float32)
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=valid)


# R x C x L. First (pinned) config: 64 x 64 taking 16 positions at a time, at 8 warps: no spill on sm_80 (64 x 64 x 32
# spilled 240 B there at 4 warps, 56 B at 8) and wgmma on sm_90 (docs/tuning.md). Every tile lowers to wgmma on
# sm_90; with 3xTF32, 64 x 64 x 64 and 128 x 128 x 32 spilled in every setting (16 to 2432 B) and give way to
# 128 x 64 x 16 and 128 x 128 x 16: the same outputs taking 16 positions at a time, which spill nothing at 8 warps.
# 128 x 64 x 32 and 64 x 128 x 32 gave way to 64 x 128 x 16 and 128 x 32 x 32, which spill nothing at 8 warps under
# Triton 3.6 too, the GPU machines' (there the two spilled at 8 warps in 3xTF32 or bfloat16): half the space on both.
@tuned([dict(BLOCK_R=64, BLOCK_C=64, BLOCK_L=16), dict(BLOCK_R=64, BLOCK_C=64, BLOCK_L=32),
        dict(BLOCK_R=128, BLOCK_C=32, BLOCK_L=32), dict(BLOCK_R=64, BLOCK_C=128, BLOCK_L=16),
        dict(BLOCK_R=128, BLOCK_C=64, BLOCK_L=16), dict(BLOCK_R=128, BLOCK_C=128, BLOCK_L=16)],
       key=["Cin", "L", "ROWS", "B", "HAS_GATE", "DOT_PRECISION"], warps=(8, 4))
@triton.jit
def _weight_grad_kernel(dp_ptr, x_ptr, gate_ptr, w_ptr, dw_ptr, Cin, L, ROWS, B,
                        stride_xb, stride_xc, stride_xl, stride_gb,
                        HAS_GATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """dw[g] (ROWS, Cin) float32 = sum over images b = g, g + groups, ... of dP[b] Xg[b]^T.

    Grid: (cdiv(Cin, BLOCK_C), cdiv(ROWS, BLOCK_R), groups). Xg is the operand forward multiplied:
    X * in_gate in float32 (HAS_GATE), else X rounded to w's dtype (the compute dtype; only w's
    dtype is read).
    """
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    group = tl.program_id(2)
    c_mask, r_mask = offs_c < Cin, offs_r < ROWS
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for image in range(group, B, tl.num_programs(2)):
        b = tl.cast(image, tl.int64)         # the loop variable is a Python int in the interpreter
        if HAS_GATE:
            gate = tl.load(gate_ptr + b * stride_gb + offs_c, mask=c_mask, other=0.0)
        for l0 in range(0, L, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            l_mask = offs_l < L
            dp = tl.load(dp_ptr + b * ROWS * L + offs_r[:, None] * L + offs_l[None, :],
                         mask=r_mask[:, None] & l_mask[None, :], other=0.0)
            xt = tl.load(x_ptr + b * stride_xb + offs_c[None, :] * stride_xc + offs_l[:, None] * stride_xl,
                         mask=l_mask[:, None] & c_mask[None, :], other=0.0)       # (BLOCK_L, BLOCK_C)
            if HAS_GATE:
                xt = xt.to(tl.float32) * gate[None, :]
            else:
                xt = xt.to(w_ptr.dtype.element_ty).to(tl.float32)
            acc = tl.dot(dp, xt, acc, input_precision=DOT_PRECISION)
    tl.store(dw_ptr + group * ROWS * Cin + offs_r[:, None] * Cin + offs_c[None, :], acc,
             mask=r_mask[:, None] & c_mask[None, :])


# ---- launchers -----------------------------------------------------------------------------------------

DP_BLOCKS = dict(BLOCK_ROWS=32, BLOCK_L=128)
DP_WARPS = 8     # at 4 warps, 32 x 128 spilled 84 B on sm_90
"""The ``_projection_dp_kernel`` launch (untuned): block sizes and num_warps (num_stages: Triton's default, 3)."""

def projection_dp(x, shape, strides, weight, in_gate, bn_rows, batch_stats, dtp, dgx_mean, sync_group: str = ""):
    """dP float32 (B, 3K, L) and the sums float32 (2, 3K): sum dy, sum dy p_hat over images and positions.

    x, shape, strides: X as ``projection_stats`` reads it; weight: W3 (3K, Cin) contiguous in the compute
    dtype; in_gate: float32 (B, Cin) or None; bn_rows: float32 (6, 3K) (mean, inv_std, weight, bias, 0, 0),
    whose batch-statistics terms this fills in for the BatchNorms (K rows each) that ``batch_stats``
    (three flags: theta's, phi's, gx's) says normalised with the batch; dtp: float32 (B, 2K, L);
    dgx_mean: float32 (B, L). ``sync_group``: the process group whose ranks' batch those BatchNorms
    normalised with (by name; "" for this rank's): their terms are then the group's (one all_reduce).
    """
    batch, cin, length = shape
    rows = weight.shape[0]
    cols = batch * space.n_splits(length)
    dp = torch.empty((batch, rows, length), device=x.device, dtype=torch.float32)
    partials = torch.empty((2, rows, cols), device=x.device, dtype=torch.float32)
    gate, stride_gb, has_gate = _gate_args(in_gate, x)
    direct = not any(batch_stats)               # no batch-statistics terms: dP in one pass
    grid = lambda meta: (space.n_splits(length), triton.cdiv(rows, meta["BLOCK_ROWS"]), batch)  # noqa: E731
    _projection_grad_kernel[grid](x, gate, weight, bn_rows, dtp, dgx_mean, dp, partials, cin, length, rows, cols,
                                  *strides, stride_gb, HAS_GATE=has_gate, STORE_DP=direct, SPLIT=space.STAT_SPLIT,
                                  DOT_PRECISION=space.dot_precision(x.device, tf32_ok=weight.dtype == torch.float32))
    sums = partials.sum(dim=2)
    if not direct:
        k = rows // 3
        terms = sync.group_means(sums, batch * length, sync_group) if sync_group else sums / (batch * length)
        for i in (i for i, used in enumerate(batch_stats) if used):
            bn_rows[4:, i * k:(i + 1) * k] = terms[:, i * k:(i + 1) * k]
        block_rows, block_l = DP_BLOCKS["BLOCK_ROWS"], DP_BLOCKS["BLOCK_L"]
        _projection_dp_kernel[(triton.cdiv(length, block_l), triton.cdiv(rows, block_rows), batch)](
            dp, bn_rows, dtp, dgx_mean, length, rows, BLOCK_ROWS=block_rows, BLOCK_L=block_l, num_warps=DP_WARPS)
    return dp, sums


def input_grad(x, shape, strides, weight, dp, in_gate, dx, dx_strides, accumulate: bool):
    """Write (or, ``accumulate``, add) X's gradient into dx through ``dx_strides`` (X's view of dx; dx None:
    none is written); return in_gate's gradient float32 (B, Cin), or None without a gate.

    weight: W3 float32 (3K, Cin) contiguous; dp: float32 (B, 3K, L); in_gate: float32 (B, Cin) or None.
    """
    batch, cin, length = shape
    gate, stride_gb, has_gate = _gate_args(in_gate, x)
    n_cols = triton.cdiv(length, DGATE_COLS_BLOCK)
    dgate = torch.zeros((batch, cin, n_cols), device=x.device, dtype=torch.float32) if has_gate else dp
    grid = lambda meta: (triton.cdiv(length, meta["BLOCK_L"]), triton.cdiv(cin, meta["BLOCK_C"]), batch)  # noqa: E731
    _input_grad_kernel[grid](weight, dp, x, gate, dx if dx is not None else x, dgate, cin, length, weight.shape[0],
                             n_cols, *strides, stride_gb, *(dx_strides if dx is not None else strides),
                             HAS_GATE=has_gate, WRITE_DX=dx is not None, ACCUMULATE=accumulate,
                             DOT_PRECISION=space.dot_precision(x.device, tf32_ok=x.dtype == torch.float32))
    return dgate.sum(dim=2) if has_gate else None


def weight_grad_groups(batch: int, rows: int, cin: int, length: int) -> int:
    """Groups of images dW3 is reduced in (one partial dW3 each): enough for WEIGHT_GRAD_PROGRAMS programs,
    at most the batch, and partials (groups, rows, Cin) under a quarter of dP (B, rows, L)."""
    tiles = triton.cdiv(rows, 64) * triton.cdiv(cin, 64)
    return max(1, min(batch, WEIGHT_GRAD_PROGRAMS // tiles, batch * length // (4 * cin)))


def weight_grad(x, shape, strides, weight, dp, in_gate):
    """dW3 float32 (3K, Cin) = sum_b dP[b] Xg[b]^T; weight: W3 in the compute dtype (its dtype rounds X)."""
    batch, cin, length = shape
    rows = weight.shape[0]
    groups = weight_grad_groups(batch, rows, cin, length)
    dw = torch.empty((groups, rows, cin), device=x.device, dtype=torch.float32)
    gate, stride_gb, has_gate = _gate_args(in_gate, x)
    grid = lambda meta: (triton.cdiv(cin, meta["BLOCK_C"]), triton.cdiv(rows, meta["BLOCK_R"]), groups)  # noqa: E731
    _weight_grad_kernel[grid](dp, x, gate, weight, dw, cin, length, rows, batch, *strides, stride_gb,
                              HAS_GATE=has_gate,
                              DOT_PRECISION=space.dot_precision(x.device, tf32_ok=weight.dtype == torch.float32))
    return dw[0] if groups == 1 else dw.sum(dim=0)
