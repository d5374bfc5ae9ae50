"""``RGAModule``: the drop-in replacement for the authors' ``RGA_Module``."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import dispatch
from .common import checks
from .common.branch import Branch

ORDERS = ("sc", "cs", "parallel")


def check_order(order) -> str:
    return checks.one_of("order", order, ORDERS)


def _embed(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv (no bias) -> BatchNorm -> ReLU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


def _attention_net(width: int, down_ratio: int) -> nn.Sequential:
    """conv -> BN -> ReLU -> conv to one channel -> BN."""
    hidden = width // down_ratio
    return nn.Sequential(nn.Conv2d(width, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
                         nn.Conv2d(hidden, 1, 1, bias=False), nn.BatchNorm2d(1))


class RGAModule(nn.Module):
    """Relation-Aware Global Attention block (RGA-S, RGA-C or RGA-SC), exact and fast.

    Same constructor arguments, submodules, parameters, buffers and state_dict keys as the
    authors' ``RGA_Module``; same train/eval semantics (BatchNorm running statistics
    included). ``backend`` picks the implementation: ``"torch"`` (reassociated PyTorch),
    ``"triton"`` (fused kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``) or ``"auto"``
    (Triton for CUDA tensors it takes, PyTorch otherwise, warning once per reason).
    ``algorithm`` picks the Triton path's exact algorithm: ``"reassociated"`` (Z from the
    skinny products W_in phi^T, W_out theta^T; never forms G), ``"tiled"`` (G built block
    by block on chip and fed straight into the relation embedding), or ``"auto"`` (per branch:
    the one ``rga_triton.tune`` measured faster on this GPU, else the fewer multiply-adds;
    see ``rga_triton.dispatch``).
    ``order`` composes the branches of RGA-SC: ``"sc"`` (the authors': spatial gate, then
    the channel gate computed on the gated map), ``"cs"``, or ``"parallel"`` (both gates
    from x: out = x * sigmoid(a_s) * sigmoid(a_c)), the variants of the paper's Table 1.

    ``inter_spatial`` (default in_spatial // spa_ratio): the relation embedding's rows; a block
    resampled to another size keeps its source's (:meth:`resized`).

    x: (B, in_channel, H, W) with H * W == in_spatial. Returns a tensor of x's shape.
    """

    def __init__(self, in_channel: int, in_spatial: int, use_spatial: bool = True, use_channel: bool = True,
                 cha_ratio: int = 8, spa_ratio: int = 8, down_ratio: int = 8, backend: str = "auto",
                 algorithm: str = "auto", order: str = "sc", inter_spatial: int | None = None):
        super().__init__()
        self.inter_channel, self.inter_spatial = checks.block_sizes(
            in_channel, in_spatial, use_spatial, use_channel, cha_ratio, spa_ratio, down_ratio, inter_spatial)
        # checked above: ints of any kind (NumPy's too), kept as Python ints
        in_channel, in_spatial, cha_ratio, spa_ratio, down_ratio = map(
            int, (in_channel, in_spatial, cha_ratio, spa_ratio, down_ratio))
        self.in_channel, self.in_spatial = in_channel, in_spatial
        self.use_spatial, self.use_channel = use_spatial, use_channel
        self.cha_ratio, self.spa_ratio, self.down_ratio = cha_ratio, spa_ratio, down_ratio
        self.backend = dispatch.check_backend(backend)
        self.algorithm = dispatch.check_algorithm(algorithm)
        self.order = check_order(order)

        # Registration order follows the authors' module so state_dict key order matches too.
        if use_spatial:
            self.gx_spatial = _embed(in_channel, self.inter_channel)
        if use_channel:
            self.gx_channel = _embed(in_spatial, self.inter_spatial)
        if use_spatial:
            self.gg_spatial = _embed(2 * in_spatial, self.inter_spatial)
        if use_channel:
            self.gg_channel = _embed(2 * in_channel, self.inter_channel)
        if use_spatial:
            self.W_spatial = _attention_net(1 + self.inter_spatial, down_ratio)
        if use_channel:
            self.W_channel = _attention_net(1 + self.inter_channel, down_ratio)
        if use_spatial:
            self.theta_spatial = _embed(in_channel, self.inter_channel)
            self.phi_spatial = _embed(in_channel, self.inter_channel)
        if use_channel:
            self.theta_channel = _embed(in_spatial, self.inter_spatial)
            self.phi_channel = _embed(in_spatial, self.inter_spatial)

    def branch(self, name: str) -> Branch:
        """The submodules and sizes of the ``"spatial"`` or ``"channel"`` branch."""
        if name not in ("spatial", "channel"):
            raise ValueError(f"name must be 'spatial' or 'channel', got {name!r}")
        dims = ((self.inter_spatial, self.inter_channel, self.in_spatial) if name == "spatial" else
                (self.inter_channel, self.inter_spatial, self.in_channel))       # (R, K, L)
        return Branch(*(getattr(self, f"{part}_{name}") for part in ("theta", "phi", "gx", "gg", "W")), dims)

    def branches(self) -> dict[str, Branch]:
        """The :class:`Branch` of each branch in use, spatial first: what a call hands down."""
        return {name: self.branch(name) for name, used in (("spatial", self.use_spatial),
                                                           ("channel", self.use_channel)) if used}

    def extra_repr(self) -> str:
        return (f"in_channel={self.in_channel}, in_spatial={self.in_spatial}, use_spatial={self.use_spatial}, "
                f"use_channel={self.use_channel}, cha_ratio={self.cha_ratio}, spa_ratio={self.spa_ratio}, "
                f"down_ratio={self.down_ratio}, backend={self.backend!r}, algorithm={self.algorithm!r}, "
                f"order={self.order!r}" + (f", inter_spatial={self.inter_spatial}"
                                           if self.inter_spatial != self.in_spatial // self.spa_ratio else ""))

    def resized(self, from_hw, to_hw, mode: str = "bilinear") -> RGAModule:
        """A new block for ``to_hw`` = (H', W') feature maps, its position-indexed weights resampled
        from this block's, built for ``from_hw`` = (H, W) (scaled by N / N'; docs/resize.md gives
        the rule per weight). Everything else is kept: other weights, BatchNorm buffers, settings,
        train/eval mode. The same size returns equal weights, bit for bit. An approximation of the
        block trained at H' x W', meant to run and fine-tune there."""
        from .resize import resized_block
        return resized_block(self, from_hw, to_hw, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.backend = dispatch.check_backend(self.backend)
        self.algorithm = dispatch.check_algorithm(self.algorithm)
        self.order = check_order(self.order)
        branches = self.branches()
        first = next(iter(branches.values()))
        checks.input_tensor(x, self.in_channel, self.in_spatial, checks.uniform_parameters(self, first.theta[0].weight))
        return dispatch.forward(self, x, branches)      # which implementation runs: the whole rule is in dispatch.py


RGA_Module = RGAModule
