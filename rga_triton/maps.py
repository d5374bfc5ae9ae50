"""Public affinity helpers: G itself, and the relation maps the paper's Fig. 4 shows."""
from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from . import dispatch
from .common.checks import FLOAT_DTYPES, input_tensor
from .module import RGAModule
from .torch_path import relation_inputs


def affinity(theta: torch.Tensor, phi: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """G = theta^T phi per image: theta (B, K, M), phi (B, K, N) -> (B, M, N), differentiable.

    Computed tile by tile by a Triton kernel where Triton takes the tensors (float32
    accumulation; float32 inputs keep float32 accuracy), else by ``torch.matmul``.
    """
    _check_affinity_operands(theta, phi)
    if dispatch.resolve(dispatch.check_backend(backend), theta) == "triton":
        from .ops.affinity.op import TritonAffinity
        with dispatch.on_device_of(theta):
            return TritonAffinity.apply(theta, phi)
    return torch.matmul(theta.transpose(1, 2), phi)


def _check_affinity_operands(theta, phi) -> None:
    for name, t in (("theta", theta), ("phi", phi)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                            f"got dtype {t.dtype}")
    if theta.dim() != 3 or phi.dim() != 3 or theta.shape[:2] != phi.shape[:2]:
        raise ValueError(f"theta and phi must be (B, K, M) and (B, K, N) with the same B and K, got shapes "
                         f"{tuple(theta.shape)} and {tuple(phi.shape)}")
    if theta.dtype != phi.dtype or theta.device != phi.device:
        raise TypeError(f"theta and phi must share dtype and device, got {theta.dtype} on {theta.device} "
                        f"and {phi.dtype} on {phi.device}")


def _index(value, what: str) -> int:
    """``value`` as an int index: ints (Python, NumPy, 0-d integer tensors), never bools or floats."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got bool ({value!r})")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__} ({value!r})") from None


def _flat_positions(positions, height: int, width: int) -> torch.Tensor:
    if isinstance(positions, (str, bytes)) or not hasattr(positions, "__iter__"):
        raise TypeError(f"positions must be a sequence of flat indices or (row, col) pairs, "
                        f"got {type(positions).__name__} ({positions!r})")
    flat = []
    for p in positions:
        if isinstance(p, (tuple, list)):
            if len(p) != 2:
                raise ValueError(f"positions must hold flat indices or (row, col) pairs, got {p!r}")
            i, j = _index(p[0], f"row of position {p!r}"), _index(p[1], f"col of position {p!r}")
            if not (0 <= i < height and 0 <= j < width):
                raise ValueError(f"position {p!r} is outside the {height} x {width} feature map")
            flat.append(i * width + j)
        else:
            index = _index(p, f"position {p!r}")
            if not 0 <= index < height * width:
                raise ValueError(f"position {p!r} is outside [0, {height * width}) (H*W = {height}*{width})")
            flat.append(index)
    if not flat:
        raise ValueError("positions must name at least one query position")
    return torch.tensor(flat, dtype=torch.long)


@torch.no_grad()
def relation_maps(module, x: torch.Tensor, positions: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of the spatial affinity G for query positions, as H x W maps.

    module: an :class:`rga_triton.RGAModule` with a spatial branch; x: (B, in_channel, H, W)
    with H*W == in_spatial. positions: flat indices p in [0, H*W) or (row, col) pairs (ints).
    Returns (rows, cols), each (B, P, H, W): ``rows[b, q] = G[b, p_q, :]`` (how p_q relates
    to every position) and ``cols[b, q] = G[b, :, p_q]`` (how every position relates to
    p_q), with G = theta^T phi of the spatial branch in the module's current mode (no
    BatchNorm buffer changes).
    """
    if not isinstance(module, RGAModule):
        raise TypeError(f"module must be an rga_triton.RGAModule (rga_triton.convert turns the authors' blocks "
                        f"into one), got {type(module).__name__}")
    if not module.use_spatial:
        raise ValueError("module must have a spatial branch (use_spatial=True) to draw relation maps")
    branch = module.branch("spatial")
    input_tensor(x, module.in_channel, module.in_spatial, branch.theta[0].weight)
    b, c, h, w = x.shape
    index = _flat_positions(positions, h, w).to(x.device)
    theta, phi, _ = relation_inputs(branch, x.reshape(b, c, h * w), update=False)
    rows = affinity(theta[:, :, index], phi, module.backend)                     # (B, P, N): G[p, :]
    cols = affinity(theta, phi[:, :, index], module.backend).transpose(1, 2)     # (B, P, N): G[:, p]
    return rows.reshape(b, -1, h, w), cols.reshape(b, -1, h, w)
