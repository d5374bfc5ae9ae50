"""Triton kernels and their plain-Python launchers (testable without autograd).

- ``projection``: one read of x -> theta, phi (BN + ReLU) and the channel-mean of gx;
  a statistics variant for train-mode BatchNorm.
- ``relation``: A = [W_in phi^T | W_out theta^T], the fused Z -> BN -> ReLU -> W-network
  -> gate-logit kernels, and the tiled exact alternative that builds G blocks on chip.
- ``gating``: out = x * spatial_gate * channel_gate in one pass.
- ``affinity``: G = theta^T phi, blocked, for callers who want G itself.
"""
