"""Same training, same accuracy: the authors' RGA-Net and the converted one trained side by side (issue 31).

    python bench/studies/convergence.py                  # --preset cpu: small four-stage RGA-Net, 64 x 32, 1000 steps
    python bench/studies/convergence.py --preset gpu     # RGA-Net (ResNet-50), 256 x 128, 16 x 4, 500 steps (unrun)

One seed, one batch stream (``bench/lib/reid_data.py``: P identities x K augmented images), the
authors' recipe (``bench/lib/reid_train.py``: Adam 8e-4, label-smoothed cross-entropy + batch-hard
triplet, BNNeck), float32. The models: the authors' blocks (``reference/``), the same weights
``convert``ed to the torch path, and to the Triton path where Triton runs (CUDA); and, as the yardstick
for float32 rounding, the authors' model again on the same batches with each batch's images in
reverse order (the same loss and gradients, another rounding: "authors, reordered"). Every
``--eval-every`` steps each model's rank-1 and mAP (cosine distance, ``bench/lib/retrieval.py``) on
held-out identities. Writes ``bench/results/convergence/convergence_<preset>.csv`` (one row per
model and step: loss, seconds; rank-1 and mAP on evaluation steps) and ``..._<preset>.png`` (loss
curves on one axis, rank-1/mAP on the other), and prints the median time per step and the final
metrics. Float32 training of this model is chaotic (tests/block/test_convergence.py): curves
agree closely for the first steps and then as two float32 runs of the same model do.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from bench.lib import reid_train  # noqa: E402
from bench.lib.reid_data import SyntheticReID  # noqa: E402
from bench.lib.retrieval import rank1_map  # noqa: E402
from rga_triton.dispatch import triton_unsupported_reason  # noqa: E402

PRESETS = {
    # arch, input, train/test identities, gallery images per test identity, P x K, steps, evaluation period
    "cpu": dict(arch="small", height=64, width=32, train_ids=32, test_ids=48, gallery=4, identities=4, instances=4,
                steps=1000, eval_every=50, device="cpu"),
    "gpu": dict(arch="resnet50", height=256, width=128, train_ids=128, test_ids=64, gallery=8, identities=16,
                instances=4, steps=500, eval_every=50, device="cuda", views_per_id=16),
}
OUT_DIR = os.path.join(ROOT, "bench", "results", "convergence")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--steps", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="default: the preset's (cpu or cuda); '--preset gpu --device cpu --steps 2' "
                                    "is a smoke test of the ResNet-50 model")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: the small model's ops are tiny; on a shared machine two contending "
                        "threads were ~50x slower than one)")
    p.add_argument("--out-dir", default=OUT_DIR)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def evaluate(model, split) -> tuple[float, float]:
    q = reid_train.features(model, split.query)
    g = reid_train.features(model, split.gallery)
    return rank1_map(q, g, split.query_pids, split.gallery_pids, split.query_camids, split.gallery_camids)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--preset gpu needs a CUDA device")
    torch.set_num_threads(args.threads)
    data = SyntheticReID(args.height, args.width, num_train_ids=args.train_ids, num_test_ids=args.test_ids,
                         gallery_per_id=args.gallery, seed=args.seed)
    started = time.perf_counter()

    def batches(reordered: bool = False):
        """The stream, made again for each model (all of it would not fit in memory at the paper's size)."""
        for images, labels in data.batches(args.steps, args.identities, args.instances,
                                           views_per_id=getattr(args, "views_per_id", None)):
            yield (images.flip(0), labels.flip(0)) if reordered else (images, labels)

    split = data.query_gallery()
    print(f"{args.preset}: {args.arch} RGA-Net at {args.height} x {args.width}, batch {args.identities} x "
          f"{args.instances}, {args.steps} steps, {args.test_ids} query identities x {args.gallery} gallery images, "
          f"{args.device}, torch {torch.__version__}; evaluation split in {time.perf_counter() - started:.0f} s",
          flush=True)
    authors = reid_train.authors_model(data.num_classes, args.height, args.width, arch=args.arch, seed=args.seed,
                                       dtype=torch.float32).to(args.device)
    models = {"authors": reid_train.in_dtype(authors, torch.float32),
              "authors, reordered": reid_train.in_dtype(authors, torch.float32),
              "converted (torch)": reid_train.converted(authors, "torch")}
    reason = triton_unsupported_reason(torch.empty(0, device=args.device))
    if reason is None and args.device == "cuda":
        models["converted (triton)"] = reid_train.converted(authors, "triton")
    else:
        print(f"converted (triton) not run: {reason or 'the Triton path runs on CUDA in this study'}")

    os.makedirs(args.out_dir, exist_ok=True)
    csv_path = os.path.join(args.out_dir, f"convergence_{args.preset}.csv")
    results = {}
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "step", "loss", "seconds", "rank1", "mAP"])
        for name, model in models.items():
            results[name] = train_one(name, model, batches(reordered=name == "authors, reordered"), split, args)
            evals = dict((s, (r, m)) for s, r, m in results[name]["evals"])
            for step in range(0, args.steps + 1):
                loss = f"{results[name]['losses'][step - 1]:.6f}" if step else ""
                seconds = f"{results[name]['seconds'][step - 1]:.5f}" if step else ""
                rank1, mean_ap = (f"{v:.6f}" for v in evals[step]) if step in evals else ("", "")
                if step == 0 and step not in evals:
                    continue
                writer.writerow([name, step, loss, seconds, rank1, mean_ap])
    png_path = os.path.join(args.out_dir, f"convergence_{args.preset}.png")
    plot(results, args, png_path)
    summary(results, args)
    print(f"wrote {csv_path} and {png_path}")
    return results


