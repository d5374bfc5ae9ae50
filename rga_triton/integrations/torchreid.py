"""torchreid (deep-person-reid): ``register()`` adds RGA-Net and RGA versions of torchreid's own models.

**torchreid's models with RGA.** ``register()`` also adds ``rga_<name>`` for every model of
torchreid's ResNet family and OSNet that its factory has (:data:`FAMILY`: ``rga_resnet50``,
``rga_resnet50_fc512``, ``rga_resnet101``, ``rga_resnext50_32x4d``, ``rga_se_resnet50``,
``rga_resnet50_ibn_a``, ``rga_resnet50_ibn_b``, ``rga_osnet_x1_0``, ``rga_osnet_ain_x1_0``, ...): the
model torchreid builds itself (its ``pretrained=True`` ImageNet weights included, loaded before the
blocks exist) with an RGA block after each stage by :func:`rga_triton.attach` (``layer1`` ..
``layer4`` for the ResNets, ``conv2`` .. ``conv4`` for OSNet: :func:`stages_of`). Every torchreid
convention is the model's own, as its forward is: eval features, softmax logits, ``(logits,
features)`` for triplet, ``featuremaps(x)`` and OSNet's ``return_featuremaps`` (the maps then include
the blocks).

**RGA-Net.**

After ``register()``, ``torchreid.models.build_model("rga_net", num_classes, loss="softmax")``
builds :func:`rga_triton.models.rga_net` with torchreid's conventions: eval mode returns the
(B, 2048) feature after the BNNeck; train mode returns the logits for ``loss="softmax"`` (so
``ImageSoftmaxEngine`` takes the cross-entropy of the logits alone) and ``(logits, features)``,
the features before the BNNeck, for ``loss="triplet"`` (``ImageTripletEngine``);
``model(x, return_featuremaps=True)`` returns the (B, 2048, H/16, W/16) map
(``tools/visualize_actmap.py``).

Names: ``rga_net`` (RGA-SC, the paper's), ``rga_net_s`` (spatial only), ``rga_net_c`` (channel
only). ``build_model``'s ``pretrained=True`` (its default) loads torchvision's ImageNet
ResNet-50 into the backbone, downloaded once into torch.hub's cache, as torchreid's own
``resnet50`` does; ``use_gpu`` is ignored (move the model yourself, as torchreid's scripts do).

torchreid's factory passes only ``num_classes``, ``loss``, ``pretrained`` and ``use_gpu``: the
input size and the RGA settings are given to ``register(height=, width=, **rga)`` and hold for
every model it builds afterwards (``height`` x ``width`` must be the data manager's).
Both layouts are handled: PyPI's ``torchreid`` (0.2.x: ``torchreid.reid.models``) and
deep-person-reid's own (``torchreid.models``).
"""
from __future__ import annotations

import functools
import importlib

from ..attach import attach
from ..models import rga_net

__all__ = ["register", "VARIANTS", "FAMILY", "models_module", "stages_of"]

VARIANTS = {
    "rga_net": dict(use_spatial=True, use_channel=True),
    "rga_net_s": dict(use_spatial=True, use_channel=False),
    "rga_net_c": dict(use_spatial=False, use_channel=True),
}
_FACTORY = "__model_factory"        # torchreid's module-level dict (build_model reads it)
FAMILY = ("resnet", "resnext", "se_resnet", "se_resnext", "osnet")
"""Prefixes of the torchreid model names that get an ``rga_`` version: its ResNet family and OSNet."""


