"""The error metric of DESIGN.md's numerical contract, shared by the tests and the sweep."""
from __future__ import annotations

import torch


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
