"""Which exact algorithm builds a branch's relation embedding Z under ``algorithm="auto"``.

One branch reads X (B, Cin, L) and embeds it to theta, phi (K x L per image); its relation
embedding has R = L / spa_ratio rows. Both algorithms compute the same Z (R x L per image),
only the rounding order differs:

- ``"reassociated"``: A = [W_in phi^T | W_out theta^T] (R x 2K), then Z = A [theta; phi].
  Multiply-adds per image: 2 R K L for A, 2 R K L for Z, so 4 R K L.
- ``"tiled"``: G = theta^T phi block by block on chip, Z = W_in G^T + W_out G straight from
  each block. Multiply-adds per image: K L^2 for G, 2 R L^2 for Z.

``"auto"`` takes, per branch (``rga_triton.dispatch.branch_algorithm``), the algorithm that
``rga_triton.tune`` measured faster on this GPU for that branch's (R, K, L, dtype, pass), stored
in the GPU's configuration file; without a measurement, the one with fewer multiply-adds. With
R = L / s (s: spa_ratio in the spatial branch, cha_ratio in the channel one), tiled has fewer
only when (4 - s) K > 2 L: never for s >= 4, so the count picks reassociated at RGA-Net's
ratios of 8.
"""
from __future__ import annotations

import torch

from .checks import one_of

ALGORITHMS = ("reassociated", "tiled")
PASSES = ("forward", "train")
"""``"forward"``: a call without gradients; ``"train"``: a forward that backward will follow."""


def multiply_adds(algorithm: str, r: int, k: int, length: int) -> int:
    """Multiply-adds per image to build Z (R x L) from theta, phi (K x L) with ``algorithm``."""
    if one_of("algorithm", algorithm, ALGORITHMS) == "reassociated":
        return 4 * r * k * length
    return k * length * length + 2 * r * length * length


def fewest_multiply_adds(r: int, k: int, length: int) -> str:
    """The cost model's choice; ties go to reassociated, which never forms G."""
    return min(ALGORITHMS, key=lambda a: multiply_adds(a, r, k, length))


def bucket(r: int, k: int, length: int, dtype: torch.dtype, grad_pass: str) -> str:
    """The key of a measured choice: 'K=32,L=2048,R=256,dtype=float32,pass=train'."""
    one_of("grad_pass", grad_pass, PASSES)
    return f"K={k},L={length},R={r},dtype={str(dtype).replace('torch.', '')},pass={grad_pass}"
