"""rga_triton: exact, fast Relation-Aware Global Attention (Zhang et al., CVPR 2020) for PyTorch."""
from .maps import affinity, relation_maps
from .module import RGA_Module, RGAModule

__all__ = ["RGAModule", "RGA_Module", "affinity", "relation_maps"]
__version__ = "0.1.0"
