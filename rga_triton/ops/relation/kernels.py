"""Relation embedding and attention gate, without the L x L affinity.

Per image, with theta, phi (K, L) stacked as tp = [theta; phi] (2K, L), the relation
embedding weight Wg = [W_in | W_out] (R, 2L), the W network conv1 (Hd, 1 + R) and conv2 (1, Hd):

    A   = [W_in phi^T | W_out theta^T]                  (R, 2K)   reduction over L
    Z   = A tp = W_in G^T + W_out G,  G = theta^T phi   (R, L)    never stored
    rel = ReLU(BN_gg(Z))
    h   = conv1[:, 0] gx_mean + conv1[:, 1:] rel        (Hd, L)
    logit = conv2 ReLU(BN_1(h))                          (L,)      the last BN is applied by the caller

Train mode needs batch statistics of Z and h before their ReLUs: ``z_stats`` and
``hidden_stats`` recompute Z tile by tile (cheaper than storing it: tp, (2K, L), is 2K/R
the size of Z, (R, L)) and reduce (mean, M2) per split; ``gate_logit`` then normalises.

The tiled alternative (``relation_z_tiled``) builds G block by block on chip and feeds
it straight into Wg, writing only Z (R, L); the gate kernels then read that Z. Both are
exact; only the rounding order differs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...common.settings import MAX_HIDDEN
from ...launch import space
from ...launch.tuned import tuned
from ..batchnorm.stats import store_partials, welford_merge


@triton.jit
def _z_dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """tl.dot for Z's products (A, Z = A tp, the tiled G and Z), whose sums cancel: 3xTF32 where the
    kernel's other dots run single TF32 (TF32 allowed, ``launch/space.dot_precision``), else theirs."""
    if DOT_PRECISION == "tf32":
        out = tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out


# First config (pinned launches): 64 x 64 at 8 warps, which spills nothing on sm_90 and sm_80 and lowers to
# wgmma on sm_90 (docs/tuning.md). Every tile reduces over 32 positions (BLOCK_L) at a time, or 16 for the widest:
# the dot holds its whole BLOCK_L-long operands in registers, twice over for the 3xTF32 halves, and 32 x 32 x 64,
# 64 x 32 x 64 and 32 x 64 x 128 spilled on sm_90 (at 4 warps, or in every setting: up to 5192 B in bfloat16).
# 64- and 128-row tiles lower to wgmma; 32 x 32 is the mma.sync fallback with the most programs.
@tuned([dict(BLOCK_R=64, BLOCK_K=64, BLOCK_L=32), dict(BLOCK_R=32, BLOCK_K=32, BLOCK_L=32),
        dict(BLOCK_R=64, BLOCK_K=32, BLOCK_L=32), dict(BLOCK_R=128, BLOCK_K=64, BLOCK_L=16)],
       key=["R", "K", "L", "DOT_PRECISION"], warps=(8, 4))
