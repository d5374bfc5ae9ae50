"""A missing pretrained_backbone file says where torchvision's ImageNet weights come from."""
from __future__ import annotations

import pytest
import torch

from rga_triton.models import load_backbone_weights


def test_missing_backbone_file_says_where_the_weights_come_from(tmp_path):
    missing = tmp_path / "resnet50-19c8e357.pth"
    with pytest.raises(FileNotFoundError) as info:
        load_backbone_weights(torch.nn.Module(), str(missing))
    text = str(info.value)
    assert str(missing) in text and "download.pytorch.org/models/resnet50-19c8e357.pth" in text
    assert torch.hub.get_dir() in text and "IMAGENET1K_V1" in text
