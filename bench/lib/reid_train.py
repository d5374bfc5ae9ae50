"""The authors' RGA-Net training recipe on the synthetic re-ID set, shared by the convergence tests and study.

- Models: :func:`authors_model` builds RGA-Net with the authors' blocks (``reference.RGA_Module``)
  after each of the four stages, BNNeck and a bias-free classifier, at one of two sizes:
  ``"resnet50"`` (RGA-Net itself: torchvision's ResNet-50 with last stride 1, ``rga_triton.models``'
  module tree with every RGA block swapped for the authors') or ``"small"`` (the same four RGA
  stages behind a reduced-width ResNet of one basic block per stage, widths 16-128, for a CPU).
  :func:`converted` is ``rga_triton.convert`` on a deep copy: the same weights, our blocks.
- Recipe (the authors' ``main_imgreid.py``): Adam (lr 8e-4, weight decay 5e-4), label-smoothed
  cross-entropy (epsilon 0.1) on the logits after the BNNeck plus batch-hard triplet loss (margin
  0.3, Euclidean distance) on the pooled features before it.
- :func:`train` runs the steps on a batch list and records what the convergence criterion
  compares: the loss per step, wall time per step, and snapshots of the parameters and
  BatchNorm running statistics at asked steps.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import rga_triton
from reference import RGA_Module
from rga_triton.models import rga_net
from rga_triton.models.resnet import stage_sizes

SMALL_WIDTHS = (16, 32, 64, 128)
BLOCK_ARGS = ("in_channel", "in_spatial", "use_spatial", "use_channel")


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the (1x1 conv -> BN when the shape changes) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class SmallBackbone(nn.Module):
    """ResNet-50's stem and stage strides (2, 2 maxpool; 1, 2, 2, last stride 1), one basic block per stage
    of ``widths``, and ``rga_att{k}`` (the authors' block) after stage k: RGA-Net's four RGA stages, narrow."""

    def __init__(self, height: int, width: int, widths=SMALL_WIDTHS, cha_ratio=8, spa_ratio=2, down_ratio=2):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = widths[0]
        for k, (c, stride, (h, w)) in enumerate(zip(widths, (1, 2, 2, 1), stage_sizes(height, width)), start=1):
            setattr(self, f"layer{k}", BasicBlock(c_in, c, stride))
            setattr(self, f"rga_att{k}", RGA_Module(c, h * w, True, True, cha_ratio, spa_ratio, down_ratio))
            c_in = c
        self.num_features = widths[-1]

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for k in range(1, 5):
            x = getattr(self, f"rga_att{k}")(getattr(self, f"layer{k}")(x))
        return x


class SmallRGANet(nn.Module):
    """:class:`SmallBackbone` -> average pooling -> BNNeck (BatchNorm1d, bias frozen) -> bias-free classifier.
    Train mode returns ``(logits, pooled features)``, eval mode the features after the neck: RGANet's contract."""

    def __init__(self, num_classes: int, height: int, width: int, **kwargs):
        super().__init__()
        self.backbone = SmallBackbone(height, width, **kwargs)
        self.feat_bn = nn.BatchNorm1d(self.backbone.num_features)
        self.feat_bn.bias.requires_grad_(False)
        self.cls = nn.Linear(self.backbone.num_features, num_classes, bias=False)
        nn.init.normal_(self.cls.weight, std=0.001)

    def forward(self, x):
        pooled = self.backbone(x).mean(dim=(2, 3))
        features = self.feat_bn(pooled)
        if not self.training:
            return features
        return self.cls(features), pooled


def authors_model(num_classes: int, height: int, width: int, arch: str = "small", seed: int = 0,
                  dtype=torch.float64, spa_ratio: int | None = None, down_ratio: int | None = None,
                  widths=SMALL_WIDTHS) -> nn.Module:
    """RGA-Net with the authors' blocks, initialised from ``seed``, in train mode (see the module docstring).
    Ratios default to 8 for ``"resnet50"`` (the paper) and to 2 for ``"small"`` (non-empty W networks);
    ``widths`` are the small backbone's four stage widths."""
    torch.manual_seed(seed)
    if arch == "small":
        model = SmallRGANet(num_classes, height, width, widths=widths, spa_ratio=spa_ratio or 2,
                            down_ratio=down_ratio or 2)
    elif arch == "resnet50":
        model = rga_net(num_classes, height=height, width=width, spa_ratio=spa_ratio or 8,
                        down_ratio=down_ratio or 8, backend="torch")
        for k in range(1, 5):
            block = getattr(model.backbone, f"rga_att{k}")
            authors = RGA_Module(*(getattr(block, a) for a in BLOCK_ARGS), block.cha_ratio, block.spa_ratio,
                                 block.down_ratio)
            authors.load_state_dict(block.state_dict())
            setattr(model.backbone, f"rga_att{k}", authors)
    else:
        raise ValueError(f"arch must be 'small' or 'resnet50', got {arch!r}")
    return model.to(dtype).train()


def converted(model: nn.Module, backend: str = "torch", dtype=None) -> nn.Module:
    """A deep copy of ``model`` (in ``dtype``), its authors' blocks converted to ``RGAModule(backend=)``."""
    copied = copy.deepcopy(model)
    if dtype is not None:
        copied = copied.to(dtype)
    return rga_triton.convert(copied, backend=backend)


def in_dtype(model: nn.Module, dtype) -> nn.Module:
    """A deep copy of ``model`` in ``dtype`` (the authors' model in float32, say)."""
    return copy.deepcopy(model).to(dtype)


def label_smoothed_cross_entropy(logits, labels, epsilon: float = 0.1):
    """The authors' CrossEntropyLabelSmooth: targets (1 - eps) one-hot + eps / classes."""
    return F.cross_entropy(logits, labels, label_smoothing=epsilon)


def batch_hard_triplet(features, labels, margin: float = 0.3):
    """The authors' TripletLoss (hard mining): Euclidean distances clamped at 1e-12 before the root, the
    farthest positive and the nearest negative per anchor, hinge at ``margin``, mean over the batch."""
    dist = (features[:, None] - features[None]).pow(2).sum(-1).clamp(min=1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    hardest_positive = dist.masked_fill(~same, float("-inf")).max(dim=1).values
    hardest_negative = dist.masked_fill(same, float("inf")).min(dim=1).values
    return F.relu(hardest_positive - hardest_negative + margin).mean()


def loss_fn(model, images, labels):
    logits, pooled = model(images)
    return label_smoothed_cross_entropy(logits, labels) + batch_hard_triplet(pooled, labels)


def optimizer_for(model, lr: float = 8e-4, weight_decay: float = 5e-4):
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def parameters_vector(model) -> torch.Tensor:
    """Every parameter, flattened, in float64 on the CPU (the frozen BNNeck bias included)."""
    return torch.cat([p.detach().double().cpu().flatten() for p in model.parameters()])


def running_stats(model) -> dict[str, torch.Tensor]:
    """{name: tensor} of every BatchNorm buffer (running_mean, running_var, num_batches_tracked), float64 CPU."""
    return {k: v.detach().cpu().double().clone() if v.is_floating_point() else v.detach().cpu().clone()
            for k, v in model.state_dict().items() if "running_" in k or "num_batches_tracked" in k}


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def train(model, batches, snapshots=(), probe=None, lr: float = 8e-4, on_step=None) -> dict:
    """Train ``model`` one step per batch of ``batches`` (cast to the model's dtype and device).

    Returns ``{"losses": [...], "seconds": [...], "stats": [...], "snapshots": {step: {"params", "stats",
    "probe"}}}``: the BatchNorm buffers after every step (``"stats"``, when ``snapshots`` is given), and after
    each step number in ``snapshots`` (1-based) every parameter, the buffers and ``probe(model)`` (when given;
    say, eval features). ``on_step(step, loss, model)`` runs after each step.
    """
    reference = next(model.parameters())
    optimizer = optimizer_for(model, lr=lr)
    out = {"losses": [], "seconds": [], "stats": [], "snapshots": {}}
    model.train()
    for step, (images, labels) in enumerate(batches, start=1):
        images, labels = images.to(reference), labels.to(reference.device)
        synchronize(reference.device)
        start = time.perf_counter()
        loss = loss_fn(model, images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize(reference.device)
        out["seconds"].append(time.perf_counter() - start)
        out["losses"].append(float(loss.detach()))
        if snapshots:
            out["stats"].append(running_stats(model))
        if step in snapshots:
            out["snapshots"][step] = {"params": parameters_vector(model), "stats": out["stats"][-1],
                                      "probe": probe(model) if probe is not None else None}
        if on_step is not None:
            on_step(step, out["losses"][-1], model)
    return out


@torch.no_grad()
def features(model, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Eval-mode features (after the BNNeck) of ``images``, float64 on the CPU; the model's mode is restored."""
    reference = next(model.parameters())
    was_training = model.training
    model.eval()
    out = torch.cat([model(images[i:i + batch_size].to(reference)).double().cpu()
                     for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return out
