"""Issue 22: how well a resized RGA block agrees with the original, and whether fine-tuning it pays.

Consistency: a smooth input x at H x W and its bilinear upsample x' at 1.5x and 2x. The block
resized by ``rga_triton.resize.resized_block`` runs on x'; its spatial gate is compared with the
original block's gate on x, bilinearly upsampled, and its channel gate with the original's.
Beside it the pooling baseline: x' pooled back to H x W (area), the original block, its spatial
gate upsampled. Eval mode, BatchNorm statistics from train-mode forwards on smooth inputs.
Gates are the reference's (reference/rga.py) in the authors' "sc" order: spatial gate on x,
channel gate on the spatially gated map. Errors: max |gate - target| and ||gate - target|| / ||target||.

Fine-tuning: a synthetic task whose signal is finer than the trained grid (predict the value at
a one-pixel marker of a 16 x 16 map), a tiny model pretrained at 8 x 8, then the same number of
steps at 16 x 16 from the resized block and from the pooling wrapper (same data, seeds, Adam).

    python bench/studies/resize_consistency.py                # both tables (3 to 6 minutes on 2 CPU cores)
    python bench/studies/resize_consistency.py --quick        # smaller shapes, fewer steps
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # reference/

from reference import RGA_Module  # noqa: E402
from rga_triton import RGAModule  # noqa: E402
from rga_triton.resize import POSITION_INPUTS, resized_block  # noqa: E402

# (name, channels, H, W, spa_ratio, down_ratio): RGA-Net's stage 3 and stage 2 blocks at a 256 x 128 input
# (ratios 8, as the paper), and two small blocks for --quick and the tests.
STAGES = [("stage 3 (1024 ch, 16x8)", 1024, 16, 8, 8, 8), ("stage 2 (512 ch, 32x16)", 512, 32, 16, 8, 8)]
QUICK_STAGES = [("small (64 ch, 8x4)", 64, 8, 4, 2, 2), ("small (64 ch, 12x6)", 64, 12, 6, 4, 2)]
FACTORS = (1.5, 2.0)


def reference_block(block: RGAModule) -> RGA_Module:
    """The reference module with ``block``'s parameters and buffers, whatever its inter_spatial.

    Built at in_spatial = inter_spatial * spa_ratio (so its rows match), then its four
    position-indexed convs given ``block``'s input widths; the reference's forward reads sizes
    off x and the weights only, so it computes the authors' block at ``block.in_spatial``.
    """
    ref = RGA_Module(block.in_channel, block.inter_spatial * block.spa_ratio, block.use_spatial, block.use_channel,
                     block.cha_ratio, block.spa_ratio, block.down_ratio, order=block.order)
    for name in POSITION_INPUTS:
        seq = getattr(ref, name, None)
        if seq is not None:
            seq[0] = nn.Conv2d(getattr(block, name)[0].in_channels, seq[0].out_channels, 1, bias=False)
    ref.in_spatial = block.in_spatial
    weight = next(block.parameters())
    ref = ref.to(dtype=weight.dtype, device=weight.device)
    ref.load_state_dict(block.state_dict(), strict=True)
    return ref.train(block.training)


def smooth_input(batch: int, channels: int, h: int, w: int, gen: torch.Generator, dtype=torch.float64,
                 frequencies: int = 3) -> torch.Tensor:
    """Per channel, a random sum of cos(pi a u) cos(pi b v), a, b < ``frequencies``, u, v in [0, 1] at cell centres."""
    u = (torch.arange(h, dtype=dtype) + 0.5) / h
    v = (torch.arange(w, dtype=dtype) + 0.5) / w
    basis = torch.stack([torch.outer(torch.cos(math.pi * a * u), torch.cos(math.pi * b * v))
                         for a in range(frequencies) for b in range(frequencies)])          # (F, h, w)
    coef = torch.randn(batch, channels, basis.shape[0], generator=gen, dtype=dtype) / (1 + torch.arange(
        basis.shape[0], dtype=dtype))
    return torch.einsum("bcf,fhw->bchw", coef, basis)


def calibrate(block: nn.Module, make_input, batches: int = 6) -> None:
    """Realistic BatchNorm statistics: cumulative averages over ``batches`` train-mode forwards."""
    bns = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    was = block.training
    block.train()
    with torch.no_grad():
        for _ in range(batches):
            block(make_input())
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    block.train(was)


def gates(ref: RGA_Module, x: torch.Tensor):
    """(spatial gate (B, 1, H, W), channel gate (B, C, 1, 1)) as the "sc" forward applies them."""
    s = torch.sigmoid(ref.spatial_logit(x))
    c = torch.sigmoid(ref.channel_logit(s * x))
    return s, c


def _errors(actual, target):
    return float((actual - target).abs().max()), float((actual - target).norm() / target.norm())


def consistency(channels: int, h: int, w: int, factor: float, seed: int = 0, batch: int = 4,
                spa_ratio: int = 8, cha_ratio: int = 8, down_ratio: int = 8, scale: bool = True):
    """{"resampled"/"pooled": {"spatial"/"channel": (max abs error, relative error)}} for one shape.

    ``scale=False`` drops the N / N' factor of the resampled weights (a control: it must do worse).
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    block = RGAModule(channels, h * w, cha_ratio=cha_ratio, spa_ratio=spa_ratio, down_ratio=down_ratio,
                      backend="torch").double()
    calibrate(block, lambda: smooth_input(8, channels, h, w, gen))
    block.eval()
    h2, w2 = round(h * factor), round(w * factor)
    big = resized_block(block, (h, w), (h2, w2))
    if not scale:
        with torch.no_grad():
            for name in POSITION_INPUTS:
                getattr(big, name)[0].weight.mul_(h2 * w2 / (h * w))
    small_ref, big_ref = reference_block(block).eval(), reference_block(big).eval()
    x = smooth_input(batch, channels, h, w, gen)
    xb = F.interpolate(x, size=(h2, w2), mode="bilinear", align_corners=False)
    up = lambda g: F.interpolate(g, size=(h2, w2), mode="bilinear", align_corners=False)  # noqa: E731
    with torch.no_grad():
        s, c = gates(small_ref, x)
        s_big, c_big = gates(big_ref, xb)
        s_pool, c_pool = gates(small_ref, F.interpolate(xb, size=(h, w), mode="area"))
    return {"resampled": {"spatial": _errors(s_big, up(s)), "channel": _errors(c_big, c)},
            "pooled": {"spatial": _errors(up(s_pool), up(s)), "channel": _errors(c_pool, c)}}


