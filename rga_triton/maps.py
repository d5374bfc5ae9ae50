"""Public affinity helpers: G itself, and the relation maps the paper's Fig. 4 shows."""
from __future__ import annotations

from typing import Sequence

import torch

from . import backend as _backend
from .torch_path import relation_inputs


def affinity(theta: torch.Tensor, phi: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """G = theta^T phi per image: theta (B, K, M), phi (B, K, N) -> (B, M, N).

    Computed tile by tile by a Triton kernel where Triton takes the tensors (float32
    accumulation; float32 inputs keep float32 accuracy), else by ``torch.matmul``.
    """
    for name, t in (("theta", theta), ("phi", phi)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if _backend.resolve(_backend.check_backend(backend), theta) == "triton":
        from .kernels.affinity import affinity as triton_affinity
        return triton_affinity(theta, phi)
    if theta.dim() != 3 or phi.dim() != 3 or theta.shape[:2] != phi.shape[:2]:
        raise ValueError(f"theta and phi must be (B, K, M) and (B, K, N) with the same B and K, got shapes "
                         f"{tuple(theta.shape)} and {tuple(phi.shape)}")
    return torch.matmul(theta.transpose(1, 2), phi)


def _flat_positions(positions, height: int, width: int) -> torch.Tensor:
    flat = []
    for p in positions:
        if isinstance(p, (tuple, list)):
            if len(p) != 2:
                raise ValueError(f"positions must hold flat indices or (row, col) pairs, got {p!r}")
            i, j = p
            if not (0 <= i < height and 0 <= j < width):
                raise ValueError(f"position {p!r} is outside the {height} x {width} feature map")
            flat.append(i * width + j)
        else:
            if not 0 <= int(p) < height * width:
                raise ValueError(f"position {p!r} is outside [0, {height * width}) (H*W = {height}*{width})")
            flat.append(int(p))
    if not flat:
        raise ValueError("positions must name at least one query position")
    return torch.tensor(flat, dtype=torch.long)


@torch.no_grad()
def relation_maps(module, x: torch.Tensor, positions: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of the spatial affinity G for query positions, as H x W maps.

    positions: flat indices p in [0, H*W) or (row, col) pairs. Returns (rows, cols), each
    (B, P, H, W): ``rows[b, q] = G[b, p_q, :]`` (how p_q relates to every position) and
    ``cols[b, q] = G[b, :, p_q]`` (how every position relates to p_q), with G = theta^T phi
    of the spatial branch in the module's current mode (no BatchNorm buffer changes).
    """
    if not getattr(module, "use_spatial", False):
        raise ValueError("module must have a spatial branch (use_spatial=True) to draw relation maps")
    b, c, h, w = x.shape
    index = _flat_positions(positions, h, w).to(x.device)
    theta, phi, _ = relation_inputs(module.branch("spatial"), x.reshape(b, c, h * w), update=False)
    backend = getattr(module, "backend", "auto")
    rows = affinity(theta[:, :, index], phi, backend)                     # (B, P, N): G[p, :]
    cols = affinity(theta, phi[:, :, index], backend).transpose(1, 2)     # (B, P, N): G[:, p]
    return rows.reshape(b, -1, h, w), cols.reshape(b, -1, h, w)
