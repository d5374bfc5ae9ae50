"""out = x * spatial_gate * channel_gate, the single pass that writes the block's output, and its backward:
one pass over (x, grad_out) that writes dx and reduces both gates' gradients."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...common.layout import empty_like_merged, mergeable
from ...launch.tuned import tuned


@tuned([dict(BLOCK_C=16, BLOCK_N=256), dict(BLOCK_C=32, BLOCK_N=128), dict(BLOCK_C=8, BLOCK_N=512)],
       key=["C", "N"], warps=(4,), stages=(1,))
@triton.jit
def _apply_gates_kernel(x_ptr, spatial_ptr, channel_ptr, out_ptr, C, N, stride_xb, stride_xc, stride_xn,
                        stride_ob, stride_oc, stride_on, HAS_SPATIAL: tl.constexpr, HAS_CHANNEL: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[b, c, n] = x[b, c, n] * spatial[b, n] * channel[b, c]; x and out read and written by strides.

    The spatially gated value is rounded to x's dtype before the channel gate, as the
    reference's two separate multiplications round it. Grid: (cdiv(N, BLOCK_N), cdiv(C, BLOCK_C), B).
    """
    b = tl.program_id(2).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n_mask, c_mask = offs_n < N, offs_c < C
    mask = c_mask[:, None] & n_mask[None, :]
    x = tl.load(x_ptr + b * stride_xb + offs_c[:, None] * stride_xc + offs_n[None, :] * stride_xn, mask=mask)
    y = x
    if HAS_SPATIAL:
        gate = tl.load(spatial_ptr + b * N + offs_n, mask=n_mask)
        y = (y.to(tl.float32) * gate[None, :]).to(x.dtype)
    if HAS_CHANNEL:
        gate = tl.load(channel_ptr + b * C + offs_c, mask=c_mask)
        y = (y.to(tl.float32) * gate[:, None]).to(x.dtype)
    tl.store(out_ptr + b * stride_ob + offs_c[:, None] * stride_oc + offs_n[None, :] * stride_on, y, mask=mask)


GATE_BLOCK_C = 32
GATE_CHUNK_N = 256
"""The backward's partial sums: one per GATE_BLOCK_C channels (spatial gate) and one per
GATE_CHUNK_N positions (channel gate). Every BLOCK_N in its space divides GATE_CHUNK_N, so
their layout does not depend on which config runs (autotune trials leave nothing stale)."""


