"""Train-mode BatchNorm finalisation (ops/batchnorm/kernels.py): one launch merges the per-split
partial statistics of up to three alike BatchNorms; the result is nn.BatchNorm2d's, per BatchNorm
(its own eps, momentum, affine parameters and running statistics)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from rga_triton.launch.space import STAT_SPLIT
from rga_triton.ops.batchnorm import norm as bn_norm
from rga_triton.ops.batchnorm.kernels import MAX_GROUP, finalize_groups

from helpers import DEVICE

pytestmark = pytest.mark.needs_triton


def partials(z: torch.Tensor) -> torch.Tensor:
    """(2, rows, B * splits) float32: per image and split of STAT_SPLIT positions, the mean and M2
    (sum of squared deviations) of each row, as the statistics kernels write them."""
    batch, rows, length = z.shape
    means, m2s = [], []
    for b in range(batch):
        for start in range(0, length, STAT_SPLIT):
            chunk = z[b, :, start:start + STAT_SPLIT].double()
            mean = chunk.mean(dim=1)
            means.append(mean)
            m2s.append(((chunk - mean[:, None]) ** 2).sum(dim=1))
    return torch.stack([torch.stack(means, 1), torch.stack(m2s, 1)]).float()


def make_bns(widths, seed=0, device=DEVICE, **odd):
    """BatchNorms with their own eps, momentum, affine parameters and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    bns = []
    for i, width in enumerate(widths):
        bn = nn.BatchNorm2d(width, eps=1e-5 * (i + 1), momentum=0.1 * (i + 1), affine=odd.get("affine", [True] * 9)[i])
        with torch.no_grad():
            if bn.affine:
                bn.weight.copy_(torch.rand(width, generator=gen) + 0.5)
                bn.bias.copy_(torch.randn(width, generator=gen))
            bn.running_mean.copy_(torch.randn(width, generator=gen))
            bn.running_var.copy_(torch.rand(width, generator=gen) + 0.5)
            bn.num_batches_tracked.fill_(i)
        bns.append(bn.train(i not in odd.get("eval", ())).to(device))
    return bns


@pytest.mark.parametrize("widths,odd,launches", [
    ([6, 6, 6], {}, 1),                               # the projection's theta, phi, gx: one launch
    ([6, 6, 6], {"eval": (1,)}, 2),                   # phi on running statistics: theta and gx apart
    ([6, 6, 6], {"affine": [True, False, True]}, 3),  # affine differs: the kernel's constant
    ([5, 6, 6], {}, 2),                               # widths differ
    ([4, 4, 4, 4], {}, 2),                            # at most three per launch
], ids=["alike", "middle-eval", "affine-differs", "widths-differ", "four"])
def test_grouped_finalize_is_batchnorm_per_batchnorm(widths, odd, launches, monkeypatch):
    batch, length = 3, STAT_SPLIT + 44                # two splits per image, the second a tail
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(batch, sum(widths), length, generator=gen) * 2 + 1
    bns = make_bns(widths, **odd)
    expected = make_bns(widths, device="cpu", **odd)  # the same BatchNorms, run by nn.BatchNorm2d
    calls = []
    original = bn_norm.bn_finalize
    monkeypatch.setattr(bn_norm, "bn_finalize", lambda *a, **k: calls.append(len(a[2])) or original(*a, **k))

    bn_norm.check_batch(bns, batch * length, z.shape)
    norm = bn_norm.finalized(bns, partials(z).to(DEVICE), length)

    assert len(calls) == launches and all(1 <= n <= MAX_GROUP for n in calls), calls
    start = 0
    for bn, ref in zip(bns, expected):
        rows = slice(start, start + bn.num_features)
        zb = z[:, rows].unsqueeze(-1)
        out = ref(zb).squeeze(-1)                     # nn.BatchNorm2d: output, and its buffers move
        got = z[:, rows] * norm.scale[rows].cpu()[None, :, None] + norm.shift[rows].cpu()[None, :, None]
        assert torch.allclose(got, out, atol=1e-5, rtol=1e-5), bn
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.allclose(getattr(bn, name).cpu().double(), getattr(ref, name).cpu().double(),
                                  atol=1e-6, rtol=1e-5), name
        if bn.training:     # the statistics it normalised with, which backward reads
            assert torch.allclose(norm.mean[rows].cpu(), zb.mean(dim=(0, 2, 3)), atol=1e-5)
            var = zb.var(dim=(0, 2, 3), unbiased=False)
            assert torch.allclose(norm.inv_std[rows].cpu(), torch.rsqrt(var + bn.eps), rtol=1e-5)
        start += bn.num_features


def test_finalize_groups_keeps_rows_in_order():
    bns = make_bns([4, 4, 4, 4, 8])
    groups = finalize_groups(list(zip([0, 4, 8, 12, 16], bns)))
    assert [(start, len(members)) for start, members in groups] == [(0, 3), (12, 1), (16, 1)]
    # a gap in the rows (a BatchNorm on running statistics between) splits a run
    assert [start for start, _ in finalize_groups([(0, bns[0]), (8, bns[1])])] == [0, 8]
