"""rga_triton.attach on a CNN it has never seen: a small custom network (no torchvision here; torchvision's
resnet101 and wide_resnet50_2 are in test_integrations_attach.py, in the toolbox venv)."""
import copy

import pytest
import torch
import torch.nn as nn

import rga_triton
from reference import RGA_Module
from rga_triton.attach import attached, block_keys, stage_outputs

from helpers import TOLERANCE, compare_steps, randomize_batchnorm, rel_err

SIZE = (32, 16)                     # stem 16 x 8, body.0 8 x 4, body.1 4 x 2
RGA = dict(cha_ratio=2, spa_ratio=2, down_ratio=2)
AFTER = {"stem": dict(use_channel=False), "body.1": {}}     # a top-level stage and one inside a Sequential


class TinyCNN(nn.Module):
    """A three-stage CNN with a head: what attach has never seen (no ResNet, no torchvision)."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(
            nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()),
            nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()))
        self.head = nn.Linear(32, classes)
        self.unused = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean(dim=(2, 3)))


def _base(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = TinyCNN().to(dtype)
    randomize_batchnorm(model, torch.randn(4, 3, *SIZE, dtype=dtype), torch.Generator().manual_seed(seed))
    return model


@pytest.fixture(scope="module")
def pair():
    """(base network, the same network attached, float64, torch path, non-trivial BatchNorm state everywhere)."""
    base = _base()
    model = rga_triton.attach(copy.deepcopy(base), AFTER, SIZE, backend="torch", **RGA)
    for name in ("rga_att1", "rga_att2"):
        randomize_batchnorm(getattr(model, name), torch.randn(4, *_stage_shape(name), dtype=torch.float64),
                            torch.Generator().manual_seed(1))
    return base, model


def _stage_shape(name):
    return {"rga_att1": (8, 16, 8), "rga_att2": (32, 4, 2)}[name]


def _with_reference_blocks(base, model):
    """The base network with the literal reference blocks (float64, the attached blocks' weights) composed by hand."""
    refs = []
    for name, kwargs in zip(("rga_att1", "rga_att2"), AFTER.values()):
        block = getattr(model, name)
        ref = RGA_Module(block.in_channel, block.in_spatial, **{**RGA, **kwargs}).double()
        ref.load_state_dict(block.state_dict(), strict=True)
        refs.append(ref)
    plain = copy.deepcopy(base)

    def forward(x):
        x = refs[0](plain.stem(x))
        x = refs[1](plain.body[1](plain.body[0](x)))
        return plain.head(x.mean(dim=(2, 3)))

    return plain, refs, forward


def test_blocks_are_named_submodules_sized_from_the_stage_outputs(pair):
    _, model = pair
    assert attached(model) == {"stem": "rga_att1", "body.1": "rga_att2"}
    one, two = model.rga_att1, model.rga_att2
    assert (one.in_channel, one.in_spatial, one.use_channel) == (8, 16 * 8, False)     # per-stage kwargs win
    assert (two.in_channel, two.in_spatial, two.use_channel, two.spa_ratio) == (32, 4 * 2, True, 2)
    assert isinstance(one, rga_triton.RGAModule) and one.backend == "torch"
    assert one.theta_spatial[0].weight.dtype == torch.float64 and one.training == model.training
    assert set(block_keys(model)) == {k for k in model.state_dict() if k.startswith(("rga_att1.", "rga_att2."))}
    outputs = stage_outputs(TinyCNN(), ["stem", "body.0"], (3, 64, 32))
    shapes = {name: tuple(out.shape) for name, out in outputs.items()}
    assert shapes == {"stem": (1, 8, 32, 16), "body.0": (1, 16, 16, 8)}


@pytest.mark.parametrize("train", [True, False])
def test_attached_blocks_compute_the_reference_forward_and_backward(pair, train):
    """The attached network equals the base network with the authors' blocks composed by hand after the
    stages, in float64: output, grad x, every parameter's gradient and the running statistics after a step."""
    base, model = pair
    model, base = copy.deepcopy(model).train(train), copy.deepcopy(base)
    plain, refs, forward = _with_reference_blocks(base, model)
    for module in (plain, *refs):
        module.train(train)
    x = torch.randn(3, 3, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grad = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, expected = model(xa), forward(xb)
    out.backward(grad)
    expected.backward(grad)
    tol = TOLERANCE[torch.float64]
    assert rel_err(out, expected) <= tol and rel_err(xa.grad, xb.grad) <= tol
    reference_params = dict(plain.named_parameters())
    reference_params.update({f"rga_att{k}.{n}": p for k, ref in enumerate(refs, 1) for n, p in ref.named_parameters()})
    for name, p in model.named_parameters():
        expected_grad = reference_params[name].grad
        if expected_grad is None:                         # the model's unused conv
            assert p.grad is None, name
            continue
        assert rel_err(p.grad, expected_grad) <= tol, name
    reference_state = dict(plain.state_dict())
    reference_state.update({f"rga_att{k}.{n}": v for k, ref in enumerate(refs, 1) for n, v in ref.state_dict().items()})
    for name, value in model.state_dict().items():
        assert (torch.equal(value, reference_state[name]) if "num_batches" in name
                else rel_err(value, reference_state[name]) <= tol), name


def test_a_triton_path_block_is_a_standalone_rgamodule_on_its_stage_output():
    """float32 on the Triton path: the attached block against the float64 reference on the stage's output
    (forward, backward, running statistics), and the model's output is the block applied to that stage."""
    base = _base(torch.float32).eval()                   # eval: measuring the stage output moves no statistics
    model = rga_triton.attach(copy.deepcopy(base), ["body.1"], SIZE, backend="triton", **RGA)
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        stage = base.body(base.stem(x.clone()))          # base: the same weights, no hook
    block = model.rga_att1
    ref = RGA_Module(32, 8, **RGA).double()
    ref.load_state_dict(block.state_dict(), strict=True)
    for train in (True, False):
        compare_steps(ref, block, stage.double(), train, TOLERANCE[torch.float32], torch.float32)
    model.eval()
    with torch.no_grad():
        expected = base.head(block(base.body(base.stem(x))).mean(dim=(2, 3)))
        assert torch.equal(model(x), expected)


def test_base_weights_are_untouched_and_load_without_renaming():
    base = _base()
    model = copy.deepcopy(base).train()
    model.stem.eval()                                     # a mixed-mode model keeps its modes
    rga_triton.attach(model, AFTER, SIZE, backend="torch", **RGA)
    state = model.state_dict()
    for name, value in base.state_dict().items():
        assert torch.equal(state[name], value), name      # bit-identical, num_batches_tracked included
    assert not model.stem.training and model.body.training and model.rga_att1.training
    fresh = rga_triton.attach(TinyCNN().double(), AFTER, SIZE, backend="torch", **RGA)
    report = fresh.load_state_dict(base.state_dict(), strict=False)     # the base file, keys as they are
    # BatchNorm fills a missing num_batches_tracked itself: every other key of the blocks is reported missing
    assert sorted(report.missing_keys) == sorted(k for k in block_keys(fresh) if "num_batches" not in k)
    assert not report.unexpected_keys
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in base.state_dict().items())


def test_state_dict_round_trips_strictly_and_copies_run_their_own_blocks(pair):
    _, model = pair
    other = rga_triton.attach(TinyCNN().double(), AFTER, SIZE, backend="torch", **RGA)
    other.load_state_dict(model.state_dict(), strict=True)
    assert other.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, *SIZE, dtype=torch.float64)
    model, other = copy.deepcopy(model).eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(other(x), model(x))
        twin = copy.deepcopy(model)
        twin.rga_att2.W_spatial[4].bias.add_(1.0)         # the copy's hook runs the copy's block
        assert not torch.equal(twin(x), model(x))
        model.rga_att2 = twin.rga_att2                    # a replaced block is the one that runs
        assert torch.equal(twin(x), model(x))


