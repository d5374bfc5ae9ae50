"""The "torch" backend against the literal reference in float64: outputs, gradients, BN state."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rga_triton
from reference import RGA_Module

from helpers import BATCHNORM_VARIANTS, TOLERANCE, compare_steps, make_pair, rel_err, vary_batchnorms

BRANCHES = [(True, True), (True, False), (False, True)]

# (C, H, W, B, cha_ratio, spa_ratio, down_ratio): square, non-square, N % spa_ratio != 0,
# C % cha_ratio != 0, B in {2, 5}.
SHAPES = [
    (16, 8, 8, 2, 2, 8, 4),
    (20, 6, 10, 5, 3, 8, 4),     # N = 60: N / spa_ratio = 7.5; C / cha_ratio = 6.67
    (37, 7, 5, 2, 4, 3, 4),      # odd everything
]


@pytest.mark.parametrize("use_spatial,use_channel", BRANCHES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float64_matches_reference(shape, train, use_spatial, use_channel):
    c, h, w, b, cr, sr, dr = shape
    ref, fast, x = make_pair(c, h, w, b, use_spatial, use_channel, cr, sr, dr, dtype=torch.float64)
    compare_steps(ref, fast, x, train, TOLERANCE[torch.float64], torch.float64, steps=3)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_float32_matches_float64_reference(train):
    ref, fast, x = make_pair(24, 9, 7, 3, cha_ratio=2, spa_ratio=4, down_ratio=4)
    compare_steps(ref, fast, x, train, TOLERANCE[torch.float32], torch.float32, steps=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_half_precision_matches_float64_reference(shape, train, dtype):
    c, h, w, b, cr, sr, dr = shape
    ref, fast, x = make_pair(c, h, w, b, True, True, cr, sr, dr, dtype=dtype)
    compare_steps(ref, fast, x, train, TOLERANCE[dtype], dtype, steps=2)


@pytest.mark.slow
@pytest.mark.parametrize("c,h,w", [(256, 64, 32), (2048, 16, 8)], ids=["stage1", "stage4"])
def test_rga_net_stage_shapes_float32(c, h, w):
    ref, fast, x = make_pair(c, h, w, batch=2)
    compare_steps(ref, fast, x, True, TOLERANCE[torch.float32], torch.float32, steps=1)
    ref.eval(), fast.eval()
    with torch.no_grad():
        assert rel_err(fast(x.float()), ref(x)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("order", ["cs", "parallel"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_branch_orders_match_reference(order, train):
    ref, fast, x = make_pair(20, 6, 10, 3, cha_ratio=3, down_ratio=4, dtype=torch.float64, order=order)
    compare_steps(ref, fast, x, train, TOLERANCE[torch.float64], torch.float64, steps=2)


def test_momentum_none_cumulative_average():
    ref, fast, x = make_pair(16, 8, 8, 2, cha_ratio=2, down_ratio=4, dtype=torch.float64)
    for m in (ref, fast):
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.momentum = None
    compare_steps(ref, fast, x, True, TOLERANCE[torch.float64], torch.float64, steps=3)


@pytest.mark.parametrize("check", ["gradcheck", "gradgradcheck"])
def test_gradcheck_float64(check):
    """First and second derivatives (gradient penalties: the torch path is twice differentiable), train and eval."""
    for train in (True, False):
        _, fast, x = make_pair(8, 4, 4, 2, cha_ratio=2, spa_ratio=2, down_ratio=2, dtype=torch.float64)
        fast.train(train)
        x = x.clone().requires_grad_(True)
        assert getattr(torch.autograd, check)(fast, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradient_penalty_matches_reference():
    """d/dtheta ||d out / dx||^2 against the reference, the quantity a gradient penalty trains on."""
    ref, fast, x = make_pair(12, 5, 6, 3, cha_ratio=2, spa_ratio=3, down_ratio=2, dtype=torch.float64)
    grads = []
    for module in (ref, fast):
        xin = x.clone().requires_grad_(True)
        out = module(xin)
        grad_x, = torch.autograd.grad((out * out.detach().sin()).sum(), xin, create_graph=True)
        penalty = grad_x.square().sum()
        grads.append(torch.autograd.grad(penalty, [xin] + list(module.parameters())))
    for name, actual, expected in zip(["x"] + [n for n, _ in fast.named_parameters()], grads[1], grads[0]):
        assert rel_err(actual, expected) <= TOLERANCE[torch.float64], name


def test_state_dict_round_trip():
    ref = RGA_Module(32, 64, cha_ratio=4, down_ratio=4)
    fast = rga_triton.RGAModule(32, 64, cha_ratio=4, down_ratio=4)
    fast.load_state_dict(ref.state_dict(), strict=True)
    assert list(fast.state_dict()) == list(ref.state_dict())
    back = RGA_Module(32, 64, cha_ratio=4, down_ratio=4)
    back.load_state_dict(fast.state_dict(), strict=True)
    for name, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
        assert fast.state_dict()[name].shape == value.shape, name


def test_reference_state_dict_gives_same_outputs():
    ref, fast, x = make_pair(32, 8, 8, 2, cha_ratio=4, down_ratio=4, dtype=torch.float64)
    for train in (False, True):
        ref.train(train), fast.train(train)
        assert rel_err(fast(x), ref(x)) <= TOLERANCE[torch.float64]


def test_alias_and_exports():
    assert rga_triton.RGA_Module is rga_triton.RGAModule


class _ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def _square_tensors(module, x, size):
    """Ops that produced a tensor with two dimensions of at least ``size`` (an N x N map per image)."""
    x = x.clone().requires_grad_(True)
    with _ShapeRecorder() as rec:
        module(x).sum().backward()
    return [(op, s) for op, s in rec.shapes if sum(d >= size for d in s) >= 2]


@pytest.mark.parametrize("use_spatial,use_channel,c,h,w", [
    (True, False, 8, 12, 12),    # spatial: N = 144 > C, look for N x N
    (False, True, 160, 4, 4),    # channel: C = 160 > N, look for C x C
    (True, True, 8, 12, 12),
])
def test_no_square_affinity_is_formed(use_spatial, use_channel, c, h, w):
    size = h * w if use_spatial else c
    ref, fast, x = make_pair(c, h, w, 2, use_spatial, use_channel, cha_ratio=2, spa_ratio=8, down_ratio=2,
                             dtype=torch.float64)
    fast.train()
    assert _square_tensors(fast, x, size) == []
    # The detector does fire on the reference, which materialises G.
    assert _square_tensors(ref.train(), x, size)


@pytest.mark.parametrize("variant", BATCHNORM_VARIANTS)
@pytest.mark.parametrize("use_spatial,use_channel", [(True, False), (False, True), (True, True)],
                         ids=["RGA-S", "RGA-C", "RGA-SC"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batchnorm_configurations_match_reference(variant, use_spatial, use_channel, train):
    """track_running_stats=False, affine=False, a zero BatchNorm weight: as nn.BatchNorm2d does."""
    ref, fast, x = make_pair(20, 6, 10, 3, use_spatial, use_channel, cha_ratio=3, down_ratio=4)
    vary_batchnorms((ref, fast), variant)
    compare_steps(ref, fast, x, train, TOLERANCE[torch.float32], torch.float32, steps=2)


# ---- bad input: each error names the argument -------------------------------------------------------

def _module(**kw):
    args = dict(in_channel=16, in_spatial=64, cha_ratio=2, down_ratio=4)
    args.update(kw)
    return rga_triton.RGAModule(**args).double()


@pytest.mark.parametrize("x,exc,match", [
    (torch.randn(16, 8, 8, dtype=torch.float64), ValueError, "x must be 4-D"),
    (torch.randn(2, 15, 8, 8, dtype=torch.float64), ValueError, r"in_channel=16"),
    (torch.randn(2, 16, 8, 7, dtype=torch.float64), ValueError, r"in_spatial=64"),
    (torch.ones(2, 16, 8, 8, dtype=torch.int64), TypeError, "floating-point"),
    (torch.ones(2, 16, 8, 8, dtype=torch.bool), TypeError, "floating-point"),
    (torch.ones(2, 16, 8, 8, dtype=torch.complex64), TypeError, "floating-point"),
    (torch.randn(2, 16, 8, 8, dtype=torch.float32), TypeError, "dtype"),
    ([[1.0]], TypeError, "torch.Tensor"),
])
def test_bad_input(x, exc, match):
    with pytest.raises(exc, match=match):
        _module()(x)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(in_channel=1), ValueError, "cha_ratio"),
    (dict(in_spatial=4, spa_ratio=8), ValueError, "spa_ratio"),
    (dict(down_ratio=64), ValueError, "down_ratio"),
    (dict(use_spatial=False, use_channel=False), ValueError, "use_spatial"),
    (dict(in_channel=16.0), TypeError, "in_channel"),
    (dict(cha_ratio=0), ValueError, "cha_ratio"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(order="cc"), ValueError, "order"),
])
def test_bad_constructor_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        _module(**kw)


def test_one_value_per_channel_in_train_fails_like_batchnorm():
    ref = RGA_Module(4, 1, cha_ratio=1, spa_ratio=1, down_ratio=1).double()
    fast = rga_triton.RGAModule(4, 1, cha_ratio=1, spa_ratio=1, down_ratio=1, backend="torch").double()
    x = torch.randn(1, 4, 1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel") as expected:
        ref(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fast(x)
    assert "when training" in str(expected.value)


def test_batch_of_one_trains_like_reference():
    ref, fast, x = make_pair(16, 8, 8, 1, cha_ratio=2, down_ratio=4, dtype=torch.float64)
    compare_steps(ref, fast, x, True, TOLERANCE[torch.float64], torch.float64)


def test_empty_batch():
    """B = 0 returns an empty output as convs do; in train mode every BatchNorm behaves as
    nn.BatchNorm2d does on an empty batch (stats untouched, num_batches_tracked + 1).
    The authors' module raises here (its view(b, c, -1) is ambiguous for b = 0)."""
    _, fast, _ = make_pair(16, 8, 8, 2, cha_ratio=2, down_ratio=4, dtype=torch.float64)
    x = torch.randn(0, 16, 8, 8, dtype=torch.float64)
    fast.eval()
    assert fast(x).shape == x.shape
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    fast.train()
    assert fast(x).shape == x.shape
    for name, value in fast.state_dict().items():
        expected = before[name] + 1 if name.endswith("num_batches_tracked") else before[name]
        assert torch.equal(value, expected), name
