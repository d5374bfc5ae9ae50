"""RGA-Net: ResNet-50 with an RGA block after each stage, BNNeck head, as the paper trains it.

The module tree and state_dict keys follow the authors' ``ResNet50_RGA_Model``
(``backbone.conv1`` .. ``backbone.layer4``, ``backbone.rga_att1`` .. ``backbone.rga_att4``,
``feat_bn``, ``cls``), so their trained checkpoints load with
:func:`rga_triton.load_checkpoint`; the ResNet-50 part of ``backbone`` has torchvision's
``resnet50`` keys, so ImageNet weights load with ``pretrained_backbone``.

Distributed training: wrap the model in ``DistributedDataParallel`` or FSDP2's ``fully_shard`` as
usual (``examples/train_distributed.py``, docs/distributed.md). As with ``nn.BatchNorm2d`` under
DDP, every BatchNorm, the RGA blocks' included, normalises with its own replica's batch.
``nn.SyncBatchNorm.convert_sync_batchnorm`` also swaps the RGA blocks' BatchNorm submodules, and
then the blocks synchronise too, on the Triton path as on the torch path: one all_gather per
BatchNorm group forward, one all_reduce backward (``ops/batchnorm/sync.py``).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn as nn

from ..attach import attach
from ..common.checks import one_of
from ..module import check_order
from .resnet import EXPANSION, WIDTHS, ResNet50, resnet50_keys, stage_sizes


class RGABackbone(ResNet50):
    """ResNet-50 (last stride 1 by default) with ``rga_att{k}`` = RGAModule after stage k.

    Built by :func:`rga_triton.attach` applied to :class:`ResNet50` after ``layer1`` .. ``layer4``: the
    blocks are the submodules ``rga_att1`` .. ``rga_att4`` (the authors' names and state_dict keys)
    and a forward hook on ``layer{k}`` sends its output through ``rga_att{k}``, so ``forward`` is
    ResNet-50's. Each block's ``in_spatial`` is the H*W of its stage's feature map for a ``height`` x
    ``width`` input (64*32, 32*16, 16*8, 16*8 at 256 x 128 with last stride 1), computed by
    :func:`~rga_triton.models.stage_sizes` (no measuring forward). ``backend``, ``algorithm`` and
    ``order`` go to every block.
    """

    def __init__(self, height: int = 256, width: int = 128, use_spatial: bool = True, use_channel: bool = True,
                 cha_ratio: int = 8, spa_ratio: int = 8, down_ratio: int = 8, last_stride: int = 1,
                 backend: str = "auto", algorithm: str = "auto", order: str = "sc"):
        super().__init__(last_stride=last_stride)
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_order(order)     # here, not per block: the per-block error blames the input size
        self.height, self.width = height, width
        stages = [f"layer{k}" for k in range(1, 5)]
        shapes = {stage: (c * EXPANSION, h, w)
                  for stage, (h, w), c in zip(stages, stage_sizes(height, width, last_stride), WIDTHS)}
        attach(self, stages, (height, width), stage_shapes=shapes, use_spatial=use_spatial, use_channel=use_channel,
               cha_ratio=cha_ratio, spa_ratio=spa_ratio, down_ratio=down_ratio, backend=backend,
               algorithm=algorithm, order=order)

    def stage_inputs(self, x: torch.Tensor, stages=(1, 2, 3, 4)) -> dict[int, torch.Tensor]:
        """{k: the feature map that enters rga_att{k}} for the requested stages (for relation maps)."""
        wanted, out = set(stages), {}
        x = self.stem(x)
        for k in range(1, max(wanted) + 1):
            x = getattr(self, f"layer{k}").forward(x)       # the stage alone: .forward skips its hook
            if k in wanted:
                out[k] = x
            if k < max(wanted):
                x = getattr(self, f"rga_att{k}")(x)
        return out


LOSSES = ("softmax", "triplet")
NECK_FEATS = ("after", "before")


def check_loss(loss) -> str:
    """``loss`` as torchreid names it: what train mode returns (see :class:`RGANet`)."""
    return one_of("loss", loss, LOSSES)


def check_neck_feat(neck_feat) -> str:
    """``neck_feat`` as fast-reid names it: the eval feature from after or before the BNNeck."""
    return one_of("neck_feat", neck_feat, NECK_FEATS)


class RGANet(nn.Module):
    """RGA-Net (Zhang et al., CVPR 2020) for re-identification.

    backbone (ResNet-50 + four RGA blocks) -> global average pooling -> ``feat_bn``
    (BatchNorm1d neck, bias frozen: BNNeck) -> ``cls`` (linear, no bias).

    What ``forward`` returns follows torchreid's convention (its ``models/resnet.py``):

    - train mode, ``loss="triplet"`` (the default, as before): ``(logits, features)`` with
      ``features`` the pooled feature *before* the neck, which the authors' and BNNeck's triplet
      loss takes (the logits feed the cross-entropy);
    - train mode, ``loss="softmax"``: the logits alone (torchreid's softmax engine would
      otherwise average its cross-entropy over every element of a tuple);
    - eval mode, either loss: the (B, 2048) feature that re-ID retrieval compares, after the
      BNNeck (``neck_feat="after"``, the default, the authors' choice) or before it
      (``neck_feat="before"``: the pooled feature);
    - ``forward(x, return_featuremaps=True)``: the backbone's (B, 2048, H/16, W/16) map, in either
      mode (what torchreid's ``visualize_actmap.py`` asks for).
    """

    num_features = 2048

    def __init__(self, num_classes: int, height: int = 256, width: int = 128, use_spatial: bool = True,
                 use_channel: bool = True, cha_ratio: int = 8, spa_ratio: int = 8, down_ratio: int = 8,
                 last_stride: int = 1, backend: str = "auto", algorithm: str = "auto", order: str = "sc",
                 loss: str = "triplet", neck_feat: str = "after"):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.loss, self.neck_feat = check_loss(loss), check_neck_feat(neck_feat)
        self.backbone = RGABackbone(height, width, use_spatial, use_channel, cha_ratio, spa_ratio, down_ratio,
                                    last_stride, backend, algorithm, order)
        self.feat_bn = nn.BatchNorm1d(self.num_features)
        self.feat_bn.bias.requires_grad_(False)
        self.cls = nn.Linear(self.num_features, num_classes, bias=False)
        nn.init.normal_(self.cls.weight, std=0.001)   # the authors' classifier initialisation

    @property
    def height(self) -> int:
        return self.backbone.height

    @property
    def width(self) -> int:
        return self.backbone.width

    def resized(self, height: int, width: int, mode: str = "bilinear") -> RGANet:
        """A copy of this model for ``height`` x ``width`` images: each RGA block's position-indexed
        weights resampled from its stage's map size to the new one (``RGAModule.resized``), all
        else copied. An approximation of the model trained at that size, to run and fine-tune there."""
        from ..resize import resized_model
        return resized_model(self, height, width, mode)

    def forward(self, x: torch.Tensor, return_featuremaps: bool = False):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (3, self.height, self.width):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be (B, 3, height={self.height}, width={self.width}) images, got {shape}; the "
                             f"RGA blocks' in_spatial is fixed by the input size: build the model with "
                             f"rga_net(..., height=, width=) for another size, or model.resized(height, width)")
        if not isinstance(return_featuremaps, bool):
            raise TypeError(f"return_featuremaps must be a bool, got {type(return_featuremaps).__name__}")
        maps = self.backbone(x)
        if return_featuremaps:
            return maps
        pooled = maps.mean(dim=(2, 3))
        features = self.feat_bn(pooled)
        if not self.training:
            return features if check_neck_feat(self.neck_feat) == "after" else pooled
        logits = self.cls(features)
        if check_loss(self.loss) == "softmax":
            return logits
        return logits, pooled


def load_backbone_weights(backbone: nn.Module, weights, map_location="cpu") -> None:
    """Load torchvision ``resnet50`` weights (a path or a state_dict) into ``backbone``'s ResNet-50 part.

    Strict on the ResNet-50 keys: every conv/BatchNorm tensor must be there with its shape (the
    ImageNet classifier ``fc.*`` is ignored; ``num_batches_tracked`` missing from old files is
    set to 0); the RGA blocks keep their initialisation. ``module.`` prefixes are stripped.
    """
    from ..checkpoint import find_state_dict, match_state_dict

    if isinstance(weights, (str, os.PathLike)):
        if not os.path.isfile(weights):
            hub = os.path.join(torch.hub.get_dir(), "checkpoints")
            raise FileNotFoundError(
                f"pretrained_backbone: no file {os.fspath(weights)!r}. It takes torchvision's ImageNet resnet50 "
                f"weights: resnet50-19c8e357.pth, the file the authors used, is at "
                f"https://download.pytorch.org/models/resnet50-19c8e357.pth; torchvision.models.resnet50("
                f"weights='IMAGENET1K_V1') downloads its own copy into the torch.hub cache, {hub}. Pass that file's "
                f"path (or pretrained_backbone=torchvision.models.resnet50(weights=...).state_dict())")
        weights = torch.load(weights, map_location=map_location, weights_only=True)
    if not isinstance(weights, Mapping):
        raise TypeError(f"pretrained_backbone must be a path or a state_dict, got {type(weights).__name__}")
    state, _ = find_state_dict(weights)
    resnet = set(resnet50_keys(backbone))
    loadable, report = match_state_dict(backbone, state, ignore_unexpected=("fc.",))
    report.missing_keys = [k for k in report.missing_keys if k in resnet]
    if not report.ok:
        raise RuntimeError("pretrained_backbone does not hold torchvision resnet50 weights for this backbone:\n  "
                           + "\n  ".join(report.problems()))
    backbone.load_state_dict(loadable, strict=False)


def rga_net(num_classes: int, height: int = 256, width: int = 128, use_spatial: bool = True,
            use_channel: bool = True, cha_ratio: int = 8, spa_ratio: int = 8, down_ratio: int = 8,
            backend: str = "auto", pretrained_backbone=None, last_stride: int = 1,
            algorithm: str = "auto", order: str = "sc", loss: str = "triplet", neck_feat: str = "after") -> RGANet:
    """Build RGA-Net (RGA-SC by default; RGA-S / RGA-C with ``use_channel`` / ``use_spatial`` off).

    ``height`` x ``width`` is the input size (256 x 128 in the paper); the RGA blocks'
    ``in_spatial`` follows from it. ``backend`` / ``algorithm`` / ``order`` go to every RGAModule;
    ``order`` composes the two branches of each block: ``"sc"`` (the authors' and the paper's
    RGA-Net: spatial gate, then channel gate), ``"cs"`` or ``"parallel"`` (Table 1's variants).
    ``pretrained_backbone``: a path or state_dict of torchvision ``resnet50`` ImageNet weights,
    loaded strictly into the ResNet-50 part (``fc`` ignored). To load a trained RGA-Net
    checkpoint (the authors' files included) use :func:`rga_triton.load_checkpoint`.
    ``loss`` (torchreid's values): train mode returns ``(logits, pre-neck features)`` for
    ``"triplet"`` (the default), the logits alone for ``"softmax"``. ``neck_feat``: eval mode
    returns the feature after the BNNeck (``"after"``, the default) or before it (``"before"``).
    """
    model = RGANet(num_classes, height, width, use_spatial, use_channel, cha_ratio, spa_ratio, down_ratio,
                   last_stride, backend, algorithm, order, loss=loss, neck_feat=neck_feat)
    if pretrained_backbone is not None:
        load_backbone_weights(model.backbone, pretrained_backbone)
    return model
