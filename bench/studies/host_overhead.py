"""Host time of one RGA block call with every Triton kernel launch stubbed out.

What the host spends issuing a step: Python, the custom-op dispatcher, our launch wrappers
(configuration lookup, autotuner), PyTorch's small ops. A block whose GPU work is shorter than
this is host-bound when timed alone (``bench/sweep.py`` marks such rows; in a model, the GPU's
queue of earlier work hides it). Runs on a CPU: kernels go through Triton's interpreter, whose
launches are replaced by no-ops, so what is timed is everything but the kernels (and Triton's
own launcher, which a GPU adds per launch).

    python bench/studies/host_overhead.py --shape 64x16x8 --batch 2
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"        # before Triton is imported: its kernels become interpretable

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import rga_triton  # noqa: E402

LAUNCHES: collections.Counter = collections.Counter()


def _stub(self, *args, **kwargs):
    LAUNCHES[self.fn.__name__] += 1


def stub_kernels() -> None:
    """Every Triton launch (direct or through the autotuner) counts itself and does nothing."""
    InterpretedFunction.run = _stub
    InterpretedFunction.__getitem__ = lambda self, grid: (lambda *a, **k: _stub(self, *a, **k))


def host_ms(backend: str, train: bool, shape: tuple[int, int, int], batch: int, steps: int,
            frozen: bool = False) -> tuple[float, float]:
    """(median host ms per call, kernel launches per call): eval = a no-grad forward, train = forward + backward
    with the gradients cleared before each step, as ``optimizer.zero_grad()`` clears them. ``frozen``: the
    calls run inside ``rga_triton.frozen(module)`` (derived constants kept between eval calls)."""
    c, h, w = shape
    module = rga_triton.RGAModule(c, h * w, backend=backend).train(train)
    x = torch.randn(batch, c, h, w, requires_grad=train)

    def call():
        if train:
            out = module(x)
            out.backward(torch.ones_like(out))
        else:
            with torch.no_grad():
                module(x)

    def zero_grad():        # as optimizer.zero_grad() leaves them: backward then assigns, adding nothing
        for t in (x, *module.parameters()):
            t.grad = None

    with rga_triton.frozen(module) if frozen else contextlib.nullcontext():
        for _ in range(5):
            zero_grad()
            call()
        LAUNCHES.clear()
        times = []
        for _ in range(steps):
            zero_grad()
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2], sum(LAUNCHES.values()) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64x16x8", help="C x H x W (default 64x16x8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    if len(shape) != 3 or min(shape) < 1 or args.batch < 1 or args.steps < 1:
        parser.error("--shape is CxHxW with positive ints; --batch and --steps are positive")
    stub_kernels()
    print(f"RGA-SC {args.shape}, B={args.batch}, host ms per call (median of {args.steps}), kernels stubbed out")
    for mode in ("eval", "train"):
        for backend in ("torch", "triton"):
            ms, launches = host_ms(backend, mode == "train", shape, args.batch, args.steps)
            print(f"  {mode:5s} {backend:6s} {ms:7.2f} ms   {launches:4.0f} kernel launches")
    ms, launches = host_ms("triton", False, shape, args.batch, args.steps, frozen=True)
    print(f"  eval  triton  {ms:7.2f} ms   {launches:4.0f} kernel launches   inside rga_triton.frozen()")
    return 0


if __name__ == "__main__":
    sys.exit(main())