def models_module():
    """torchreid's models module: ``torchreid.reid.models`` (PyPI) or ``torchreid.models`` (deep-person-reid)."""
    for name in ("torchreid.reid.models", "torchreid.models"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if isinstance(vars(module).get(_FACTORY), dict):
            return module
    raise ImportError("rga_triton.integrations.torchreid needs torchreid (pip install torchreid, or "
                      "deep-person-reid from source): neither torchreid.reid.models nor torchreid.models "
                      "has a model factory")


def _build(variant: str, height: int, width: int, rga: dict, num_classes, loss="softmax", pretrained=True,
           use_gpu=True, **unexpected):
    if unexpected:
        raise TypeError(f"{variant}: unexpected argument(s) {sorted(unexpected)} (torchreid's build_model "
                        f"passes num_classes, loss, pretrained, use_gpu; give the rest to register())")
    if loss not in ("softmax", "triplet"):
        raise ValueError(f"loss must be 'softmax' or 'triplet' for {variant}, got {loss!r}")
    model = rga_net(num_classes, height=height, width=width, loss=loss, **dict(rga, **VARIANTS[variant]))
    if pretrained:
        from ._weights import load_imagenet_resnet50
        load_imagenet_resnet50(model.backbone)
    return model


def stages_of(model) -> list[str]:
    """The stages a torchreid model gets RGA after: ``layer1`` .. ``layer4`` (ResNets, ResNeXts, SE-ResNets,
    IBN), ``conv2`` .. ``conv4`` (OSNet's three OS stages)."""
    for names in ([f"layer{k}" for k in range(1, 5)], [f"conv{k}" for k in range(2, 5)]):
        if all(hasattr(model, name) for name in names):
            return names
    raise ValueError(f"{type(model).__name__} has neither layer1..layer4 nor conv2..conv4: not a torchreid "
                     f"ResNet or OSNet; use rga_triton.attach(model, after=[...], input_size=...) with its stages")


def _build_attached(name: str, height: int, width: int, rga: dict, num_classes, loss="softmax", pretrained=True,
                    use_gpu=True, **kwargs):
    model = _TORCHREID_BUILDERS[name](num_classes=num_classes, loss=loss, pretrained=pretrained, use_gpu=use_gpu,
                                      **kwargs)
    return attach(model, stages_of(model), (height, width), **rga)


_TORCHREID_BUILDERS: dict = {}       # torchreid's own builders, by name, as register() found them


def register(height: int = 256, width: int = 128, overwrite: bool = True, **rga) -> list[str]:
    """Add ``rga_net``, ``rga_net_s``, ``rga_net_c`` and ``rga_<name>`` for torchreid's ResNet family and OSNet
    (:data:`FAMILY`) to torchreid's ``build_model``; returns the names.

    ``height`` x ``width``: the input size (the data manager's; torchreid's default is 256 x 128).
    ``rga``: further :func:`rga_triton.models.rga_net` arguments (``cha_ratio``, ``spa_ratio``,
    ``down_ratio``, ``backend``, ``algorithm``, ``order``, ``last_stride``, ``neck_feat``), checked
    here by building nothing but validated on the first build; the ``rga_<name>`` models take the
    RGAModule ones (all but ``last_stride`` and ``neck_feat``: torchreid's model has its own).
    ``overwrite=False`` refuses to replace a model of the same name already in the factory.
    """
    for name in ("use_spatial", "use_channel", "loss", "num_classes", "pretrained_backbone"):
        if name in rga:
            raise TypeError(f"register() does not take {name}: the variant name picks the branches, "
                            f"build_model passes num_classes and loss, and pretrained=True loads ImageNet")
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    factory = vars(models_module())[_FACTORY]
    family = sorted(name for name in factory if name.startswith(FAMILY))
    names = list(VARIANTS) + [f"rga_{name}" for name in family]
    if not overwrite:
        taken = [name for name in names if name in factory]
        if taken:
            raise ValueError(f"torchreid's model factory already has {taken} (pass overwrite=True to replace)")
    for variant in VARIANTS:
        factory[variant] = functools.partial(_build, variant, height, width, dict(rga))
    attach_rga = {k: v for k, v in rga.items() if k not in ("last_stride", "neck_feat")}   # rga_net's only
    for name in family:
        _TORCHREID_BUILDERS[name] = factory[name]
        factory[f"rga_{name}"] = functools.partial(_build_attached, name, height, width, attach_rga)
    return names
