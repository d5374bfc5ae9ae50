"""Which code runs a call: the one place that decides.

For ``RGAModule.forward(x)`` (and ``affinity``), in this order:

1. **Backend** (:func:`backend_for`). ``"torch"`` runs ``torch_path``. ``"triton"`` runs the
   kernels or raises a ValueError that gives the reason. ``"auto"`` runs the kernels for CUDA
   tensors they take, else the torch path, warning once per reason (:func:`warn_once`). The
   reasons (:func:`triton_unsupported_reason`, :func:`module_unsupported_reason`): Triton not
   installed or its ops failed to import; a CPU tensor without ``TRITON_INTERPRET=1``; float64;
   bfloat16 under the interpreter or before Ampere; a GPU older than Turing; an attention-network
   hidden layer wider than ``MAX_HIDDEN``. A CPU tensor under ``"auto"`` always takes the torch
   path (the interpreter is for tests, asked for with ``backend="triton"``).
2. **SyncBatchNorm** (:func:`sync_group`): train-mode ``nn.SyncBatchNorm`` layers in a process
   group of several ranks synchronise on the Triton path too: each BatchNorm group's statistics
   are gathered over the group's ranks in forward (one ``all_gather``) and its backward terms
   summed (one ``all_reduce``), inside the ops (``ops/batchnorm/sync.py``), so eager calls and
   torch.compile's graphs (which call the ops, opaque to it) both synchronise. The last
   one-channel BatchNorm gathers once too in eager mode (``sync.SyncedBatchNorm``); under
   torch.compile it is the torch path's formula (``common/batchnorm.py``), whose count breaks the
   graph (``fullgraph=True`` refuses a synchronised block; tested with two ranks). A block
   whose SyncBatchNorms span several process groups, or sit beside BatchNorms that normalise
   with the rank's batch alone, takes the torch path: ``"auto"`` warns once, ``"triton"`` raises.
3. **ONNX export**: while ``torch.onnx.export`` traces (``common/tracing.exporting_to_onnx``),
   every block takes the torch path, so the exported graph holds standard ops only (no
   ``rga_triton::*`` op, which ONNX cannot name) and is the same from every backend.
4. **Empty input** (``x.numel() == 0``): the torch path (nothing to launch; BatchNorm
   bookkeeping as nn.BatchNorm2d does it), except in a synchronised block, whose rank must
   take part in the group's collectives as the others do: it runs the Triton path on its empty
   batch and adds count 0, as ``nn.SyncBatchNorm`` does.
5. **Route** of the Triton path (:func:`route`): ``"kernels"`` when no gradient is wanted in
   eager mode (the launchers themselves); ``"eager-ops"`` when one is (the
   custom ops' implementations and autograd formulas called without the dispatcher, x threaded
   through the projections); ``"registered-ops"`` under torch.compile, or wherever something
   intercepts PyTorch calls (make_fx, a dispatch mode, a tensor subclass): ``torch.ops.rga_triton.*``.
6. **Algorithm** per branch (:func:`branch_algorithm`): the module's ``algorithm``, or for
   ``"auto"`` the one ``rga_triton.tune`` measured faster on this GPU for the branch's shape
   (its configuration file's ``"algorithms"``), else the one with fewer multiply-adds
   (``common/algorithm.py``).
7. **Z in memory** per branch in training (:func:`keeps_z`): kept when its reduction is longer
   than :data:`RECOMPUTE_Z_MAX_K2`, else rebuilt tile by tile in every pass.

Set elsewhere, read by the steps: the projection's backward (``RGA_TRITON_PROJECTION_BACKWARD``,
``common/settings.py``), each kernel's launch configuration (``launch/tuned.py``), and the precision
of float32 dots:

**TF32.** float32 dots follow ``torch.backends.cuda.matmul.allow_tf32`` (also set by
``torch.set_float32_matmul_precision("high")``), read at launch by ``launch/space.tf32_allowed`` (a
graph constant under torch.compile). False (PyTorch's default): every float32 ``tl.dot`` on CUDA
runs 3xTF32 and float32 meets 1e-5. True: the dots that do not cancel take a single TF32 product
(``space.dot_precision(device, tf32_ok=True)``): a float32 block's projection P = W3 X (forward,
its recomputation in backward, dX and dW3), the attention network's hidden layer (h = W1 rel and
its backward), and the affinity G of float32 inputs. Z's products (A = [W_in phi^T | W_out theta^T],
Z = A tp, the tiled G and Z) keep 3xTF32 (``ops/relation/kernels._z_dot``): their sums cancel
before the relation BatchNorm. So does a half-precision block's projection backward, whose weight
gradients are cancellation residues. With TF32 on, float32 stays within 5e-3 of the float64
reference, or 4x the error of PyTorch's own TF32 run of the authors' module where that is larger
(docs/numerics.md, "TF32 when asked").

This module imports no Triton: the Triton path and its configuration store are imported when a
call takes them.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from typing import NamedTuple

import torch

from .common import algorithm
from .common.batchnorm import distributed, process_group_name, synchronised, uses_batch_stats
from .common.checks import one_of
from .common.frozen import TABLES as FROZEN_TABLES
from .common.layout import compute_dtype, mergeable
from .common.settings import MAX_HIDDEN, interpreter_serialised, interpreting
from .common.tracing import assume_constant_result, exporting_to_onnx, intercepted
from .torch_path import rga_forward as torch_forward

BACKENDS = ("auto", "torch", "triton")
ALGORITHMS = ("auto",) + algorithm.ALGORITHMS
ROUTES = ("kernels", "eager-ops", "registered-ops")
_warned_reasons: set[str] = set()


# ---- 1. the backend ---------------------------------------------------------------------------------------

def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
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
        from . import ops
        ops.register()
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
    return one_of("backend", backend, BACKENDS)


def check_algorithm(algorithm) -> str:
    return one_of("algorithm", algorithm, ALGORITHMS)


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


_LIBRARY_DIRS = tuple(os.path.join(os.path.dirname(os.path.abspath(path)), "")
                      for path in (__file__, torch.__file__))


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` issued by the function calling this one name the
    user's line: the first frame outside rga_triton and torch (``Module.__call__`` and the module
    hierarchy, ``torch.no_grad`` decorators), however deep the call came through them."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        if not os.path.abspath(frame.f_code.co_filename).startswith(_LIBRARY_DIRS):
            return level
        frame, level = frame.f_back, level + 1
    return 1


@assume_constant_result     # torch.compile warns while tracing (dynamo cannot trace warnings.warn)
def warn_once(reason: str) -> None:
    """One ``warnings.warn`` per reason and process for a fallback to the torch backend, naming the
    caller's line (:func:`caller_stacklevel`)."""
    if reason not in _warned_reasons:
        _warned_reasons.add(reason)
        warnings.warn(f"rga_triton: using the 'torch' backend: {reason}", stacklevel=caller_stacklevel())


