"""fast-reid (the real package): its Baseline meta-architecture on the registered RGA backbone."""
import pytest
import torch
import torch.nn as nn

pytest.importorskip("fastreid")

from fastreid.config import get_cfg  # noqa: E402
from fastreid.modeling.backbones import build_backbone  # noqa: E402
from fastreid.modeling.backbones.resnet import ResNet, build_resnet_backbone  # noqa: E402
from fastreid.modeling.meta_arch import build_model  # noqa: E402
from fastreid.utils.events import EventStorage  # noqa: E402

import rga_triton.integrations.fastreid as rga_fastreid  # noqa: E402  (registers the backbone)
from rga_triton.attach import attached  # noqa: E402


def _cfg(**backbone):
    """fast-reid's defaults naming the RGA backbone, at 64 x 32 with ratio-2 blocks on the torch path."""
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_rga_resnet_backbone"
    cfg.MODEL.BACKBONE.PRETRAIN = False
    for key, value in backbone.items():
        setattr(cfg.MODEL.BACKBONE, key, value)
    cfg.INPUT.SIZE_TRAIN = cfg.INPUT.SIZE_TEST = [64, 32]
    cfg.MODEL.BACKBONE.RGA.SPA_RATIO = 2
    cfg.MODEL.BACKBONE.RGA.DOWN_RATIO = 2
    cfg.MODEL.BACKBONE.RGA.BACKEND = "torch"
    cfg.MODEL.HEADS.NUM_CLASSES = 4
    cfg.MODEL.HEADS.WITH_BNNECK = True
    cfg.MODEL.LOSSES.NAME = ("CrossEntropyLoss", "TripletLoss")
    return cfg


def test_baseline_trains_with_its_loss_dict_and_evaluates_features():
    torch.manual_seed(0)
    model = build_model(_cfg())
    assert isinstance(model.backbone, ResNet) and model.backbone.rga_att4.in_spatial == 4 * 2     # fast-reid's own
    images, targets = torch.rand(8, 3, 64, 32) * 255, torch.arange(4).repeat(2)
    assert model.backbone(images).shape == (8, 2048, 4, 2)         # fast-reid's (B, 2048, H/16, W/16)
    with EventStorage(0):
        losses = model({"images": images.clone(), "targets": targets})
    assert set(losses) == {"loss_cls", "loss_triplet"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.rga_att1.gg_spatial[0].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        features = model(images.clone())
    assert features.shape == (8, 2048)


def test_config_node_last_stride_and_rga_settings_are_read():
    cfg = _cfg(LAST_STRIDE=2)
    cfg.merge_from_list(["MODEL.BACKBONE.RGA.USE_CHANNEL", False, "MODEL.BACKBONE.RGA.ORDER", "cs"])  # as YAML does
    backbone = build_backbone(cfg)
    assert backbone(torch.randn(2, 3, 64, 32)).shape == (2, 2048, 2, 1)
    assert not backbone.rga_att1.use_channel and backbone.rga_att1.order == "cs"
    assert backbone.rga_att2.spa_ratio == 2 and backbone.rga_att2.cha_ratio == 8


def test_syncbn_builds_and_converts_the_rga_blocks_too():
    backbone = build_backbone(_cfg(NORM="syncBN"))
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    assert isinstance(backbone.rga_att1.gg_spatial[1], nn.SyncBatchNorm)
    backbone.eval()
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, 64, 32)).shape == (2, 2048, 4, 2)


def test_pretrain_path_loads_torchvision_keys(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    source = torchvision.models.resnet50().state_dict()
    path = tmp_path / "resnet50.pth"
    torch.save(source, path)
    backbone = build_backbone(_cfg(PRETRAIN=True, PRETRAIN_PATH=str(path)))
    torch.testing.assert_close(backbone.layer2[1].conv1.weight, source["layer2.1.conv1.weight"])


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="MODEL.BACKBONE.NORM"):
        build_backbone(_cfg(NORM="GN"))
    cfg = _cfg()
    cfg.INPUT.SIZE_TEST = [128, 64]
    with pytest.raises(ValueError, match="INPUT.SIZE_TEST"):
        build_backbone(cfg)
    cfg = _cfg()
    cfg.MODEL.BACKBONE.RGA.SPA_RATIO = 64                         # empties a W network at 4 x 2 positions
    with pytest.raises(ValueError, match="stage"):
        build_backbone(cfg)


def test_add_rga_config_on_a_config_made_elsewhere():
    from fastreid.config import CfgNode

    cfg = CfgNode({"MODEL": {"BACKBONE": {"NAME": "x"}}})
    cfg.freeze()
    rga_fastreid.add_rga_config(cfg)
    assert cfg.MODEL.BACKBONE.RGA.SPA_RATIO == 8 and cfg.is_frozen()


def _train_step_and_eval(cfg, batch=4):
    """Baseline: one train step (its loss dict, gradients into the blocks), then eval features."""
    torch.manual_seed(0)
    model = build_model(cfg)
    images, targets = torch.rand(batch, 3, 64, 32) * 255, torch.arange(batch // 2).repeat(2)
    with EventStorage(0):
        losses = model({"images": images.clone(), "targets": targets})
    assert set(losses) == {"loss_cls", "loss_triplet"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(getattr(model.backbone, f"rga_att{k}").W_spatial[0].weight.grad.abs().sum() > 0 for k in range(1, 5))
    model.eval()
    with torch.no_grad():
        assert model(images.clone()).shape == (batch, model.backbone.rga_att4.in_channel)
    return model


def test_r50_ibn_with_non_local_blocks_attaches_after_the_non_local_blocks():
    """R50-IBN-NL (fast-reid's AGW backbone): stages 2 and 3 end in a non-local block, whose output the block gets."""
    model = _train_step_and_eval(_cfg(WITH_IBN=True, WITH_NL=True))
    backbone = model.backbone
    assert attached(backbone) == {"layer1.2": "rga_att1", "NL_2.1": "rga_att2", "NL_3.2": "rga_att3",
                                  "layer4.2": "rga_att4"}
    assert backbone.layer1[0].bn1.__class__.__name__ == "IBN"
    seen = {}
    backbone.NL_2[1].register_forward_hook(lambda m, a, out: seen.setdefault("stage", out), prepend=True)
    backbone.rga_att2.register_forward_pre_hook(lambda m, a: seen.setdefault("block", a[0]))
    with torch.no_grad():
        backbone(torch.randn(2, 3, 64, 32))
    assert torch.equal(seen["stage"], seen["block"])            # the block gets exactly stage 2's output


def test_r101_and_r18_build_train_and_evaluate():
    model = _train_step_and_eval(_cfg(DEPTH="101x", WITH_SE=True))
    assert len(model.backbone.layer3) == 23 and attached(model.backbone)["layer3.22"] == "rga_att3"
    keys = set(build_resnet_backbone(_cfg(DEPTH="101x", WITH_SE=True)).state_dict())   # fast-reid's keys, unchanged
    assert keys == {k for k in model.backbone.state_dict() if not k.startswith("rga_att")}
    small = build_backbone(_cfg(DEPTH="18x"))
    assert [getattr(small, f"rga_att{k}").in_channel for k in range(1, 5)] == [64, 128, 256, 512]
    with pytest.raises(ValueError, match="MODEL.BACKBONE.DEPTH"):
        build_backbone(_cfg(DEPTH="152x"))
