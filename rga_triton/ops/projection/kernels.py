"""Projection: one read of a branch's input yields its three 1x1-conv embeddings.

A branch sees X (B, Cin, L), read through strides (spatial: x as (B, C, N); channel: x
read transposed as (B, N, C), no copy), optionally scaled per input channel by a gate
already computed (RGA-SC: the spatial gate applied where the channel branch reads x).
W3 = [W_theta; W_phi; W_gx] is (3K, Cin). For each image:

    P = W3 (X * in_gate)                                  (3K, L)
    theta, phi = ReLU(P[:K] * scale + shift), ReLU(P[K:2K] * scale + shift)
    gx_mean[l] = mean_k ReLU(P[2K + k, l] * scale + shift)

In half precision a gated tile is multiplied as two parts in the weights' dtype, hi + lo:
rounded once, x * in_gate cost up to 6e-2 on train-mode weight gradients (see README).

BatchNorm enters as a per-row (scale, shift): folded running statistics in eval, batch
statistics in train, which ``projection_stats`` measures first (Welford within a program,
Chan's merge across programs, all in float32). In train the statistics pass also stores P
(B, 3K, L) float32, and the apply pass reads it instead of multiplying W3 and X again.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...launch import space
from ...launch.tuned import tuned
from ..batchnorm.stats import store_partials, welford_merge


@triton.jit
def _project_tile(x_ptr, gate_ptr, w_ptr, b, rows, row_mask, offs_l, l_mask, Cin,
                  stride_xb, stride_xc, stride_xl, stride_gb,
                  HAS_GATE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                  BLOCK_L: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc[rows, l] = sum_c W3[rows, c] * X[b, c, l] * in_gate[b, c], float32 (BLOCK_ROWS, BLOCK_L)."""
    acc = tl.zeros((BLOCK_ROWS, BLOCK_L), dtype=tl.float32)
    x_base = x_ptr + b * stride_xb
    for c0 in range(0, Cin, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < Cin
        w = tl.load(w_ptr + rows[:, None] * Cin + offs_c[None, :],
                    mask=row_mask[:, None] & c_mask[None, :], other=0.0)
        xt = tl.load(x_base + offs_c[:, None] * stride_xc + offs_l[None, :] * stride_xl,
                     mask=c_mask[:, None] & l_mask[None, :], other=0.0)
        if HAS_GATE:
            g = tl.load(gate_ptr + b * stride_gb + offs_c, mask=c_mask, other=0.0)
            xg = xt.to(tl.float32) * g[:, None]
            hi = xg.to(w.dtype)
            acc = tl.dot(w, hi, acc, input_precision=DOT_PRECISION)
            if w.dtype != tl.float32:
                # half-precision weights: x * gate rounded to w's dtype loses up to 6e-2 on some
                # train-mode gradients (cancellation); hi + lo carries it to ~2x w's precision
                lo = (xg - hi.to(tl.float32)).to(w.dtype)
                acc = tl.dot(w, lo, acc, input_precision=DOT_PRECISION)
        else:
            # x's dtype, or the autocast dtype of the weights (x float32 under torch.autocast)
            acc = tl.dot(w, xt.to(w.dtype), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _embed_tile(x_ptr, gate_ptr, w_ptr, p_ptr, scale_ptr, shift_ptr, b, rows, row_mask, offs_l, l_mask, Cin, L, ROWS,
                stride_xb, stride_xc, stride_xl, stride_gb,
                HAS_GATE: tl.constexpr, P_IN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                BLOCK_L: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """ReLU(P[rows, l] * scale[rows] + shift[rows]): the embedding with its BatchNorm as an affine map.
    P_IN: P read from p (B, ROWS, L) float32, as the statistics pass stored it; else multiplied here."""
    if P_IN:
        acc = tl.load(p_ptr + b * ROWS * L + rows[:, None] * L + offs_l[None, :],
                      mask=row_mask[:, None] & l_mask[None, :], other=0.0)
    else:
        acc = _project_tile(x_ptr, gate_ptr, w_ptr, b, rows, row_mask, offs_l, l_mask, Cin,
                            stride_xb, stride_xc, stride_xl, stride_gb,
                            HAS_GATE, BLOCK_C, BLOCK_ROWS, BLOCK_L, DOT_PRECISION)
    scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
    shift = tl.load(shift_ptr + rows, mask=row_mask, other=0.0)
    return tl.maximum(acc * scale[:, None] + shift[:, None], 0.0, propagate_nan=tl.PropagateNan.ALL)


# Rows x C x L. The 3xTF32 product holds both operands' TF32 halves beside the accumulator: 64 x 32 x 128,
# 32 x 64 x 128 and 64 x 64 x 64 spilled in every num_warps x num_stages on sm_90 with 3xTF32 (44 to
# 2080 B; bench/studies/kernel_resources.py). They give way to 64 x 16 x 64 (wgmma, spilling nothing in any setting
# or precision), 32 x 16 x 128 and 64 x 32 x 64 (wgmma, at 8 warps). The 16-wide reductions keep the operand tiles
# small; the 64- and 128-row tiles lower to Hopper's wgmma, the 32-row ones stay mma.sync. Every BLOCK_L divides
# STAT_SPLIT.
@tuned([dict(BLOCK_ROWS=32, BLOCK_C=32, BLOCK_L=64), dict(BLOCK_ROWS=64, BLOCK_C=16, BLOCK_L=64),
        dict(BLOCK_ROWS=32, BLOCK_C=16, BLOCK_L=128), dict(BLOCK_ROWS=64, BLOCK_C=32, BLOCK_L=64),
        dict(BLOCK_ROWS=64, BLOCK_C=16, BLOCK_L=128), dict(BLOCK_ROWS=128, BLOCK_C=16, BLOCK_L=64)],
       key=["Cin", "L", "ROWS", "STORE_P", "DOT_PRECISION"], warps=(8, 4))     # first config: 8 warps, no spill
@triton.jit
def _projection_stats_kernel(x_ptr, gate_ptr, w_ptr, stats_ptr, p_ptr, Cin, L, ROWS, n_cols,
                             stride_xb, stride_xc, stride_xl, stride_gb,
                             HAS_GATE: tl.constexpr, STORE_P: tl.constexpr, SPLIT: tl.constexpr,
                             DOT_PRECISION: tl.constexpr,
                             BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """stats[:, rows, b * splits + s] = (mean, M2) of P[rows, l] over the positions of split s;
    STORE_P: p[b] = P (ROWS, L) float32 too.

    Grid: (splits, cdiv(ROWS, BLOCK_ROWS), B). stats: float32 (2, ROWS, n_cols).
    """
    pid_s = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < ROWS
    mean = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    count = 0.0
    end = tl.minimum(L, (pid_s + 1) * SPLIT)
    for l0 in range(pid_s * SPLIT, end, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        l_mask = offs_l < end
        acc = _project_tile(x_ptr, gate_ptr, w_ptr, b, rows, row_mask, offs_l, l_mask, Cin,
                            stride_xb, stride_xc, stride_xl, stride_gb,
                            HAS_GATE, BLOCK_C, BLOCK_ROWS, BLOCK_L, DOT_PRECISION)
        mean, m2, count = welford_merge(acc, l_mask, mean, m2, count)
        if STORE_P:
            tl.store(p_ptr + b * ROWS * L + rows[:, None] * L + offs_l[None, :], acc,
                     mask=row_mask[:, None] & l_mask[None, :])
    store_partials(stats_ptr, rows, row_mask, ROWS, n_cols, b * tl.num_programs(0) + pid_s, mean, m2)


# K x C x L. As in the statistics pass: 32 x 64 x 128, 128 x 32 x 128, 16 x 64 x 128 and 64 x 64 x 64 spilled in
# every setting but at most one on sm_90 with 3xTF32 (8 to 4144 B). Half as wide a reduction (32 x 16 x 128,
# 16 x 32 x 128) or half as many positions (64 x 32 x 64, 128 x 32 x 64: wgmma) spill nothing in at least two of
# their four settings in every precision case. 64 x 32 x 128 stays: at 8 warps and 2 stages the widest wgmma tile
# that spills nothing.
@tuned([dict(BLOCK_K=32, BLOCK_C=32, BLOCK_L=64), dict(BLOCK_K=32, BLOCK_C=16, BLOCK_L=128),
        dict(BLOCK_K=64, BLOCK_C=32, BLOCK_L=128), dict(BLOCK_K=64, BLOCK_C=32, BLOCK_L=64),
        dict(BLOCK_K=128, BLOCK_C=32, BLOCK_L=64), dict(BLOCK_K=16, BLOCK_C=32, BLOCK_L=128),
        dict(BLOCK_K=64, BLOCK_C=16, BLOCK_L=128), dict(BLOCK_K=128, BLOCK_C=16, BLOCK_L=64)],
       key=["Cin", "L", "K", "P_IN", "DOT_PRECISION"], warps=(8, 4))     # first config: 8 warps, no spill
@triton.jit
def _projection_apply_kernel(x_ptr, gate_ptr, w_ptr, p_ptr, scale_ptr, shift_ptr, tp_ptr, gx_mean_ptr, Cin, L, K,
                             stride_xb, stride_xc, stride_xl, stride_gb,
                             HAS_GATE: tl.constexpr, P_IN: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """tp[b] = [theta; phi] (2K, L) and gx_mean[b] (L,), float32, from P multiplied here or (P_IN) read
    from p (B, 3K, L).

    Grid: (cdiv(L, BLOCK_L), 2 * cdiv(K, BLOCK_K) + 1, B). The last program row of axis 1
    reduces the gx section over all K channels (gx itself is never stored).
    """
    b = tl.program_id(2).to(tl.int64)
    pid_r = tl.program_id(1)
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    l_mask = offs_l < L
    k_blocks = tl.cdiv(K, BLOCK_K)
    if pid_r < 2 * k_blocks:
        section = pid_r // k_blocks
        offs_k = (pid_r % k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        rows = section * K + offs_k
        y = _embed_tile(x_ptr, gate_ptr, w_ptr, p_ptr, scale_ptr, shift_ptr, b, rows, k_mask, offs_l, l_mask, Cin, L,
                        3 * K, stride_xb, stride_xc, stride_xl, stride_gb, HAS_GATE, P_IN, BLOCK_C, BLOCK_K, BLOCK_L,
                        DOT_PRECISION)
        tl.store(tp_ptr + b * 2 * K * L + rows[:, None] * L + offs_l[None, :], y.to(tp_ptr.dtype.element_ty),
                 mask=k_mask[:, None] & l_mask[None, :])
    else:
        total = tl.zeros((BLOCK_L,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            rows = 2 * K + offs_k
            y = _embed_tile(x_ptr, gate_ptr, w_ptr, p_ptr, scale_ptr, shift_ptr, b, rows, k_mask, offs_l, l_mask,
                            Cin, L, 3 * K, stride_xb, stride_xc, stride_xl, stride_gb, HAS_GATE, P_IN, BLOCK_C, BLOCK_K,
                            BLOCK_L, DOT_PRECISION)
            total += tl.sum(tl.where(k_mask[:, None], y, 0.0), axis=0)
        tl.store(gx_mean_ptr + b * L + offs_l, total / K, mask=l_mask)


def _gate_args(in_gate: torch.Tensor | None, x: torch.Tensor):
    if in_gate is None:
        return x, 0, False          # dummy pointer, never read
    return in_gate, in_gate.stride(0), True


def projection_stats(x: torch.Tensor, shape, strides, weight: torch.Tensor, in_gate: torch.Tensor | None = None,
                     keep_p: bool = False):
    """Per-split (mean, M2) of P = W3 (X * in_gate) for each of W3's rows: float32 (2, 3K, B * splits),
    and with ``keep_p`` P itself, float32 (B, 3K, L), for ``projection_apply`` to read (else None).

    x: the tensor X is read from; shape, strides: X's (B, Cin, L) and its strides in x;
    weight: (3K, Cin) contiguous in the compute dtype (x's, or autocast's); in_gate: float32 (B, Cin) or None.
    """
    batch, cin, length = shape
    rows = weight.shape[0]
    cols = batch * space.n_splits(length)
    stats = torch.empty((2, rows, cols), device=x.device, dtype=torch.float32)
    p = torch.empty((batch, rows, length), device=x.device, dtype=torch.float32) if keep_p else None
    gate, stride_gb, has_gate = _gate_args(in_gate, x)
    grid = lambda meta: (space.n_splits(length), triton.cdiv(rows, meta["BLOCK_ROWS"]), batch)  # noqa: E731
    _projection_stats_kernel[grid](x, gate, weight, stats, p if keep_p else stats, cin, length, rows, cols, *strides,
                                   stride_gb, HAS_GATE=has_gate, STORE_P=keep_p, SPLIT=space.STAT_SPLIT,
                                   DOT_PRECISION=space.dot_precision(x.device, tf32_ok=weight.dtype == torch.float32))
    return stats, p


def projection_apply(x: torch.Tensor, shape, strides, weight: torch.Tensor, scale: torch.Tensor,
                     shift: torch.Tensor, in_gate: torch.Tensor | None = None, p: torch.Tensor | None = None):
    """theta and phi stacked, (B, 2K, L) float32, and gx's channel mean (B, L) float32.

    scale, shift: float32 (3K,), the BatchNorm of each row of W3 as an affine map; p: P float32 (B, 3K, L)
    as ``projection_stats`` kept it (read instead of multiplying W3 and X again), or None.
    """
    batch, cin, length = shape
    k = weight.shape[0] // 3
    # float32 whatever the compute dtype: theta and phi feed sums that cancel, and in
    # float16 they can exceed its range where x does not (|x| ~ 1e4 gives theta ~ 7e4)
    tp = torch.empty((batch, 2 * k, length), device=x.device, dtype=torch.float32)
    gx_mean = torch.empty((batch, length), device=x.device, dtype=torch.float32)
    gate, stride_gb, has_gate = _gate_args(in_gate, x)
    grid = lambda meta: (triton.cdiv(length, meta["BLOCK_L"]), 2 * triton.cdiv(k, meta["BLOCK_K"]) + 1, batch)  # noqa: E731
    _projection_apply_kernel[grid](x, gate, weight, p if p is not None else tp, scale, shift, tp, gx_mean, cin,
                                   length, k, *strides, stride_gb, HAS_GATE=has_gate, P_IN=p is not None,
                                   DOT_PRECISION=space.dot_precision(x.device, tf32_ok=weight.dtype == torch.float32))
    return tp, gx_mean