def test_fullgraph_compile_traces_the_hooks():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = rga_triton.attach(_base(torch.float32), AFTER, SIZE, backend="torch", **RGA).eval()
    counter = CompileCounter()
    x = torch.randn(2, 3, *SIZE)
    try:
        with torch.no_grad():
            out = torch.compile(model, fullgraph=True, backend=counter)(x)   # a graph break raises
            assert rel_err(out, model(x)) <= TOLERANCE[torch.float32]
        assert counter.frame_count == 1
        assert counter.op_count > 40          # the blocks' convs and matmuls are in the graph, not skipped
    finally:
        torch._dynamo.reset()


def test_a_model_meta_cannot_run_is_measured_for_real():
    class MakesACpuTensor(TinyCNN):
        def forward(self, x):
            return super().forward(x + torch.zeros(1, 3, 1, 1))      # a CPU tensor: meta inputs fail here

    model = rga_triton.attach(MakesACpuTensor(), ["body.0"], SIZE, backend="torch", **RGA)
    assert (model.rga_att1.in_channel, model.rga_att1.in_spatial) == (16, 8 * 4)
    assert model(torch.randn(2, 3, *SIZE)).shape == (2, 5)


def test_errors_name_the_stage():
    model = TinyCNN()
    with pytest.raises(ValueError, match=r"no submodule 'body\.7'.*\['stem', 'body', 'head', 'unused'\]"):
        rga_triton.attach(model, ["stem", "body.7"], SIZE)
    with pytest.raises(ValueError, match=r"stage 2 \('head'.*4-D.*2-D tensor of shape \(1, 5\)"):
        rga_triton.attach(model, ["stem", "head"], SIZE, **RGA)
    with pytest.raises(ValueError, match=r"stage 2 \('body\.1', 32 channels, 4 x 2 = 8 positions at a 32 x 16 "
                                         r"input\).*spa_ratio"):
        rga_triton.attach(model, ["stem", "body.1"], SIZE, cha_ratio=2, spa_ratio=16, down_ratio=2)
    with pytest.raises(RuntimeError, match=r"\['unused'\] did not run"):
        rga_triton.attach(model, ["unused"], SIZE, **RGA)
    with pytest.raises(TypeError, match="in_spatial"):
        rga_triton.attach(model, {"stem": dict(in_spatial=4)}, SIZE, **RGA)
    with pytest.raises(TypeError, match="Sequential"):
        rga_triton.attach(model.body, ["0"], SIZE, **RGA)
    with pytest.raises(ValueError, match="input_size"):
        rga_triton.attach(model, ["stem"], (32,), **RGA)
    with pytest.raises(ValueError, match="twice"):
        rga_triton.attach(model, ["stem", "stem"], SIZE, **RGA)
    assert not attached(model) and not hasattr(model, "rga_att1")       # nothing attached by a failed call
    rga_triton.attach(model, ["stem"], SIZE, **RGA)
    with pytest.raises(ValueError, match="already has an attribute 'rga_att1'"):
        rga_triton.attach(model, ["body.0"], SIZE, **RGA)
    rga_triton.attach(model, ["body.0"], SIZE, names=["rga_body"], **RGA)      # a second call, other names
    assert attached(model) == {"stem": "rga_att1", "body.0": "rga_body"}
