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
The backends train interleaved, step 1 of each, then step 2 of each, ..., so each sees the
same load on a busy machine; on a CPU, "auto" runs the same PyTorch code as "torch", so any
difference between their speeds is noise, and the script says so.
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
    p.add_argument("--backend", default="auto", choices=["torch", "triton", "auto", "all"],
                   help="rga_triton backend of the RGA blocks: torch (PyTorch ops), triton (the kernels; CUDA, or "
                        "the CPU under TRITON_INTERPRET=1), auto (Triton where it runs, else torch; default), or "
                        "all: each in turn from the same weights and batches, interleaved step by step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda if available)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="'paper' (256 x 128, batch 64, ratios 8; default on CUDA) or 'small' (64 x 32, batch 8, "
                        "spa/down ratios 2 so the 4 x 2 maps keep non-empty W networks; default on CPU)")
    p.add_argument("--height", type=int, help="input image height (default: the preset's, 256 or 64)")
    p.add_argument("--width", type=int, help="input image width (default: the preset's, 128 or 32)")
    p.add_argument("--spa-ratio", type=int, help="RGA spatial reduction ratio (default: the preset's, 8 or 2)")
    p.add_argument("--down-ratio", type=int, help="RGA embedding reduction ratio (default: the preset's, 8 or 2)")
    p.add_argument("--identities", type=int, help="identities per batch, P (default: the preset's, 16 or 2)")
    p.add_argument("--instances", type=int, help="images per identity, K (default 4); batch = P * K")
    p.add_argument("--num-classes", type=int, default=32,
                   help="identities in the synthetic data set and the classifier's outputs (default 32)")
    p.add_argument("--steps", type=int, default=5, help="training steps per backend (default 5)")
    p.add_argument("--lr", type=float, default=8e-4, help="Adam learning rate (default 8e-4, the authors')")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default 0)")
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


class Trainer:
    """One backend's model and optimizer; ``step`` runs one training step and prints it."""

    def __init__(self, backend: str, args):
        torch.manual_seed(args.seed)
        self.backend, self.args = backend, args
        self.model = rga_triton.models.rga_net(args.num_classes, height=args.height, width=args.width,
                                               spa_ratio=args.spa_ratio, down_ratio=args.down_ratio,
                                               backend=backend).to(args.device).train()
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=args.lr,
                                          weight_decay=5e-4)
        self.cuda = args.device.startswith("cuda")
        # Triton compiles (and may autotune) its kernels on their first call: only on CUDA.
        self.compiles = self.cuda and runs_triton(backend, args.device)
        self.interpreted = not self.cuda and runs_triton(backend, args.device)   # TRITON_INTERPRET=1
        self.losses, self.seconds = [], []

    def step(self, images, labels, total: int) -> None:
        sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        sync()
        start = time.perf_counter()
        logits, features = self.model(images)
        loss = F.cross_entropy(logits, labels) + batch_hard_triplet(features, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        sync()
        self.seconds.append(time.perf_counter() - start)
        self.losses.append(float(loss.detach()))
        n = len(self.losses)
        if self.interpreted:      # the interpreter runs each kernel through NumPy: seconds, not a speed
            rate = f"{self.seconds[-1]:.3g} s/step (Triton's interpreter: a check, not a speed)"
        else:
            rate = f"{len(images) / self.seconds[-1]:.3g} images/s"
        note = "  (includes first-call compilation/autotuning)" if n == 1 and self.compiles else ""
        print(f"[{self.backend}] step {n}/{total}  loss {self.losses[-1]:.4f}  {rate}{note}", flush=True)

    def result(self, batch: int) -> dict:
        return {"losses": self.losses, "images_per_s": [batch / s for s in self.seconds], "seconds": self.seconds}


def runs_triton(backend: str, device: str) -> bool:
    """Whether ``backend`` runs the Triton kernels on ``device`` ("auto" where Triton takes the tensors)."""
    return backend != "torch" and triton_unsupported_reason(torch.empty(0, device=device)) is None


def train(backend: str, args, batches) -> dict:
    """One backend alone: every step in turn."""
    trainer = Trainer(backend, args)
    for images, labels in batches:
        trainer.step(images, labels, len(batches))
    return trainer.result(len(batches[0][0]))


def main(argv=None) -> dict:
    args = parse_args(argv)
    backends = ["torch", "triton", "auto"] if args.backend == "all" else [args.backend]
    print(f"RGA-Net, {args.height} x {args.width} input, batch {args.identities * args.instances} "
          f"({args.identities} identities x {args.instances}), spa_ratio {args.spa_ratio}, down_ratio "
          f"{args.down_ratio}, {args.steps} steps on {args.device}, torch {torch.__version__}")
    batches = synthetic_batches(args, args.device)
    trainers = {}
    for backend in backends:
        reason = runnable(backend, args.device)
        if reason is not None:
            if args.backend == "all":
                print(f"[{backend}] skipped: {reason}")
                continue
            raise SystemExit(f"backend {backend!r} cannot run here: {reason}")
        trainers[backend] = Trainer(backend, args)
    for images, labels in batches:        # interleaved: step k of every backend, then step k + 1
        for trainer in trainers.values():
            trainer.step(images, labels, len(batches))
    batch = args.identities * args.instances
    results = {backend: t.result(batch) for backend, t in trainers.items()}
    if results:
        print("\nbackend   median of steps 2+          final loss")
        for backend, t in trainers.items():
            steady = t.seconds[1:] or t.seconds
            rate = (f"{statistics.median(steady):.3g} s/step (interpreted)" if t.interpreted
                    else f"{batch / statistics.median(steady):.3g} images/s")
            print(f"{backend:8s}  {rate:26s}  {t.losses[-1]:.4f}")
        if not args.device.startswith("cuda"):
            print("On a CPU the first steps also warm up the allocator and caches, and other jobs on the machine "
                  "move every step's time: compare medians over several steps, on an idle machine.")
            same = [b for b, t in trainers.items() if not t.interpreted and not runs_triton(b, args.device)]
            if len(same) > 1:
                print(f"{' and '.join(same)} run the same PyTorch code here: the difference between their speeds "
                      f"is noise, not a property of the backends.")
        first = next(iter(results))
        for backend, r in results.items():
            if backend != first:
                a, b = r["losses"][0], results[first]["losses"][0]
                print(f"step-1 loss (same weights, same batch): |{backend} - {first}| = {abs(a - b):.2e} "
                      f"(relative {abs(a - b) / abs(b):.1e})")
    return results


if __name__ == "__main__":
    main()
