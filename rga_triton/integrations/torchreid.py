"""torchreid (deep-person-reid): ``register()`` adds RGA-Net to its model factory.

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

from ..models import rga_net

__all__ = ["register", "VARIANTS", "models_module"]

VARIANTS = {
    "rga_net": dict(use_spatial=True, use_channel=True),
    "rga_net_s": dict(use_spatial=True, use_channel=False),
    "rga_net_c": dict(use_spatial=False, use_channel=True),
}
_FACTORY = "__model_factory"        # torchreid's module-level dict (build_model reads it)


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


def register(height: int = 256, width: int = 128, overwrite: bool = True, **rga) -> list[str]:
    """Add ``rga_net``, ``rga_net_s`` and ``rga_net_c`` to torchreid's ``build_model``; returns the names.

    ``height`` x ``width``: the input size (the data manager's; torchreid's default is 256 x 128).
    ``rga``: further :func:`rga_triton.models.rga_net` arguments (``cha_ratio``, ``spa_ratio``,
    ``down_ratio``, ``backend``, ``algorithm``, ``order``, ``last_stride``, ``neck_feat``), checked
    here by building nothing but validated on the first build. ``overwrite=False`` refuses to replace
    a model of the same name already in the factory.
    """
    for name in ("use_spatial", "use_channel", "loss", "num_classes", "pretrained_backbone"):
        if name in rga:
            raise TypeError(f"register() does not take {name}: the variant name picks the branches, "
                            f"build_model passes num_classes and loss, and pretrained=True loads ImageNet")
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    factory = vars(models_module())[_FACTORY]
    if not overwrite:
        taken = [name for name in VARIANTS if name in factory]
        if taken:
            raise ValueError(f"torchreid's model factory already has {taken} (pass overwrite=True to replace)")
    for variant in VARIANTS:
        factory[variant] = functools.partial(_build, variant, height, width, dict(rga))
    return list(VARIANTS)