@triton.jit
def _relation_a_kernel(tp_ptr, wg_ptr, a_ptr, R, K, L, DOT_PRECISION: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
    """a[b, :, :K] = W_in phi[b]^T, a[b, :, K:] = W_out theta[b]^T; float32 (B, R, 2K).

    Grid: (cdiv(R, BLOCK_R), 2 * cdiv(K, BLOCK_K), B). wg: (R, 2L) contiguous.
    """
    b = tl.program_id(2).to(tl.int64)
    k_blocks = tl.cdiv(K, BLOCK_K)
    half = tl.program_id(1) // k_blocks                  # 0: W_in with phi, 1: W_out with theta
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = (tl.program_id(1) % k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
    r_mask, k_mask = offs_r < R, offs_k < K
    src_rows = (1 - half) * K + offs_k                    # phi rows for W_in, theta rows for W_out
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        l_mask = offs_l < L
        w = tl.load(wg_ptr + offs_r[:, None] * 2 * L + half * L + offs_l[None, :],
                    mask=r_mask[:, None] & l_mask[None, :], other=0.0)
        t = tl.load(tp_ptr + b * 2 * K * L + src_rows[None, :] * L + offs_l[:, None],     # (BLOCK_L, BLOCK_K)
                    mask=l_mask[:, None] & k_mask[None, :], other=0.0)
        acc = _z_dot(w.to(tl.float32), t, acc, DOT_PRECISION)
    tl.store(a_ptr + b * R * 2 * K + offs_r[:, None] * 2 * K + half * K + offs_k[None, :], acc,
             mask=r_mask[:, None] & k_mask[None, :])


# It holds three accumulators (two G tiles and Z), each a 3xTF32 product: every config spilled at 4 warps.
# First (pinned) config: 64 x 64 outputs, G taken 16 columns and 16 channels at a time, at 8 warps: no spill on
# sm_90 or sm_80, and its products lower to wgmma on sm_90 (docs/tuning.md). Every tile takes G 16 x 16 at a
# time: with 32 channels (BLOCK_K) or 32 columns (BLOCK_C) the operands' TF32 halves of the same outputs spilled
# at 4 warps, or at 3 stages, or everywhere (64 x 64 x 64 x 32: 716 B at 8 warps). 64 x 128 and 128 x 64 are the
# widest tiles that fit at 8 warps (2 stages); 32-row tiles are the mma.sync fallback.
@tuned([dict(BLOCK_R=64, BLOCK_L=64, BLOCK_C=16, BLOCK_K=16), dict(BLOCK_R=32, BLOCK_L=32, BLOCK_C=16, BLOCK_K=16),
        dict(BLOCK_R=32, BLOCK_L=64, BLOCK_C=16, BLOCK_K=16), dict(BLOCK_R=64, BLOCK_L=32, BLOCK_C=16, BLOCK_K=16),
        dict(BLOCK_R=64, BLOCK_L=128, BLOCK_C=16, BLOCK_K=16), dict(BLOCK_R=128, BLOCK_L=64, BLOCK_C=16, BLOCK_K=16)],
       key=["R", "K", "L", "DOT_PRECISION"], warps=(8, 4))
@triton.jit
def _relation_z_tiled_kernel(tp_ptr, wg_ptr, z_ptr, R, K, L, DOT_PRECISION: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
                             BLOCK_K: tl.constexpr):
    """z[b, r, p] = sum_c W_in[r, c] G[p, c] + W_out[r, c] G[c, p] with G = theta^T phi, G made on chip.

    Grid: (cdiv(L, BLOCK_L), cdiv(R, BLOCK_R), B). z: float32 (B, R, L).
    """
    b = tl.program_id(2).to(tl.int64)
    offs_p = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    p_mask, r_mask = offs_p < L, offs_r < R
    tp = tp_ptr + b * 2 * K * L
    z = tl.zeros((BLOCK_R, BLOCK_L), dtype=tl.float32)
    for c0 in range(0, L, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < L
        g_pc_t = tl.zeros((BLOCK_C, BLOCK_L), dtype=tl.float32)     # G[p, c] transposed: phi_c^T theta_p
        g_cp = tl.zeros((BLOCK_C, BLOCK_L), dtype=tl.float32)       # G[c, p]: theta_c^T phi_p
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            pk_mask = k_mask[:, None] & p_mask[None, :]
            ck_mask = c_mask[:, None] & k_mask[None, :]
            theta_p = tl.load(tp + offs_k[:, None] * L + offs_p[None, :], mask=pk_mask, other=0.0)
            phi_p = tl.load(tp + (K + offs_k[:, None]) * L + offs_p[None, :], mask=pk_mask, other=0.0)
            theta_c_t = tl.load(tp + offs_k[None, :] * L + offs_c[:, None], mask=ck_mask, other=0.0)
            phi_c_t = tl.load(tp + (K + offs_k[None, :]) * L + offs_c[:, None], mask=ck_mask, other=0.0)
            g_pc_t = _z_dot(phi_c_t, theta_p, g_pc_t, DOT_PRECISION)
            g_cp = _z_dot(theta_c_t, phi_p, g_cp, DOT_PRECISION)
        rc_mask = r_mask[:, None] & c_mask[None, :]
        w_in = tl.load(wg_ptr + offs_r[:, None] * 2 * L + offs_c[None, :], mask=rc_mask, other=0.0)
        w_out = tl.load(wg_ptr + offs_r[:, None] * 2 * L + L + offs_c[None, :], mask=rc_mask, other=0.0)
        z = _z_dot(w_in.to(tl.float32), g_pc_t, z, DOT_PRECISION)
        z = _z_dot(w_out.to(tl.float32), g_cp, z, DOT_PRECISION)
    tl.store(z_ptr + b * R * L + offs_r[:, None] * L + offs_p[None, :], z, mask=r_mask[:, None] & p_mask[None, :])


@triton.jit
def _z_tile(a_ptr, tp_ptr, z_ptr, b, offs_r, r_mask, offs_l, l_mask, R, K2, L,
            Z_IN_MEMORY: tl.constexpr, DOT_PRECISION: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
    """Z[b, offs_r, offs_l] in float32: A tp recomputed, or read from the tiled kernel's output."""
    if Z_IN_MEMORY:
        z = tl.load(z_ptr + b * R * L + offs_r[:, None] * L + offs_l[None, :],
                    mask=r_mask[:, None] & l_mask[None, :], other=0.0)
    else:
        z = tl.zeros((BLOCK_R, BLOCK_L), dtype=tl.float32)
        for k0 in range(0, K2, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K2
            a = tl.load(a_ptr + b * R * K2 + offs_r[:, None] * K2 + offs_k[None, :],
                        mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            t = tl.load(tp_ptr + b * K2 * L + offs_k[:, None] * L + offs_l[None, :],
                        mask=k_mask[:, None] & l_mask[None, :], other=0.0)
            z = _z_dot(a, t.to(tl.float32), z, DOT_PRECISION)
    return z


@triton.jit
def _hidden_tile(a_ptr, tp_ptr, z_ptr, w1_ptr, z_scale_ptr, z_shift_ptr, gx_mean_ptr, b, offs_l, l_mask,
                 R, K2, L, HIDDEN, Z_IN_MEMORY: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
    """h = conv1 [gx_mean; ReLU(Z * z_scale + z_shift)] for positions offs_l: float32 (BLOCK_H, BLOCK_L)."""
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < HIDDEN
    h = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        z = _z_tile(a_ptr, tp_ptr, z_ptr, b, offs_r, r_mask, offs_l, l_mask, R, K2, L,
                    Z_IN_MEMORY, DOT_PRECISION, BLOCK_R, BLOCK_K, BLOCK_L)
        scale = tl.load(z_scale_ptr + offs_r, mask=r_mask, other=0.0)
        shift = tl.load(z_shift_ptr + offs_r, mask=r_mask, other=0.0)
        # ReLU that keeps NaN (tl.maximum's default turns it into 0), as torch.relu does
        rel = tl.maximum(z * scale[:, None] + shift[:, None], 0.0, propagate_nan=tl.PropagateNan.ALL)
        rel = tl.where(r_mask[:, None], rel, 0.0)
        w1 = tl.load(w1_ptr + offs_h[:, None] * (R + 1) + 1 + offs_r[None, :],
                     mask=h_mask[:, None] & r_mask[None, :], other=0.0)
        h = tl.dot(w1, rel, h, input_precision=DOT_PRECISION)
    w_pool = tl.load(w1_ptr + offs_h * (R + 1), mask=h_mask, other=0.0)
    gx = tl.load(gx_mean_ptr + b * L + offs_l, mask=l_mask, other=0.0)
    return h + w_pool[:, None] * gx[None, :]


# Warpgroup MMA (sm_90): the BLOCK_R=64 tiles' Z = A tp product lowers to wgmma (an M tile of 64 per warpgroup);
# 64 x 16 x 64 does so without spilling at 8 warps in the hidden-layer kernels too (K taken 16 at a time), where
# 64 x 32 x 64 spills. The BLOCK_R=32 and 16 tiles stay mma.sync. The hidden layer's product h = W1 rel cannot:
# its M tile is the hidden width (BLOCK_H, 32 for most blocks), under wgmma's 64 (docs/tuning.md).
# At the widest hidden layer (BLOCK_H=128) h is a 128 x BLOCK_L tile beside everything else: 4-warp configs spill
# unless the tile is small. 32 x 64 x 128, which spilled in every setting at every width, gave way to 32 x 16 x 32,
# which spills nothing in any setting, BLOCK_H=128 included.
_GATE_SPACE = [dict(BLOCK_R=32, BLOCK_K=32, BLOCK_L=64), dict(BLOCK_R=64, BLOCK_K=32, BLOCK_L=64),
               dict(BLOCK_R=32, BLOCK_K=16, BLOCK_L=32), dict(BLOCK_R=16, BLOCK_K=64, BLOCK_L=32),
               dict(BLOCK_R=64, BLOCK_K=16, BLOCK_L=64)]
# The hidden statistics hold h (BLOCK_H x BLOCK_L) beside the Z tile and its 3xTF32 operand halves: _GATE_SPACE's
# 64 x 32 x 64 and 32 x 64 x 128 spilled in every num_warps x num_stages on sm_90 (52 to 3688 B). Here they give way
# to tiles taking A 16 columns at a time (32 x 16 x 64, and 64 x 16 x 32, which lowers to wgmma) and 16 x 32 x 64.
# At BLOCK_H=128 only tiles of 32 positions spill nothing at 4 warps: 16 x 64 x 32 (spilling at 4 warps there) gave
# way to 16 x 32 x 32, and 32 x 16 x 32 joined.
_HIDDEN_STATS_SPACE = [dict(BLOCK_R=32, BLOCK_K=32, BLOCK_L=64), dict(BLOCK_R=32, BLOCK_K=16, BLOCK_L=64),
                       dict(BLOCK_R=16, BLOCK_K=32, BLOCK_L=64), dict(BLOCK_R=16, BLOCK_K=32, BLOCK_L=32),
                       dict(BLOCK_R=64, BLOCK_K=16, BLOCK_L=64), dict(BLOCK_R=64, BLOCK_K=16, BLOCK_L=32),
                       dict(BLOCK_R=32, BLOCK_K=16, BLOCK_L=32)]


# warps=(8, 4): the first config at 8 warps, under the register file's limit (docs/tuning.md)
@tuned(_GATE_SPACE, key=["R", "K2", "L", "Z_IN_MEMORY", "DOT_PRECISION"], warps=(8, 4))
@triton.jit
def _z_stats_kernel(a_ptr, tp_ptr, z_ptr, stats_ptr, R, K2, L, n_cols,
                    Z_IN_MEMORY: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
    """stats[:, r, b * splits + s] = (mean, M2) of Z[b, r, l] over split s. Grid: (splits, cdiv(R, BLOCK_R), B)."""
    pid_s = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    mean = tl.zeros((BLOCK_R,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_R,), dtype=tl.float32)
    count = 0.0
    end = tl.minimum(L, (pid_s + 1) * SPLIT)
    for l0 in range(pid_s * SPLIT, end, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        l_mask = offs_l < end
        z = _z_tile(a_ptr, tp_ptr, z_ptr, b, offs_r, r_mask, offs_l, l_mask, R, K2, L,
                    Z_IN_MEMORY, DOT_PRECISION, BLOCK_R, BLOCK_K, BLOCK_L)
        mean, m2, count = welford_merge(z, l_mask, mean, m2, count)
    store_partials(stats_ptr, offs_r, r_mask, R, n_cols, b * tl.num_programs(0) + pid_s, mean, m2)


@tuned(_HIDDEN_STATS_SPACE, key=["R", "K2", "L", "HIDDEN", "Z_IN_MEMORY", "DOT_PRECISION"], warps=(8, 4))
@triton.jit
def _hidden_stats_kernel(a_ptr, tp_ptr, z_ptr, w1_ptr, z_scale_ptr, z_shift_ptr, gx_mean_ptr, stats_ptr,
                         R, K2, L, HIDDEN, n_cols, Z_IN_MEMORY: tl.constexpr, SPLIT: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
    """stats[:, j, b * splits + s] = (mean, M2) of h[b, j, l] over split s. Grid: (splits, B)."""
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    mean = tl.zeros((BLOCK_H,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_H,), dtype=tl.float32)
    count = 0.0
    end = tl.minimum(L, (pid_s + 1) * SPLIT)
    for l0 in range(pid_s * SPLIT, end, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        l_mask = offs_l < end
        h = _hidden_tile(a_ptr, tp_ptr, z_ptr, w1_ptr, z_scale_ptr, z_shift_ptr, gx_mean_ptr, b, offs_l, l_mask,
                         R, K2, L, HIDDEN, Z_IN_MEMORY, DOT_PRECISION, BLOCK_H, BLOCK_R, BLOCK_K, BLOCK_L)
        mean, m2, count = welford_merge(h, l_mask, mean, m2, count)
    store_partials(stats_ptr, offs_h, offs_h < HIDDEN, HIDDEN, n_cols, b * tl.num_programs(0) + pid_s, mean, m2)


@tuned(_GATE_SPACE, key=["R", "K2", "L", "HIDDEN", "Z_IN_MEMORY", "APPLY_GATE", "DOT_PRECISION"], warps=(8, 4))
@triton.jit
def _gate_logit_kernel(a_ptr, tp_ptr, z_ptr, w1_ptr, z_scale_ptr, z_shift_ptr, gx_mean_ptr,
                       h_scale_ptr, h_shift_ptr, w2_ptr, out_scale_ptr, out_shift_ptr, logit_ptr, R, K2, L, HIDDEN,
                       Z_IN_MEMORY: tl.constexpr, APPLY_GATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
    """logit[b, l] = conv2 ReLU(h * h_scale + h_shift), before the last BatchNorm; with APPLY_GATE
    (eval) the gate sigmoid(logit * out_scale + out_shift) instead. Grid: (cdiv(L, BLOCK_L), B)."""
    b = tl.program_id(1).to(tl.int64)
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    l_mask = offs_l < L
    h = _hidden_tile(a_ptr, tp_ptr, z_ptr, w1_ptr, z_scale_ptr, z_shift_ptr, gx_mean_ptr, b, offs_l, l_mask,
                     R, K2, L, HIDDEN, Z_IN_MEMORY, DOT_PRECISION, BLOCK_H, BLOCK_R, BLOCK_K, BLOCK_L)
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < HIDDEN
    scale = tl.load(h_scale_ptr + offs_h, mask=h_mask, other=0.0)
    shift = tl.load(h_shift_ptr + offs_h, mask=h_mask, other=0.0)
    w2 = tl.load(w2_ptr + offs_h, mask=h_mask, other=0.0)
    hidden = tl.maximum(h * scale[:, None] + shift[:, None], 0.0, propagate_nan=tl.PropagateNan.ALL)
    logit = tl.sum(w2[:, None] * hidden, axis=0)
    if APPLY_GATE:
        logit = tl.sigmoid(logit * tl.load(out_scale_ptr) + tl.load(out_shift_ptr))
    tl.store(logit_ptr + b * L + offs_l, logit, mask=l_mask)


# ---- launchers -----------------------------------------------------------------------------------------

def relation_a(tp: torch.Tensor, wg: torch.Tensor) -> torch.Tensor:
    """A = [W_in phi^T | W_out theta^T], float32 (B, R, 2K). tp: float32 (B, 2K, L); wg: (R, 2L) contiguous."""
    batch, k2, length = tp.shape
    r = wg.shape[0]
    a = torch.empty((batch, r, k2), device=tp.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(r, meta["BLOCK_R"]), 2 * triton.cdiv(k2 // 2, meta["BLOCK_K"]), batch)  # noqa: E731
    _relation_a_kernel[grid](tp, wg, a, r, k2 // 2, length, DOT_PRECISION=space.dot_precision(tp.device))
    return a


def relation_z_tiled(tp: torch.Tensor, wg: torch.Tensor) -> torch.Tensor:
    """Z = W_in G^T + W_out G, float32 (B, R, L), G built on chip block by block (never stored)."""
    batch, k2, length = tp.shape
    r = wg.shape[0]
    z = torch.empty((batch, r, length), device=tp.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(length, meta["BLOCK_L"]), triton.cdiv(r, meta["BLOCK_R"]), batch)  # noqa: E731
    _relation_z_tiled_kernel[grid](tp, wg, z, r, k2 // 2, length, DOT_PRECISION=space.dot_precision(tp.device))
    return z


class RelationOperands:
    """What the gate kernels read for one branch: A and tp (reassociated) or Z (tiled)."""

    def __init__(self, tp: torch.Tensor, gx_mean: torch.Tensor, a: torch.Tensor | None, z: torch.Tensor | None,
                 r: int):
        self.tp, self.gx_mean, self.r = tp, gx_mean, r
        self.z_in_memory = z is not None
        self.a = a if a is not None else gx_mean     # dummy pointer when unused
        self.z = z if z is not None else gx_mean
        self.batch, self.k2, self.length = tp.shape
        # the gate kernels' own dots (the hidden layer) may go TF32; their Z tiles keep 3xTF32 (_z_dot)
        self.precision = space.dot_precision(tp.device, tf32_ok=True)


def _block_h(hidden: int) -> int:
    if hidden > MAX_HIDDEN:     # RGAModule sends such modules to the torch path (backend.module_unsupported_reason)
        raise ValueError(f"the attention network's hidden width {hidden} exceeds the kernels' {MAX_HIDDEN}")
    return max(16, triton.next_power_of_2(hidden))


def z_stats(ops: RelationOperands) -> torch.Tensor:
    """Per-split (mean, M2) of Z's rows: float32 (2, R, B * splits)."""
    cols = ops.batch * space.n_splits(ops.length)
    stats = torch.empty((2, ops.r, cols), device=ops.tp.device, dtype=torch.float32)
    grid = lambda meta: (space.n_splits(ops.length), triton.cdiv(ops.r, meta["BLOCK_R"]), ops.batch)  # noqa: E731
    _z_stats_kernel[grid](ops.a, ops.tp, ops.z, stats, ops.r, ops.k2, ops.length, cols,
                          Z_IN_MEMORY=ops.z_in_memory, SPLIT=space.STAT_SPLIT,
                          DOT_PRECISION=space.dot_precision(ops.tp.device))     # Z's products only
    return stats


def hidden_stats(ops: RelationOperands, w1: torch.Tensor, z_scale: torch.Tensor, z_shift: torch.Tensor):
    """Per-split (mean, M2) of h's rows: float32 (2, Hd, B * splits). w1: float32 (Hd, 1 + R)."""
    hidden = w1.shape[0]
    cols = ops.batch * space.n_splits(ops.length)
    stats = torch.empty((2, hidden, cols), device=ops.tp.device, dtype=torch.float32)
    grid = (space.n_splits(ops.length), ops.batch)
    _hidden_stats_kernel[grid](ops.a, ops.tp, ops.z, w1, z_scale, z_shift, ops.gx_mean, stats,
                               ops.r, ops.k2, ops.length, hidden, cols, Z_IN_MEMORY=ops.z_in_memory,
                               SPLIT=space.STAT_SPLIT, DOT_PRECISION=ops.precision, BLOCK_H=_block_h(hidden))
    return stats


def gate_logit(ops: RelationOperands, w1, z_scale, z_shift, h_scale, h_shift, w2, out_scale=None, out_shift=None):
    """The gate logit before the last BatchNorm, float32 (B, L); w2: float32 (Hd,).

    Given the last BatchNorm as (out_scale, out_shift) (eval), the sigmoid gate instead.
    """
    apply_gate = out_scale is not None
    if not apply_gate:
        out_scale = out_shift = w2      # dummy pointers, never read
    hidden = w1.shape[0]
    logit = torch.empty((ops.batch, ops.length), device=ops.tp.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(ops.length, meta["BLOCK_L"]), ops.batch)  # noqa: E731
    _gate_logit_kernel[grid](ops.a, ops.tp, ops.z, w1, z_scale, z_shift, ops.gx_mean, h_scale, h_shift, w2,
                             out_scale, out_shift, logit, ops.r, ops.k2, ops.length, hidden,
                             Z_IN_MEMORY=ops.z_in_memory, APPLY_GATE=apply_gate,
                             DOT_PRECISION=ops.precision, BLOCK_H=_block_h(hidden))
    return logit
