"""Config spaces and launch-time choices shared by the kernels.

Under Triton's interpreter (or with ``RGA_TRITON_PIN_CONFIG=1``, ``common/settings.pinned``)
every kernel is pinned to the first config of its space (``tuned.py``), so CPU tests do not run
each config through numpy.
"""
from __future__ import annotations

import torch
import triton

from ..common.tracing import assume_constant_result

STAT_SPLIT = 256
"""Positions one statistics program reduces. Every BLOCK_L in a config space divides it, so
the layout of partial statistics does not depend on which config autotune picks."""


def configs(space: list[dict], warps=(4, 8), stages=(2, 3)) -> list[triton.Config]:
    """The cross product of block-size dicts with num_warps and num_stages (a pinned kernel
    autotunes over the first one only: ``common/settings.pinned``)."""
    return [triton.Config(dict(s), num_warps=w, num_stages=st) for s in space for w in warps for st in stages]


@assume_constant_result     # read at launch; under torch.compile a constant of the graph
def tf32_allowed() -> bool:
    """Whether the user lets float32 matmuls use TF32: ``torch.backends.cuda.matmul.allow_tf32``, which
    ``torch.set_float32_matmul_precision("high")`` (or ``"medium"``) also sets."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def dot_precision(device: torch.device, tf32_ok: bool = False) -> str:
    """How ``tl.dot`` treats float32 operands on ``device``.

    On CUDA: 'tf32x3', three TF32 products that recover float32 accuracy on tensor cores
    (far faster than FMA-based IEEE dots). ``tf32_ok``: the launcher's products may run a single
    TF32 product, 'tf32', when the user asked for TF32 (:func:`tf32_allowed`): a float32 block's
    projection (forward, its recomputation in backward, dX and dW3), the attention network's
    hidden layer (forward and backward, every dtype) and the affinity G of float32 inputs.
    Z's products (A, Z = A tp, the tiled G and Z) keep 3xTF32 whatever is asked: their sums
    cancel (``ops/relation/kernels._z_dot``), as do a half-precision block's other float32
    products. Why, and the TF32 tolerance they are held to: docs/numerics.md, "TF32 when asked".
    Elsewhere (Triton's interpreter) 'ieee'. Half-precision operands ignore it.
    """
    if device.type != "cuda":
        return "ieee"
    return "tf32" if tf32_ok and tf32_allowed() else "tf32x3"


def n_splits(length: int) -> int:
    return triton.cdiv(length, STAT_SPLIT)
