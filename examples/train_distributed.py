"""Train RGA-Net on synthetic re-ID data over several processes: DDP or FSDP2, synchronised BatchNorm.

    torchrun --nproc_per_node=8 examples/train_distributed.py --sync-bn              # one machine, 8 GPUs
    torchrun --nproc_per_node=8 --nnodes=2 --node-rank=0 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29500 examples/train_distributed.py --sync-bn --fsdp      # and node-rank 1 on the other
    torchrun --nproc_per_node=2 examples/train_distributed.py --steps 3 --preset tiny  # two CPU processes (gloo)

Each rank trains on its slice of every global batch (``--identities`` x ``--instances`` images, the
same batches as ``examples/train_synthetic.py``'s). The loss printed is the mean over the ranks,
which with every BatchNorm synchronised is the loss one process computes on the whole batch.

- ``--sync-bn``: ``nn.SyncBatchNorm.convert_sync_batchnorm``. The RGA blocks synchronise their
  BatchNorms themselves, on the Triton path as on the torch path (docs/distributed.md). On CPUs,
  PyTorch's own SyncBatchNorm refuses CPU tensors and DDP refuses SyncBatchNorm modules: only the
  RGA blocks are converted there, and the gradients are averaged by hand as DDP would.
- ``--freeze-bn``: every BatchNorm outside the RGA blocks (the ResNet-50's and the BNNeck) normalises
  with its running statistics and does not train (fast-reid's ``FrozenBN``); with ``--sync-bn``
  every BatchNorm that normalises with the batch is then synchronised, on CPUs too, and the run
  computes what one process computes on the whole batch (tests/ecosystem/test_train_distributed.py).
- ``--fsdp``: FSDP2 (``fully_shard`` on each ResNet stage and RGA block, then on the whole model)
  instead of DDP; ``--save DIR`` writes a sharded checkpoint with ``torch.distributed.checkpoint``
  and ``--resume DIR`` reads one.

The backend is NCCL where CUDA is available, else gloo. ``--loss ce`` trains on the cross-entropy
alone: the batch-hard triplet loss is computed on each rank's slice, so it is not the whole batch's.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                   # train_synthetic
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from train_synthetic import PRESETS, batch_hard_triplet, synthetic_batches  # noqa: E402

import rga_triton  # noqa: E402

TINY = dict(height=32, width=16, spa_ratio=2, down_ratio=2, identities=2, instances=4)
"""A preset for CPU checks: 32 x 16 images, batch 8."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=[*sorted(PRESETS), "tiny"], default=None,
                   help="'paper' (256 x 128, batch 64; default on CUDA), 'small' (64 x 32, batch 8) or 'tiny' "
                        "(32 x 16, batch 8; default on CPU)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="rga_triton backend of the RGA blocks (default auto: the kernels on CUDA)")
    p.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="adam (the authors'; default) or sgd (plain: what a check of the gradients wants, since "
                        "Adam's first steps move tiny gradients by the full learning rate whatever their rounding)")
    p.add_argument("--lr", type=float, default=8e-4, help="learning rate (default 8e-4, the authors' for Adam)")
    p.add_argument("--num-classes", type=int, default=32, help="identities in the synthetic data (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default 0)")
    p.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across the ranks")
    p.add_argument("--freeze-bn", action="store_true",
                   help="every BatchNorm outside the RGA blocks normalises with its running statistics, untrained")
    p.add_argument("--fsdp", action="store_true", help="shard parameters with FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--loss", choices=["ce+triplet", "ce"], default="ce+triplet",
                   help="the authors' cross-entropy + batch-hard triplet (default), or cross-entropy alone")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="the model's and data's dtype (float64: for checks; the RGA blocks then run on the torch path)")
    p.add_argument("--save", metavar="DIR", help="write a sharded checkpoint (torch.distributed.checkpoint) at the end")
    p.add_argument("--resume", metavar="DIR", help="load a checkpoint written by --save before training")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    preset = TINY if (args.preset or ("paper" if cuda else "tiny")) == "tiny" else PRESETS[args.preset or "paper"]
    for key, value in preset.items():
        setattr(args, key, value)
    args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    return args