def consistency_table(stages=STAGES, factors=FACTORS) -> list[str]:
    lines = ["| block | factor | gate | resampled: max abs | resampled: rel L2 | pooling: max abs | pooling: rel L2 |",
             "|---|---|---|---|---|---|---|"]
    for name, c, h, w, spa_ratio, down_ratio in stages:
        for f in factors:
            r = consistency(c, h, w, f, spa_ratio=spa_ratio, down_ratio=down_ratio)
            for gate in ("spatial", "channel"):
                (ra, rr), (pa, pr) = r["resampled"][gate], r["pooled"][gate]
                lines.append(f"| {name} | {f:g}x | {gate} | {ra:.2e} | {rr:.2e} | {pa:.2e} | {pr:.2e} |")
    return lines


# ---------------------------------------------------------------- fine-tuning on a finer signal

def marker_batch(batch: int, h: int, w: int, gen: torch.Generator, density: float = 0.25):
    """x (B, 2, h, w): channel 0 a per-pixel random marker m (each pixel marked with p = ``density``),
    channel 1 N(0, 1) values v; y = sum_p m_p v_p / sqrt(density * h * w) (variance 1).

    The marker changes from pixel to pixel: at 16 x 16 it is finer than an 8 x 8 grid, so a
    gate computed at 8 x 8 and upsampled cannot select the marked pixels, one at 16 x 16 can."""
    values = torch.randn(batch, h * w, generator=gen)
    marker = (torch.rand(batch, h * w, generator=gen) < density).float()
    x = torch.stack([marker, values], dim=1).view(batch, 2, h, w)
    return x, (marker * values).sum(1) / math.sqrt(density * h * w)


