"""fast-reid: importing this module registers the backbone ``build_rga_resnet_backbone``.

Name it in a config (``MODEL.BACKBONE.NAME: "build_rga_resnet_backbone"``) and fast-reid's meta
architectures (``Baseline`` and the others) get fast-reid's own ResNet, built by its
``build_resnet_backbone`` from the same config, with an RGA block after each of its four stages
(:func:`rga_triton.attach`): every ResNet fast-reid builds, with its keys, its pretrained weights and
its forward, returning its (B, C, H/16, W/16) map (H/32, W/32 at ``LAST_STRIDE: 2``); fast-reid's
heads add the pooling, the BNNeck and the classifier.

Read from the config:

- by fast-reid's ``build_resnet_backbone``, exactly as for ``build_resnet_backbone``:
  ``MODEL.BACKBONE.DEPTH`` (``18x``, ``34x``, ``50x``, ``101x`` in fast-reid 1.4.0), ``WITH_IBN``
  (ResNet-IBN-a), ``WITH_SE``, ``WITH_NL`` (non-local blocks), ``LAST_STRIDE``, ``NORM``,
  ``PRETRAIN`` / ``PRETRAIN_PATH`` (loaded by fast-reid before the blocks exist, so its files load
  without renaming; without a path it downloads its own ImageNet file for the depth, IBN and SE);
- ``MODEL.BACKBONE.NORM``: ``"BN"`` or ``"syncBN"`` (the RGA blocks' BatchNorms are converted to
  ``nn.SyncBatchNorm`` too, and synchronise their statistics on the torch path in multi-rank
  training); other norms raise (the blocks' normalisation is BatchNorm);
- ``INPUT.SIZE_TRAIN`` (H, W): the input size, which fixes the RGA blocks' ``in_spatial``;
  ``INPUT.SIZE_TEST`` must be the same;
- ``MODEL.BACKBONE.RGA`` (a node this module adds to fast-reid's defaults, so ``get_cfg()`` and
  YAML files know it): ``USE_SPATIAL``, ``USE_CHANNEL``, ``CHA_RATIO``, ``SPA_RATIO``,
  ``DOWN_RATIO``, ``ORDER``, ``BACKEND``, ``ALGORITHM`` (RGAModule's arguments, the paper's values
  by default). ``add_rga_config(cfg)`` adds it to a config made before this import.

Where a stage's output is: fast-reid's ResNet calls each stage's blocks one by one and puts its
non-local blocks after some of them, so stage k's output is that of ``layer{k}``'s last block, or of
the non-local block that follows it (``NL_2.1`` and ``NL_3.2`` for R50 with ``WITH_NL``):
:func:`stage_names`. The blocks are ``rga_att1`` .. ``rga_att4`` on the backbone; with DEPTH ``50x``
and no IBN/SE/NL the backbone's state_dict keys are RGA-Net's backbone keys.
"""
from __future__ import annotations

import torch.nn as nn
from fastreid.config import CfgNode
from fastreid.config import defaults as _defaults
from fastreid.modeling.backbones import BACKBONE_REGISTRY
from fastreid.modeling.backbones.resnet import build_resnet_backbone

from ..attach import attach, attached

__all__ = ["add_rga_config", "build_rga_resnet_backbone", "stage_names", "RGA_DEFAULTS"]

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


def stage_names(resnet: nn.Module) -> list[str]:
    """The submodules whose outputs are the four stages' outputs in fast-reid's ResNet ``resnet``:
    ``layer{k}.{last}``, or ``NL_{k}.{j}`` where a non-local block follows ``layer{k}``'s last block."""
    names = []
    for k in range(1, 5):
        last = len(getattr(resnet, f"layer{k}")) - 1
        nonlocal_after = [i for i in getattr(resnet, f"NL_{k}_idx", []) if i >= 0]   # fast-reid's forward puts -1
        names.append(f"NL_{k}.{len(nonlocal_after) - 1}" if nonlocal_after and nonlocal_after[-1] == last
                     else f"layer{k}.{last}")
    return names


@BACKBONE_REGISTRY.register()
def build_rga_resnet_backbone(cfg) -> nn.Module:
    """fast-reid's ResNet from ``cfg`` with an RGA block after each stage (the module docstring: the keys it reads)."""
    backbone_cfg = cfg.MODEL.BACKBONE
    norm = backbone_cfg.NORM
    if norm not in NORMS:
        raise ValueError(f"MODEL.BACKBONE.NORM must be one of {NORMS} for build_rga_resnet_backbone, got {norm!r}")
    height, width = _input_size(cfg)
    rga = _rga_settings(cfg)
    try:
        model = build_resnet_backbone(cfg)
    except KeyError as err:
        raise ValueError(f"MODEL.BACKBONE.DEPTH must be a depth fast-reid's build_resnet_backbone builds ('18x', "
                         f"'34x', '50x', '101x' in fast-reid 1.4.0), got {backbone_cfg.DEPTH!r}") from err
    attach(model, stage_names(model), (height, width), **rga)
    if norm == "syncBN":     # fast-reid's syncBN ResNet is nn.SyncBatchNorm already: convert the blocks only
        for name in attached(model).values():
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(model, name)))
    return model


add_rga_config(_defaults._C)     # fast-reid's get_cfg() clones this node
