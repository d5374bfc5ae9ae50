"""The implementations under test, built from one shared state_dict, and the float64 oracle."""
from __future__ import annotations

import contextlib
import gc
import logging
from dataclasses import dataclass, field

import torch

import rga_triton
from bench.lib import cost_model
from bench.lib.cost_model import BRANCHES
from reference import RGA_Module
from rga_triton.common.settings import interpreting  # noqa: F401  (re-exported for bench scripts and tests)
from rga_triton.testing import TOLERANCE as TESTING_TOLERANCE
from rga_triton.testing import tolerance

IMPLS = ("reference", "compile", "compile-max-autotune", "torch", "triton", "triton-tiled", "triton-graphs")
DEFAULT_IMPLS = ("reference", "compile", "torch", "triton", "triton-tiled")
FAST_IMPLS = ("torch", "triton", "triton-tiled", "triton-graphs")     # the rga_triton ones
GRAPHED_IMPLS = ("compile-max-autotune", "triton-graphs")    # compiled with CUDA graphs on a GPU
# The contract's table (rga_triton.testing), by dtype name; float32 at its TF32-safe bound.
TOLERANCE = {str(dtype).replace("torch.", ""): tolerance(dtype, tf32=True) for dtype in TESTING_TOLERANCE}
# Above this (analytic FLOPs of the materialised algorithm) the float64 oracle is the torch path:
# float64 runs far below the tensor-core rates, and the reference would take minutes per case.
ORACLE_REFERENCE_MAX_FLOPS = 4e12


class Unavailable(Exception):
    """The implementation cannot run this case here (recorded as status 'skipped')."""


@dataclass(frozen=True)
class Case:
    c: int
    h: int
    w: int
    batch: int
    branch: str
    mode: str
    dtype: str
    input_hw: str = ""      # e.g. "256x128" for RGA-Net stage shapes
    stage: int | str = ""
    cha_ratio: int = 8
    spa_ratio: int = 8
    down_ratio: int = 8

    @property
    def n(self) -> int:
        return self.h * self.w

    @property
    def shape(self) -> str:
        return f"{self.c}x{self.h}x{self.w}"

    @property
    def ratios(self) -> dict:
        return {"cha_ratio": self.cha_ratio, "spa_ratio": self.spa_ratio, "down_ratio": self.down_ratio}

    def module_args(self) -> tuple:
        use_spatial, use_channel = BRANCHES[self.branch]
        return (self.c, self.n, use_spatial, use_channel, self.cha_ratio, self.spa_ratio, self.down_ratio)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text


@dataclass
class GraphSkips:
    """What :func:`watch_graph_skips` saw: compiled graphs that run without CUDA graphs, and PyTorch's reasons."""
    count: int = 0
    reasons: list = field(default_factory=list)

    def note(self) -> str | None:
        """The row's note when graphs were skipped: a graphed row then timed the compiled step without them."""
        if not self.count:
            return None
        why = "; ".join(dict.fromkeys(self.reasons)) or "no CUDA device"     # on a CPU inductor says nothing
        return f"CUDA graphs skipped ({self.count} graph{'s' * (self.count > 1)}): {why}"


class _Collect(logging.Handler):
    def __init__(self, into: list):
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record):
        self.into.append(record.getMessage())


CUDAGRAPHS_LOGGER = "torch._inductor.cudagraph_utils.__cudagraphs"
"""Where inductor logs why it skips CUDA graphs (TORCH_LOGS=cudagraphs shows it; a handler here sees it anyway)."""


