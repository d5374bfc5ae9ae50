"""rga_triton.attach on torchvision models it has no code for: resnet101 and wide_resnet50_2 (toolbox venv)."""
import pytest
import torch

torchvision = pytest.importorskip("torchvision")

import rga_triton  # noqa: E402
from rga_triton.attach import attached, block_keys  # noqa: E402

STAGES = ["layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize("name", ["resnet101", "wide_resnet50_2"])
def test_attach_to_a_torchvision_model(name):
    torch.manual_seed(0)
    base = getattr(torchvision.models, name)(num_classes=3)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = rga_triton.attach(base, STAGES, (64, 32), spa_ratio=2, down_ratio=2, backend="torch")
    assert list(attached(model)) == STAGES
    assert [(b.in_channel, b.in_spatial) for b in (getattr(model, f"rga_att{k}") for k in range(1, 5))] == \
        [(256, 16 * 8), (512, 8 * 4), (1024, 4 * 2), (2048, 2 * 1)]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())            # torchvision's keys, untouched
    report = getattr(torchvision.models, name)(num_classes=3).load_state_dict(
        {k: v for k, v in state.items() if k not in block_keys(model)}, strict=True)   # and back, strictly
    assert not report.missing_keys
    x = torch.randn(2, 3, 64, 32)
    model(x).square().sum().backward()
    assert all(getattr(model, f"rga_att{k}").gg_spatial[0].weight.grad.abs().sum() > 0 for k in range(1, 5))