def train_one(name, model, batches, split, args) -> dict:
    evals = [(0, *evaluate(model, split))]
    print(f"[{name}] step 0: rank-1 {evals[0][1]:.3f}  mAP {evals[0][2]:.3f}", flush=True)
    def on_step(step, loss, m):
        if step % args.eval_every == 0 or step == args.steps:
            evals.append((step, *evaluate(m, split)))
            print(f"[{name}] step {step}: loss {loss:.4f}  rank-1 {evals[-1][1]:.3f}  mAP {evals[-1][2]:.3f}",
                  flush=True)

    result = reid_train.train(model, batches, on_step=on_step)
    result["evals"] = evals
    return result


def smooth(values, window: int = 20):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(results, args, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(12, 4.6))
    colours = {"authors": "tab:blue", "authors, reordered": "tab:gray", "converted (torch)": "tab:orange",
               "converted (triton)": "tab:green"}
    for name, r in results.items():
        steps = range(1, len(r["losses"]) + 1)
        c = colours.get(name)
        ax_loss.plot(steps, r["losses"], color=c, alpha=0.2, linewidth=0.8)
        median = statistics.median(r["seconds"][1:] or r["seconds"])
        ax_loss.plot(steps, smooth(r["losses"]), color=c, linewidth=1.8,
                     label=f"{name}: {median * 1e3:.0f} ms/step")
        s = [e[0] for e in r["evals"]]
        ax_metric.plot(s, [e[1] for e in r["evals"]], color=c, marker="o", linestyle="-", label=f"{name} rank-1")
        ax_metric.plot(s, [e[2] for e in r["evals"]], color=c, marker="s", linestyle="--", label=f"{name} mAP")
    ax_loss.set_xlabel("training step")
    ax_loss.set_ylabel("loss: label-smoothed CE + triplet (20-step mean)")
    ax_loss.set_title("Training loss, same seed and batches")
    ax_loss.legend(fontsize=9)
    ax_metric.set_xlabel("training step")
    ax_metric.set_ylabel("rank-1 / mAP on held-out identities (cosine)")
    ax_metric.set_ylim(0, 1.02)
    ax_metric.set_title("Retrieval")
    ax_metric.legend(fontsize=8, ncol=2, loc="lower right")
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    fig.suptitle(f"RGA-Net ({args.arch}, {args.height}x{args.width}, batch {args.identities}x{args.instances}, "
                 f"float32): authors' blocks vs converted, {device}, torch {torch.__version__}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(results, args) -> None:
    base = results.get("authors")
    print("\nmodel                 median s/step   loss (last 20 mean)   final rank-1 / mAP   last 5 evals' mean")
    for name, r in results.items():
        median = statistics.median(r["seconds"][1:] or r["seconds"])
        last, recent = r["evals"][-1], r["evals"][-5:]
        tail = r["losses"][-20:]
        print(f"{name:20s}  {median:13.4f}   {sum(tail) / len(tail):19.4f}   {last[1]:8.3f} / {last[2]:.3f}   "
              f"{statistics.mean(e[1] for e in recent):8.3f} / {statistics.mean(e[2] for e in recent):.3f}")
    if base is not None:
        b = statistics.median(base["seconds"][1:])
        for name, r in results.items():
            if name != "authors":
                print(f"{name} vs authors: x{b / statistics.median(r['seconds'][1:]):.2f} per training step")
        for name, r in results.items():
            if name != "authors":
                dev = [abs(a - c) for a, c in zip(r["losses"], base["losses"])]
                first = next((i + 1 for i, d in enumerate(dev) if d > 1e-3 * abs(base["losses"][i])), None)
                print(f"{name} vs authors: max |loss difference| {max(dev):.3e}; relative difference first over "
                      f"1e-3 at step {first}")


if __name__ == "__main__":
    main()
