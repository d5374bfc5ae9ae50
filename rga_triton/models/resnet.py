"""ResNet-50 written out with torchvision's module names, so its state_dict keys are torchvision's.

``ResNet50().state_dict()`` has exactly the keys and shapes of ``torchvision.models.resnet50()``
without the ImageNet classifier (``fc.weight``, ``fc.bias``): ``conv1``, ``bn1``, ``layer1`` ..
``layer4`` made of torchvision's ``Bottleneck`` (v1.5: the stride sits on the 3x3 conv), with
``N.downsample.0`` (1x1 conv) and ``N.downsample.1`` (BatchNorm) on each stage's first block.
ImageNet weights saved from torchvision therefore load with
:func:`rga_triton.models.load_backbone_weights` (or ``rga_net(..., pretrained_backbone=path)``);
no torchvision import is needed.
"""
from __future__ import annotations

import torch
import torch.nn as nn

LAYERS = (3, 4, 6, 3)          # ResNet-50's blocks per stage
WIDTHS = (64, 128, 256, 512)   # bottleneck widths; outputs are 4x these
EXPANSION = 4


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1x1 -> 3x3 (stride) -> 1x1 (x4 channels), residual, ReLU."""

    expansion = EXPANSION

    def __init__(self, in_channels: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * EXPANSION, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def stage_sizes(height: int, width: int, last_stride: int = 1) -> list[tuple[int, int]]:
    """(H, W) of the feature map after each of the four stages for an input of height x width.

    Follows the conv arithmetic exactly, so it is (H/4, W/4), (H/8, W/8), (H/16, W/16), and
    (H/16, W/16) with last stride 1 (H/32, W/32 with 2) whenever 32 divides H and W.
    """
    h = _conv_out(_conv_out(height, 7, 2, 3), 3, 2, 1)     # conv1, maxpool
    w = _conv_out(_conv_out(width, 7, 2, 3), 3, 2, 1)
    sizes = [(h, w)]
    for stride in (2, 2, last_stride):
        h, w = _conv_out(h, 3, stride, 1), _conv_out(w, 3, stride, 1)
        sizes.append((h, w))
    return sizes


class ResNet50(nn.Module):
    """ResNet-50 without its classifier: conv1, bn1, relu, maxpool, layer1 .. layer4.

    ``last_stride=1`` (re-ID practice, as in RGA-Net) keeps layer4 at 1/16 of the input;
    ``last_stride=2`` is torchvision's network. Initialised as torchvision initialises it.
    ``forward`` returns the layer4 feature map (B, 2048, H/16, W/16 with last stride 1).
    """

    def __init__(self, last_stride: int = 1):
        super().__init__()
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride!r}")
        self.last_stride = last_stride
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = 64
        for index, (blocks, width, stride) in enumerate(zip(LAYERS, WIDTHS, (1, 2, 2, last_stride)), start=1):
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, width * EXPANSION, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(width * EXPANSION),
            )
            layer = [Bottleneck(in_channels, width, stride, downsample)]
            in_channels = width * EXPANSION
            layer += [Bottleneck(in_channels, width) for _ in range(1, blocks)]
            setattr(self, f"layer{index}", nn.Sequential(*layer))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's initialisation: Kaiming-normal (fan_out) convs, BatchNorm weight 1, bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x)
        return x


def resnet50_keys(module: nn.Module) -> list[str]:
    """The state_dict keys of ``module`` that belong to ResNet-50 (conv1, bn1, layer1..4)."""
    heads = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")
    return [k for k in module.state_dict() if k.startswith(heads)]
