"""Peak memory of one RGA train step (forward + backward) per implementation, without timing it.

    python bench/studies/step_memory.py --shape 256x64x32 --batch 8
    TRITON_INTERPRET=1 python bench/studies/step_memory.py --impls reference,torch,triton   # on a CPU

On CUDA: the allocator's peak beyond what was allocated before the step. On a CPU: the peak
bytes of live tensors that ATen ops return (``live_memory.py``), which also counts the
Triton path under the interpreter. Either way the inputs, parameters and buffers are not
counted, and the gradients the step creates are. Prints one line per implementation with
the ratio to the first one.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.lib import impls, timing  # noqa: E402
from bench.lib.impls import Case  # noqa: E402
from bench.lib.live_memory import LiveTensorBytes  # noqa: E402

BRANCHES = ("RGA-S", "RGA-C", "RGA-SC")


def _shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CxHxW such as 256x64x32, got {text!r}") from None
    return c, h, w


def step_peaks(case: Case, names: list[str], device: torch.device, breakdown: int = 0):
    """Peak MB of one train step of each implementation on the same inputs and parameters, and (CPU,
    ``breakdown`` > 0) the ``breakdown`` largest (bytes, "shape dtype") of the tensors live at its peak."""
    state = impls.master_state(case, device)
    x, grad_out = impls.make_inputs(case, device)
    peaks, parts = {}, {}
    for name in names:
        module, _ = impls.build(name, case, state, device)
        fn, resets, _ = impls.make_step(module, x, grad_out, train=True)
        fn()                                         # first call: autotuning, caches
        held = [x, grad_out, *module.parameters(), *module.buffers()]
        if breakdown and device.type == "cpu":       # timing.peak_memory's CPU count, keeping what the peak holds
            for t in resets:
                t.grad = None                        # the step creates its gradients
            gc.collect()
            with LiveTensorBytes(held, snapshot=True) as tracker:
                fn()
            peaks[name], parts[name] = tracker.peak / 2 ** 20, tracker.at_peak[:breakdown]
        else:
            peaks[name], _ = timing.peak_memory(fn, device, resets, held)
        del module, fn
        impls.free_memory(device)
    return peaks, parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=_shape, default=(256, 64, 32), help="CxHxW (default: RGA-Net stage 1)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--branch", choices=BRANCHES, default="RGA-SC")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--impls", default="reference,torch,triton",
                        help="comma-separated, from reference, torch, triton, triton-tiled")
    parser.add_argument("--breakdown", type=int, default=0, metavar="N",
                        help="CPU: also list the N largest tensors live at each step's peak")
    args = parser.parse_args(argv)
    names = args.impls.split(",")
    unknown = [n for n in names if n not in ("reference", "torch", "triton", "triton-tiled")]
    if unknown:
        parser.error(f"--impls: unknown {unknown}; expected reference, torch, triton, triton-tiled")
    if args.batch < 1:
        parser.error(f"--batch: expected a positive batch size, got {args.batch}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = impls.triton_unavailable(device)
    if reason and any(n.startswith("triton") for n in names):
        parser.error(f"--impls: the Triton path cannot run here ({reason})")
    c, h, w = args.shape
    case = Case(c, h, w, args.batch, args.branch, "train", args.dtype)
    try:
        peaks, parts = step_peaks(case, names, device, args.breakdown)
    except ValueError as error:         # a shape the block cannot take, in the module's own words
        parser.error(f"--shape {c}x{h}x{w}: {error}")
    x_mb = case.batch * c * h * w * torch.finfo(getattr(torch, args.dtype)).bits / 8 / 2 ** 20
    print(f"{args.branch} train step, C={c} at {h}x{w}, B={args.batch}, {args.dtype} on {device.type} "
          f"(x is {x_mb:.1f} MB)")
    first = names[0]
    for name in names:
        print(f"  {name:13s} {peaks[name]:9.1f} MB = {peaks[name] / x_mb:5.1f} x the input = "
              f"{100 * peaks[name] / peaks[first]:5.1f} % of {first}")
        for nbytes, what in parts.get(name, []):
            print(f"      {nbytes / 2 ** 20:9.1f} MB = {nbytes / 2 ** 20 / x_mb:5.2f} x  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
