"""Config spaces and launch-time choices shared by the kernels.

Under Triton's interpreter (or with ``RGA_TRITON_PIN_CONFIG=1``, ``common/settings.pinned``)
every kernel is pinned to the first config of its space (``tuned.py``), so CPU tests do not run
each config through numpy.
"""
from __future__ import annotations

import torch
import triton

STAT_SPLIT = 256
"""Positions one statistics program reduces. Every BLOCK_L in a config space divides it, so
the layout of partial statistics does not depend on which config autotune picks."""


def configs(space: list[dict], warps=(4, 8), stages=(2, 3)) -> list[triton.Config]:
    """The cross product of block-size dicts with num_warps and num_stages (a pinned kernel
    autotunes over the first one only: ``common/settings.pinned``)."""
    return [triton.Config(dict(s), num_warps=w, num_stages=st) for s in space for w in warps for st in stages]


def dot_precision(device: torch.device) -> str:
    """How ``tl.dot`` treats float32 operands on ``device``.

    On CUDA: 'tf32x3', three TF32 products that recover float32 accuracy on tensor cores
    (far faster than FMA-based IEEE dots), whatever ``torch.backends.cuda.matmul.allow_tf32``
    says and whatever the block's dtype: a single TF32 product in the projection puts a
    float32 output near 8e-4, over the contract's 1e-4 (docs/numerics.md), and on half-precision blocks the
    relation products (float32 operands, sums that cancel) then miss 2e-2 on train-mode
    gradients (up to 2e-1 on grad x, measured with ``tests/gpu_numerics.py``). Elsewhere
    (Triton's interpreter) 'ieee'. Half-precision operands ignore it.
    """
    return "tf32x3" if device.type == "cuda" else "ieee"


def n_splits(length: int) -> int:
    return triton.cdiv(length, STAT_SPLIT)