def sync_group(module) -> str | None:
    """The name of the process group that ``module``'s train-mode SyncBatchNorms synchronise over
    (``common.batchnorm.synchronised``), "" when none does, or None when the Triton path cannot
    synchronise them: they span several process groups, or BatchNorms that normalise with this
    rank's batch alone sit beside them (the ops take one group per call)."""
    # SyncBatchNorm only synchronises in training, in a process group: other calls skip the submodule walk.
    if not (module.training and distributed()):
        return ""
    names, local = set(), False
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            if synchronised(m):
                names.add(process_group_name(m))
            else:
                local = local or uses_batch_stats(m)
    if not names:
        return ""
    return names.pop() if len(names) == 1 and not local else None


def backend_for(module, x: torch.Tensor, group: str | None = "") -> str:
    """``"torch"`` or ``"triton"``: the backend that runs ``module(x)`` (steps 1 to 3 of the rule);
    ``group``: :func:`sync_group`'s answer for ``module``."""
    backend = module.backend
    if backend != "torch" and group is None:
        if backend == "triton":
            raise ValueError("backend='triton' cannot run this module: its train-mode SyncBatchNorm layers span "
                             "several process groups, or sit beside BatchNorms that normalise with this rank's "
                             "batch alone (convert every BatchNorm of the block with one process_group, or use "
                             "backend='torch' or 'auto')")
        warn_once("the block's train-mode SyncBatchNorms span several process groups or sit beside unsynchronised "
                  "BatchNorms, which the torch path synchronises one by one")
        backend = "torch"
    if backend != "torch" and exporting_to_onnx():
        return "torch"
    return resolve(backend, x, module)


# ---- 5 to 7. the Triton path: route, algorithm, Z ---------------------------------------------------------

class Plan(NamedTuple):
    """How the Triton path runs one call (``triton_path.forward`` reads it), with what it runs on."""

    branches: dict          # branch name -> common.branch.Branch, the branches in use (spatial first)
    dtype: torch.dtype      # the dtype the kernels multiply in (common.layout.compute_dtype of x)
    route: str              # one of ROUTES
    wants_grad: bool        # a backward will follow: keep what it reads
    threaded: bool          # x threaded through the projections (one grad-x buffer; eager backward only)
    algorithms: dict        # branch name -> "reassociated" or "tiled"
    keep_z: dict            # branch name -> whether Z (B, R, L) stays in memory for backward
    frozen: dict | None     # the block's derived constants under rga_triton.frozen() (route "kernels"), else None
    sync_group: str         # the process group the BatchNorms synchronise over, by name ("" for none: sync_group)


