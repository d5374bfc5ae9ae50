"""Draw RGA's relation maps (the paper's Fig. 4) for a few query positions over an image.

    python examples/relation_maps.py                          # synthetic pedestrian, random weights
                                                              # -> examples/output/relation_maps.png
    python examples/relation_maps.py --image person.png --checkpoint model_best.pth.tar --out maps.png

For each query position p (a marked point on the image) the figure shows, over the image,
row p of the spatial affinity G = theta^T phi of one RGA block (how p relates to every
position: ``rows``) and column p (how every position relates to p: ``cols``), from
:func:`rga_triton.relation_maps`. With random weights the maps show the pipeline, not learned
relations: pass a trained RGA-Net checkpoint (the authors' files load through
:func:`rga_triton.load_checkpoint`) and a real image to get the paper's pictures.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import rga_triton  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output", "relation_maps.png")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # ImageNet normalisation, as the authors train


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", help="an image file (PNG; JPEG with Pillow); default: a synthetic pedestrian")
    p.add_argument("--checkpoint", help="a trained RGA-Net checkpoint (e.g. the authors' .pth.tar)")
    p.add_argument("--pretrained-backbone", help="torchvision resnet50 ImageNet weights for the backbone")
    p.add_argument("--height", type=int, default=256, help="input image height (default 256, the paper's)")
    p.add_argument("--width", type=int, default=128, help="input image width (default 128)")
    p.add_argument("--spa-ratio", type=int, default=8, help="RGA spatial reduction ratio (default 8)")
    p.add_argument("--down-ratio", type=int, default=8, help="RGA embedding reduction ratio (default 8)")
    p.add_argument("--stage", type=int, default=1, choices=[1, 2, 3, 4], help="which RGA block (1 = after layer1)")
    p.add_argument("--points", default="0.15,0.5;0.4,0.35;0.75,0.6",
                   help="query positions as 'y,x;y,x' fractions of the image height and width")
    p.add_argument("--backend", default="auto", choices=["torch", "triton", "auto"],
                   help="rga_triton backend of the RGA blocks (default auto: Triton on CUDA, else PyTorch)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="PNG file to write (default examples/output/relation_maps.png; its folder is created)")
    return p.parse_args(argv)


def synthetic_pedestrian(height: int, width: int) -> np.ndarray:
    """An (H, W, 3) float image in [0, 1]: a figure with head, shirt, trousers on a graded background."""
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width]).reshape(2, 1, 1)
    img = np.stack([0.55 + 0.2 * yy, 0.6 + 0.1 * xx, 0.5 + 0.1 * (1 - yy)], axis=-1)
    cx = 0.5
    head = (yy - 0.13) ** 2 / 0.07 ** 2 + (xx - cx) ** 2 / 0.14 ** 2 < 1
    torso = (yy > 0.22) & (yy < 0.55) & (np.abs(xx - cx) < 0.24)
    arms = (yy > 0.24) & (yy < 0.52) & (np.abs(xx - cx) > 0.26) & (np.abs(xx - cx) < 0.34)
    legs = (yy >= 0.55) & (yy < 0.95) & (np.abs(xx - cx) > 0.03) & (np.abs(xx - cx) < 0.2)
    img[head] = (0.85, 0.7, 0.55)
    img[torso | arms] = (0.8, 0.15, 0.15)
    img[legs] = (0.15, 0.2, 0.45)
    rng = np.random.default_rng(0)
    return np.clip(img + 0.03 * rng.standard_normal(img.shape), 0, 1).astype(np.float32)


def load_image(path: str | None, height: int, width: int) -> np.ndarray:
    if path is None:
        return synthetic_pedestrian(height, width)
    import matplotlib.image as mpimg

    img = np.asarray(mpimg.imread(path), dtype=np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    img = img[..., :3] / (255.0 if img.max() > 1.0 else 1.0)
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
    return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()


def parse_points(text: str) -> list[tuple[float, float]]:
    points = []
    for item in text.split(";"):
        y, x = (float(v) for v in item.split(","))
        if not (0 <= y < 1 and 0 <= x < 1):
            raise SystemExit(f"--points: {item!r} must be fractions in [0, 1)")
        points.append((y, x))
    return points


def main(argv=None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args = parse_args(argv)
    model = rga_triton.models.rga_net(1, height=args.height, width=args.width, spa_ratio=args.spa_ratio,
                                      down_ratio=args.down_ratio, backend=args.backend,
                                      pretrained_backbone=args.pretrained_backbone)
    if args.checkpoint:
        report = rga_triton.load_checkpoint(model, args.checkpoint, strict=False)   # its classifier size differs
        print(report)
    else:
        print("no --checkpoint: random weights, so the maps show the computation, not learned relations")
    model = model.to(args.device).eval()

    image = load_image(args.image, args.height, args.width)
    x = (torch.from_numpy(image).permute(2, 0, 1)[None] - torch.tensor(MEAN)[:, None, None]) \
        / torch.tensor(STD)[:, None, None]
    block = getattr(model.backbone, f"rga_att{args.stage}")
    with torch.no_grad():
        feats = model.backbone.stage_inputs(x.to(args.device), stages=(args.stage,))[args.stage]
    h, w = feats.shape[-2:]
    points = parse_points(args.points)
    cells = [(min(int(py * h), h - 1), min(int(px * w), w - 1)) for py, px in points]
    rows, cols = rga_triton.relation_maps(block, feats, cells)            # (1, P, h, w) each
    up = F.interpolate(torch.cat([rows, cols], 1).float().cpu(), size=(args.height, args.width), mode="bilinear",
                       align_corners=False)[0].numpy()

    n = len(points)
    fig, axes = plt.subplots(2, n + 1, figsize=(2.0 * (n + 1) + 0.8, 2.0 * 2 * args.height / args.width + 0.6),
                             squeeze=False, layout="constrained")
    colors = plt.cm.tab10.colors
    for r in range(2):
        axes[r, 0].imshow(image)
        for i, (py, px) in enumerate(points):
            axes[r, 0].plot(px * args.width, py * args.height, "o", ms=7, mec="white", color=colors[i % 10])
        axes[r, 0].set_title("image" if r == 0 else f"stage {args.stage}: {h}x{w}", fontsize=8)
    for r, (name, maps) in enumerate((("row: p -> all", up[:n]), ("col: all -> p", up[n:]))):
        low, high = float(maps.min()), float(maps.max())      # one colour scale per row of maps
        for i, (py, px) in enumerate(points):
            ax = axes[r, i + 1]
            ax.imshow(image)
            shown = ax.imshow(maps[i], cmap="jet", alpha=0.55, vmin=low, vmax=high)
            ax.plot(px * args.width, py * args.height, "o", ms=7, mec="white", color=colors[i % 10])
            ax.set_title(f"{name}\np={cells[i]}", fontsize=8)
        bar = fig.colorbar(shown, ax=list(axes[r, 1:]), shrink=0.8, pad=0.02)
        bar.set_label("relation G (theta^T phi)", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle(f"RGA relation maps (rga_triton.relation_maps, block rga_att{args.stage})", fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
