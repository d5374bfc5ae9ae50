"""timm: :func:`create_model` puts RGA on any timm CNN; importing this module registers ``rga_resnet50``.

**Any timm CNN.** ``rga_triton.integrations.timm.create_model("convnext_tiny", input_size=(256, 128),
rga=dict(spa_ratio=8), num_classes=751)`` builds the model with ``timm.create_model`` (every timm
keyword passes through, ``pretrained=True`` included: timm loads its weights before the blocks
exist) and attaches an RGA block after each stage its ``feature_info`` lists at a reduction of 4 or
more (:func:`stages_of`: ``layer1`` .. ``layer4`` for ResNets and ResNeSts, ``s1`` .. ``s4`` for
RegNets, ``stages.0`` .. ``stages.3`` for ConvNeXts; the stride-2 stem is left out: at 256 x 128
its 128 x 64 map would be a 8192-position block). The model keeps timm's API
(``forward_features`` returns the last stage's map through its block) and its keys, plus
``rga_att1`` ...; ``input_size`` is fixed by the blocks, and ``pretrained_cfg["input_size"]`` says
it. timm models without ``feature_info`` raise.

**RGA-Net as a timm model.**

``timm.create_model("rga_resnet50", num_classes=751, height=256, width=128)`` builds RGA-Net
(ResNet-50, last stride 1, an RGA-SC block after each stage, BNNeck) with timm's model API:

- ``forward_features(x)``: the (B, 2048, H/16, W/16) map;
- ``forward_head(maps, pre_logits=False)``: average pooling, the BNNeck, the classifier;
  ``pre_logits=True`` stops before the classifier and returns the (B, 2048) re-ID feature;
- ``forward(x)``: logits in train and eval mode (timm's convention; ``rga_triton.models.rga_net``
  is the re-ID convention: features in eval);
- ``reset_classifier(num_classes)`` (0: no classifier, ``forward`` returns the features),
  ``get_classifier()``, ``num_features`` and ``num_classes``;
- ``pretrained_cfg`` whose ``input_size`` is (3, height, width): the RGA blocks' ``in_spatial``
  is fixed by it, so timm's data config (``resolve_data_config``) gives images of that size.

State-dict keys are RGA-Net's (``backbone.*``, ``feat_bn.*``, ``cls.*``), so
``rga_triton.load_checkpoint`` and the authors' files work. No RGA-Net weights are published:
``pretrained=True`` loads torchvision's ImageNet ResNet-50 into the backbone
(``pretrained_backbone=path`` loads a local file of the same keys).
The RGA keyword arguments of ``rga_triton.models.rga_net`` (``use_spatial``, ``cha_ratio``,
``backend``, ``order``, ...) pass through ``create_model``.
"""
from __future__ import annotations

import timm
import torch
import torch.nn as nn
from timm.models import register_model

from ..attach import attach
from ..models import RGANet, load_backbone_weights, stage_sizes

__all__ = ["RGAResNet50", "rga_resnet50", "create_model", "stages_of"]

# Old-style default cfgs: timm's register_model reads the module's ``default_cfgs`` for the entry point's name.
default_cfgs = {
    "rga_resnet50": dict(
        url="", num_classes=1000, input_size=(3, 256, 128), pool_size=(16, 8), crop_pct=1.0,
        interpolation="bilinear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv="backbone.conv1", classifier="cls", license="mit"),
}


class RGAResNet50(RGANet):
    """RGA-Net with timm's model API (see the module docstring)."""

    def __init__(self, num_classes: int = 1000, height: int = 256, width: int = 128, **rga):
        _check_num_classes(num_classes)
        super().__init__(max(num_classes, 1), height, width, **rga)
        self.head_hidden_size = self.num_features
        self.global_pool = "avg"
        self.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's (B, 2048, H/16, W/16) map (H/32, W/32 at last_stride=2)."""
        return super().forward(x, return_featuremaps=True)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average pooling -> BNNeck -> classifier; the (B, 2048) feature with ``pre_logits=True``."""
        features = self.feat_bn(x.mean(dim=(2, 3)))
        return features if pre_logits else self.cls(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.cls

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none). Only average pooling is offered."""
        _check_num_classes(num_classes)
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool must be None or 'avg' (RGA-Net averages), got {global_pool!r}")
        self.num_classes = num_classes
        if num_classes:
            self.cls = nn.Linear(self.num_features, num_classes, bias=False)
            nn.init.normal_(self.cls.weight, std=0.001)
        else:
            self.cls = nn.Identity()


def _check_num_classes(num_classes) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0: no classifier), got {num_classes!r}")