# BLOCK_N=128 (at 4 warps) and 256 spill registers for sm_90 (bench/studies/kernel_resources.py). 8 warps first:
# the pinned launch of this streaming kernel then holds 126 registers a thread, not 222 (16 warps per SM, not 8).
@tuned([dict(BLOCK_N=64), dict(BLOCK_N=32)], key=["C", "N"], warps=(8, 4), stages=(1,))
@triton.jit
def _apply_gates_backward_kernel(x_ptr, grad_ptr, spatial_ptr, channel_ptr, dx_ptr, ds_ptr, dc_ptr, C, N,
                                 stride_xb, stride_xc, stride_xn, stride_gb, stride_gc, stride_gn,
                                 stride_db, stride_dc, stride_dn, HAS_SPATIAL: tl.constexpr,
                                 HAS_CHANNEL: tl.constexpr, BLOCK_C: tl.constexpr, CHUNK_N: tl.constexpr,
                                 BLOCK_N: tl.constexpr):
    """With g = grad_out, s = spatial (B, N), h = channel (B, C), all products in float32:

        dx[b, c, n] = g * s[b, n] * h[b, c]                           (x's dtype)
        ds[b, j, n] = sum_{c in block j} g * x * h[b, c]               (float32 (B, cdiv(C, BLOCK_C), N))
        dc[b, i, c] = sum_{n in chunk i} g * x * s[b, n]               (float32 (B, cdiv(N, CHUNK_N), C))

    The caller sums the partials in a fixed order: no atomics, bitwise repeatable. A missing
    gate counts as ones and its partials are not written.
    Grid: (cdiv(N, CHUNK_N), cdiv(C, BLOCK_C), B); each program walks its chunk BLOCK_N at a time.
    """
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    h = tl.load(channel_ptr + b * C + offs_c, mask=c_mask, other=0.0) if HAS_CHANNEL else 1.0
    dc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    end = tl.minimum(N, (pid_n + 1) * CHUNK_N)
    for n0 in range(pid_n * CHUNK_N, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end       # the chunk's end: a BLOCK_N past it would count the next chunk twice
        mask = c_mask[:, None] & n_mask[None, :]
        g = tl.load(grad_ptr + b * stride_gb + offs_c[:, None] * stride_gc + offs_n[None, :] * stride_gn,
                    mask=mask, other=0.0).to(tl.float32)
        s = tl.load(spatial_ptr + b * N + offs_n, mask=n_mask, other=0.0) if HAS_SPATIAL else 1.0
        dx = g * s[None, :] if HAS_SPATIAL else g
        dx = dx * h[:, None] if HAS_CHANNEL else dx
        tl.store(dx_ptr + b * stride_db + offs_c[:, None] * stride_dc + offs_n[None, :] * stride_dn,
                 dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_SPATIAL or HAS_CHANNEL:
            gx = g * tl.load(x_ptr + b * stride_xb + offs_c[:, None] * stride_xc + offs_n[None, :] * stride_xn,
                             mask=mask, other=0.0).to(tl.float32)
            if HAS_SPATIAL:
                ds = tl.sum(gx * h[:, None], axis=0) if HAS_CHANNEL else tl.sum(gx, axis=0)
                tl.store(ds_ptr + (b * tl.num_programs(1) + pid_c) * N + offs_n, ds, mask=n_mask)
            if HAS_CHANNEL:
                dc += tl.sum(gx * s[None, :], axis=1) if HAS_SPATIAL else tl.sum(gx, axis=1)
    if HAS_CHANNEL:
        tl.store(dc_ptr + (b * tl.num_programs(0) + pid_n) * C + offs_c, dc, mask=c_mask)


def apply_gates(x: torch.Tensor, spatial: torch.Tensor | None, channel: torch.Tensor | None) -> torch.Tensor:
    """x (B, C, H, W) any strides; spatial float32 (B, H*W) or None; channel float32 (B, C) or None.

    The output has x's memory format where H and W merge into one axis, else it is contiguous.
    """
    batch, c, h, w = x.shape
    n = h * w
    x = mergeable(x)
    out = empty_like_merged(x)
    dummy = spatial if spatial is not None else channel
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(c, meta["BLOCK_C"]), batch)  # noqa: E731
    _apply_gates_kernel[grid](x, spatial if spatial is not None else dummy, channel if channel is not None else dummy,
                              out, c, n, x.stride(0), x.stride(1), x.stride(3),
                              out.stride(0), out.stride(1), out.stride(3),
                              HAS_SPATIAL=spatial is not None, HAS_CHANNEL=channel is not None)
    return out


def apply_gates_backward(grad_out: torch.Tensor, x: torch.Tensor, spatial: torch.Tensor | None,
                         channel: torch.Tensor | None):
    """(dx, d_spatial, d_channel) of ``apply_gates``: dx like x (its memory format where H and W merge);
    d_spatial float32 (B, H*W) and d_channel float32 (B, C), None where that gate is None.

    grad_out: (B, C, H, W), any strides (an expanded gradient is read in place).
    """
    batch, c, h, w = x.shape
    n = h * w
    x, grad_out = mergeable(x), mergeable(grad_out)
    dx = empty_like_merged(x)
    position_chunks, channel_blocks = triton.cdiv(n, GATE_CHUNK_N), triton.cdiv(c, GATE_BLOCK_C)
    f32 = dict(device=x.device, dtype=torch.float32)
    ds = torch.empty((batch, channel_blocks, n), **f32) if spatial is not None else None
    dc = torch.empty((batch, position_chunks, c), **f32) if channel is not None else None
    dummy = next(t for t in (spatial, channel, x) if t is not None)
    _apply_gates_backward_kernel[(position_chunks, channel_blocks, batch)](
        x, grad_out, spatial if spatial is not None else dummy, channel if channel is not None else dummy, dx,
        ds if ds is not None else dummy, dc if dc is not None else dummy, c, n,
        x.stride(0), x.stride(1), x.stride(3), grad_out.stride(0), grad_out.stride(1), grad_out.stride(3),
        dx.stride(0), dx.stride(1), dx.stride(3), HAS_SPATIAL=spatial is not None,
        HAS_CHANNEL=channel is not None, BLOCK_C=GATE_BLOCK_C, CHUNK_N=GATE_CHUNK_N)
    return dx, ds.sum(dim=1) if ds is not None else None, dc.sum(dim=1) if dc is not None else None
