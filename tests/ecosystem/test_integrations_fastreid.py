"""fast-reid (the real package): its Baseline meta-architecture on the registered RGA backbone."""
import copy
import threading

import pytest
import torch
import torch.nn as nn

pytest.importorskip("fastreid")

from fastreid.config import get_cfg  # noqa: E402
from fastreid.modeling.backbones import build_backbone  # noqa: E402
from fastreid.modeling.backbones.resnet import ResNet, build_resnet_backbone  # noqa: E402
from fastreid.modeling.meta_arch import build_model  # noqa: E402
from fastreid.utils.checkpoint import Checkpointer  # noqa: E402
from fastreid.utils.events import EventStorage  # noqa: E402

import rga_triton.integrations.fastreid as rga_fastreid  # noqa: E402  (registers the backbone)
from rga_triton import RGAModule  # noqa: E402
from rga_triton.attach import attached  # noqa: E402
from rga_triton.testing import rel_err, tolerance  # noqa: E402


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
    cfg = _cfg(NORM="syncBN")
    cfg.INPUT.SIZE_TEST = [96, 48]
    backbone = build_backbone(cfg).eval()
    assert isinstance(backbone.rga_att1, rga_fastreid.TestSizeRGAModule)
    assert isinstance(backbone.rga_att1.gg_spatial[1], nn.SyncBatchNorm)
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, 96, 48)).shape == (2, 2048, 6, 3)


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
    cfg.INPUT.SIZE_TEST = [128]
    with pytest.raises(ValueError, match=r"INPUT.SIZE_TEST must be \[height, width\]"):
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


def _resized_standalone(model):
    """A copy of fast-reid ``model`` whose blocks are plain RGAModules resized from its blocks' current weights
    (``RGAModule.resized``, docs/resize.md): what its eval at SIZE_TEST must compute."""
    standalone = copy.deepcopy(model)
    for name in attached(model.backbone).values():
        block = getattr(model.backbone, name)
        plain = RGAModule(block.in_channel, block.in_spatial, block.use_spatial, block.use_channel, block.cha_ratio,
                          block.spa_ratio, block.down_ratio, backend=block.backend, algorithm=block.algorithm,
                          order=block.order, inter_spatial=block.inter_spatial)
        plain.load_state_dict(block.state_dict(), strict=True)
        setattr(standalone.backbone, name, plain.eval().resized(block.train_hw, block.test_hw))
    return standalone.eval()


def test_size_test_evaluates_through_blocks_resized_from_the_trained_weights(tmp_path):
    """SIZE_TRAIN 64 x 32, SIZE_TEST 96 x 48: a train step at 64 x 32, then fast-reid's evaluation (eval mode,
    test-size images) computes what the standalone resized model of the trained weights computes, and the
    model stays the train-size model: its state_dict is a SIZE_TEST = SIZE_TRAIN model's, unchanged by eval.
    R18, the cheapest depth: the mechanism does not depend on it."""
    cfg = _cfg(DEPTH="18x", FEAT_DIM=512)
    cfg.INPUT.SIZE_TEST = [96, 48]
    torch.manual_seed(0)
    model = build_model(cfg)
    blocks = [getattr(model.backbone, f"rga_att{k}") for k in range(1, 5)]
    assert all(isinstance(b, rga_fastreid.TestSizeRGAModule) for b in blocks)
    assert [(b.train_hw, b.test_hw) for b in blocks] == [((16, 8), (24, 12)), ((8, 4), (12, 6)), ((4, 2), (6, 3)),
                                                         ((4, 2), (6, 3))]
    train_size_model = build_model(_cfg(DEPTH="18x", FEAT_DIM=512))  # SIZE_TEST = SIZE_TRAIN: plain blocks
    train_size_model.load_state_dict(model.state_dict(), strict=True)   # same keys and shapes, both ways
    model.load_state_dict(train_size_model.state_dict(), strict=True)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    images, targets = torch.rand(4, 3, 64, 32) * 255, torch.arange(2).repeat(2)
    with EventStorage(0):
        losses = model({"images": images, "targets": targets})
    sum(losses.values()).backward()
    optimizer.step()
    trained = {key: value.clone() for key, value in model.state_dict().items()}

    test_images = torch.rand(2, 3, 96, 48) * 255
    model.eval()                                                 # as fast-reid's inference_context does
    with torch.no_grad():
        features = model({"images": test_images.clone()})
        expected = _resized_standalone(model)({"images": test_images.clone()})
    assert features.shape == (2, 512)
    assert rel_err(features, expected) <= tolerance(torch.float32)
    after_eval = model.state_dict()
    assert after_eval.keys() == trained.keys() and all(torch.equal(after_eval[k], v) for k, v in trained.items())

    # fast-reid's DefaultPredictor: build, eval(), then load the checkpoint; eval calls see the loaded weights
    Checkpointer(model, save_dir=str(tmp_path)).save("model_final")
    predictor = build_model(cfg).eval()
    with torch.no_grad():
        before_loading = predictor({"images": test_images.clone()})
    Checkpointer(predictor).load(str(tmp_path / "model_final.pth"))
    loaded_state = predictor.state_dict()
    assert all(torch.equal(loaded_state[k], v) for k, v in trained.items())   # no key skipped for its shape
    with torch.no_grad():
        loaded = predictor({"images": test_images.clone()})
    assert rel_err(loaded, expected) <= tolerance(torch.float32) < rel_err(before_loading, expected)

    model.train()
    with pytest.raises(ValueError, match="eval mode only"):
        model.backbone(test_images)


def test_test_size_calls_from_threads_take_turns_on_the_twin():
    """Test-size calls share the block's meta twin: concurrent ones must not see each other's tensors."""
    torch.manual_seed(0)
    block = rga_fastreid.serve_test_size(RGAModule(32, 32, spa_ratio=2, down_ratio=2, backend="torch"), (8, 4), (12, 6))
    x = torch.randn(4, 32, 12, 6)
    with torch.no_grad():
        expected = block.eval()(x)
    errors = []

    def serve():
        try:
            with torch.no_grad():
                for _ in range(20):
                    assert torch.equal(block(x), expected)
        except Exception as error:          # noqa: BLE001  (reported below)
            errors.append(error)

    threads = [threading.Thread(target=serve) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_size_test_that_cannot_be_resized_names_the_key():
    cfg = _cfg()
    cfg.INPUT.SIZE_TEST = [2**16, 2**16]                         # stage 1: a 64 x 2 * 16384**2 weight, past 2**31
    with pytest.raises(ValueError, match=r"INPUT.SIZE_TEST=\[65536, 65536\].*stage 1 \('layer1.2'"):
        build_backbone(cfg)
