"""Train RGA-Net for a few steps on synthetic re-ID data; print loss and images/s per step.

    python examples/train_synthetic.py                    # small preset on a CPU, paper preset on a GPU
    python examples/train_synthetic.py --backend all      # same weights and batches through each backend
    python examples/train_synthetic.py --preset paper --steps 20 --backend triton   # 256 x 128, batch 64

The data are P identities x K images each (the authors' sampler): every identity is a fixed
random pattern plus fresh noise per image, so the loss goes down within a few steps. The loss
is the authors' cross-entropy on the logits plus a batch-hard triplet loss (margin 0.3) on the
pooled features, with Adam at their base learning rate 8e-4.

``--backend all`` builds the model once per backend from the same seed and feeds the same
batches, so the step-1 losses (same weights, same batch) must agree to float32 rounding. Later
steps drift apart even between two exact implementations: train-mode BatchNorm over a few
images and Adam's sign-like first update amplify rounding differences (the literal reference
and the "torch" path separate the same way). It skips ``"triton"`` where Triton cannot run
(no CUDA device and TRITON_INTERPRET unset; the interpreter takes minutes per step here).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import rga_triton  # noqa: E402
from rga_triton.dispatch import triton_unsupported_reason  # noqa: E402

PRESETS = {
    # height, width, spa_ratio, down_ratio, identities P, images per identity K
    "paper": dict(height=256, width=128, spa_ratio=8, down_ratio=8, identities=16, instances=4),
    "small": dict(height=64, width=32, spa_ratio=2, down_ratio=2, identities=2, instances=4),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="auto", choices=["torch", "triton", "auto", "all"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="'paper' (256 x 128, batch 64, ratios 8; default on CUDA) or 'small' (64 x 32, batch 8, "
                        "spa/down ratios 2 so the 4 x 2 maps keep non-empty W networks; default on CPU)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--spa-ratio", type=int)
    p.add_argument("--down-ratio", type=int)
    p.add_argument("--identities", type=int, help="identities per batch (P)")
    p.add_argument("--instances", type=int, help="images per identity (K); batch = P * K")
    p.add_argument("--num-classes", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    preset = PRESETS[args.preset or ("paper" if args.device.startswith("cuda") else "small")]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.identities > args.num_classes:
        p.error(f"--identities ({args.identities}) must be <= --num-classes ({args.num_classes})")
    return args


def synthetic_batches(args, device):
    """``args.steps`` batches of (images, labels): P identities x K noisy views of each identity's pattern."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    patterns = torch.rand(args.num_classes, 3, args.height // 8, args.width // 8, generator=gen)
    patterns = F.interpolate(patterns, size=(args.height, args.width), mode="bilinear", align_corners=False)
    batches = []
    for _ in range(args.steps):
        ids = torch.randperm(args.num_classes, generator=gen)[: args.identities]
        labels = ids.repeat_interleave(args.instances)
        images = patterns[labels] + 0.3 * torch.randn(len(labels), 3, args.height, args.width, generator=gen)
        batches.append(((images - 0.45) / 0.25, labels))
    return [(x.to(device), y.to(device)) for x, y in batches]


def batch_hard_triplet(features: torch.Tensor, labels: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    dist = torch.cdist(features, features)
    same = labels[:, None] == labels[None, :]
    hardest_positive = (dist * same).max(dim=1).values
    hardest_negative = dist.masked_fill(same, float("inf")).min(dim=1).values
    return F.relu(hardest_positive - hardest_negative + margin).mean()


def runnable(backend: str, device: str) -> str | None:
    """Why ``backend`` cannot run on ``device`` here, or None."""
    if backend != "triton":
        return None
    return triton_unsupported_reason(torch.empty(0, device=device))


def train(backend: str, args, batches) -> dict:
    torch.manual_seed(args.seed)
    model = rga_triton.models.rga_net(args.num_classes, height=args.height, width=args.width,
                                      spa_ratio=args.spa_ratio, down_ratio=args.down_ratio,
                                      backend=backend).to(args.device).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=5e-4)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    losses, speeds = [], []
    for step, (images, labels) in enumerate(batches, start=1):
        sync()
        start = time.perf_counter()
        logits, features = model(images)
        loss = F.cross_entropy(logits, labels) + batch_hard_triplet(features, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        seconds = time.perf_counter() - start
        losses.append(float(loss.detach()))
        speeds.append(len(images) / seconds)
        print(f"[{backend}] step {step}/{len(batches)}  loss {losses[-1]:.4f}  {speeds[-1]:.1f} images/s"
              + ("  (includes first-call compilation/autotuning)" if step == 1 and backend != "torch" else ""),
              flush=True)
    return {"losses": losses, "images_per_s": speeds}


def main(argv=None) -> dict:
    args = parse_args(argv)
    backends = ["torch", "triton", "auto"] if args.backend == "all" else [args.backend]
    print(f"RGA-Net, {args.height} x {args.width} input, batch {args.identities * args.instances} "
          f"({args.identities} identities x {args.instances}), spa_ratio {args.spa_ratio}, down_ratio "
          f"{args.down_ratio}, {args.steps} steps on {args.device}, torch {torch.__version__}")
    batches = synthetic_batches(args, args.device)
    results = {}
    for backend in backends:
        reason = runnable(backend, args.device)
        if reason is not None:
            if args.backend == "all":
                print(f"[{backend}] skipped: {reason}")
                continue
            raise SystemExit(f"backend {backend!r} cannot run here: {reason}")
        results[backend] = train(backend, args, batches)
    if results:
        print("\nbackend   median images/s (steps 2+)   final loss")
        for backend, r in results.items():
            steady = r["images_per_s"][1:] or r["images_per_s"]
            print(f"{backend:8s}  {statistics.median(steady):24.1f}   {r['losses'][-1]:.4f}")
        first = next(iter(results))
        for backend, r in results.items():
            if backend != first:
                a, b = r["losses"][0], results[first]["losses"][0]
                print(f"step-1 loss (same weights, same batch): |{backend} - {first}| = {abs(a - b):.2e} "
                      f"(relative {abs(a - b) / abs(b):.1e})")
    return results


if __name__ == "__main__":
    main()
