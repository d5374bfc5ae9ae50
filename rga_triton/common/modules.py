"""nn.Module tree helpers (``nn.Module.set_submodule`` needs torch >= 2.6 for top-level names)."""
from __future__ import annotations

import torch.nn as nn


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at the qualified ``name`` (e.g. ``"backbone.rga_att1"``) in ``model``; return the
    module it replaces."""
    parent, _, leaf = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, leaf)
    setattr(owner, leaf, module)
    return old
