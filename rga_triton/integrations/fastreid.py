"""fast-reid: importing this module registers the backbone ``build_rga_resnet_backbone``.

Name it in a config (``MODEL.BACKBONE.NAME: "build_rga_resnet_backbone"``) and fast-reid's meta
architectures (``Baseline`` and the others) get RGA-Net's backbone: a ResNet-50 with an RGA block
after each stage, returning fast-reid's (B, 2048, H/16, W/16) map (H/32, W/32 at
``LAST_STRIDE: 2``); fast-reid's heads add the pooling, the BNNeck and the classifier.

Read from the config:

- ``INPUT.SIZE_TRAIN`` (H, W): the input size, which fixes the RGA blocks' ``in_spatial``;
  ``INPUT.SIZE_TEST`` must be the same;
- ``MODEL.BACKBONE.LAST_STRIDE``; ``MODEL.BACKBONE.NORM``: ``"BN"`` (BatchNorm2d) or ``"syncBN"``
  (every BatchNorm, the RGA blocks' included, converted to ``nn.SyncBatchNorm``: the blocks then
  synchronise their statistics on the torch path in multi-rank training); other norms raise;
- ``MODEL.BACKBONE.PRETRAIN`` / ``PRETRAIN_PATH``: torchvision-keyed ResNet-50 weights loaded
  strictly into the ResNet-50 part (fast-reid's ``resnet50`` files have these keys); without a
  path, torchvision's ImageNet file through torch.hub's cache;
- ``MODEL.BACKBONE.RGA`` (a node this module adds to fast-reid's defaults, so ``get_cfg()`` and
  YAML files know it): ``USE_SPATIAL``, ``USE_CHANNEL``, ``CHA_RATIO``, ``SPA_RATIO``,
  ``DOWN_RATIO``, ``ORDER``, ``BACKEND``, ``ALGORITHM`` (RGAModule's arguments, the paper's values
  by default). ``add_rga_config(cfg)`` adds it to a config made before this import.
"""
from __future__ import annotations

import torch.nn as nn
from fastreid.config import CfgNode
from fastreid.config import defaults as _defaults
from fastreid.modeling.backbones import BACKBONE_REGISTRY

from ..models import RGABackbone, load_backbone_weights

__all__ = ["add_rga_config", "build_rga_resnet_backbone", "RGA_DEFAULTS"]

RGA_DEFAULTS = dict(USE_SPATIAL=True, USE_CHANNEL=True, CHA_RATIO=8, SPA_RATIO=8, DOWN_RATIO=8, ORDER="sc",
                    BACKEND="auto", ALGORITHM="auto")
NORMS = ("BN", "syncBN")


def add_rga_config(cfg) -> None:
    """Add ``MODEL.BACKBONE.RGA`` with its defaults to ``cfg`` (kept where it is already there)."""
    if "RGA" not in cfg.MODEL.BACKBONE:
        frozen = cfg.is_frozen()
        cfg.defrost()
        cfg.MODEL.BACKBONE.RGA = CfgNode(dict(RGA_DEFAULTS))
        if frozen:
            cfg.freeze()


def _rga_settings(cfg) -> dict:
    node = dict(RGA_DEFAULTS, **dict(cfg.MODEL.BACKBONE.get("RGA", {})))
    unknown = sorted(set(node) - set(RGA_DEFAULTS))
    if unknown:
        raise ValueError(f"MODEL.BACKBONE.RGA has unknown keys {unknown}; known: {sorted(RGA_DEFAULTS)}")
    return dict(use_spatial=node["USE_SPATIAL"], use_channel=node["USE_CHANNEL"], cha_ratio=node["CHA_RATIO"],
                spa_ratio=node["SPA_RATIO"], down_ratio=node["DOWN_RATIO"], order=node["ORDER"],
                backend=node["BACKEND"], algorithm=node["ALGORITHM"])


def _input_size(cfg) -> tuple[int, int]:
    train, test = tuple(cfg.INPUT.SIZE_TRAIN), tuple(cfg.INPUT.SIZE_TEST)
    if len(train) != 2:
        raise ValueError(f"INPUT.SIZE_TRAIN must be [height, width], got {list(train)}")
    if test != train:
        raise ValueError(f"INPUT.SIZE_TEST must equal INPUT.SIZE_TRAIN for build_rga_resnet_backbone (the RGA "
                         f"blocks' in_spatial is fixed by the input size), got {list(test)} and {list(train)}")
    return train


@BACKBONE_REGISTRY.register()
def build_rga_resnet_backbone(cfg) -> nn.Module:
    """RGA-Net's backbone for fast-reid (see the module docstring for the config keys it reads)."""
    backbone_cfg = cfg.MODEL.BACKBONE
    norm = backbone_cfg.NORM
    if norm not in NORMS:
        raise ValueError(f"MODEL.BACKBONE.NORM must be one of {NORMS} for build_rga_resnet_backbone, got {norm!r}")
    if backbone_cfg.DEPTH not in ("50x", 50, "50"):
        raise ValueError(f"MODEL.BACKBONE.DEPTH must be '50x' (RGA-Net is a ResNet-50), got {backbone_cfg.DEPTH!r}")
    height, width = _input_size(cfg)
    model = RGABackbone(height, width, last_stride=backbone_cfg.LAST_STRIDE, **_rga_settings(cfg))
    if backbone_cfg.PRETRAIN:
        if backbone_cfg.PRETRAIN_PATH:
            load_backbone_weights(model, backbone_cfg.PRETRAIN_PATH)
        else:
            from ._weights import load_imagenet_resnet50
            load_imagenet_resnet50(model)
    if norm == "syncBN":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


add_rga_config(_defaults._C)     # fast-reid's get_cfg() clones this node
