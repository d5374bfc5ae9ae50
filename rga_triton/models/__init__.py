"""Models built on RGAModule: RGA-Net (ResNet-50 + RGA-SC) and its torchvision-compatible ResNet-50."""
from .resnet import Bottleneck, ResNet50, stage_sizes
from .rga_net import RGABackbone, RGANet, load_backbone_weights, rga_net

__all__ = ["rga_net", "RGANet", "RGABackbone", "ResNet50", "Bottleneck", "stage_sizes", "load_backbone_weights"]
