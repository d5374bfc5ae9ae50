"""Tracing: torch.compile's constant-result marker (without importing torch._dynamo), and whether
something traces or intercepts a call.

``torch.compiler.assume_constant_result`` imports torch._dynamo (about a second on a 2-core CPU,
as long as torch itself takes) only to set one attribute on the function, which dynamo reads when
it meets a call to it while tracing. Setting that attribute here keeps ``import rga_triton`` cheap;
``tests/test_export.py`` checks it is the one PyTorch's decorator sets.
"""
from __future__ import annotations

import torch

MARKER = "_dynamo_marked_constant"


def assume_constant_result(fn):
    """Mark ``fn`` as torch.compiler.assume_constant_result does: torch.compile calls it while tracing
    and puts the result in the graph as a constant."""
    setattr(fn, MARKER, True)
    return fn


def intercepted(x: torch.Tensor) -> bool:
    """True wherever something traces or intercepts PyTorch calls (torch.compile, make_fx, a dispatch
    mode, a tensor subclass such as FakeTensor): it must see the registered ops, one per step."""
    return torch.compiler.is_compiling() or type(x) is not torch.Tensor or bool(torch._C._len_torch_dispatch_stack())
