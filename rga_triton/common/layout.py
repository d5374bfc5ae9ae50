"""How a block reads x and its weights: views, layouts and the dtype of the products."""
from __future__ import annotations

import torch


def mergeable(t: torch.Tensor) -> torch.Tensor:
    """t (B, C, H, W), or a contiguous copy when its H and W axes cannot merge into one position axis."""
    return t if t.stride(2) == t.shape[3] * t.stride(3) else t.contiguous()


def empty_like_merged(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor like x, in x's memory format where H and W merge, else contiguous."""
    out = torch.empty_like(x)                  # x's memory format (channels_last stays channels_last)
    return out if out.stride(2) == x.shape[3] * out.stride(3) else torch.empty(x.shape, dtype=x.dtype,
                                                                               device=x.device)


def input_views(x: torch.Tensor) -> dict:
    """(shape, strides) of x (B, C, H, W) read as the spatial (B, C, N) and the channel (B, N, C) input."""
    b, c, h, w = x.shape
    sb, sc, sn = x.stride(0), x.stride(1), x.stride(3)
    return {"spatial": ((b, c, h * w), (sb, sc, sn)), "channel": ((b, h * w, c), (sb, sn, sc))}


def branch_length(x: torch.Tensor, view: str) -> int:
    """L of a branch reading x (B, C, H, W): H*W positions (spatial) or C channels (channel)."""
    return x.shape[2] * x.shape[3] if view == "spatial" else x.shape[1]


def weight_matrix(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (stack of) 1x1-conv weight(s) as one contiguous (rows, in) matrix in ``dtype``, detached."""
    return weight.detach().flatten(1).to(dtype).contiguous()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matrix products run in: x's, or the autocast dtype for float32 x under autocast."""
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def batch_slices(batch: int, pieces: int) -> list:
    """``pieces`` slices of the batch (fewer when it is smaller); one under torch.compile, where a Python
    loop over the batch would make every batch size a recompile."""
    if pieces == 1 or torch.compiler.is_compiling():
        return [slice(0, batch)]            # no arithmetic on a symbolic batch size: no guard on it
    step = max(1, -(-batch // pieces))
    return [slice(i, i + step) for i in range(0, batch, step)]
