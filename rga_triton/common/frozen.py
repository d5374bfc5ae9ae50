"""``rga_triton.frozen(model)``: derive once, serve many.

Outside it, every Triton-path call derives its stacked weights and folded BatchNorms from the modules
as they are (docs/design.md, "Nothing derived outlives a call"). Inside it, each block's no-grad eval
calls derive them once and reuse them: for serving a model whose parameters, buffers and attributes
do not change, where that derivation is host time each call would pay again.
"""
from __future__ import annotations

import contextlib
import threading

import torch.nn as nn

TABLES: dict[int, dict] = {}
"""id(module) -> that module's derived tensors, while a :func:`frozen` context holds it (read with ``.get``)."""
_LOCK = threading.Lock()


@contextlib.contextmanager
def frozen(model: nn.Module):
    """A context in which the RGA blocks of ``model`` derive their Triton-path constants (stacked 1x1-conv
    weights, eval BatchNorms folded) once, on their first no-grad eval call, and reuse them after.

    The promise you make: inside it nothing changes the model's parameters, buffers or module
    attributes (no optimizer step, no ``load_state_dict``, no EMA update, no ``eps`` change). A change
    made anyway is not seen until the context ends. A train-mode call inside drops the block's
    constants (its running statistics move). Leaving the context drops them all. Contexts nest.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    ids = [id(m) for m in model.modules()]
    with _LOCK:
        added = [i for i in ids if i not in TABLES]
        for i in added:
            TABLES[i] = {}
    try:
        yield model
    finally:
        with _LOCK:
            for i in added:
                TABLES.pop(i, None)
