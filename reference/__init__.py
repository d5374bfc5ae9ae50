"""The oracle: the authors' RGA module, written out literally (materialised affinity).

Used by the tests (as the float64 ground truth) and by ``bench/sweep.py`` (as the
baseline). ``rga_triton`` never imports it.
"""
from .rga import RGA_Module

__all__ = ["RGA_Module"]
