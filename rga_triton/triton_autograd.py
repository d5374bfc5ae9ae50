"""The ``"triton"`` backend when gradients are wanted: the block as three autograd Functions.

One branch is ``_Projection`` (x -> theta, phi, gx_mean) then ``_RelationGate``
(-> the logit before the last BatchNorm), then that one-channel BatchNorm and the sigmoid
in PyTorch (a (B, L) tensor); ``_ApplyGates`` writes the output. Autograd composes the
branches in any ``order``, the spatial gate feeding the channel branch's projection
included, so each Function only differentiates its own step:

- ``_RelationGate`` runs the forward kernels and the backward kernels of
  ``kernels/relation_backward.py``: the whole attention network and the relation BatchNorm
  per position tile, plus four batched matmuls for dA, dtp and the relation weight. Z
  (B, R, L) is materialised once in forward (one batched matmul, A tp) and read by every
  later pass instead of recomputed: R L floats per image, never L x L.
- ``_Projection`` and ``_ApplyGates`` differentiate in PyTorch: their backward is two
  large matmuls and elementwise work, which cuBLAS and PyTorch already do at bandwidth.

BatchNorm buffers move once, in forward, exactly as nn.BatchNorm2d moves them; backward
uses the statistics forward normalised with. Every backward reduction has a fixed order,
so gradients are bitwise repeatable run to run.
"""
from __future__ import annotations

import torch

from .batchnorm import batch_norm, uses_batch_stats
from .kernels.gating import apply_gates
from .kernels.projection import projection_apply, projection_stats
from .kernels.relation import RelationOperands, gate_logit, hidden_stats, relation_a, relation_z_tiled, z_stats
from .kernels.relation_backward import hidden_backward, relation_backward
from .torch_path import Branch
from .triton_path import compose_gates, compute_dtype, input_views, mergeable, normalizers


def _bn_rows(bn, norm) -> torch.Tensor:
    """float32 (6, C): mean, inv_std, weight, bias, c_b, c_g (the last two set by backward)."""
    weight = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(norm.mean)
    bias = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(norm.mean)
    zeros = torch.zeros_like(norm.mean)
    return torch.stack([norm.mean, norm.inv_std, weight, bias, zeros, zeros])


def _bn_grads(bn, sums: torch.Tensor):
    """(d weight, d bias) of ``bn`` from (sum dy, sum dy x_hat), in the parameters' dtype."""
    if bn.weight is None:
        return None, None
    return sums[1].to(bn.weight.dtype), sums[0].to(bn.bias.dtype)


class _Projection(torch.autograd.Function):
    """(x, in_gate, W3 and the three embedding BatchNorms) -> tp = [theta; phi] (B, 2K, L), gx_mean (B, L)."""

    @staticmethod
    def forward(ctx, x, in_gate, w3, weight3, bias3, branch: Branch, view: str, dtype):
        shape, strides = input_views(x)[view]
        batch, _, length = shape
        bns = [seq[1] for seq in (branch.theta, branch.phi, branch.gx)]
        w3c = w3.flatten(1).to(dtype).contiguous()
        k = w3c.shape[0] // 3
        norm = normalizers(bns, lambda: projection_stats(x, shape, strides, w3c, in_gate),
                           batch * length, (batch, k, length), length)
        tp, gx_mean = projection_apply(x, shape, strides, w3c, norm.scale, norm.shift, in_gate)
        batch_rows = torch.cat([torch.full((bn.num_features,), float(uses_batch_stats(bn)), device=x.device)
                                for bn in bns])
        rows = torch.stack([norm.mean, norm.inv_std, weight3.detach().float(), bias3.detach().float(), batch_rows])
        ctx.save_for_backward(x, in_gate, w3c, rows)
        ctx.view, ctx.w3_dtype, ctx.bn_dtype = view, w3.dtype, weight3.dtype
        return tp, gx_mean

    @staticmethod
    def backward(ctx, dtp, dgx_mean):
        x, in_gate, w3c, rows = ctx.saved_tensors
        mean, inv_std, weight, bias, batch_rows = rows
        b, c, h, w = x.shape
        feats = x.reshape(b, c, h * w)
        if ctx.view == "channel":
            feats = feats.transpose(1, 2)
        xg = feats if in_gate is None else feats.float() * in_gate[:, :, None]
        xg = xg.to(w3c.dtype).float()                  # the operand the kernel multiplied
        k = w3c.shape[0] // 3
        count = xg.shape[0] * xg.shape[2]
        p_hat = (torch.matmul(w3c.float(), xg) - mean[:, None]) * inv_std[:, None]
        y = p_hat * weight[:, None] + bias[:, None]
        dtp = torch.zeros_like(y[:, :2 * k]) if dtp is None else dtp
        dgx = torch.zeros_like(y[:, 0]) if dgx_mean is None else dgx_mean
        dy = torch.cat([dtp, (dgx / k)[:, None, :].expand(-1, k, -1)], dim=1)
        dy = torch.where(y > 0, dy, 0.0)
        sum_b, sum_g = dy.sum(dim=(0, 2)), (dy * p_hat).sum(dim=(0, 2))
        if batch_rows.any():        # batch-statistics terms; rows in eval have none (and NaN sums stay out)
            correction = (sum_b[:, None] + p_hat * sum_g[:, None]) / count
            dy = dy - torch.where(batch_rows.bool()[:, None], correction, 0.0)
        dp = (weight * inv_std)[:, None] * dy
        dw3 = torch.einsum("bkl,bcl->kc", dp, xg)
        dfeats = torch.matmul(w3c.float().t(), dp)
        d_gate = None
        if in_gate is not None:
            d_gate = (dfeats * feats.float()).sum(dim=2) if ctx.needs_input_grad[1] else None
            dfeats = dfeats * in_gate[:, :, None]
        if ctx.view == "channel":
            dfeats = dfeats.transpose(1, 2)
        dx = dfeats.reshape(b, c, h, w).to(x.dtype)
        return dx, d_gate, dw3.to(ctx.w3_dtype), sum_g.to(ctx.bn_dtype), sum_b.to(ctx.bn_dtype), None, None, None