def route(x: torch.Tensor, wants_grad: bool) -> str:
    """The route of the Triton path for ``x`` (one of :data:`ROUTES`)."""
    if not wants_grad and not torch.compiler.is_compiling():
        return "kernels"
    return "registered-ops" if intercepted(x) else "eager-ops"


@assume_constant_result      # torch.compile: the choice is a constant of the graph
def choose(r: int, k: int, length: int, dtype: torch.dtype, grad_pass: str, device: torch.device) -> str:
    """The algorithm ``"auto"`` runs for one branch: measured on this GPU if stored, else the cost model's."""
    from .launch.tuned import STORE

    STORE.ensure_loaded(device)
    return STORE.algorithms.get(algorithm.bucket(r, k, length, dtype, grad_pass)) or \
        algorithm.fewest_multiply_adds(r, k, length)


def branch_algorithm(setting: str, branch, dtype: torch.dtype, device: torch.device, grad_pass: str) -> str:
    """The algorithm that builds ``branch``'s Z with products in ``dtype``: the module's ``setting``,
    or for ``"auto"`` the branch's measured or cheapest one (:func:`choose`)."""
    if setting != "auto":
        return setting
    return choose(*branch.dims, dtype, grad_pass, device)


RECOMPUTE_Z_MAX_K2 = 64
"""Z = A tp is rebuilt tile by tile in every pass, instead of kept in memory, when its reduction
is this short (2K <= 64): a tile then costs about what reading it back costs, and Z, R x L
per image, is where RGA-Net's memory goes (the spatial branch at stage 1 and the channel
branch at stages 3-4, 2K = 64 and 32, keep one to two copies of x's size otherwise)."""


def keeps_z(k2: int) -> bool:
    """Whether a train step keeps Z (B, R, L) in memory for the later passes, given 2K."""
    return k2 > RECOMPUTE_Z_MAX_K2


def plan(module, x: torch.Tensor, branches: dict, wants_grad: bool, threaded: bool | None = None,
         group: str = "") -> Plan:
    """The :class:`Plan` of a Triton-path call on ``branches`` (``RGAModule.branches()``). ``threaded``
    (default: when a gradient is wanted in eager mode; torch.compile traces the ops' own formulas)
    chains x through the projections; ``group``: :func:`sync_group`'s answer."""
    taken = route(x, wants_grad)
    if threaded is None:
        threaded = wants_grad and not torch.compiler.is_compiling()
    grad_pass = "train" if wants_grad else "forward"
    dtype = compute_dtype(x)
    algorithms = {name: branch_algorithm(module.algorithm, branch, dtype, x.device, grad_pass)
                  for name, branch in branches.items()}
    keep_z = {name: wants_grad and keeps_z(2 * branch.dims[1]) for name, branch in branches.items()}
    held = FROZEN_TABLES.get(id(module))
    if held and module.training:
        held.clear()            # a train-mode call on any route moves running statistics: folded ones are stale
    return Plan(branches, dtype, taken, wants_grad, threaded, algorithms, keep_z,
                held if taken == "kernels" else None, group)


# ---- running it -------------------------------------------------------------------------------------------

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


def wants_grad(module, x: torch.Tensor) -> bool:
    """Whether a backward may follow: grad mode on, and x or a parameter requires a gradient."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def run_triton(module, x: torch.Tensor, branches: dict, threaded: bool | None = None,
               group: str | None = None) -> torch.Tensor:
    """The block's output on the Triton path (steps 4 to 7 of the rule); ``group``: :func:`sync_group`'s
    answer, asked here where not given."""
    group = sync_group(module) if group is None else group
    if x.numel() == 0 and not group:        # a synchronised rank takes part in the collectives, images or not
        return torch_forward(module, x, branches)
    from . import triton_path

    with on_device_of(x), interpreter_serialised():
        x = mergeable(x)        # once per call: every step reads x with its H and W merged
        return triton_path.forward(module, x, plan(module, x, branches, wants_grad(module, x), threaded, group))


def forward(module, x: torch.Tensor, branches: dict) -> torch.Tensor:
    """``RGAModule.forward``'s dispatch: the whole rule of this module's docstring. ``branches``:
    ``module.branches()``, handed down to the path that runs."""
    group = sync_group(module)         # one walk of the submodules per call, read by both steps
    if backend_for(module, x, group) == "triton":
        return run_triton(module, x, branches, group=group)
    return torch_forward(module, x, branches)