@contextlib.contextmanager
def watch_graph_skips():
    """Counts the compiled graphs inside the block that inductor left without CUDA graphs (mutated or CPU
    inputs, unsupported ops: mode="reduce-overhead" then runs the graph as is), with the reasons it logs."""
    from torch._dynamo.utils import counters

    seen = GraphSkips()
    handler = _Collect(seen.reasons)
    logger = logging.getLogger(CUDAGRAPHS_LOGGER)
    before = counters["inductor"]["cudagraph_skips"]
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        seen.count = counters["inductor"]["cudagraph_skips"] - before


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def master_state(case: Case, device: torch.device, seed: int = 0) -> dict:
    """A float32 CPU state_dict shared by every implementation of this shape and branch.

    Conv weights: PyTorch's default init. BatchNorm: random affine parameters, running
    statistics from one train pass (momentum 1, torch path, on ``device``) then perturbed,
    so eval-mode gates are neither saturated nor equal to the batch statistics.
    """
    gen = torch.Generator().manual_seed(seed + 7919 * case.c + 104729 * case.n + list(BRANCHES).index(case.branch))
    torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen)))
    ref = RGA_Module(*case.module_args())
    bns = [m for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(0.5 + torch.rand(bn.weight.shape, generator=gen))
            bn.bias.copy_(0.2 * torch.randn(bn.bias.shape, generator=gen))
    stats = rga_triton.RGAModule(*case.module_args(), backend="torch").to(device)
    stats.load_state_dict(ref.state_dict())
    for bn in stats.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.momentum = 1.0
    x = torch.randn(2, case.c, case.h, case.w, generator=gen).to(device)
    with torch.no_grad():
        stats.train()(x)
    state = {k: v.detach().cpu().clone() for k, v in stats.state_dict().items()}
    del stats, x
    for name in [k for k in state if k.endswith("running_var")]:
        mean = name[: -len("running_var")] + "running_mean"
        std = state[name].sqrt()
        state[mean] += 0.2 * std * torch.randn(std.shape, generator=gen)
        state[name] *= 0.7 + 0.6 * torch.rand(std.shape, generator=gen)
    for name in [k for k in state if k.endswith("num_batches_tracked")]:
        state[name].fill_(int(torch.randint(0, 5, (1,), generator=gen)))
    return state


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x and grad_out in the case's dtype on ``device`` (drawn in float32 from a seeded generator)."""
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    dtype = getattr(torch, case.dtype)
    shape = (case.batch, case.c, case.h, case.w)
    x = torch.randn(shape, generator=gen, device=device).to(dtype)
    grad_out = torch.randn(shape, generator=gen, device=device).to(dtype)
    return x, grad_out


def make_step(module, x: torch.Tensor, grad_out: torch.Tensor, train: bool, cudagraphs: bool = False):
    """(fn, tensors whose .grad to reset between calls, leaf x): one eval forward or train forward+backward.

    ``cudagraphs``: the module is compiled with CUDA graphs (mode="max-autotune"); each call
    starts a new step so outputs of the previous one may be overwritten.
    """
    mark = torch.compiler.cudagraph_mark_step_begin if cudagraphs else (lambda: None)
    if not train:
        def fn():
            mark()
            with torch.no_grad():
                return module(x)
        return fn, None, x
    leaf = x.detach().requires_grad_(True)

    def fn():
        mark()
        out = module(leaf)
        out.backward(grad_out)
        return out
    return fn, [leaf] + [p for p in module.parameters() if p.requires_grad], leaf


@dataclass
class Oracle:
    out: torch.Tensor          # float64, CPU
    grad_x: torch.Tensor | None
    against: str               # what produced it, e.g. "reference-float64@cuda"


def oracle(case: Case, state: dict, x: torch.Tensor, grad_out: torch.Tensor, device: torch.device) -> Oracle | None:
    """The float64 answer for the case's inputs: the reference on ``device``; if that runs out of
    memory or would cost more than ORACLE_REFERENCE_MAX_FLOPS, rga_triton's torch path (the same
    function, tested against the reference in tests/) in float64; None if both run out of memory."""
    train = case.mode == "train"
    ref_flops = cost_model.flops(case.c, case.h, case.w, case.batch, case.branch, case.mode, "materialised",
                                 **case.ratios)
    candidates = ("reference", "torch") if ref_flops <= ORACLE_REFERENCE_MAX_FLOPS else ("torch",)
    for name in candidates:
        module = fn = leaf = None
        try:
            if name == "reference":
                module = RGA_Module(*case.module_args())
            else:
                module = rga_triton.RGAModule(*case.module_args(), backend="torch")
            module.load_state_dict(state)
            module.to(device=device, dtype=torch.float64).train(train)
            fn, _, leaf = make_step(module, x.double(), grad_out.double(), train)
            out = fn().detach().cpu()
            grad = leaf.grad.detach().cpu() if train else None
            return Oracle(out, grad, f"{name}-float64@{device.type}")
        except Exception as exc:   # noqa: BLE001
            if not is_oom(exc):
                raise
        finally:
            del module, fn, leaf
            free_memory(device)
    return None


def compiled(impl: str) -> bool:
    """Whether ``impl`` is a torch.compile'd module (its kernels are not ATen ops; dynamo state to reset)."""
    return impl.startswith("compile") or impl == "triton-graphs"


def triton_unavailable(device: torch.device) -> str | None:
    """Why rga_triton's Triton path cannot run float32 tensors on ``device``, or None: the library's own
    reason (``dispatch.triton_unsupported_reason``). Under TRITON_INTERPRET=1 it takes CPU tensors and
    runs through Triton's interpreter: a functional check (timings are meaningless)."""
    from rga_triton import dispatch

    return dispatch.triton_unsupported_reason(torch.empty(0, device=device))


def resolved_algorithms(module, dtype: torch.dtype, train: bool, device: torch.device) -> str:
    """What a Triton module's ``algorithm`` setting runs: "tiled", or for "auto" the branches' choices
    ("reassociated (auto)", or "spatial:tiled+channel:reassociated (auto)" when they differ)."""
    if module.algorithm != "auto":
        return module.algorithm
    from rga_triton.dispatch import branch_algorithm
    branches = module.branches()
    names = list(branches)
    chosen = {n: branch_algorithm(module.algorithm, b, dtype, device, "train" if train else "forward")
              for n, b in branches.items()}
    if len(set(chosen.values())) == 1:
        return f"{chosen[names[0]]} (auto)"
    return "+".join(f"{n}:{a}" for n, a in chosen.items()) + " (auto)"


def build(impl: str, case: Case, state: dict, device: torch.device):
    """(callable module with the shared parameters in the case's dtype on ``device``, algorithm label).

    The label of a Triton module says what each branch runs (:func:`resolved_algorithms`), else None.
    """
    dtype = getattr(torch, case.dtype)
    train = case.mode == "train"
    if impl in ("reference", "compile", "compile-max-autotune"):
        module = RGA_Module(*case.module_args())
        module.load_state_dict(state)
        module.to(device=device, dtype=dtype).train(train)
        if impl == "reference":
            return module, None
        torch._dynamo.reset()    # a fresh cache per case: no recompile limit, no dynamic-shape graphs
        mode = "max-autotune" if impl == "compile-max-autotune" else None
        return torch.compile(module, mode=mode, dynamic=False), None
    if impl in ("torch", "triton", "triton-tiled", "triton-graphs"):
        backend = "torch" if impl == "torch" else "triton"
        if backend == "triton":
            reason = triton_unavailable(device)
            if reason:
                raise Unavailable(reason)
        module = rga_triton.RGAModule(*case.module_args(), backend=backend,
                                      algorithm="tiled" if impl == "triton-tiled" else "auto")
        module.load_state_dict(state)
        module.to(device=device, dtype=dtype).train(train)
        label = resolved_algorithms(module, dtype, train, device) if backend == "triton" else None
        if impl == "triton-graphs":
            # what a user does about host time at small shapes: CUDA graphs replay the step's launches
            # (on a CPU, mode="reduce-overhead" compiles without them)
            torch._dynamo.reset()
            module = torch.compile(module, mode="reduce-overhead", dynamic=False)
        return module, label
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")
