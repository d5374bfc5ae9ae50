"""What synchronised BatchNorm moves between ranks per RGA-Net train step, against DDP's gradient all-reduce.

Counted from the model, no GPU and no process group needed: for each RGA block of RGA-Net, each
branch's BatchNorm groups (the projection's three BatchNorms, the relation's, the hidden one's, the
last one-channel one) and the bytes each collective of ``rga_triton/ops/batchnorm/sync.py`` sends
per rank; then the bytes DDP all-reduces (every parameter's gradient, float32) and those of the
ResNet-50's own SyncBatchNorms (``nn.SyncBatchNorm``: an all_gather of 2C + 1 float32 values
forward, an all_reduce of 2C backward). docs/distributed.md quotes its table:

    python bench/studies/sync_bytes.py --size 256x128 --world 8
"""
from __future__ import annotations

import argparse
import os
import sys

import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from rga_triton.models import rga_net  # noqa: E402

FLOAT64, FLOAT32 = 8, 4


def block_groups(block) -> list[tuple[str, int]]:
    """(BatchNorm group, rows) of an RGA block, in the order a train step synchronises them."""
    groups = []
    for name, branch in block.branches().items():
        groups += [(f"{name} projection (theta, phi, gx)", sum(seq[1].num_features
                                                              for seq in (branch.theta, branch.phi, branch.gx))),
                   (f"{name} relation", branch.gg[1].num_features), (f"{name} hidden", branch.W[1].num_features),
                   (f"{name} last", branch.W[4].num_features)]
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256x128", help="input HxW (default: %(default)s)")
    parser.add_argument("--world", type=int, default=4, help="ranks, for the bytes an all_gather receives")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.lower().split("x"))
    model = rga_net(751, height=height, width=width, backend="torch")
    print("| stage | block | BatchNorm group | rows | forward all_gather sends (B) | backward all_reduce (B) |")
    print("|---|---|---|---|---|---|")
    rga_forward = rga_backward = rga_collectives = 0
    for k in range(1, 5):
        block = getattr(model.backbone, f"rga_att{k}")
        for group, rows in block_groups(block):
            sent, reduced = (1 + 2 * rows) * FLOAT64, (1 + 2 * rows) * FLOAT64
            rga_forward, rga_backward, rga_collectives = rga_forward + sent, rga_backward + reduced, rga_collectives + 2
            print(f"| {k} | {block.in_channel}x{block.in_spatial} | {group} | {rows} | {sent} | {reduced} |")
    params = sum(p.numel() for p in model.parameters())
    resnet_bns = [m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and "rga_att" not in name]
    resnet_forward = sum((2 * bn.num_features + 1) * FLOAT32 for bn in resnet_bns)
    resnet_backward = sum(2 * bn.num_features * FLOAT32 for bn in resnet_bns)
    print()
    print(f"RGA blocks, per rank and step: {rga_collectives} collectives, forward {rga_forward / 1e3:.1f} kB sent "
          f"(all_gather: each rank receives {args.world}x that), backward {rga_backward / 1e3:.1f} kB all-reduced")
    print(f"ResNet-50's own SyncBatchNorms ({len(resnet_bns)}): forward {resnet_forward / 1e3:.1f} kB, "
          f"backward {resnet_backward / 1e3:.1f} kB")
    print(f"DDP's gradient all-reduce: {params / 1e6:.2f} M parameters, {params * FLOAT32 / 1e6:.1f} MB float32")


if __name__ == "__main__":
    main()