class _RelationGate(torch.autograd.Function):
    """(tp, gx_mean, relation and attention-network weights) -> logit before the last BatchNorm, (B, L)."""

    @staticmethod
    def forward(ctx, tp, gx_mean, wg, w1, w2, z_weight, z_bias, h_weight, h_bias, branch: Branch, tiled: bool,
                dtype):
        batch, _, length = tp.shape
        count = batch * length
        wgc = wg.flatten(1).to(dtype).contiguous()
        r = wgc.shape[0]
        a = None if tiled else relation_a(tp, wgc)
        z = relation_z_tiled(tp, wgc) if tiled else torch.bmm(a, tp)
        ops = RelationOperands(tp, gx_mean, None, z, r, dtype)
        bn_z, bn_h = branch.gg[1], branch.W[1]
        z_norm = normalizers([bn_z], lambda: z_stats(ops), count, (batch, r, length), length)
        w1f, w2f = w1.detach().flatten(1).float().contiguous(), w2.detach().flatten().float().contiguous()
        h_norm = normalizers([bn_h], lambda: hidden_stats(ops, w1f, z_norm.scale, z_norm.shift),
                             count, (batch, w1f.shape[0], length), length)
        logit = gate_logit(ops, w1f, z_norm.scale, z_norm.shift, h_norm.scale, h_norm.shift, w2f)
        ctx.save_for_backward(tp, gx_mean, a, z, wgc, w1f, w2f, z_norm.scale, z_norm.shift,
                              _bn_rows(bn_z, z_norm), _bn_rows(bn_h, h_norm))
        ctx.branch, ctx.dtype = branch, dtype
        ctx.batch_stats = uses_batch_stats(bn_z), uses_batch_stats(bn_h)
        ctx.weight_dtypes = wg.dtype, w1.dtype, w2.dtype
        return logit

    @staticmethod
    def backward(ctx, dlogit):
        tp, gx_mean, a, z, wgc, w1f, w2f, z_scale, z_shift, z_bn, h_bn = ctx.saved_tensors
        z_batch, h_batch = ctx.batch_stats
        batch, k2, length = tp.shape
        count = batch * length
        ops = RelationOperands(tp, gx_mean, None, z, wgc.shape[0], ctx.dtype)
        dlogit = dlogit.float().contiguous()

        args = (ops, w1f, z_scale, z_shift)
        if h_batch:         # the batch-statistics terms need dy1's sums before dh
            h_sums = hidden_backward(*args, h_bn, w2f, dlogit, sums=True, write=False)[0]
            h_bn = h_bn.clone()
            h_bn[4:] = h_sums[:2] / count
            _, dh, dgx_mean, dw1_pool = hidden_backward(*args, h_bn, w2f, dlogit, sums=False, write=True)
        else:
            h_sums, dh, dgx_mean, dw1_pool = hidden_backward(*args, h_bn, w2f, dlogit, sums=True, write=True)
        if z_batch:
            z_sums, dw1_rel, _ = relation_backward(ops, w1f, z_bn, dh, sums=True, write=False)
            z_bn = z_bn.clone()
            z_bn[4:] = z_sums / count
            dz = relation_backward(ops, w1f, z_bn, dh, sums=False, write=True)[2]
        else:
            z_sums, dw1_rel, dz = relation_backward(ops, w1f, z_bn, dh, sums=True, write=True)

        # Z = A tp with A = [W_in phi^T | W_out theta^T]: dA, dtp, then through A to theta, phi, W_in, W_out
        if a is None:
            a = relation_a(tp, wgc)
        k = k2 // 2
        da = torch.bmm(dz, tp.transpose(1, 2))
        dtp = torch.bmm(a.transpose(1, 2), dz)
        wf = wgc.float()
        w_in, w_out = wf[:, :length], wf[:, length:]
        da_in, da_out = da[:, :, :k], da[:, :, k:]
        dtp[:, k:] += torch.matmul(da_in.transpose(1, 2), w_in)
        dtp[:, :k] += torch.matmul(da_out.transpose(1, 2), w_out)
        dw_in = torch.einsum("brk,bkl->rl", da_in, tp[:, k:])
        dw_out = torch.einsum("brk,bkl->rl", da_out, tp[:, :k])

        wg_dtype, w1_dtype, w2_dtype = ctx.weight_dtypes
        dwg = torch.cat([dw_in, dw_out], dim=1).to(wg_dtype).view(wgc.shape[0], 2 * length, 1, 1)
        dw1 = torch.cat([dw1_pool[:, None], dw1_rel], dim=1).to(w1_dtype).view(*w1f.shape, 1, 1)
        dw2 = h_sums[2].to(w2_dtype).view(1, -1, 1, 1)
        dz_weight, dz_bias = _bn_grads(ctx.branch.gg[1], z_sums)
        dh_weight, dh_bias = _bn_grads(ctx.branch.W[1], h_sums)
        return dtp, dgx_mean, dwg, dw1, dw2, dz_weight, dz_bias, dh_weight, dh_bias, None, None, None


