"""RGA-Net: torchvision-compatible ResNet-50 keys, the authors' module tree, shapes, exactness, loading."""
from __future__ import annotations

import copy

import pytest
import torch

import rga_triton
from reference import RGA_Module
from rga_triton.models import ResNet50, RGANet, rga_net, stage_sizes
from rga_triton.module import ORDERS

from helpers import rel_err

# A tiny RGA-Net that runs in well under a second on a CPU: 64 x 32 input gives 16x8, 8x4, 4x2
# and 4x2 feature maps; ratios of 2 keep every W network non-empty at 8 positions.
TINY = dict(height=64, width=32, spa_ratio=2, down_ratio=2)


def expected_resnet50() -> dict[str, tuple]:
    """torchvision resnet50's state_dict keys and shapes, written out by hand (fc left out)."""
    def conv(name, out, inp, k):
        return {f"{name}.weight": (out, inp, k, k)}

    def bn(name, c):
        return {f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,),
                f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()}

    keys = {**conv("conv1", 64, 3, 7), **bn("bn1", 64)}
    inp = 64
    for layer, (blocks, width) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)], start=1):
        for i in range(blocks):
            p = f"layer{layer}.{i}"
            keys.update(conv(f"{p}.conv1", width, inp, 1)); keys.update(bn(f"{p}.bn1", width))
            keys.update(conv(f"{p}.conv2", width, width, 3)); keys.update(bn(f"{p}.bn2", width))
            keys.update(conv(f"{p}.conv3", 4 * width, width, 1)); keys.update(bn(f"{p}.bn3", 4 * width))
            if i == 0:
                keys.update(conv(f"{p}.downsample.0", 4 * width, inp, 1))
                keys.update(bn(f"{p}.downsample.1", 4 * width))
            inp = 4 * width
    return keys


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def test_resnet50_keys_match_torchvision():
    got = shapes(ResNet50().state_dict())
    want = expected_resnet50()
    assert list(got) == list(want)          # same names, same order
    assert got == want
    # Spot checks typed from torchvision's resnet50().state_dict():
    assert got["layer1.0.conv1.weight"] == (64, 64, 1, 1)
    assert got["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert got["layer2.0.conv2.weight"] == (128, 128, 3, 3)
    assert got["layer4.2.bn3.running_var"] == (2048,)
    assert len(got) == 318                   # torchvision's 320 minus fc.weight, fc.bias
    assert sum(p.numel() for p in ResNet50().parameters()) == 25_557_032 - (2048 * 1000 + 1000)


def test_last_stride_and_stage_sizes():
    assert stage_sizes(256, 128) == [(64, 32), (32, 16), (16, 8), (16, 8)]
    assert stage_sizes(256, 128, last_stride=2)[-1] == (8, 4)
    net = ResNet50(last_stride=1)
    assert net.layer4[0].conv2.stride == (1, 1) and net.layer4[0].downsample[0].stride == (1, 1)
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 64, 32)).shape == (1, 2048, 4, 2)


def test_rga_net_has_the_authors_module_tree():
    model = rga_net(751)   # the paper's setting: 256 x 128, RGA-SC, ratios 8
    state = shapes(model.state_dict())
    want = {f"backbone.{k}": v for k, v in expected_resnet50().items()}
    for stage, (c, n) in enumerate([(256, 64 * 32), (512, 32 * 16), (1024, 16 * 8), (2048, 16 * 8)], start=1):
        block = getattr(model.backbone, f"rga_att{stage}")
        assert (block.in_channel, block.in_spatial) == (c, n)
        want.update({f"backbone.rga_att{stage}.{k}": v for k, v in shapes(RGA_Module(c, n).state_dict()).items()})
    want.update({"feat_bn.weight": (2048,), "feat_bn.bias": (2048,), "feat_bn.running_mean": (2048,),
                 "feat_bn.running_var": (2048,), "feat_bn.num_batches_tracked": (), "cls.weight": (751, 2048)})
    assert state == want
    assert model.cls.bias is None and not model.feat_bn.bias.requires_grad


def test_rga_net_outputs_in_train_and_eval():
    torch.manual_seed(0)
    model = rga_net(5, backend="torch", **TINY)
    x = torch.randn(4, 3, 64, 32)
    logits, features = model.train()(x)
    assert logits.shape == (4, 5) and features.shape == (4, 2048)
    (logits.logsumexp(1).sum() + features.norm()).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        out = model(x)
        pooled = model.backbone(x).mean(dim=(2, 3))
    assert out.shape == (4, 2048)
    assert rel_err(out, model.feat_bn(pooled)) == 0.0        # eval returns the post-neck feature


def test_rga_net_matches_the_authors_blocks_in_float64():
    """Whole-network exactness: same weights with the literal reference blocks in place."""
    torch.manual_seed(0)
    fast = rga_net(7, backend="torch", **dict(TINY, height=32, width=16)).double()   # 8x4 .. 2x1 maps
    slow = copy.deepcopy(fast)
    for k in range(1, 5):
        block = getattr(fast.backbone, f"rga_att{k}")
        ref = RGA_Module(block.in_channel, block.in_spatial, spa_ratio=2, down_ratio=2).double()
        ref.load_state_dict(block.state_dict())
        setattr(slow.backbone, f"rga_att{k}", ref)
    x = torch.randn(3, 3, 32, 16, dtype=torch.float64)
    for train in (True, False):
        a, b = fast.train(train)(x), slow.train(train)(x)
        for u, v in zip(a if train else [a], b if train else [b]):
            assert rel_err(u, v) < 1e-10
    for (name, u), v in zip(fast.state_dict().items(), slow.state_dict().values()):
        assert torch.equal(u, v) if "num_batches" in name else rel_err(u, v) < 1e-10, name


