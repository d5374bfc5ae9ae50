"""The projection in plain PyTorch: the forward formula the ``"torch"`` backend runs, and the
backward formula the kernels of ``backward_kernels.py`` replaced, kept to measure them against
(``RGA_TRITON_PROJECTION_BACKWARD=torch``, ``common/settings.py``) and traced as it is into a
compiled backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...common.batchnorm import batch_norm
from ...common.layout import batch_slices, empty_like_merged, weight_matrix
from ..batchnorm import sync


def relation_inputs(branch, feats: torch.Tensor, update: bool = True):
    """theta, phi (B, K, L) and the channel-mean of the gx embedding (B, 1, L) of one branch
    (``branch``: its theta, phi and gx submodules) reading ``feats`` (B, Cin, L), differentiable."""
    weights = [branch.theta[0].weight, branch.phi[0].weight, branch.gx[0].weight]
    k = weights[0].shape[0]
    projected = torch.matmul(torch.cat(weights).flatten(1).to(feats.dtype), feats)   # one read of feats
    theta, phi, gx = (
        F.relu(batch_norm(z, seq[1], update))
        for z, seq in zip(projected.split(k, dim=1), (branch.theta, branch.phi, branch.gx))
    )
    return theta, phi, gx.mean(dim=1, keepdim=True)


def gated_input(x: Tensor, in_gate: Optional[Tensor], view: str, compute_dtype: torch.dtype, pieces: int = 8):
    """(batch slices, operand): ``operand(rows)`` is the operand the projection kernel multiplied for
    those images, float32 in x's (B, C, N) layout: x rounded to the compute dtype (a no-op but
    under autocast), or x scaled by in_gate along the branch's input axis (C for the spatial
    view, N for the channel view), which the kernel keeps to float32 accuracy. One slice, and a
    view of x, where that changes nothing; else ``pieces`` slices, so that the copy alive at any
    time is a fraction of x (eager only: under torch.compile a Python loop over the batch would
    make every batch size a recompile)."""
    b, c, h, w = x.shape
    feats = x.reshape(b, c, h * w)

    def operand(rows: slice) -> Tensor:
        part = feats[rows]
        if in_gate is None:
            return part.to(compute_dtype).float()
        gate = in_gate[rows]
        return part.float() * (gate[:, :, None] if view == "spatial" else gate[:, None, :])

    whole = in_gate is None and x.dtype == torch.float32 and compute_dtype == torch.float32
    return batch_slices(b, 1 if whole else pieces), operand


def projection_grads_torch(x, in_gate, w3, bn_weight, bn_bias, norm, view, compute_dtype, batch_stats, dtp, dgx_mean,
                           needs=(True, True, True), dx: Optional[Tensor] = None, sync_group: str = ""):
    """``op.projection_grads`` as PyTorch ops (``RGA_TRITON_PROJECTION_BACKWARD=torch``).

    Large matmuls and elementwise work, which the backend already does at bandwidth.
    Written to keep few temporaries alive: P (B, 3K, L) is normalised in place and freed once dy,
    which becomes dP in place, has its batch-statistics terms; the gated input (when there is one)
    and grad x's float32 temporaries exist a few images at a time.

    X (B, Cin, L) is xg (B, C, N) for the spatial view and its transpose for the channel view,
    so every product below is taken in xg's layout (no transposed copy of x or dx).
    """
    need_x, need_gate, need_w3 = needs
    _, _, mean, inv_std = norm
    weight, bias = bn_weight.detach().float()[:, None], bn_bias.detach().float()[:, None]
    w3c = weight_matrix(w3, compute_dtype).float()                     # (3K, Cin)
    k = w3c.shape[0] // 3
    spatial = view == "spatial"
    batch, c, h, w = x.shape
    count = batch * (h * w if spatial else c)

    slices, gated = gated_input(x, in_gate, view, compute_dtype)

    def project(xg):        # P = W3 X for the images of xg
        return torch.matmul(w3c, xg if spatial else xg.transpose(1, 2))

    if len(slices) == 1:
        buf = project(gated(slices[0]))                                 # P (B, 3K, L)
    else:
        buf = x.new_empty((batch, 3 * k, h * w if spatial else c), dtype=torch.float32)
        for rows in slices:
            buf[rows] = project(gated(rows))
    p_hat = buf.sub_(mean[:, None]).mul_(inv_std[:, None])
    active = torch.addcmul(bias, p_hat, weight) > 0                     # ReLU's mask on y = BN(P)
    dy = torch.empty_like(p_hat)
    dy[:, :2 * k] = dtp if dtp is not None else 0.0
    dy[:, 2 * k:] = (dgx_mean / k)[:, None, :] if dgx_mean is not None else 0.0
    dy.masked_fill_(active.logical_not_(), 0.0)
    del active
    sum_b = dy.sum(dim=(0, 2))
    sum_g = sum((dy[rows] * p_hat[rows]).sum(dim=(0, 2)) for rows in batch_slices(batch, 8))   # a slice's temporary
    # batch-statistics terms (eval rows have none): over the synchronised ranks' batch where there are several
    mean_b, mean_g = sync.group_means(torch.stack([sum_b, sum_g]), count, sync_group) if sync_group else \
        (sum_b / count, sum_g / count)
    for i, batch_stats_i in enumerate(batch_stats):
        if batch_stats_i:
            rows = slice(i * k, (i + 1) * k)
            dy[:, rows] -= p_hat[:, rows].mul_(mean_g[rows, None]).add_(mean_b[rows, None])
    del p_hat, buf
    dp = dy.mul_(weight * inv_std[:, None])                             # dP (B, 3K, L)
    dw3 = None
    if need_w3:
        dw3 = w3c.new_zeros(w3c.shape)
        for rows in slices:
            xg = gated(rows)
            if spatial:     # sum_b dP[b] X[b]^T: (b, 3K, C) per image is small next to X
                dw3 += torch.bmm(dp[rows], xg.transpose(1, 2)).sum(dim=0)
            else:           # X[b]^T = xg[b]: stack the batch along the reduction, xg as (b*C, N) in place
                dw3.addmm_(dp[rows].transpose(0, 1).reshape(3 * k, -1), xg.reshape(-1, xg.shape[2]))
            del xg
        dw3 = dw3.to(w3.dtype).view(w3.shape)
    dx, d_gate = _input_grads(x, in_gate, w3c, dp, spatial, slices, dx, need_x, need_gate and in_gate is not None)
    return dx, d_gate, dw3, sum_g.to(bn_weight.dtype), sum_b.to(bn_bias.dtype)


def _input_grads(x, in_gate, w3c, dp, spatial: bool, slices, dx, need_x: bool, need_gate: bool):
    """(dx, d_in_gate) of the projection: dX = W3^T dP, scaled by in_gate along the branch's input
    axis (C for the spatial view, N for the channel view) and added into ``dx`` in place (written
    to a new tensor where dx is None; None unless ``need_x``), and in_gate's gradient, the sum
    of x * W3^T dP over the other axis (None unless ``need_gate``).

    Taken in x's (B, C, N) layout, ``slices`` of the batch at a time, with no x-sized temporary
    in float32: the spatial view folds the gate into W3^T (a C x 3K matrix per image) and takes
    the gate's gradient from dP x^T (3K x C per image); the channel view, whose gate runs along
    the product's output axis, scales one slice of W3^T dP at a time.
    """
    batch, c, h, w = x.shape
    feats = x.reshape(batch, c, h * w)
    beta = 0.0 if dx is None else 1.0
    if need_x and dx is None:
        dx = empty_like_merged(x)
    out = dx.view(feats.shape) if need_x else None
    d_gate = x.new_empty(in_gate.shape, dtype=torch.float32) if need_gate else None
    for rows in slices:
        images = dp[rows].shape[0]
        if spatial:
            if d_gate is not None:      # d_gate[b, c] = sum_k W3[k, c] (dP[b] x[b]^T)[k, c]
                d_gate[rows] = torch.linalg.vecdot(torch.bmm(dp[rows], feats[rows].float().transpose(1, 2)),
                                                   w3c, dim=1)
            if need_x:                  # dX[b] = (W3^T * g[b]) dP[b]
                w_t = w3c.t()
                w_t = w_t.expand(images, -1, -1) if in_gate is None else w_t * in_gate[rows, :, None]
                _add_product(out[rows], w_t, dp[rows], beta)
        elif in_gate is None:           # dX[b]^T = dP[b]^T W3
            if need_x:
                _add_product(out[rows], dp[rows].transpose(1, 2), w3c.expand(images, -1, -1), beta)
        else:                           # dX[b]^T = (dP[b]^T W3) * g[b] along N
            raw = torch.matmul(dp[rows].transpose(1, 2), w3c)                  # (b, C, N), float32
            if d_gate is not None:
                d_gate[rows] = torch.linalg.vecdot(raw, feats[rows].float(), dim=1)
            if need_x:
                _add_into(out[rows], raw.mul_(in_gate[rows, None, :]), beta)
    return dx, d_gate


def _add_product(out: Tensor, a: Tensor, b: Tensor, beta: float) -> None:
    """out = beta * out + a @ b (batched), in place; a float32 product rounded once where out is half."""
    if out.dtype == a.dtype:
        out.baddbmm_(a, b, beta=beta)
    else:
        _add_into(out, torch.bmm(a, b), beta)


def _add_into(out: Tensor, value: Tensor, beta: float) -> None:
    """out = beta * out + value in place, beta 0 or 1 (0: out's old contents, uninitialised, are not read)."""
    if beta:
        out.add_(value)
    else:
        out.copy_(value)