class _ApplyGates(torch.autograd.Function):
    """out = x * spatial[:, None, :] * channel[:, :, None] (x viewed as (B, C, N)), one kernel pass."""

    @staticmethod
    def forward(ctx, x, spatial, channel):
        ctx.save_for_backward(x, spatial, channel)
        return apply_gates(x, spatial, channel)

    @staticmethod
    def backward(ctx, grad_out):
        x, spatial, channel = ctx.saved_tensors
        b, c, h, w = x.shape
        g = grad_out.reshape(b, c, h * w).float()
        xf = x.reshape(b, c, h * w).float()
        s = spatial[:, None, :] if spatial is not None else 1.0
        ch = channel[:, :, None] if channel is not None else 1.0
        d_spatial = (g * xf * ch).sum(dim=1) if spatial is not None and ctx.needs_input_grad[1] else None
        d_channel = (g * xf * s).sum(dim=2) if channel is not None and ctx.needs_input_grad[2] else None
        dx = (g * s * ch).reshape(b, c, h, w).to(x.dtype) if ctx.needs_input_grad[0] else None
        return dx, d_spatial, d_channel


def _flat_weight(seqs) -> torch.Tensor:
    """The three embedding convs' weights stacked, (3K, Cin): differentiable."""
    return torch.cat([seq[0].weight.flatten(1) for seq in seqs])


def _branch_gate(branch: Branch, x: torch.Tensor, view: str, in_gate, tiled: bool) -> torch.Tensor:
    """Sigmoid gate (B, L), float32, of one branch, differentiable in x, in_gate and every parameter."""
    dtype = compute_dtype(x)
    embeds = (branch.theta, branch.phi, branch.gx)
    bns = [seq[1] for seq in embeds]
    if all(bn.weight is not None for bn in bns):
        weight3, bias3 = torch.cat([bn.weight for bn in bns]), torch.cat([bn.bias for bn in bns])
    else:       # affine=False: nothing to differentiate, ones and zeros to normalise with
        rows = sum(bn.num_features for bn in bns)
        weight3, bias3 = torch.ones(rows, device=x.device), torch.zeros(rows, device=x.device)
    tp, gx_mean = _Projection.apply(x, in_gate, _flat_weight(embeds), weight3, bias3, branch, view, dtype)
    conv1, bn1, _, conv2, bn2 = branch.W
    bn_z = branch.gg[1]
    logit = _RelationGate.apply(tp, gx_mean, branch.gg[0].weight, conv1.weight, conv2.weight,
                                bn_z.weight, bn_z.bias, bn1.weight, bn1.bias, branch, tiled, dtype)
    return torch.sigmoid(batch_norm(logit.unsqueeze(1), bn2).squeeze(1))


def autograd_forward(module, x: torch.Tensor, algorithm: str = "reassociated") -> torch.Tensor:
    """The block's output through the kernels, differentiable; updates BatchNorm buffers in train mode."""
    x = mergeable(x)

    def gate(name, in_gate=None):
        return _branch_gate(module.branch(name), x, name, in_gate, algorithm == "tiled")

    spatial, channel = compose_gates(module, gate)
    return _ApplyGates.apply(x, spatial, channel)
