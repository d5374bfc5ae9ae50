"""Tracing: torch.compile's constant-result marker (without importing torch._dynamo), and whether
something traces or intercepts a call (torch.compile, a dispatch mode, an ONNX export).

``torch.compiler.assume_constant_result`` imports torch._dynamo (about a second on a 2-core CPU,
as long as torch itself takes) only to set one attribute on the function, which dynamo reads when
it meets a call to it while tracing. Setting that attribute here keeps ``import rga_triton`` cheap;
``tests/ecosystem/test_export.py`` checks it is the one PyTorch's decorator sets.
"""
from __future__ import annotations

import sys

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


_DYNAMO_FLAGS = "torch.onnx._internal.exporter._flags"
_TORCHSCRIPT_GLOBALS = ("torch.onnx._internal.torchscript_exporter._globals", "torch.onnx._globals")


@assume_constant_result     # dynamo would otherwise fold the exporters' flags to False
def exporting_to_onnx() -> bool:
    """True while ``torch.onnx.export`` (dynamo or TorchScript exporter) traces a model: the flag each
    exporter sets, read where it lives if that module was imported (never importing torch.onnx;
    ``rga_triton/integrations/onnx.py`` says which flags, checked on torch 2.13 and 2.14)."""
    flags = sys.modules.get(_DYNAMO_FLAGS)
    if flags is not None and getattr(flags, "_is_onnx_exporting", False):
        return True
    for name in _TORCHSCRIPT_GLOBALS:
        module = sys.modules.get(name)
        if module is not None and getattr(getattr(module, "GLOBALS", None), "in_onnx_export", False):
            return True
    return False
