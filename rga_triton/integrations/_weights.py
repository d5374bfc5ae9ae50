"""ImageNet ResNet-50 weights for the adapters' ``pretrained`` switches (torchvision's, through torch.hub)."""
from __future__ import annotations

import os
import pickle

import torch.nn as nn

# torchvision's ResNet50_Weights.IMAGENET1K_V1: the file torchreid's and fast-reid's resnet50 start from.
IMAGENET_RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"


def load_imagenet_resnet50(backbone: nn.Module) -> None:
    """Load torchvision's ImageNet ResNet-50 into ``backbone``'s ResNet-50 part (the RGA blocks keep
    their initialisation). Downloads once into torch.hub's cache (``$TORCH_HOME/hub/checkpoints``),
    and reads the cached file after that, offline included, as tensors only (``weights_only=True``):
    whoever can write to that cache must not be able to run code here."""
    from torch.hub import get_dir, load_state_dict_from_url

    from ..models import load_backbone_weights

    try:
        state = load_state_dict_from_url(IMAGENET_RESNET50_URL, map_location="cpu", progress=False,
                                         weights_only=True)
    except pickle.UnpicklingError as err:
        cached = os.path.join(get_dir(), "checkpoints", os.path.basename(IMAGENET_RESNET50_URL))
        raise ValueError(f"the cached ImageNet ResNet-50 weights at {cached!r} hold objects other than tensors, "
                         f"which torchvision's file does not: the file was changed or damaged, and was not "
                         f"loaded. Delete it to download it again.\n{err}") from err
    load_backbone_weights(backbone, state)
