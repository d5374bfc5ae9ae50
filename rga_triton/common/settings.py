"""Every environment variable and package-wide constant, read in one place.

- ``TRITON_INTERPRET=1``: Triton's interpreter runs the kernels on the CPU (how CI tests them);
  CPU tensors may then take ``backend="triton"``.
- ``RGA_TRITON_PIN_CONFIG=1``: every kernel launches with the first config of its space (no
  autotuning); the interpreter always pins.
- ``RGA_TRITON_CONFIG_DIR``: the folder of per-GPU configuration files (default: the packaged
  ``rga_triton/configs``).
- ``RGA_TRITON_PROJECTION_BACKWARD``: ``"kernels"`` (default) or ``"torch"``, how the projection
  is differentiated (``ops/projection/op.py``); ``"torch"`` is the A/B baseline of the kernels.
- ``RGA_TRITON_COMPILE_THREADS``: threads that compile an autotune space ahead of timing
  (``launch/precompile.py``).
"""
from __future__ import annotations

import contextlib
import os
import threading

from .checks import one_of

PACKAGED_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

PROJECTION_BACKWARDS = ("kernels", "torch")
PROJECTION_BACKWARD = os.environ.get("RGA_TRITON_PROJECTION_BACKWARD", "kernels")
"""How the projection is differentiated: ``"kernels"`` (``ops/projection/backward_kernels.py``,
3xTF32 on CUDA) or ``"torch"`` (``ops/projection/pytorch.py``, PyTorch's float32 matmuls), the
formula the kernels replaced, kept to measure them against. Read at import; tests set the attribute."""

MAX_HIDDEN = 128
"""The widest attention-network hidden layer the Triton kernels take: RGA-Net's widest (the first
stage of a 512 x 256 input). The kernels hold a position tile's hidden activations in one block,
and the relation backward kernel's shared memory grows with it: at 128 its configs need 48 to
160 KiB (sm_90, two pipeline stages; autotuning skips those a GPU cannot hold, and every GPU
since Turing holds the smallest), at 256 up to 320 KiB, past any GPU's. Every config of every
kernel compiles at this width in CI (bench/lib/compile_kernels.py)."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter."""
    return _flag("TRITON_INTERPRET")


_INTERPRETER_LOCK = threading.RLock()


def interpreter_serialised():
    """A context that lets one thread at a time launch kernels under Triton's interpreter, which is not
    thread-safe (kernels called from several threads at once raise ``InterpreterError``); on a GPU, and
    while torch.compile traces (dynamo cannot trace a lock; a compiled graph is run, not traced, by threads),
    none."""
    import torch

    if interpreting() and not torch.compiler.is_compiling():
        return _INTERPRETER_LOCK
    return contextlib.nullcontext()


def pinned() -> bool:
    """True when every kernel launches with the first config of its space (interpreter, or asked)."""
    return interpreting() or _flag("RGA_TRITON_PIN_CONFIG")


def config_dir() -> str:
    """The folder of per-GPU configuration files."""
    return os.environ.get("RGA_TRITON_CONFIG_DIR") or PACKAGED_CONFIG_DIR


def projection_backward() -> str:
    """:data:`PROJECTION_BACKWARD`, checked."""
    return one_of("RGA_TRITON_PROJECTION_BACKWARD", PROJECTION_BACKWARD, PROJECTION_BACKWARDS)
