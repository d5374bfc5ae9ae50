"""The numerical contract (docs/numerics.md) as code: the error metric and the one tolerance table,
shared by the tests and by the sweep's correctness check."""
from __future__ import annotations

import torch

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
"""What ||out - ref|| / ||ref|| against the float64 reference may be, per dtype, where float32
products are IEEE (a CPU, or CUDA with TF32 off)."""

TOLERANCE_TF32 = 1e-4
"""float32's bound where products may use TF32 (CUDA with ``allow_tf32``, 3xTF32 tensor cores)."""


def tolerance(dtype: torch.dtype, tf32: bool = False) -> float:
    """The contract's bound for ``dtype``; ``tf32``: float32 products may be TF32 (the bound on CUDA)."""
    if dtype not in TOLERANCE:
        raise ValueError(f"dtype must be one of {tuple(TOLERANCE)}, got {dtype}")
    return TOLERANCE_TF32 if tf32 and dtype == torch.float32 else TOLERANCE[dtype]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 on the CPU.

    inf when the two disagree on where values are NaN, +inf or -inf (a NaN or an infinity
    never passes for a number, nor one for the other); the norm of the difference itself
    when ``expected`` is all zeros.
    """
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    for where in (torch.isnan, torch.isposinf, torch.isneginf):
        if not torch.equal(where(actual), where(expected)):
            return float("inf")
    finite = torch.isfinite(expected)
    diff = (actual[finite] - expected[finite]).norm()
    scale = expected[finite].norm()
    return float(diff / scale) if scale > 0 else float(diff)
