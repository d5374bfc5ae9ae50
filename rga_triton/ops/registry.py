"""How a step becomes a PyTorch custom operator (namespace ``rga_triton``), and its eager twin.

``torch.compile`` cannot trace the Triton launchers: they take BatchNorm modules, go through the
autotuning wrapper of ``launch/tuned.py`` and branch on BatchNorm state on the host. Each step is
therefore a ``torch.library.custom_op``: an opaque call whose arguments are tensors, lists of
tensors and scalars, with a fake (shapes-only) implementation for tracing.

Why ``custom_op`` and not ``torch.library.triton_op`` + ``wrap_triton``: triton_op needs dynamo
to trace each launcher down to ``kernel[grid](...)``, and ours pass through ``TunedKernel``
(configuration-file lookup, autotuning, recording the winner) and through
``ops/batchnorm/norm.finalized`` (momentum=None reads num_batches_tracked on the host). Opaque
ops keep that code as it is; inductor cannot fuse into them, and has nothing to fuse there.

Two rules shape the ops. An op that moves BatchNorm running statistics mutates its buffer
arguments (declared in ``mutates_args``, so functionalization copies the updates back when it
hands the op copies), and an op with an autograd formula must be functional. So a BatchNorm
group with a train-mode member is measured by its own op (``*_norm``, on detached inputs),
which moves the running statistics; the differentiated op then computes from those statistics,
and its backward formula contains the batch-statistics terms itself, as nn.BatchNorm2d's does.

Eager autograd calls each op's implementation and backward formula directly
(:func:`eager_function`), not through the dispatcher, which costs 80 to 90 us per call on a
2-core CPU (a third of a small block's host time); torch.compile traces the registered ops.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..common.settings import interpreter_serialised

IMPLS: dict[str, Callable] = {}
"""Each op's Python implementation, by op name (what :func:`eager_function` and eager backward call)."""


def custom_op(name: str, **kwargs):
    """``torch.library.custom_op("rga_triton::<name>", ...)`` that also keeps the function in :data:`IMPLS`."""
    def register(fn):
        IMPLS[name] = fn
        return torch.library.custom_op(f"rga_triton::{name}", **kwargs)(fn)
    return register


def backward_op(ctx, name: str):
    """The op a backward formula calls: its implementation under an eager Function (``ctx.eager``),
    else the registered op, which a compiled backward traces."""
    return IMPLS[name] if getattr(ctx, "eager", False) else getattr(torch.ops.rga_triton, name)


def eager_function(name: str, setup_context, backward):
    """The differentiable op ``name`` as a ``torch.autograd.Function`` around its implementation: the same
    forward, saved tensors and backward formula as the registered op, without the dispatcher."""
    impl = IMPLS[name]

    class EagerOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = impl(*inputs)
            setup_context(ctx, inputs, output)
            ctx.eager = True
            return output

        @staticmethod
        @once_differentiable
        def backward(ctx, *grads):
            with interpreter_serialised():      # one thread at a time through Triton's interpreter
                return backward(ctx, *grads)

    EagerOp.__name__ = EagerOp.__qualname__ = f"{name}_eager"
    return EagerOp.apply


def float32_backward(backward):
    """Run a backward formula with autocast off: its products stay float32, as in eager backward
    (torch.compile traces backward under the forward's autocast state), one thread at a time under
    Triton's interpreter. ctx.device_type: set in setup or forward."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        with interpreter_serialised():
            if not torch.is_autocast_enabled(ctx.device_type):     # eager backward: nothing to switch off
                return backward(ctx, *grads)
            with torch.autocast(ctx.device_type, enabled=False):
                return backward(ctx, *grads)
    return run


def contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return t.contiguous() if t is not None else None
