"""The blocked affinity G = theta^T phi, for callers who want G itself (relation maps)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...launch import space
from ...launch.tuned import tuned


@tuned([dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32), dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32)],
       key=["M", "N", "K", "DOT_PRECISION"])
@triton.jit
def _affinity_kernel(theta_ptr, phi_ptr, g_ptr, M, N, K,
                     stride_tb, stride_tk, stride_tm, stride_pb, stride_pk, stride_pn,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """g[b, m, n] = sum_k theta[b, k, m] phi[b, k, n]; g contiguous float32 (B, M, N).

    Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), B).
    """
    b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        theta_t = tl.load(theta_ptr + b * stride_tb + offs_k[None, :] * stride_tk + offs_m[:, None] * stride_tm,
                          mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        phi = tl.load(phi_ptr + b * stride_pb + offs_k[:, None] * stride_pk + offs_n[None, :] * stride_pn,
                      mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(theta_t, phi, acc, input_precision=DOT_PRECISION)
    tl.store(g_ptr + b * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=m_mask[:, None] & n_mask[None, :])


def affinity(theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """G = theta^T phi per image: theta (B, K, M), phi (B, K, N) -> (B, M, N) in theta's dtype.

    Accumulates in float32; float32 inputs keep float32 accuracy (see ``dot_precision``).
    The operands are checked by :func:`rga_triton.affinity`.
    """
    batch, k, m = theta.shape
    n = phi.shape[2]
    g = torch.empty((batch, m, n), device=theta.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), batch)  # noqa: E731
    _affinity_kernel[grid](theta, phi, g, m, n, k, *theta.stride(), *phi.stride(),
                           DOT_PRECISION=space.dot_precision(theta.device, tf32_ok=theta.dtype == torch.float32))
    return g.to(theta.dtype)
