"""timm (the real package): ``rga_resnet50`` through create_model, with timm's model API."""
import pytest
import torch

timm = pytest.importorskip("timm")

import rga_triton.integrations.timm  # noqa: E402,F401  (registers rga_resnet50)
from rga_triton.models import rga_net  # noqa: E402

SMALL = dict(height=64, width=32, spa_ratio=2, down_ratio=2, backend="torch")


def test_create_model_forward_head_and_reset_classifier():
    assert "rga_resnet50" in timm.list_models("rga_*")
    model = timm.create_model("rga_resnet50", num_classes=7, **SMALL)
    assert model.num_features == 2048 and model.num_classes == 7
    assert model.pretrained_cfg["input_size"] == (3, 64, 32)
    assert timm.data.resolve_data_config(model=model)["input_size"] == (3, 64, 32)
    x = torch.randn(2, 3, 64, 32)
    maps = model.forward_features(x)
    assert maps.shape == (2, 2048, 4, 2)
    assert model(x).shape == (2, 7)                           # train mode: logits
    model.eval()
    with torch.no_grad():
        logits, features = model(x), model.forward_head(model.forward_features(x), pre_logits=True)
        assert logits.shape == (2, 7)                         # timm: logits in eval mode too
        assert features.shape == (2, 2048)
        torch.testing.assert_close(model.get_classifier()(features), logits)
        # pre_logits is RGA-Net's eval feature (after the BNNeck): same weights, same function
        reid = rga_net(7, **SMALL).eval()
        reid.load_state_dict(model.state_dict(), strict=True)
        torch.testing.assert_close(reid(x), features)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), features)


def test_default_input_size_and_bad_arguments():
    assert timm.create_model("rga_resnet50").pretrained_cfg["input_size"] == (3, 256, 128)
    with pytest.raises(ValueError, match="in_chans"):
        timm.create_model("rga_resnet50", in_chans=1, **SMALL)
    with pytest.raises(ValueError, match="num_classes"):
        timm.create_model("rga_resnet50", num_classes=-1, **SMALL)
    model = timm.create_model("rga_resnet50", num_classes=2, **SMALL)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(2, global_pool="max")


# Any timm CNN with feature_info: a block after each stage it lists at reduction >= 4.
CNNS = {"resnet50": ["layer1", "layer2", "layer3", "layer4"], "resnest50d": ["layer1", "layer2", "layer3", "layer4"],
        "regnety_002": ["s1", "s2", "s3", "s4"], "convnext_tiny": ["stages.0", "stages.1", "stages.2", "stages.3"]}
BLOCKS = dict(spa_ratio=2, down_ratio=2)


@pytest.mark.parametrize("name,backend", [(name, "torch") for name in CNNS] + [("regnety_002", "triton")])
def test_create_model_attaches_after_the_feature_info_stages(name, backend):
    from rga_triton.attach import attached
    from rga_triton.integrations.timm import create_model

    torch.manual_seed(0)
    model = create_model(name, input_size=(64, 32), rga=dict(BLOCKS, backend=backend), num_classes=3)
    assert list(attached(model)) == CNNS[name]
    assert model.pretrained_cfg["input_size"] == (3, 64, 32)
    plain = timm.create_model(name, num_classes=3)
    assert set(plain.state_dict()) == {k for k in model.state_dict() if not k.startswith("rga_att")}
    x = torch.randn(2, 3, 64, 32)
    seen = {}
    last = model.get_submodule(CNNS[name][-1])
    last.register_forward_hook(lambda m, a, out: seen.setdefault("stage", out), prepend=True)
    model.rga_att4.register_forward_pre_hook(lambda m, a: seen.setdefault("block", a[0]))
    logits = model.train()(x)
    assert logits.shape == (2, 3) and torch.equal(seen["stage"], seen["block"])   # the block gets the stage's map
    logits.square().sum().backward()
    assert all(getattr(model, f"rga_att{k}").W_spatial[0].weight.grad.abs().sum() > 0 for k in range(1, 5))
    model.eval()
    with torch.no_grad():
        maps = model.forward_features(x)
        assert maps.dim() == 4 and model(x).shape == (2, 3)


def test_a_model_without_stages_is_refused():
    from rga_triton.integrations.timm import stages_of

    with pytest.raises(ValueError, match="feature_info"):
        stages_of(torch.nn.Conv2d(3, 3, 1))