def _pretrained_cfg(pretrained_cfg, overlay, height: int, width: int, last_stride: int) -> dict:
    if pretrained_cfg is None or isinstance(pretrained_cfg, str):
        cfg = dict(default_cfgs["rga_resnet50"], architecture="rga_resnet50")
    elif isinstance(pretrained_cfg, dict):
        cfg = dict(pretrained_cfg)
    elif hasattr(pretrained_cfg, "to_dict"):
        cfg = pretrained_cfg.to_dict()
    else:
        raise TypeError(f"pretrained_cfg must be None, a str, a dict or a timm PretrainedCfg, "
                        f"got {type(pretrained_cfg).__name__}")
    cfg.update(overlay or {})
    cfg.update(input_size=(3, height, width), pool_size=tuple(stage_sizes(height, width, last_stride)[-1]))
    return cfg


@register_model
def rga_resnet50(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None,
                 num_classes: int = 1000, in_chans: int = 3, height: int = 256, width: int = 128,
                 pretrained_backbone=None, **rga) -> RGAResNet50:
    """RGA-Net (RGA-SC, ResNet-50) for ``timm.create_model``; ``height`` x ``width`` is the input size."""
    if in_chans != 3:
        raise ValueError(f"in_chans must be 3 (RGA-Net's ResNet-50 stem takes RGB images), got {in_chans!r}")
    if pretrained and pretrained_backbone is not None:
        raise ValueError("pass pretrained=True (torchvision's ImageNet ResNet-50) or pretrained_backbone=, not both")
    model = RGAResNet50(num_classes, height, width, **rga)
    model.pretrained_cfg = model.default_cfg = _pretrained_cfg(
        pretrained_cfg, pretrained_cfg_overlay, height, width, model.backbone.layer4[0].conv2.stride[0])
    if pretrained:
        from ._weights import load_imagenet_resnet50
        load_imagenet_resnet50(model.backbone)
    elif pretrained_backbone is not None:
        load_backbone_weights(model.backbone, pretrained_backbone)
    return model


MIN_REDUCTION = 4       # feature_info entries from here on are stages; the stride-2 stem is not


def stages_of(model: nn.Module) -> list[str]:
    """The modules ``model.feature_info`` lists at a reduction of 4 or more: its stages, in order."""
    info = getattr(model, "feature_info", None)
    if info is None:
        raise ValueError(f"{type(model).__name__} has no feature_info: name its stages with "
                         f"rga_triton.attach(model, after=[...], input_size=...)")
    entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    stages = [entry["module"] for entry in entries if entry.get("reduction", 0) >= MIN_REDUCTION]
    if not stages:
        raise ValueError(f"{type(model).__name__}'s feature_info lists no stage at a reduction >= {MIN_REDUCTION}")
    return stages


def create_model(model_name: str, input_size=(256, 128), rga: dict | None = None, **timm_kwargs) -> nn.Module:
    """``timm.create_model(model_name, **timm_kwargs)`` with an RGA block after each stage (module docstring).

    ``input_size``: ``(H, W)`` the model will run at (it fixes the blocks' ``in_spatial``); ``rga``:
    :func:`rga_triton.attach`'s block arguments (``spa_ratio``, ``backend``, ... and per-stage dicts
    are not taken here: call ``attach`` for those).
    """
    model = timm.create_model(model_name, **timm_kwargs)
    height, width = tuple(input_size)[-2:]
    attach(model, stages_of(model), (height, width), **(rga or {}))
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict):
        model.pretrained_cfg = dict(cfg, input_size=(3, height, width))
    return model
