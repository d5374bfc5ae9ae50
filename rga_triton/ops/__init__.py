"""The Triton path's steps, one folder each: the math (README.md), the kernels and their launchers,
the custom ops with fakes and autograd formulas, and the PyTorch formula where one exists.

- ``projection/``: x -> theta, phi (BatchNorm + ReLU) and gx's channel mean, one read of x.
- ``relation/``: A or tiled Z -> BatchNorm -> attention network -> the gate's logit.
- ``gating/``: out = x * spatial gate * channel gate.
- ``batchnorm/``: train-mode statistics, their finalisation, and what a kernel normalises with.
- ``affinity/``: G = theta^T phi itself, for relation maps.
- ``registry.py``: how a step becomes a ``torch.ops.rga_triton`` op and its eager twin.

Every step folder uses the same file for the same role: ``kernels.py`` (forward kernels and their
launchers), ``backward_kernels.py`` (backward kernels and launchers), ``op.py`` (custom ops, fakes,
autograd), ``pytorch.py`` (the PyTorch formula the kernels are tested against). A folder without
one of them says why in its README.md.

Importing this package imports no Triton; :func:`register` imports the op modules, which
registers ``torch.ops.rga_triton.*`` (``rga_triton.dispatch.register_ops`` calls it).
"""


def register() -> None:
    """Import every step's op module: registers ``torch.ops.rga_triton.*``."""
    from .gating import op as _gating  # noqa: F401
    from .projection import op as _projection  # noqa: F401
    from .relation import op as _relation  # noqa: F401
