"""One RGA branch as the layers below the module receive it: its submodules and sizes, handed down as data.

``RGAModule.branches()`` builds one :class:`Branch` per branch in use, once per call; dispatch and the
paths read weights, BatchNorms and sizes from it and never call back into the module.
"""
from __future__ import annotations

from typing import NamedTuple

import torch.nn as nn


class Branch(NamedTuple):
    """The five submodules of one RGA branch (spatial or channel), in the authors' naming, and its sizes.

    theta, phi, gx: 1x1 conv + BatchNorm + ReLU embeddings of X (B, Cin, L); gg: the relation
    embedding (a conv over the 2L stacked relation channels to R rows); W: the attention network.
    dims: (R, K, L), relation rows, embedding width, positions.
    """

    theta: nn.Sequential
    phi: nn.Sequential
    gx: nn.Sequential
    gg: nn.Sequential
    W: nn.Sequential
    dims: tuple[int, int, int]
