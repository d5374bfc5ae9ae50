"""Bad-input contract (issue 8): every path refuses bad input with the same clear error.

Each error names the argument, the expected value and the actual one, and the "torch" and
"triton" backends raise exactly the same error: the checks run before dispatch. The
single-case basics (wrong rank, channel count, H*W, dtype, constructor ratios) are in
tests/block/test_torch_path.py; here every path is checked against the others, together with what
those tests leave out: devices, empty batches, one value per channel in training, gradients
on non-float tensors, unusable Triton.
"""
from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rga_triton
from reference import RGA_Module
from rga_triton import dispatch

from helpers import TOLERANCE, TRITON_RUNS, make_pair, rel_err

BACKENDS = ["torch", "triton"]


def _module(backend: str, dtype=torch.float32, **kw) -> rga_triton.RGAModule:
    args = dict(in_channel=16, in_spatial=64, cha_ratio=2, down_ratio=4)
    args.update(kw)
    return rga_triton.RGAModule(**args, backend=backend).to(dtype)


def _error(call):
    """(exception type, message) that ``call()`` raises; fails the test if it returns."""
    with pytest.raises(Exception) as info:
        call()
    return type(info.value), str(info.value)


def _randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


# (id, input factory, module dtype, module device, exception, words the message must contain:
#  the argument, the expected value, the actual value)
BAD_INPUTS = [
    ("rank3", lambda: _randn(16, 8, 8), torch.float32, "cpu", ValueError,
     ["x must be 4-D", "in_channel=16", "in_spatial=64", "(16, 8, 8)"]),
    ("rank5", lambda: _randn(2, 16, 8, 8, 1), torch.float32, "cpu", ValueError,
     ["x must be 4-D", "(2, 16, 8, 8, 1)"]),
    ("channels", lambda: _randn(2, 15, 8, 8), torch.float32, "cpu", ValueError,
     ["x.shape[1]", "in_channel=16", "(2, 15, 8, 8)"]),
    ("channels_empty_batch", lambda: _randn(0, 15, 8, 8), torch.float32, "cpu", ValueError,
     ["x.shape[1]", "in_channel=16", "(0, 15, 8, 8)"]),
    ("spatial", lambda: _randn(2, 16, 8, 7), torch.float32, "cpu", ValueError,
     ["H*W", "in_spatial=64", "8*7 = 56"]),
    ("int64", lambda: torch.ones(2, 16, 8, 8, dtype=torch.int64), torch.float32, "cpu", TypeError,
     ["x must be a floating-point tensor", "torch.int64"]),
    ("uint8", lambda: torch.ones(2, 16, 8, 8, dtype=torch.uint8), torch.float32, "cpu", TypeError,
     ["x must be a floating-point tensor", "torch.uint8"]),
    ("bool", lambda: torch.ones(2, 16, 8, 8, dtype=torch.bool), torch.float32, "cpu", TypeError,
     ["x must be a floating-point tensor", "torch.bool"]),
    ("complex64", lambda: torch.ones(2, 16, 8, 8, dtype=torch.complex64), torch.float32, "cpu", TypeError,
     ["x must be a floating-point tensor", "torch.complex64"]),
    # the one non-float tensor that can require grad: PyTorch refuses requires_grad on integer
    # and bool tensors itself (test_requires_grad_on_integers_is_refused_by_pytorch)
    ("complex_requires_grad", lambda: torch.ones(2, 16, 8, 8, dtype=torch.complex64, requires_grad=True),
     torch.float32, "cpu", TypeError, ["x must be a floating-point tensor", "torch.complex64"]),
    ("float16_into_float32", lambda: _randn(2, 16, 8, 8, dtype=torch.float16), torch.float32, "cpu", TypeError,
     ["x has dtype torch.float16", "parameters are torch.float32", "autocast"]),
    ("float32_into_float16", lambda: _randn(2, 16, 8, 8), torch.float16, "cpu", TypeError,
     ["x has dtype torch.float32", "parameters are torch.float16"]),
    ("float64_into_float32", lambda: _randn(2, 16, 8, 8, dtype=torch.float64), torch.float32, "cpu", TypeError,
     ["x has dtype torch.float64", "parameters are torch.float32"]),
    ("x_on_meta", lambda: _randn(2, 16, 8, 8, device="meta"), torch.float32, "cpu", ValueError,
     ["x is on device meta", "parameters are on cpu"]),
    ("params_on_meta", lambda: _randn(2, 16, 8, 8), torch.float32, "meta", ValueError,
     ["x is on device cpu", "parameters are on meta"]),
    ("list", lambda: [[1.0]], torch.float32, "cpu", TypeError, ["x must be a torch.Tensor", "list"]),
    ("numpy", lambda: np.zeros((2, 16, 8, 8), dtype=np.float32), torch.float32, "cpu", TypeError,
     ["x must be a torch.Tensor", "ndarray"]),
]


