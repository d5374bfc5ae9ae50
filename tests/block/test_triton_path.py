"""The "triton" backend against the float64 reference: on CUDA when present, else through
Triton's interpreter on the CPU (TRITON_INTERPRET=1, as CI runs it)."""
import warnings

import pytest
import torch

import rga_triton
from rga_triton import dispatch

from helpers import (
    BATCHNORM_VARIANTS,
    DEVICE,
    TOLERANCE,
    TOLERANCE_TF32,
    compare_steps,
    float32_tolerance,
    make_pair,
    rel_err,
    vary_batchnorms,
)

pytestmark = pytest.mark.needs_triton
HALF_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])   # interpreter: no bf16

BRANCHES = [(True, True), (True, False), (False, True)]
# Tails everywhere: N, C, K, R and the hidden width are not multiples of any block size.
TAIL_SHAPES = [
    (20, 6, 10, 3, 3, 8, 4),     # C=20, N=60: K=6, R=7, hidden 2 / 1
    (37, 7, 5, 2, 4, 3, 4),      # C=37, N=35: K=9, R=11, hidden 3 / 2
]


def _pair(shape, use_spatial=True, use_channel=True, dtype=torch.float32, algorithm="auto", seed=0, order="sc"):
    c, h, w, b, cr, sr, dr = shape
    ref, fast, x = make_pair(c, h, w, b, use_spatial, use_channel, cr, sr, dr, dtype=dtype, device=DEVICE,
                             backend="triton", seed=seed, order=order)
    fast.algorithm = algorithm
    return ref, fast, x


