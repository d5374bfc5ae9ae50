"""rga_triton: exact, fast Relation-Aware Global Attention (Zhang et al., CVPR 2020) for PyTorch."""
from .module import RGA_Module, RGAModule

__all__ = ["RGAModule", "RGA_Module"]
__version__ = "0.1.0"