@pytest.mark.parametrize("make_x,dtype,device,exc,words", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_raises_the_same_clear_error_on_every_path(make_x, dtype, device, exc, words):
    """Wrong rank, channels or H*W, non-float or mixed dtypes, devices that differ: the same
    exception and message from every backend, naming the argument, expected and actual values."""
    errors = {backend: _error(lambda: _module(backend, dtype).to(device)(make_x())) for backend in BACKENDS}
    assert errors["torch"] == errors["triton"], errors
    kind, message = errors["torch"]
    assert kind is exc, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def _half_gg_spatial(module):
    module.gg_spatial.half()


def _float_theta_in_half_module(module):
    module.half().theta_spatial.float()


def _w_channel_on_meta(module):
    module.W_channel.to("meta")


# (id, what breaks the module's parameters, exception, words the message must contain)
MIXED_PARAMETERS = [
    ("gg_spatial_half", _half_gg_spatial, TypeError,
     ["parameter gg_spatial.0.weight is torch.float16", "other parameters are torch.float32",
      "3 of 36 differ: gg_spatial.0.weight, gg_spatial.1.weight, gg_spatial.1.bias", "module.to(torch.float32)"]),
    ("theta_float_in_half", _float_theta_in_half_module, TypeError,
     ["parameter theta_spatial.0.weight is torch.float32", "other parameters are torch.float16",
      "module.to(torch.float16)"]),
    ("W_channel_on_meta", _w_channel_on_meta, ValueError,
     ["parameter W_channel.0.weight is on meta", "other parameters are on cpu", "6 of 36 differ",
      "module.to('cpu')"]),
]


@pytest.mark.parametrize("mix,exc,words", [case[1:] for case in MIXED_PARAMETERS],
                         ids=[case[0] for case in MIXED_PARAMETERS])
def test_mixed_parameters_raise_the_same_clear_error_on_every_path(mix, exc, words):
    """Parameters that do not share one dtype and device (``module.gg_spatial.half()``): the same
    error from every backend, naming the first odd parameter, its dtype or device and the
    module's, whatever x is (the module's own dtype, or the odd one)."""
    for x_dtype in (torch.float32, torch.float16):
        def call(backend):
            module = _module(backend)
            mix(module)
            return module(_randn(2, 16, 8, 8, dtype=x_dtype))
        errors = {backend: _error(lambda: call(backend)) for backend in BACKENDS}
        assert errors["torch"] == errors["triton"], errors
        kind, message = errors["torch"]
        assert kind is exc, message
        for word in words:
            assert word in message, f"{word!r} not in {message!r}"


def test_uniform_parameters_in_any_one_dtype_pass():
    """One dtype for every parameter is legal, whichever it is; buffers do not count (BatchNorm
    statistics may stay float32 in a float16 module), and float32 parameters run under autocast."""
    module = _module("torch", torch.float16)
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean, bn.running_var = bn.running_mean.float(), bn.running_var.float()
    assert module(_randn(2, 16, 8, 8, dtype=torch.float16)).dtype == torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _module("torch")(_randn(2, 16, 8, 8, dtype=torch.bfloat16)).shape == (2, 16, 8, 8)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_float32_batchnorm_in_a_half_module_is_legal_on_every_path(train):
    """apex O2's keep_batchnorm_fp32: float16 convolutions, float32 BatchNorms. Every backend
    takes it and agrees with the torch path (outputs and gradients)."""
    results = {}
    for backend in BACKENDS:
        torch.manual_seed(0)
        module = _module(backend, torch.float16)
        for bn in module.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.float()
        module.train(train)
        x = _randn(2, 16, 8, 8, dtype=torch.float16).requires_grad_(True)
        out = module(x)
        out.float().square().sum().backward()
        results[backend] = [out, x.grad] + [p.grad for p in module.parameters()]
    for name, a, b in zip(["out", "grad x"] + [n for n, _ in _module("torch").named_parameters()], *results.values()):
        assert rel_err(a.double(), b.double()) <= 2e-2, name


def test_requires_grad_on_integers_is_refused_by_pytorch():
    """A non-float x with requires_grad cannot reach the module: PyTorch refuses to create it
    (complex can, and gets our TypeError: BAD_INPUTS' complex_requires_grad)."""
    for dtype in (torch.int64, torch.int32, torch.uint8, torch.bool):
        with pytest.raises(RuntimeError, match="floating point .*dtype can require gradients"):
            torch.ones(2, 16, 8, 8, dtype=dtype, requires_grad=True)
        with pytest.raises(RuntimeError, match="floating point .*dtype can require gradients"):
            torch.ones(2, 16, 8, 8, dtype=dtype).requires_grad_(True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_meta_tensors(backend):
    """x and parameters both on "meta": the torch path infers the output shape (as convs do);
    an explicit backend="triton" refuses with a reason instead of failing inside Triton."""
    module = _module(backend).to("meta")
    x = _randn(2, 16, 8, 8, device="meta")
    if backend == "torch":
        out = module(x)
        assert out.shape == x.shape and out.device.type == "meta"
    else:
        with pytest.raises(ValueError, match="backend='triton' cannot run this input: x is on meta"):
            module(x)


@pytest.mark.parametrize("algorithm", ["reassociated", "tiled"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_empty_batch_on_every_path(train, backend, algorithm):
    """B = 0: an empty output of x's shape; backward gives empty grad x and zero (not NaN)
    parameter gradients; every BatchNorm's buffers move exactly as nn.BatchNorm2d's do on an
    empty batch (statistics untouched, num_batches_tracked + 1 in train mode)."""
    if backend == "triton" and not TRITON_RUNS:
        pytest.skip("no GPU: set TRITON_INTERPRET=1 to run the kernels")
    if backend == "torch" and algorithm == "tiled":
        pytest.skip("the algorithm only applies to the triton path")
    _, module, _ = make_pair(16, 8, 8, 2, cha_ratio=2, down_ratio=4, backend=backend)
    module.algorithm = algorithm
    module.train(train)
    expected = {}
    for name, bn in module.named_modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            twin = copy.deepcopy(bn)
            twin(torch.zeros(0, bn.num_features, 3, 3))
            expected.update({f"{name}.{k}": v for k, v in twin.state_dict().items()})
    x = torch.randn(0, 16, 8, 8, requires_grad=True)
    out = module(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for name, p in module.named_parameters():
        assert p.grad is None or (torch.isfinite(p.grad).all() and not p.grad.any()), name
    for name, value in module.state_dict().items():
        if name in expected:
            assert torch.equal(value, expected[name]), name


SINGLE_VALUE_CASES = [
    # (in_channel, H, W, use_spatial, use_channel): B = 1 and one position, or one channel
    (4, 1, 1, True, True),
    (4, 1, 1, True, False),
    (1, 2, 2, False, True),
]


@pytest.mark.parametrize("c,h,w,use_spatial,use_channel", SINGLE_VALUE_CASES)
def test_one_value_per_channel_in_train_fails_on_every_path(c, h, w, use_spatial, use_channel):
    """B = 1 with N = 1 (spatial BatchNorms) or C = 1 (channel BatchNorms) in train mode: every
    path raises nn.BatchNorm2d's ValueError, as the reference does.

    The message's size is formatted differently: "torch.Size([1, 4, 1])" from the torch path
    (F.batch_norm's own message), "[1, 4, 1]" from the triton path (rga_triton.common.batchnorm);
    the test compares them with that formatting removed. (Without a GPU or the interpreter
    backend="triton" refuses the CPU tensor first: only the torch path is checked then.)
    """
    args = dict(in_channel=c, in_spatial=h * w, use_spatial=use_spatial, use_channel=use_channel, cha_ratio=1,
                spa_ratio=1, down_ratio=1)
    x = torch.randn(1, c, h, w)
    ref_kind, ref_message = _error(lambda: RGA_Module(**args)(x))
    assert ref_kind is ValueError and "Expected more than 1 value per channel when training" in ref_message
    messages = set()
    for backend in BACKENDS if TRITON_RUNS else ["torch"]:
        kind, message = _error(lambda: rga_triton.RGAModule(**args, backend=backend)(x))
        assert kind is ValueError, message
        assert "Expected more than 1 value per channel when training" in message
        messages.add(re.sub(r"torch\.Size\((\[[^\]]*\])\)", r"\1", message))
    assert len(messages) == 1, messages


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_value_per_channel_in_eval_matches_reference(backend):
    """B = 1 and N = 1 are fine in eval mode (running statistics), as in the reference."""
    if backend == "triton" and not TRITON_RUNS:
        pytest.skip("no GPU: set TRITON_INTERPRET=1 to run the kernels")
    gen = torch.Generator().manual_seed(5)
    ref = RGA_Module(6, 1, cha_ratio=2, spa_ratio=1, down_ratio=2).double()
    with torch.no_grad():
        for bn in ref.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.copy_(0.3 * torch.randn(bn.num_features, generator=gen, dtype=torch.float64))
                bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=gen, dtype=torch.float64))
    ref.eval()
    fast = rga_triton.RGAModule(6, 1, cha_ratio=2, spa_ratio=1, down_ratio=2, backend=backend).eval()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(1, 6, 1, 1, generator=gen, dtype=torch.float64).float().double()
    with torch.no_grad():
        assert rel_err(fast(x.float()), ref(x)) <= TOLERANCE[torch.float32]


def _authors_layers_nonempty(c, n, use_spatial, use_channel, cha_ratio, spa_ratio, down_ratio) -> bool:
    """Whether every conv of the authors' module would have at least one output channel."""
    inter_c, inter_s = c // cha_ratio, n // spa_ratio
    widths = [(1 + inter_s) // down_ratio] * use_spatial + [(1 + inter_c) // down_ratio] * use_channel
    return inter_c >= 1 and inter_s >= 1 and min(widths) >= 1


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(c=st.integers(1, 40), n=st.integers(1, 80), branches=st.sampled_from([(True, True), (True, False),
                                                                            (False, True)]),
       cha_ratio=st.integers(1, 48), spa_ratio=st.integers(1, 96), down_ratio=st.integers(1, 48))
def test_constructor_accepts_exactly_the_configurations_that_have_channels(c, n, branches, cha_ratio, spa_ratio,
                                                                           down_ratio):
    """RGAModule constructs iff no embedding and no used W network would have zero channels;
    otherwise a ValueError names the offending ratio, its value and the size that works."""
    use_spatial, use_channel = branches
    args = (c, n, use_spatial, use_channel, cha_ratio, spa_ratio, down_ratio)
    if _authors_layers_nonempty(*args):
        module = rga_triton.RGAModule(*args)
        assert module.inter_channel == c // cha_ratio and module.inter_spatial == n // spa_ratio
        return
    with pytest.raises(ValueError) as info:
        rga_triton.RGAModule(*args)
    message = str(info.value)
    if c < cha_ratio:
        assert f"cha_ratio = {cha_ratio}" in message and f"in_channel={c}" in message, message
    elif n < spa_ratio:
        assert f"spa_ratio = {spa_ratio}" in message and f"in_spatial={n}" in message, message
    else:
        assert f"down_ratio={down_ratio}" in message and "hidden channels" in message, message


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_spatial,use_channel", [(True, False), (False, True)])
def test_down_ratio_boundary(backend, use_spatial, use_channel):
    """down_ratio = 1 + width (one hidden channel) builds and runs on every path; one more is
    refused, with the largest down_ratio and smallest size that work in the message. The
    unused branch's width does not constrain it."""
    if backend == "triton" and not TRITON_RUNS:
        pytest.skip("no GPU: set TRITON_INTERPRET=1 to run the kernels")
    # spatial width N / spa_ratio = 3, channel width C / cha_ratio = 6: each limits only its branch
    c, h, w, cha_ratio, spa_ratio = 12, 3, 4, 2, 4
    width = 3 if use_spatial else 6
    module = rga_triton.RGAModule(c, h * w, use_spatial, use_channel, cha_ratio, spa_ratio, 1 + width,
                                  backend=backend)
    assert module(torch.randn(2, c, h, w)).shape == (2, c, h, w)
    with pytest.raises(ValueError) as info:
        rga_triton.RGAModule(c, h * w, use_spatial, use_channel, cha_ratio, spa_ratio, 2 + width, backend=backend)
    message = str(info.value)
    assert f"down_ratio={2 + width}" in message and f"down_ratio <= {1 + width}" in message, message
    ratio_name, size_name = ("spa_ratio", "in_spatial") if use_spatial else ("cha_ratio", "in_channel")
    assert ratio_name in message and size_name in message, message


@pytest.mark.parametrize("attribute,value", [("backend", "cuda"), ("algorithm", "fast")])
def test_attributes_changed_after_construction_are_checked(attribute, value):
    """module.backend / module.algorithm set to an unknown value later: forward names it."""
    module = _module("torch")
    setattr(module, attribute, value)
    with pytest.raises(ValueError, match=f"{attribute} must be one of .* got '{value}'"):
        module(_randn(2, 16, 8, 8))


@pytest.mark.parametrize("capability,bfloat16,words", [
    ((7, 0), False, "older than Turing"),
    ((7, 5), True, "no bfloat16 arithmetic for Triton"),
    ((7, 5), False, None),
    ((8, 0), True, None),
    ((9, 0), True, None),
])
def test_gpu_capability_decides_what_triton_takes(capability, bfloat16, words):
    """Volta and older take nothing; Turing takes float32 and float16 but not bfloat16."""
    reason = dispatch.capability_reason(capability, bfloat16, lambda: "Tesla T4")
    if words is None:
        assert reason is None
    else:
        assert words in reason and "Tesla T4" in reason


def test_triton_not_installed(monkeypatch):
    """Without an importable triton, backend="triton" says so and "auto" falls back to torch
    with one warning naming the reason."""
    monkeypatch.setattr(dispatch, "triton_importable", lambda: False)
    monkeypatch.setattr(dispatch, "_warned_reasons", set())
    x = _randn(2, 16, 8, 8)
    with pytest.raises(ValueError, match="backend='triton' cannot run this input: triton is not installed"):
        _module("triton")(x)
    auto, torch_module = _module("auto"), _module("torch")
    torch_module.load_state_dict(auto.state_dict())
    with pytest.warns(UserWarning, match="using the 'torch' backend: triton is not installed"):
        out = auto(x)
    assert torch.equal(out, torch_module(x))


def test_auto_without_gpu_or_interpreter_runs_torch(monkeypatch):
    """No CUDA tensor and no interpreter: backend="auto" warns once and gives the torch path's
    result bit for bit (backend="triton" raising here is tested in test_triton_path.py)."""
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    monkeypatch.setattr(dispatch, "_warned_reasons", set())
    auto, torch_module = _module("auto"), _module("torch")
    torch_module.load_state_dict(auto.state_dict())
    x = _randn(2, 16, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = auto(x)
        auto(x)
    messages = [str(w.message) for w in caught if "rga_triton" in str(w.message)]
    assert len(messages) == 1 and "CUDA tensor" in messages[0], messages
    assert torch.equal(out, torch_module(x))


@pytest.mark.skipif(torch.cuda.is_available() or not dispatch.interpreting(),
                    reason="the interpreter's bfloat16 limit: CPU under TRITON_INTERPRET=1 only")
def test_explicit_triton_refuses_bfloat16_under_the_interpreter():
    """Triton's interpreter has no bfloat16 arithmetic: an explicit backend="triton" says so."""
    with pytest.raises(ValueError, match="interpreter has no bfloat16"):
        _module("triton", torch.bfloat16)(_randn(2, 16, 8, 8, dtype=torch.bfloat16))


AFFINITY_BAD = [
    ("int theta", lambda: (torch.ones(1, 2, 3, dtype=torch.int64), torch.ones(1, 2, 3, dtype=torch.int64)),
     TypeError, "theta must be a floating-point tensor"),
    ("list phi", lambda: (torch.ones(1, 2, 3), [[1.0]]), TypeError, "phi must be a torch.Tensor"),
    ("2-D", lambda: (torch.ones(2, 3), torch.ones(2, 3)), ValueError, r"\(B, K, M\) and \(B, K, N\)"),
    ("K differs", lambda: (torch.ones(1, 2, 3), torch.ones(1, 4, 3)), ValueError, "same B and K"),
    ("dtypes differ", lambda: (torch.ones(1, 2, 3), torch.ones(1, 2, 3, dtype=torch.float64)), TypeError,
     "share dtype and device"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make,exc,words", [case[1:] for case in AFFINITY_BAD], ids=[case[0] for case in AFFINITY_BAD])
def test_affinity_refuses_bad_operands_on_every_path(make, exc, words, backend):
    theta, phi = make()
    with pytest.raises(exc, match=words):
        rga_triton.affinity(theta, phi, backend=backend)


def _maps_module():
    return rga_triton.RGAModule(16, 24, spa_ratio=2, down_ratio=2, backend="torch").eval()


MAPS_BAD = [
    ("not an RGAModule", lambda: (RGA_Module(16, 24, spa_ratio=2, down_ratio=2), _randn(1, 16, 4, 6), [0]), TypeError,
     "module must be an rga_triton.RGAModule"),
    ("wrong channels", lambda: (_maps_module(), _randn(1, 8, 4, 6), [0]), ValueError, r"x.shape\[1\] must equal"),
    ("3-D x", lambda: (_maps_module(), _randn(16, 4, 6), [0]), ValueError, "x must be 4-D"),
    ("H*W differs", lambda: (_maps_module(), _randn(1, 16, 4, 4), [0]), ValueError, "in_spatial=24"),
    ("float index", lambda: (_maps_module(), _randn(1, 16, 4, 6), [(1.5, 2)]), TypeError,
     r"row of position \(1.5, 2\) must be an int"),
    ("bool index", lambda: (_maps_module(), _randn(1, 16, 4, 6), [True]), TypeError, "must be an int, got bool"),
    ("positions not a sequence", lambda: (_maps_module(), _randn(1, 16, 4, 6), 5), TypeError,
     "positions must be a sequence"),
    ("outside", lambda: (_maps_module(), _randn(1, 16, 4, 6), [(4, 0)]), ValueError, "outside the 4 x 6"),
    ("empty", lambda: (_maps_module(), _randn(1, 16, 4, 6), []), ValueError, "at least one"),
]


@pytest.mark.parametrize("make,exc,words", [case[1:] for case in MAPS_BAD], ids=[case[0] for case in MAPS_BAD])
def test_relation_maps_refuses_bad_arguments(make, exc, words):
    module, x, positions = make()
    with pytest.raises(exc, match=words):
        rga_triton.relation_maps(module, x, positions)


def test_relation_maps_accepts_numpy_and_tensor_indices():
    module, x = _maps_module(), _randn(1, 16, 4, 6)
    expected = rga_triton.relation_maps(module, x, [7, (2, 3)])
    for positions in ([np.int64(7), (np.int32(2), 3)], [torch.tensor(7), (torch.tensor(2), 3)]):
        got = rga_triton.relation_maps(module, x, positions)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("backend", BACKENDS)
def test_relation_maps_leave_batchnorm_buffers_alone_in_train_mode(backend):
    """README: relation maps use the module's current mode and change no BatchNorm buffer."""
    if backend == "triton" and not (torch.cuda.is_available() or dispatch.interpreting()):
        pytest.skip("no GPU: set TRITON_INTERPRET=1 to run the kernels on the CPU")
    module = rga_triton.RGAModule(16, 24, spa_ratio=2, down_ratio=2, backend=backend).train()
    before = copy.deepcopy(module.state_dict())
    rows, cols = rga_triton.relation_maps(module, _randn(2, 16, 4, 6), [0, (3, 5)])
    after = module.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed
    assert rows.shape == cols.shape == (2, 2, 4, 6) and torch.isfinite(rows).all()
