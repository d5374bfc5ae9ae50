"""The error metric of DESIGN.md's numerical contract, shared by the tests and the sweep."""
from __future__ import annotations

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 on the CPU.

    inf when the two disagree on where values are non-finite (NaN never passes); the norm
    of the difference itself when ``expected`` is all zeros.
    """
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.equal(torch.isfinite(actual), torch.isfinite(expected)):
        return float("inf")
    finite = torch.isfinite(expected)
    diff = (actual[finite] - expected[finite]).norm()
    scale = expected[finite].norm()
    return float(diff / scale) if scale > 0 else float(diff)
