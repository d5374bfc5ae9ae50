"""What RGA-Net returns for the toolboxes (torchreid's loss= convention), without any toolbox installed."""
import subprocess
import sys

import pytest
import torch

from rga_triton.models import rga_net

TINY = dict(height=64, width=32, spa_ratio=2, down_ratio=2, backend="torch")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return rga_net(5, **TINY)


def test_loss_picks_what_train_mode_returns(model):
    x = torch.randn(2, 3, 64, 32)
    model.train()
    model.loss = "triplet"                         # the default: (logits, pre-neck features), as before
    logits, features = model(x)
    maps = model(x, return_featuremaps=True)
    assert logits.shape == (2, 5) and maps.shape == (2, 2048, 4, 2)
    torch.testing.assert_close(features, maps.mean(dim=(2, 3)))
    model.loss = "softmax"
    only = model(x)
    assert isinstance(only, torch.Tensor) and only.shape == (2, 5)
    assert rga_net(5, **TINY).loss == "triplet"


def test_eval_returns_features_after_or_before_the_neck(model):
    x = torch.randn(2, 3, 64, 32)
    model.eval()
    try:
        with torch.no_grad():
            pooled = model(x, return_featuremaps=True).mean(dim=(2, 3))
            for loss in ("softmax", "triplet"):
                model.loss, model.neck_feat = loss, "after"
                torch.testing.assert_close(model(x), model.feat_bn(pooled))
                model.neck_feat = "before"
                torch.testing.assert_close(model(x), pooled)
    finally:
        model.neck_feat = "after"


def test_bad_values_name_the_argument(model):
    with pytest.raises(ValueError, match="loss"):
        rga_net(5, loss="xent", **TINY)
    with pytest.raises(ValueError, match="neck_feat"):
        rga_net(5, neck_feat="middle", **TINY)
    with pytest.raises(TypeError, match="return_featuremaps"):
        model(torch.randn(2, 3, 64, 32), return_featuremaps="yes")


def test_integrations_package_imports_no_toolbox_and_onnx_flag_is_off():
    code = ("import sys, torch, rga_triton.integrations, rga_triton.integrations.onnx as o; "
            "assert not o.exporting_to_onnx(); "
            "bad = [m for m in ('torchreid', 'fastreid', 'timm', 'onnx', 'torch.onnx') if m in sys.modules]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