class Tiny(nn.Module):
    """stem (1x1 conv + BN + ReLU) -> attention -> mean over positions -> linear: y."""

    def __init__(self, attention: nn.Module, channels: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, channels, 1), nn.BatchNorm2d(channels), nn.ReLU())
        self.attention = attention
        self.head = nn.Linear(channels, 1)

    def forward(self, x):
        return self.head(self.attention(self.stem(x)).mean(dim=(2, 3))).squeeze(1)


class Pooled(nn.Module):
    """The pooling wrapper: gates of ``block`` (built for ``hw``) on the area-pooled input, spatial gate upsampled."""

    def __init__(self, block: RGAModule, hw):
        super().__init__()
        self.ref, self.hw = reference_block(block), tuple(hw)

    def forward(self, x):
        small = F.interpolate(x, size=self.hw, mode="area")
        s, c = gates(self.ref, small)
        return x * F.interpolate(s, size=x.shape[2:], mode="bilinear", align_corners=False) * c


def train(model: nn.Module, steps: int, hw, seed: int, lr: float = 3e-3, batch: int = 32) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        x, y = marker_batch(batch, *hw, gen)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def evaluate(model: nn.Module, hw, seed: int = 123, batches: int = 8, batch: int = 64) -> float:
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    with torch.no_grad():
        return sum(float(F.mse_loss(model(x), y)) for x, y in
                   (marker_batch(batch, *hw, gen) for _ in range(batches))) / batches


def finetune(pretrain_steps: int = 300, steps: int = 300, seed: int = 0, small=(8, 8), big=(16, 16)) -> dict:
    """Pretrain Tiny at ``small``; fine-tune a copy at ``big`` from the resized block and one through the pooling
    wrapper, same batches and optimizer. Returns the loss curves' end points and held-out losses."""
    import copy

    torch.manual_seed(seed)
    block = RGAModule(16, small[0] * small[1], cha_ratio=4, spa_ratio=8, down_ratio=4, backend="torch")
    base = Tiny(block)
    pre = train(base, pretrain_steps, small, seed)
    out = {"pretrained at %dx%d" % small: (sum(pre[-20:]) / 20, evaluate(base, small))}
    resized = copy.deepcopy(base)
    resized.attention = resized_block(base.attention, small, big)
    pooled = copy.deepcopy(base)
    pooled.attention = Pooled(base.attention, small)
    out["zero-shot at %dx%d: resampled" % big] = (float("nan"), evaluate(resized, big))
    out["zero-shot at %dx%d: pooling" % big] = (float("nan"), evaluate(pooled, big))
    for name, model in (("resampled", resized), ("pooling", pooled)):
        curve = train(model, steps, big, seed + 1)
        out[f"fine-tuned {steps} steps at %dx%d: {name}" % big] = (sum(curve[-20:]) / 20, evaluate(model, big))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and 100 steps")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 300, quick 100)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print("Consistency (eval, float64, smooth inputs; target: the original block's gate on x, upsampled)")
    print("\n".join(consistency_table(QUICK_STAGES if args.quick else STAGES)))
    steps = args.steps or (100 if args.quick else 300)
    print("\nFine-tuning (marker task; MSE, mean of the last 20 training steps and on 512 held-out samples)")
    print("| run | train loss (last 20) | held-out loss |\n|---|---|---|")
    for name, (tr, ev) in finetune(steps, steps).items():
        print(f"| {name} | {tr:.4f} | {ev:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