def build_model(args) -> nn.Module:
    torch.manual_seed(args.seed)
    model = rga_triton.models.rga_net(args.num_classes, height=args.height, width=args.width,
                                      spa_ratio=args.spa_ratio, down_ratio=args.down_ratio, backend=args.backend)
    blocks = [getattr(model.backbone, f"rga_att{k}") for k in range(1, 5)]
    if args.sync_bn:
        if args.device == "cpu":        # PyTorch's SyncBatchNorm runs on GPUs only; the RGA blocks' on any device
            for k, block in enumerate(blocks, 1):
                setattr(model.backbone, f"rga_att{k}", nn.SyncBatchNorm.convert_sync_batchnorm(block))
        else:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(args.device, getattr(torch, args.dtype)).train()
    if args.freeze_bn:      # after train(): these stay in eval for the whole run
        for name, bn in model.named_modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and "rga_att" not in name:
                bn.eval().requires_grad_(False)
    return model


def distribute(model: nn.Module, args):
    """(the module to call, a function run after backward): FSDP2, DDP, or on CPUs with SyncBatchNorm
    (which DDP refuses there) the model itself with its gradients averaged by hand."""
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for k in range(1, 5):
            fully_shard(getattr(model.backbone, f"layer{k}"))
            fully_shard(getattr(model.backbone, f"rga_att{k}"))
        fully_shard(model)
        return model, lambda: None
    has_sync = any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    if args.device == "cpu" and has_sync:
        world = dist.get_world_size()
        for p in model.parameters():        # DDP's broadcast of rank 0's parameters
            dist.broadcast(p.data, src=0)

        def average_gradients():
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            for g, avg in zip(grads, torch._utils._unflatten_dense_tensors(flat / world, grads)):
                g.copy_(avg)
        return model, average_gradients
    device_ids = [torch.device(args.device).index] if args.device.startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids), lambda: None


def checkpoint_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def main(argv=None) -> list[float]:
    """Train; the mean loss over the ranks per step."""
    args = parse_args(argv)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    try:
        return train(args)
    finally:
        dist.destroy_process_group()


def train(args) -> list[float]:
    if args.device.startswith("cuda"):
        torch.cuda.set_device(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = args.identities * args.instances
    if batch % world:
        raise SystemExit(f"the global batch ({batch} images) must split evenly over {world} ranks")
    model = build_model(args)
    module, after_backward = distribute(model, args)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=args.lr, weight_decay=5e-4) if args.optimizer == "adam" else \
        torch.optim.SGD(trained, lr=args.lr)
    if args.resume:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = checkpoint_state(model, optimizer)
        dcp.load(state, checkpoint_id=args.resume)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if rank == 0:
        print(f"{world} ranks ({dist.get_backend()}), {'FSDP2' if args.fsdp else 'DDP'}, sync-bn {args.sync_bn}, "
              f"freeze-bn {args.freeze_bn}, {batch} images per step ({batch // world} per rank)", flush=True)
    mine = slice(rank * batch // world, (rank + 1) * batch // world)
    losses = []
    for step, (images, labels) in enumerate(synthetic_batches(args, args.device), 1):
        logits, features = module(images[mine].to(getattr(torch, args.dtype)))
        loss = F.cross_entropy(logits, labels[mine])
        if args.loss == "ce+triplet":
            loss = loss + batch_hard_triplet(features, labels[mine])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        after_backward()
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
        if rank == 0:
            print(f"step {step}/{args.steps}  loss {losses[-1]:.6f}", flush=True)
    if args.save:
        import torch.distributed.checkpoint as dcp

        dcp.save(checkpoint_state(model, optimizer), checkpoint_id=args.save)
    return losses


if __name__ == "__main__":
    main()
