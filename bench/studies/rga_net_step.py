"""RGA-Net training steps, images/s: the authors' RGA blocks against converted ones, +- torch.compile.

    python bench/studies/rga_net_step.py                                  # 256 x 128, B=64 on a GPU; tiny on a CPU
    python bench/studies/rga_net_step.py --precisions float32,bf16-autocast --compile both
    python bench/studies/rga_net_step.py --max-batch --height 512 --width 256   # largest batch each fits

One model, one set of weights: RGA-Net (``rga_triton.models.rga_net``) whose four blocks are
the reference's ``RGA_Module`` (materialised affinity: the authors' model) or
``rga_triton.RGAModule`` with backend "torch" or "triton" (what ``rga_triton.convert`` gives).
A step is forward, cross-entropy on the logits, backward and an SGD update, in train mode.
Before timing, each variant's first-step loss is compared with the reference's on the same
batch (it must agree to the precision's tolerance, or the row is marked). ``--max-batch``
finds, per variant, the largest batch whose step fits in GPU memory (doubling, then bisection).
Rows go to bench/results/<device>/rga_net_step.csv.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import rga_triton  # noqa: E402
from bench.lib.hardware import environment, results_dir_name  # noqa: E402
from bench.lib.impls import free_memory, is_oom, triton_unavailable  # noqa: E402
from reference import RGA_Module  # noqa: E402

IMPLS = ("reference", "torch", "triton")
PRECISIONS = ("float32", "bf16-autocast")
# First-step loss against the reference's: some sixty train-mode BatchNorms, a few over only
# B * 2 values at the last stages, amplify rounding, so float32 agrees to 1e-3, not 1e-6.
LOSS_TOLERANCE = {"float32": 1e-3, "bf16-autocast": 2e-2}
COLUMNS = ["impl", "compiled", "precision", "height", "width", "batch", "status", "loss_rel_err",
           "step_ms_median", "step_ms_p20", "step_ms_p80", "images_per_s", "peak_mem_mb", "max_batch"]


def with_reference_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose RGAModules are the reference RGA_Module, same weights and buffers."""
    model = copy.deepcopy(model)
    for name, block in list(model.named_modules()):
        if isinstance(block, rga_triton.RGAModule):
            ref = RGA_Module(block.in_channel, block.in_spatial, block.use_spatial, block.use_channel,
                             block.cha_ratio, block.spa_ratio, block.down_ratio, order=block.order)
            ref.load_state_dict(block.state_dict())
            ref.train(block.training)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, ref.to(next(block.parameters())))
    return model


def build(impl: str, base: torch.nn.Module, compiled: bool) -> torch.nn.Module:
    """The variant ``impl`` of ``base`` (an RGA-Net with backend "torch" blocks), optionally compiled."""
    model = with_reference_blocks(base) if impl == "reference" else copy.deepcopy(base)
    if impl == "triton":
        for block in model.modules():
            if isinstance(block, rga_triton.RGAModule):
                block.backend = "triton"
    return torch.compile(model) if compiled else model


def train_step(model, images, labels, precision: str, lr: float = 1e-3) -> float:
    """Forward, loss, backward, SGD update; returns the loss."""
    device_type = images.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
        logits, _ = model(images)
        loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
                p.grad = None
    return float(loss.detach())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, images, labels, precision, warmup: int, steps: int) -> list[float]:
    """Milliseconds per step, after ``warmup`` untimed steps (compilation and autotuning happen there)."""
    device = images.device
    for _ in range(warmup):
        train_step(model, images, labels, precision)
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        train_step(model, images, labels, precision)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def batch_fits(make_model, args, batch: int, precision: str, device) -> bool:
    """Whether one training step at ``batch`` runs without running out of memory."""
    free_memory(device)
    try:
        model = make_model()
        images, labels = inputs(args, batch, device)
        train_step(model, images, labels, precision)
        _sync(device)
        return True
    except Exception as exc:  # noqa: BLE001  (OOM is a result; anything else is re-raised)
        if is_oom(exc):
            return False
        raise
    finally:
        free_memory(device)


def largest_batch(make_model, args, precision, device, limit: int = 4096) -> int:
    """Doubling from 1, then bisection: the largest batch (<= limit) whose step fits."""
    if not batch_fits(make_model, args, 1, precision, device):
        return 0
    low, high = 1, 2
    while high <= limit and batch_fits(make_model, args, high, precision, device):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if batch_fits(make_model, args, mid, precision, device) else (low, mid)
    return low