def torchvision_like_file(tmp_path, drop_num_batches=True):
    """A resnet50 ImageNet file as torchvision ships it: fc included, no num_batches_tracked (0.4-era)."""
    torch.manual_seed(1)
    state = ResNet50(last_stride=2).state_dict()
    state = {k: v for k, v in state.items() if not (drop_num_batches and k.endswith("num_batches_tracked"))}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    path = tmp_path / "resnet50-19c8e357.pth"
    torch.save(state, path)
    return path, state


def test_pretrained_backbone_loads_torchvision_weights(tmp_path):
    path, state = torchvision_like_file(tmp_path)
    for source in (path, str(path), state):
        model = rga_net(3, pretrained_backbone=source, **TINY)
        got = model.backbone.state_dict()
        for k, v in state.items():
            if not k.startswith("fc."):
                assert torch.equal(got[k], v), k
        assert int(got["layer1.0.bn1.num_batches_tracked"]) == 0


def test_pretrained_backbone_is_strict_on_resnet_keys(tmp_path):
    _, state = torchvision_like_file(tmp_path)
    broken = dict(state)
    del broken["layer3.5.bn2.running_var"]
    broken["layer9.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"layer3\.5\.bn2\.running_var(.|\n)*layer9\.0\.conv1\.weight"):
        rga_net(3, pretrained_backbone=broken, **TINY)
    wrong = dict(state, **{"conv1.weight": torch.zeros(64, 3, 3, 3)})
    with pytest.raises(RuntimeError, match=r"conv1\.weight: checkpoint \(64, 3, 3, 3\) vs model \(64, 3, 7, 7\)"):
        rga_net(3, pretrained_backbone=wrong, **TINY)


def test_rga_net_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="stage 2"):
        rga_net(5, height=64, width=32)       # ratios 8 leave a W network empty at 8 x 4 positions
    with pytest.raises(ValueError, match="num_classes"):
        rga_net(0, **TINY)
    with pytest.raises(ValueError, match="height"):
        rga_net(5, height=0, width=32)
    model = rga_net(5, backend="torch", **TINY).eval()
    with pytest.raises(ValueError, match=r"height=64, width=32"):
        model(torch.randn(1, 3, 32, 32))
    assert isinstance(model, RGANet) and isinstance(model.backbone.rga_att1, rga_triton.RGAModule)


def test_rga_net_variants():
    s = rga_net(2, use_channel=False, **TINY)
    c = rga_net(2, use_spatial=False, **TINY)
    assert not hasattr(s.backbone.rga_att1, "theta_channel") and not hasattr(c.backbone.rga_att1, "theta_spatial")
    assert all(getattr(s.backbone, f"rga_att{k}").backend == "auto" for k in range(1, 5))
    t = rga_net(2, backend="triton", **TINY)
    assert t.backbone.rga_att4.backend == "triton"


def test_rga_net_order_reaches_every_block():
    for order in ORDERS:
        model = rga_net(2, order=order, **TINY)
        assert all(getattr(model.backbone, f"rga_att{k}").order == order for k in range(1, 5))
    assert rga_net(2, **TINY).backbone.rga_att1.order == "sc"        # the authors' composition by default


def test_rga_net_bad_order_raises_the_modules_error():
    with pytest.raises(ValueError) as model_error:
        rga_net(2, order="ss", **TINY)
    with pytest.raises(ValueError) as module_error:
        rga_triton.RGAModule(64, 64, order="ss")
    assert str(model_error.value) == str(module_error.value)
    assert "order must be one of ('sc', 'cs', 'parallel'), got 'ss'" in str(model_error.value)


def test_rga_net_order_changes_the_output():
    """Orders "sc" and "parallel" with the same weights give different features: the argument is used."""
    torch.manual_seed(0)
    small = dict(TINY, height=32, width=16)
    sc = rga_net(3, backend="torch", **small).eval()
    parallel = rga_net(3, backend="torch", order="parallel", **small).eval()
    parallel.load_state_dict(sc.state_dict())
    x = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        assert rel_err(parallel(x), sc(x)) > 1e-4


def test_convert_of_an_authors_rga_net_keeps_its_order():
    """Authors'-style blocks built with an ``order`` convert to what rga_net(order=...) builds."""
    torch.manual_seed(0)
    order = "parallel"
    built = rga_net(3, backend="torch", order=order, **dict(TINY, height=32, width=16)).double().eval()
    authors = copy.deepcopy(built)
    for k in range(1, 5):
        block = getattr(built.backbone, f"rga_att{k}")
        ref = RGA_Module(block.in_channel, block.in_spatial, spa_ratio=2, down_ratio=2, order=order).double()
        ref.load_state_dict(block.state_dict())
        setattr(authors.backbone, f"rga_att{k}", ref)
    converted = rga_triton.convert(authors, backend="torch").eval()
    assert all(getattr(converted.backbone, f"rga_att{k}").order == order for k in range(1, 5))
    x = torch.randn(2, 3, 32, 16, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(converted(x), built(x)) < 1e-12
