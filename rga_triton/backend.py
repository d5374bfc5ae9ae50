"""Which implementation runs a call: ``"torch"`` or ``"triton"``, and why."""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

from . import algorithm
from .tracing import assume_constant_result

BACKENDS = ("auto", "torch", "triton")
ALGORITHMS = ("auto",) + algorithm.ALGORITHMS
_warned_reasons: set[str] = set()


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _cached_capability(index) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@assume_constant_result     # torch.compile asks while tracing; the answer is a constant of the graph
def _capability(index) -> tuple[int, int]:
    """A CUDA device's compute capability, asked once per device (forward calls this every time)."""
    return _cached_capability(index)


_ops_error: list[str] = []      # why the Triton path's operators failed to import, if they did


def register_ops() -> None:
    """Import the Triton path's custom operators (``torch.ops.rga_triton.*``), which registers them.

    ``import rga_triton`` calls this, so that a program exported with torch.export or compiled by
    AOTInductor loads in any process that imported rga_triton. A Triton that imports but cannot
    build our kernels must not take the torch path down with it: the error is kept, warned about
    once, and is the reason the Triton path gives for every input.
    """
    if not triton_importable():
        return
    try:
        from . import ops  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure: the torch path still works
        _ops_error.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(f"rga_triton: the Triton path is unavailable, its operators failed to import "
                      f"({_ops_error[0]}); backend='torch' works", stacklevel=3)


def triton_unsupported_reason(x: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take ``x``, or None when they can."""
    if not triton_importable():
        return "triton is not installed (pip install triton; Linux only)"
    if _ops_error:
        return f"the Triton path's operators failed to import ({_ops_error[0]})"
    if x.device.type != "cuda" and not interpreting():
        return (f"x is on {x.device.type}; the Triton kernels need a CUDA tensor "
                f"(or TRITON_INTERPRET=1 to run them on the CPU through Triton's interpreter)")
    if x.device.type not in ("cuda", "cpu"):
        # e.g. "meta": the interpreter would fail copying data that does not exist
        return (f"x is on {x.device.type}; the Triton kernels need a CUDA tensor, or a CPU tensor "
                f"under TRITON_INTERPRET=1")
    if x.dtype == torch.float64:
        return "float64 has no Triton kernels here (float32, float16 and bfloat16 do)"
    autocast_bf16 = torch.is_autocast_enabled(x.device.type) and \
        torch.get_autocast_dtype(x.device.type) == torch.bfloat16
    if (x.dtype == torch.bfloat16 or autocast_bf16) and interpreting():
        return "Triton's interpreter has no bfloat16 arithmetic"
    if x.device.type == "cuda":
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        return capability_reason(_capability(index), x.dtype == torch.bfloat16 or autocast_bf16,
                                 lambda: torch.cuda.get_device_name(x.device))
    return None


MAX_HIDDEN = 128
"""The widest attention-network hidden layer the Triton kernels take: RGA-Net's widest (the first
stage of a 512 x 256 input). The kernels hold a position tile's hidden activations in one block,
and the relation backward kernel's shared memory grows with it: at 128 its configs need 48 to
160 KiB (sm_90, two pipeline stages; autotuning skips those a GPU cannot hold, and every GPU
since Turing holds the smallest), at 256 up to 320 KiB, past any GPU's. Every config of every
kernel compiles at this width in CI (tests/compile_kernels.py)."""


def module_unsupported_reason(module) -> str | None:
    """Why the Triton kernels cannot take ``module``'s shapes, or None when they can."""
    for name, size, ratio in (("spatial", "in_spatial", "spa_ratio"), ("channel", "in_channel", "cha_ratio")):
        net = getattr(module, f"W_{name}", None)
        if net is not None and net[0].out_channels > MAX_HIDDEN:
            return (f"the {name} branch's attention network has {net[0].out_channels} hidden channels "
                    f"((1 + {size} // {ratio}) // down_ratio with {size}={getattr(module, size)}, "
                    f"{ratio}={getattr(module, ratio)}, down_ratio={module.down_ratio}) and the Triton kernels "
                    f"take at most {MAX_HIDDEN}: raise down_ratio or {ratio}, or use backend='torch'")
    return None


def capability_reason(capability: tuple[int, int], bfloat16: bool, device_name) -> str | None:
    """Why a GPU of ``capability`` cannot run the kernels (``device_name()`` names it), or None.

    Triton compiles for Turing (7.5) and newer; bfloat16 arithmetic needs Ampere (8.0): on a
    T4 ptxas refuses '.bf16' instructions.
    """
    if capability < (7, 5):
        return f"{device_name()} is older than Turing (compute capability 7.5)"
    if bfloat16 and capability < (8, 0):
        return (f"{device_name()} (compute capability {capability[0]}.{capability[1]}) has no bfloat16 "
                f"arithmetic for Triton (it needs 8.0, Ampere); float16 and float32 run there")
    return None


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_algorithm(algorithm) -> str:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    return algorithm


def resolve(backend: str, x: torch.Tensor, module=None) -> str:
    """The backend that runs ``x`` (through ``module``, an RGAModule, where given): explicit choices
    are honoured or refused, ``"auto"`` falls back."""
    if backend == "torch":
        return "torch"
    reason = triton_unsupported_reason(x) or (module_unsupported_reason(module) if module is not None else None)
    if backend == "triton":
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run this input: {reason}")
        return "triton"
    if reason is None and x.device.type == "cuda":
        return "triton"
    warn_once(reason or "CPU tensors run on the torch path unless backend='triton' is asked for")
    return "torch"


@assume_constant_result     # torch.compile warns while tracing (dynamo cannot trace warnings.warn)
def warn_once(reason: str) -> None:
    """One ``warnings.warn`` per reason and process for a fallback to the torch backend."""
    if reason not in _warned_reasons:
        _warned_reasons.add(reason)
        warnings.warn(f"rga_triton: using the 'torch' backend: {reason}", stacklevel=4)


def on_device_of(t: torch.Tensor):
    """A context in which ``t``'s CUDA device is the current one, for eager Triton launches.

    Triton launches on the current device whatever tensors it is handed (PyTorch's own CUDA
    ops switch to their inputs' device; a Python launcher does not), so a module on cuda:1 run
    while cuda:0 is current would launch its kernels on the wrong GPU. Backward needs no guard:
    the autograd engine runs each device's nodes with that device current. Neither do compiled
    graphs, whose wrapper code sets the device itself.
    """
    if t.is_cuda and not torch.compiler.is_compiling():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()