def inputs(args, batch: int, device):
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, args.height, args.width, generator=gen).to(device)
    labels = torch.randint(0, args.num_classes, (batch,), generator=gen).to(device)
    return images, labels


def parse_args(argv=None):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--height", type=int, default=256 if gpu else 64)
    p.add_argument("--width", type=int, default=128 if gpu else 32)
    p.add_argument("--batch", type=int, default=64 if gpu else 4)
    p.add_argument("--spa-ratio", type=int, default=8 if gpu else 2, help="8 in the paper; 2 keeps tiny maps valid")
    p.add_argument("--down-ratio", type=int, default=8 if gpu else 2)
    p.add_argument("--num-classes", type=int, default=751, help="751: Market-1501's training identities")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list from {','.join(IMPLS)}")
    p.add_argument("--precisions", default="float32", help=f"comma list from {','.join(PRECISIONS)}")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off")
    p.add_argument("--warmup", type=int, default=3 if gpu else 1)
    p.add_argument("--steps", type=int, default=20 if gpu else 2)
    p.add_argument("--max-batch", action="store_true", help="also find the largest batch each variant fits (GPU)")
    p.add_argument("--out", help="CSV path (default bench/results/<device>/rga_net_step.csv)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    for flag, values, allowed in (("--impls", args.impls, IMPLS), ("--precisions", args.precisions, PRECISIONS)):
        for value in values.split(","):
            if value not in allowed:
                p.error(f"{flag} takes values from {','.join(allowed)}, got {value!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    torch.manual_seed(0)
    base = rga_triton.models.rga_net(args.num_classes, args.height, args.width, spa_ratio=args.spa_ratio,
                                     down_ratio=args.down_ratio, backend="torch").to(device).train()
    images, labels = inputs(args, args.batch, device)
    env = environment(device)
    compiled_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    rows, reference_loss = [], {}
    for precision in args.precisions.split(","):
        for compiled in compiled_modes:
            for impl in sorted(args.impls.split(","), key=IMPLS.index):     # the reference first: the check
                row = dict(impl=impl, compiled=compiled, precision=precision, height=args.height,
                           width=args.width, batch=args.batch, **env)
                reason = triton_unavailable(device) if impl == "triton" else None
                if reason:
                    say(f"skip {impl}: {reason}")
                    rows.append({**row, "status": "skipped"})
                    continue
                free_memory(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    model = build(impl, base, compiled)
                    loss = train_step(model, images, labels, precision)       # same weights, same batch
                    if impl == "reference":
                        reference_loss[(precision, compiled)] = loss
                    ref = reference_loss.get((precision, compiled))
                    err = abs(loss - ref) / abs(ref) if ref else float("nan")
                    times = time_steps(model, images, labels, precision, args.warmup, args.steps)
                    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
                    row.update(status="ok" if not err > LOSS_TOLERANCE[precision] else "mismatch",
                               loss_rel_err=f"{err:.2e}", step_ms_median=f"{statistics.median(times):.3f}",
                               step_ms_p20=f"{q[0]:.3f}", step_ms_p80=f"{q[-1]:.3f}",
                               images_per_s=f"{args.batch * 1e3 / statistics.median(times):.1f}")
                    if device.type == "cuda":
                        row["peak_mem_mb"] = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}"
                    del model
                except Exception as exc:  # noqa: BLE001
                    if not is_oom(exc):
                        raise
                    row["status"] = "oom"
                if args.max_batch and device.type == "cuda":
                    row["max_batch"] = largest_batch(lambda: build(impl, base, compiled), args, precision, device)
                rows.append(row)
                say(f"{impl:9s} compiled={compiled!s:5s} {precision:13s} B={args.batch}: {row['status']}"
                    f"  {row.get('images_per_s', '-')} images/s  {row.get('step_ms_median', '-')} ms/step"
                    f"  loss err {row.get('loss_rel_err', '-')}  peak {row.get('peak_mem_mb', '-')} MB"
                    + (f"  max batch {row['max_batch']}" if "max_batch" in row else ""))
    out = args.out or os.path.join(ROOT, "bench", "results", results_dir_name(device), "rga_net_step.csv")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    columns = COLUMNS + sorted(env)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    say(f"wrote {out}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
