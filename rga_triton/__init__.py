"""rga_triton: exact, fast Relation-Aware Global Attention (Zhang et al., CVPR 2020) for PyTorch."""
from . import testing
from .maps import affinity, relation_maps
from .module import RGA_Module, RGAModule

__all__ = ["RGAModule", "RGA_Module", "affinity", "relation_maps", "testing", "tune"]
__version__ = "0.1.0"


def tune(*args, **kwargs):
    """Autotune the Triton kernels on this GPU and write its configuration file; returns the path.

    See :func:`rga_triton.tuning.tune` for the arguments (imported on call, so that
    ``import rga_triton`` works where Triton is not installed).
    """
    from .tuning import tune as _tune
    return _tune(*args, **kwargs)

# Models and ecosystem (issue 7): RGA-Net, convert() for the authors' blocks, their checkpoints; the
# toolbox adapters' package (it imports no adapter, and so no toolbox).
from . import integrations, models  # noqa: E402
from .attach import attach  # noqa: E402  (issue 30: RGA after the stages of any CNN)
from .checkpoint import CheckpointReport, load_checkpoint  # noqa: E402
from .common.frozen import frozen  # noqa: E402  (derive once, serve many: docs/design.md)
from .convert import convert  # noqa: E402

__all__ += ["integrations", "models", "attach", "convert", "load_checkpoint", "CheckpointReport", "frozen"]

# The Triton path's custom operators (torch.ops.rga_triton.*): registered at import, so that exported and
# AOTInductor-compiled programs load wherever rga_triton is imported.
from .dispatch import register_ops  # noqa: E402

register_ops()