@pytest.mark.parametrize("algorithm", ["reassociated", "tiled"])
@pytest.mark.parametrize("use_spatial,use_channel", BRANCHES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", TAIL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_matches_reference(shape, train, use_spatial, use_channel, algorithm):
    ref, fast, x = _pair(shape, use_spatial, use_channel, algorithm=algorithm)
    compare_steps(ref, fast, x, train, TOLERANCE[torch.float32], torch.float32, device=DEVICE, steps=3)


@pytest.mark.parametrize("order", ["cs", "parallel"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_branch_orders_match_reference(order, train):
    ref, fast, x = _pair(TAIL_SHAPES[1], order=order)
    compare_steps(ref, fast, x, train, TOLERANCE[torch.float32], torch.float32, device=DEVICE, steps=2)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_half_precision_matches_reference(dtype, train):
    ref, fast, x = _pair((64, 16, 8, 4, 8, 8, 8), dtype=dtype)
    compare_steps(ref, fast, x, train, TOLERANCE[dtype], dtype, device=DEVICE, steps=2)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("use_spatial,use_channel", [(True, False), (False, True)], ids=["RGA-S", "RGA-C"])
def test_half_precision_single_branch_train_matches_reference(dtype, use_spatial, use_channel):
    """One branch alone (no gated operand) meets the contract in half-precision train too."""
    ref, fast, x = _pair((64, 16, 8, 4, 8, 8, 8), dtype=dtype, use_spatial=use_spatial, use_channel=use_channel)
    compare_steps(ref, fast, x, True, TOLERANCE[dtype], dtype, device=DEVICE, steps=2)


@pytest.mark.skipif(DEVICE != "cuda", reason="TF32 exists on CUDA GPUs only")
def test_float32_accuracy_holds_when_tf32_is_allowed():
    """The kernels keep float32 accuracy (3xTF32) when TF32 is allowed: forward outputs and
    running statistics. Gradients are left out: backward's PyTorch matmuls (projection,
    dA, dtp) then use TF32 as the user asked (grad x ~1e-2 measured on an H100, when backward
    was still a torch-path recompute)."""
    torch.backends.cuda.matmul.allow_tf32 = True      # the autouse fixture restores it
    ref, fast, x = _pair((64, 16, 8, 4, 8, 8, 8))
    compare_steps(ref, fast, x, True, TOLERANCE_TF32, torch.float32, device=DEVICE, grads=False)


@pytest.mark.parametrize("c,h,w", [(256, 64, 32), (2048, 16, 8)], ids=["stage1", "stage4"])
def test_rga_net_stage_shapes(c, h, w):
    """RGA-Net's first and last stage shapes (the block sizes' real tails and splits): a train
    step with every gradient, then eval.

    Seed 1: with seed 0 at stage 1 one position sits on a ReLU's kink. Z from the kernels and
    Z from a float32 matmul (both within 2.4e-7 of float64) take different sides of it there,
    and only there, which moves grad x by 9e-4: rounding at a non-differentiable point, not
    an error of the algorithm (seeds 1 and 2: 9e-7 and 5e-7)."""
    ref, fast, x = make_pair(c, h, w, batch=2, device=DEVICE, backend="triton", seed=1)
    compare_steps(ref, fast, x, True, TOLERANCE[torch.float32], torch.float32, device=DEVICE)
    ref.eval(), fast.eval()
    with torch.no_grad():
        assert rel_err(fast(x.float().to(DEVICE)), ref(x)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("use_spatial,use_channel", [(True, False), (False, True)])
def test_statistics_merge_across_splits(use_spatial, use_channel):
    """L > STAT_SPLIT with a tail: partial statistics of several splits merge exactly."""
    ref, fast, x = _pair((300, 24, 20, 2, 16, 16, 8) if use_spatial else (300, 6, 4, 2, 8, 4, 4),
                         use_spatial, use_channel)
    compare_steps(ref, fast, x, True, TOLERANCE[torch.float32], torch.float32, device=DEVICE, steps=2)


def test_momentum_none_and_batch_of_one():
    ref, fast, x = _pair((16, 8, 8, 1, 2, 8, 4))
    for m in (ref, fast):
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.momentum = None
    compare_steps(ref, fast, x, True, TOLERANCE[torch.float32], torch.float32, device=DEVICE, steps=3)


def test_strided_and_channels_last_inputs():
    ref, fast, x = _pair(TAIL_SHAPES[0])
    ref.eval(), fast.eval()
    expected = ref(x)
    xd = x.float().to(DEVICE)
    wide = torch.zeros(3, 40, 6, 10, device=DEVICE)
    wide[:, ::2] = xd
    for view in (xd.to(memory_format=torch.channels_last), wide[:, ::2], xd.transpose(2, 3).contiguous()
                 .transpose(2, 3)):
        assert rel_err(fast(view), expected) <= TOLERANCE[torch.float32]


def test_tiled_and_reassociated_agree():
    _, fast, x = _pair(TAIL_SHAPES[1])
    fast.eval()
    x = x.float().to(DEVICE)
    fast.algorithm = "reassociated"
    a = fast(x)
    fast.algorithm = "tiled"
    assert rel_err(fast(x), a) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("variant", BATCHNORM_VARIANTS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batchnorm_configurations_match_reference(variant, train):
    """track_running_stats=False, affine=False, a zero BatchNorm weight: as nn.BatchNorm2d does."""
    ref, fast, x = _pair(TAIL_SHAPES[1])
    vary_batchnorms((ref, fast), variant)
    compare_steps(ref, fast, x, train, TOLERANCE[torch.float32], torch.float32, device=DEVICE, steps=2)


@pytest.mark.parametrize("algorithm", ["reassociated", "tiled"])
@pytest.mark.parametrize("use_spatial,use_channel,c,h,w", [(True, False, 8, 12, 12), (False, True, 160, 4, 4),
                                                           (True, True, 8, 12, 12)], ids=["RGA-S", "RGA-C", "RGA-SC"])
def test_no_square_affinity_is_formed(use_spatial, use_channel, c, h, w, algorithm):
    """No N x N (C x C) tensor crosses an op boundary, forward or backward, either algorithm."""
    from test_torch_path import _square_tensors
    size = h * w if use_spatial else c
    _, fast, x = make_pair(c, h, w, 2, use_spatial, use_channel, cha_ratio=2, spa_ratio=8, down_ratio=2,
                           device=DEVICE, backend="triton")
    fast.algorithm = algorithm
    assert _square_tensors(fast.train(), x.float().to(DEVICE), size) == []


def test_affinity_matches_matmul():
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(2, 9, 70, generator=gen, dtype=torch.float64)
    phi = torch.randn(2, 9, 45, generator=gen, dtype=torch.float64)
    g = rga_triton.affinity(theta.float().to(DEVICE), phi.float().to(DEVICE), backend="triton")
    assert g.shape == (2, 70, 45)
    assert rel_err(g, theta.transpose(1, 2) @ phi) <= TOLERANCE[torch.float32]
    # strided operands are read through their strides
    g_t = rga_triton.affinity(theta.float().to(DEVICE).transpose(1, 2).contiguous().transpose(1, 2),
                              phi.float().to(DEVICE), backend="triton")
    assert rel_err(g_t, theta.transpose(1, 2) @ phi) <= TOLERANCE[torch.float32]


def test_affinity_gradients_match_matmul():
    """G is differentiable on the Triton path too: dtheta = phi dG^T, dphi = theta dG."""
    gen = torch.Generator().manual_seed(5)
    theta = torch.randn(2, 9, 70, generator=gen, dtype=torch.float64)
    phi = torch.randn(2, 9, 45, generator=gen, dtype=torch.float64)
    grad_g = torch.randn(2, 70, 45, generator=gen, dtype=torch.float64)
    t64, p64 = theta.clone().requires_grad_(True), phi.clone().requires_grad_(True)
    (t64.transpose(1, 2) @ p64).backward(grad_g)
    t32 = theta.float().to(DEVICE).requires_grad_(True)
    p32 = phi.float().to(DEVICE).requires_grad_(True)
    rga_triton.affinity(t32, p32, backend="triton").backward(grad_g.float().to(DEVICE))
    assert rel_err(t32.grad, t64.grad) <= TOLERANCE[torch.float32]
    assert rel_err(p32.grad, p64.grad) <= TOLERANCE[torch.float32]
    # one operand without grad: the other still gets its gradient
    p32.grad = None
    rga_triton.affinity(theta.float().to(DEVICE), p32, backend="triton").backward(grad_g.float().to(DEVICE))
    assert rel_err(p32.grad, p64.grad) <= TOLERANCE[torch.float32]


def test_relation_maps_match_reference_affinity():
    ref, fast, x = _pair((16, 6, 10, 2, 2, 8, 4))
    ref.eval(), fast.eval()
    b, c, h, w = x.shape
    theta = ref.theta_spatial(x).view(b, -1, h * w)
    phi = ref.phi_spatial(x).view(b, -1, h * w)
    g = theta.transpose(1, 2) @ phi
    positions = [0, 17, (5, 9)]
    rows, cols = rga_triton.relation_maps(fast, x.float().to(DEVICE), positions)
    flat = [0, 17, 5 * w + 9]
    assert rows.shape == cols.shape == (b, 3, h, w)
    assert rel_err(rows, g[:, flat, :].reshape(b, 3, h, w)) <= TOLERANCE[torch.float32]
    assert rel_err(cols, g[:, :, flat].transpose(1, 2).reshape(b, 3, h, w)) <= TOLERANCE[torch.float32]
    with pytest.raises(ValueError, match="outside"):
        rga_triton.relation_maps(fast, x.float().to(DEVICE), [h * w])


def test_explicit_triton_refuses_float64():
    _, fast, x = _pair(TAIL_SHAPES[0], dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        fast(x.to(DEVICE))


def test_auto_falls_back_once_per_reason(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned_reasons", set())
    _, fast, x = _pair(TAIL_SHAPES[0], dtype=torch.float64)
    fast.backend = "auto"
    x = x.to(DEVICE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast(x)
        fast(x)
    messages = [str(w.message) for w in caught if "rga_triton" in str(w.message)]
    assert len(messages) == 1, messages


def test_triton_without_gpu_or_interpreter_says_so(monkeypatch):
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    _, fast, x = _pair(TAIL_SHAPES[0])
    with pytest.raises(ValueError, match="CUDA tensor"):
        fast.cpu()(x.float())     # a CPU tensor, no interpreter


def test_too_wide_attention_network_is_refused_or_falls_back(monkeypatch):
    """(1 + 128 // 1) // 1 = 129 hidden channels, over backend.MAX_HIDDEN: backend="triton" names the
    arguments; "auto" runs the torch path (matching the reference) after one warning that says why."""
    ref, fast, x = make_pair(4, 8, 16, 2, use_channel=False, cha_ratio=2, spa_ratio=1, down_ratio=1,
                             device=DEVICE, backend="triton")
    assert dispatch.MAX_HIDDEN == 128
    with pytest.raises(ValueError, match=r"spatial branch's attention network has 129 hidden channels "
                                         r"\(\(1 \+ in_spatial // spa_ratio\) // down_ratio with in_spatial=128, "
                                         r"spa_ratio=1, down_ratio=1\) and the Triton kernels take at most 128"):
        fast(x.float().to(DEVICE))
    fast.backend = "auto"
    monkeypatch.setattr(dispatch, "_warned_reasons", set())
    with pytest.warns(UserWarning, match="129 hidden channels"):
        out = fast(x.float().to(DEVICE))
    assert rel_err(out.double().cpu(), ref(x)) <= TOLERANCE_TF32


def test_widest_attention_network_taken_matches_reference():
    """(1 + 255) // 2 = 128 hidden channels, backend.MAX_HIDDEN: the kernels' largest hidden block."""
    ref, fast, x = make_pair(4, 15, 17, 2, use_channel=False, cha_ratio=2, spa_ratio=1, down_ratio=2,
                             device=DEVICE, backend="triton")
    assert fast.W_spatial[0].out_channels == dispatch.MAX_HIDDEN
    compare_steps(ref, fast, x, True, float32_tolerance(DEVICE), torch.float32, device=DEVICE, steps=1)


def test_memoised_constants_follow_parameter_and_buffer_updates():
    ref, fast, x = _pair(TAIL_SHAPES[0])
    ref.eval(), fast.eval()
    xd = x.float().to(DEVICE)
    with torch.no_grad():
        fast(xd)                                   # fills the memo
        for m in (ref, fast):                      # in-place updates, as optimizers and BN do
            m.gg_spatial[1].running_var.mul_(1.5)
            m.theta_channel[0].weight.mul_(0.9)
            m.W_spatial[4].bias.add_(0.3)
        assert rel_err(fast(xd), ref(x)) <= TOLERANCE[torch.float32]
        ref.load_state_dict(make_pair(20, 6, 10, 3, cha_ratio=3, down_ratio=4, seed=7)[0].state_dict())
        fast.load_state_dict(ref.state_dict())
        assert rel_err(fast(xd), ref(x)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("wants_grad", [False, True], ids=["no-grad", "grad"])
def test_kernels_launch_inside_the_inputs_device_guard(monkeypatch, wants_grad):
    """Triton launches on the current CUDA device, so the Triton path makes x's device current
    (``backend.on_device_of``) before its first launch; here a spy stands in for the guard and
    the output pass checks that it runs inside."""
    from rga_triton import triton_path
    from rga_triton.ops.gating import kernels as gating
    guarded, seen = [], []

    class Spy:
        def __init__(self, t):
            self.t = t

        def __enter__(self):
            guarded.append(self.t)

        def __exit__(self, *exc):
            guarded.pop()

    def spying(launch):
        def run(x, *args):
            seen.append(bool(guarded) and guarded[-1].data_ptr() == x.data_ptr())   # x or a view of it
            return launch(x, *args)
        return run

    monkeypatch.setattr(dispatch, "on_device_of", Spy)
    monkeypatch.setattr(triton_path, "apply_gates", spying(triton_path.apply_gates))
    monkeypatch.setattr(gating, "apply_gates", spying(gating.apply_gates))
    _, fast, x = _pair(TAIL_SHAPES[0])
    x = x.float().to(DEVICE).requires_grad_(wants_grad)
    with torch.set_grad_enabled(wants_grad):
        fast(x)
    assert seen == [True]


def test_device_guard_is_a_no_op_off_cuda():
    with dispatch.on_device_of(torch.zeros(1)):
        pass


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_module_on_the_second_gpu_matches_the_first():
    ref, fast, x = _pair(TAIL_SHAPES[0])
    x = x.float()
    out = {}
    for index in (0, 1):
        device = torch.device("cuda", index)
        with torch.cuda.device(0):      # cuda:0 current, whatever the module's device
            out[index] = fast.to(device).eval()(x.to(device)).cpu()
    assert torch.equal(out[0], out[1])
