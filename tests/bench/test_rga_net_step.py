"""bench/studies/rga_net_step.py: reference-block models, the largest-batch search, and the CLI on a tiny CPU run."""
from __future__ import annotations

import csv

import torch

import rga_triton
from bench.studies import rga_net_step
from reference import RGA_Module

TINY = dict(num_classes=4, height=32, width=16, spa_ratio=2, down_ratio=2, backend="torch")


def test_reference_blocks_carry_the_same_weights_and_give_the_same_features():
    torch.manual_seed(0)
    model = rga_triton.models.rga_net(**TINY).eval()
    ref = rga_net_step.with_reference_blocks(model)
    blocks = [m for m in ref.modules() if isinstance(m, RGA_Module)]
    assert len(blocks) == 4 and not any(isinstance(m, rga_triton.RGAModule) for m in ref.modules())
    assert ref.state_dict().keys() == model.state_dict().keys()
    images = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        assert torch.allclose(ref(images), model(images), rtol=1e-4, atol=1e-5)


def test_largest_batch_finds_the_threshold(monkeypatch):
    for threshold in (0, 1, 2, 37, 64, 1000):
        monkeypatch.setattr(rga_net_step, "batch_fits", lambda make, args, batch, precision, device, t=threshold:
                            batch <= t)
        assert rga_net_step.largest_batch(None, None, "float32", None, limit=512) == min(threshold, 512)


def test_cli_writes_a_row_per_variant(tmp_path):
    out = tmp_path / "step.csv"
    status = rga_net_step.main(["--device", "cpu", "--height", "32", "--width", "16", "--batch", "2",
                                "--num-classes", "4", "--warmup", "0", "--steps", "1", "--impls", "reference,torch",
                                "--out", str(out), "--quiet"])
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert status == 0
    assert [(r["impl"], r["status"]) for r in rows] == [("reference", "ok"), ("torch", "ok")]
    assert float(rows[1]["loss_rel_err"]) <= rga_net_step.LOSS_TOLERANCE["float32"]
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    assert set(rga_net_step.COLUMNS) <= set(rows[0])
