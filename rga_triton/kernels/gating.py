"""out = x * spatial_gate * channel_gate: the single pass that writes the block's output."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tuned import tuned


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


def apply_gates(x: torch.Tensor, spatial: torch.Tensor | None, channel: torch.Tensor | None) -> torch.Tensor:
    """x (B, C, H, W) any strides; spatial float32 (B, H*W) or None; channel float32 (B, C) or None.

    The output has x's memory format where H and W merge into one axis, else it is contiguous.
    """
    batch, c, h, w = x.shape
    n = h * w
    if x.stride(2) != w * x.stride(3):          # H and W must merge into one position axis
        x = x.contiguous()
    out = torch.empty_like(x)                  # x's memory format (channels_last stays channels_last)
    if out.stride(2) != w * out.stride(3):
        out = torch.empty((batch, c, h, w), device=x.device, dtype=x.dtype)
    dummy = spatial if spatial is not None else channel
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(c, meta["BLOCK_C"]), batch)  # noqa: E731
    _apply_gates_kernel[grid](x, spatial if spatial is not None else dummy, channel if channel is not None else dummy,
                              out, c, n, x.stride(0), x.stride(1), x.stride(3),
                              out.stride(0), out.stride(1), out.stride(3),
                              HAS_SPATIAL=spatial is not None, HAS_CHANNEL=channel is not None)
    return out
