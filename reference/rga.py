"""Relation-Aware Global Attention as the paper and the authors' published code compute it.

Zhang et al., "Relation-Aware Global Attention for Person Re-identification", CVPR 2020
(arXiv 1904.02998). This file follows the authors' forward step by step on purpose: the
affinity G = theta^T phi is materialised per image, G^T and G are viewed as N-channel maps
and concatenated (transpose first), and a 1x1 conv embeds the 2N-channel tensor. It is slow
and memory-hungry by design; it is the definition the fast paths are checked against.

Submodule names, their order inside each ``nn.Sequential`` and every parameter and buffer
match the authors' module, so their state_dicts load here with ``strict=True``.
"""
import torch
import torch.nn as nn


def _embed(in_channels, out_channels):
    """1x1 conv (no bias) -> BatchNorm -> ReLU, the authors' embedding block."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def _attention_net(in_channels, down_ratio):
    """conv -> BN -> ReLU -> conv to one channel -> BN: the W network that yields the gate logit."""
    hidden = in_channels // down_ratio
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, kernel_size=1, stride=1, padding=0, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(),
        nn.Conv2d(hidden, 1, kernel_size=1, stride=1, padding=0, bias=False),
        nn.BatchNorm2d(1),
    )


class RGA_Module(nn.Module):
    """RGA-S / RGA-C / RGA-SC block, literal. x: (B, in_channel, H, W) with H*W == in_spatial.

    ``order`` composes the two branches: "sc" (default, the authors' forward), "cs", or
    "parallel" (out = x * sigmoid(a_s) * sigmoid(a_c), both logits from x).
    """

    def __init__(self, in_channel, in_spatial, use_spatial=True, use_channel=True,
                 cha_ratio=8, spa_ratio=8, down_ratio=8, order="sc"):
        super().__init__()
        if order not in ("sc", "cs", "parallel"):     # the oracle must not run "sc" for a typo
            raise ValueError(f"order must be one of ('sc', 'cs', 'parallel'), got {order!r}")
        self.order = order      # not in the authors' module: "sc" is theirs; "cs", "parallel" from Table 1
        self.in_channel = in_channel
        self.in_spatial = in_spatial
        self.use_spatial = use_spatial
        self.use_channel = use_channel
        self.inter_channel = in_channel // cha_ratio
        self.inter_spatial = in_spatial // spa_ratio

        # Registration order follows the authors' __init__ so state_dict key order matches too.
        if self.use_spatial:
            self.gx_spatial = _embed(self.in_channel, self.inter_channel)
        if self.use_channel:
            self.gx_channel = _embed(self.in_spatial, self.inter_spatial)
        if self.use_spatial:
            self.gg_spatial = _embed(self.in_spatial * 2, self.inter_spatial)
        if self.use_channel:
            self.gg_channel = _embed(self.in_channel * 2, self.inter_channel)
        if self.use_spatial:
            self.W_spatial = _attention_net(1 + self.inter_spatial, down_ratio)
        if self.use_channel:
            self.W_channel = _attention_net(1 + self.inter_channel, down_ratio)
        if self.use_spatial:
            self.theta_spatial = _embed(self.in_channel, self.inter_channel)
            self.phi_spatial = _embed(self.in_channel, self.inter_channel)
        if self.use_channel:
            self.theta_channel = _embed(self.in_spatial, self.inter_spatial)
            self.phi_channel = _embed(self.in_spatial, self.inter_spatial)

    def spatial_logit(self, x):
        """W_ys (b, 1, h, w): the spatial branch's gate logit, as the authors compute it."""
        b, c, h, w = x.size()
        theta_xs = self.theta_spatial(x).view(b, self.inter_channel, -1).permute(0, 2, 1)
        phi_xs = self.phi_spatial(x).view(b, self.inter_channel, -1)
        Gs = torch.matmul(theta_xs, phi_xs)                     # (b, N, N)
        Gs_in = Gs.permute(0, 2, 1).reshape(b, h * w, h, w)     # channel q at p: G[p, q]
        Gs_out = Gs.reshape(b, h * w, h, w)                     # channel q at p: G[q, p]
        Gs_joint = self.gg_spatial(torch.cat((Gs_in, Gs_out), 1))

        g_xs = torch.mean(self.gx_spatial(x), dim=1, keepdim=True)
        ys = torch.cat((g_xs, Gs_joint), 1)
        return self.W_spatial(ys)

    def channel_logit(self, x):
        """W_yc (b, c, 1, 1): the channel branch's gate logit, x read as N "channels" over C "positions"."""
        b, c, h, w = x.size()
        xc = x.view(b, c, -1).permute(0, 2, 1).unsqueeze(-1)        # (b, N, C, 1)
        theta_xc = self.theta_channel(xc).squeeze(-1).permute(0, 2, 1)
        phi_xc = self.phi_channel(xc).squeeze(-1)
        Gc = torch.matmul(theta_xc, phi_xc)                         # (b, C, C)
        Gc_in = Gc.permute(0, 2, 1).unsqueeze(-1)
        Gc_out = Gc.unsqueeze(-1)
        Gc_joint = self.gg_channel(torch.cat((Gc_in, Gc_out), 1))

        g_xc = torch.mean(self.gx_channel(xc), dim=1, keepdim=True)
        yc = torch.cat((g_xc, Gc_joint), 1)
        return self.W_channel(yc).transpose(1, 2)                   # (b, C, 1, 1)

    def forward(self, x):
        if not (self.use_spatial or self.use_channel):   # the authors' forward returns None
            return None
        if self.use_spatial and self.use_channel and self.order == "parallel":
            # Both gates from the same input, applied together (the paper's Table 1 variant).
            return x * torch.sigmoid(self.spatial_logit(x)) * torch.sigmoid(self.channel_logit(x))
        # "sc" (the authors'): spatial gate, then the channel gate computed on the gated map.
        branches = ("channel", "spatial") if self.order == "cs" else ("spatial", "channel")
        for branch in branches:
            if branch == "spatial" and self.use_spatial:
                x = torch.sigmoid(self.spatial_logit(x).expand_as(x)) * x
            elif branch == "channel" and self.use_channel:
                x = torch.sigmoid(self.channel_logit(x)) * x
        return x
