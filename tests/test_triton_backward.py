"""The Triton path's backward, piece by piece and whole, against float64 PyTorch autograd.

The block-level comparisons with the reference (every branch, order, algorithm, train and
eval, tails) are in test_triton_path.py; here each autograd Function is checked alone, with
BatchNorms mixing batch and running statistics, and the properties backward must keep:
repeatable bits, retain_graph, partial requires_grad, no L x L tensor.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import rga_triton
import rga_triton.ops.projection.backward_kernels
import rga_triton.ops.projection.op
import rga_triton.ops.relation.op
from rga_triton.common import settings
from helpers import TOLERANCE, compare_steps, grad_error, make_pair, rel_err, step
from rga_triton import dispatch as backend_mod
from rga_triton.common.batchnorm import batch_norm
from rga_triton.torch_path import relation_inputs, relation_preactivation
from rga_triton import triton_path
from rga_triton.triton_path import project, relation_gate

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not backend_mod.interpreting(),
                                reason="no GPU: set TRITON_INTERPRET=1 to run the kernels on the CPU")
TOL = TOLERANCE[torch.float32]


def _module(c=20, h=6, w=10, seed=0, **kw):
    """A float64 RGAModule with random weights and non-trivial BatchNorm parameters and statistics."""
    torch.manual_seed(seed)
    args = dict(use_spatial=True, use_channel=True, cha_ratio=3, spa_ratio=8, down_ratio=4)
    args.update(kw)
    module = rga_triton.RGAModule(c, h * w, backend="torch", **args).double()
    with torch.no_grad():
        for bn in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.running_mean.normal_(0.0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return module


def _set_modes(branch, modes):
    """Train (True) or eval (False) per BatchNorm of the branch: theta, phi, gx, gg, W[1]."""
    for seq, train in zip((branch.theta, branch.phi, branch.gx, branch.gg), modes):
        seq[1].train(train)
    branch.W[1].train(modes[4])


def _grads(outputs, inputs, grad_outputs):
    return torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)


def _assert_grads_close(actual, expected, names):
    for name, a, e in zip(names, actual, expected, strict=True):
        assert rel_err(a.double().cpu(), e) <= TOL, f"{name}: {rel_err(a.double().cpu(), e):.2e}"


MODES = [(True,) * 5, (False,) * 5, (True, False, True, False, True), (False, True, False, True, False)]


@pytest.fixture(params=["dz-whole", "dz-sliced"])
def dz_slices(request, monkeypatch):
    """dZ written and consumed in one piece (test shapes are small), or a slice of the batch at a time."""
    if request.param == "dz-sliced":
        monkeypatch.setattr(rga_triton.ops.relation.op, "DZ_SLICE_MIN_BYTES", 0)
    return request.param


@pytest.mark.parametrize("modes", MODES, ids=["train", "eval", "mixed-a", "mixed-b"])
@pytest.mark.parametrize("name", ["spatial", "channel"])
def test_relation_gate_function_matches_autograd(name, modes, dz_slices):
    """relation_gate: tp, gx_mean -> logit before the last BatchNorm, every input's gradient."""
    module = _module()
    branch = module.branch(name)
    x = torch.randn(3, 20, 60, dtype=torch.float64)
    feats = x if name == "spatial" else x.transpose(1, 2)
    with torch.no_grad():
        theta, phi, gx_mean = relation_inputs(branch, feats, update=False)
    tp = torch.cat([theta, phi], dim=1)
    dlogit = torch.randn(3, feats.shape[2], dtype=torch.float64)
    conv1, bn1, _, conv2, _ = branch.W
    bn_z = branch.gg[1]
    params = [branch.gg[0].weight, conv1.weight, conv2.weight, bn_z.weight, bn_z.bias, bn1.weight, bn1.bias]
    _set_modes(branch, modes)

    # float64 autograd of the same formula (running statistics left alone: update=False)
    tp64 = tp.clone().requires_grad_(True)
    gx64 = gx_mean[:, 0].clone().requires_grad_(True)
    k = tp.shape[1] // 2
    z = relation_preactivation(branch.gg[0].weight, tp64[:, :k], tp64[:, k:])
    rel = F.relu(batch_norm(z, bn_z, False))
    hidden = F.relu(batch_norm(torch.matmul(conv1.weight.flatten(1), torch.cat([gx64[:, None], rel], 1)), bn1, False))
    logit = torch.matmul(conv2.weight.flatten(1), hidden).squeeze(1)
    expected = _grads(logit, [tp64, gx64] + params, dlogit)

    fast = {p: p.detach().float().to(DEVICE).requires_grad_(True) for p in params}
    state = {n: b.clone() for n, b in module.state_dict().items()}
    fast_module = _module().float().to(DEVICE)
    fast_module.load_state_dict(state)
    fast_branch = fast_module.branch(name)
    _set_modes(fast_branch, modes)
    tp32 = tp.float().to(DEVICE).requires_grad_(True)
    gx32 = gx_mean[:, 0].float().to(DEVICE).contiguous().requires_grad_(True)
    wg, w1, w2, z_weight, z_bias, h_weight, h_bias = fast.values()
    out = relation_gate(tp32, gx32, wg, w1, w2, torch.cat([z_weight, h_weight]), torch.cat([z_bias, h_bias]),
                        [fast_branch.gg[1], fast_branch.W[1]], False, torch.float32,
                        keep_z=backend_mod.keeps_z(tp32.shape[1]))
    assert rel_err(out.double().cpu(), logit) <= TOL
    actual = _grads(out, [tp32, gx32] + list(fast.values()), dlogit.float().to(DEVICE))
    _assert_grads_close(actual, expected, ["tp", "gx_mean", "wg", "w1", "w2", "z weight", "z bias",
                                           "h weight", "h bias"])


@pytest.fixture(params=settings.PROJECTION_BACKWARDS)
def projection_backward(request, monkeypatch):
    """The projection differentiated by its kernels, or by the PyTorch formula they replaced."""
    monkeypatch.setattr(settings, "PROJECTION_BACKWARD", request.param)
    return request.param


SIZES = {"small": (3, 19, 5, 7), "tiles": (3, 70, 9, 33)}
"""(B, C, H, W) of the projection tests: one block of everything, or several row blocks (3K = 69 and
111), position tiles and statistics splits (L = 297 in the spatial branch), with dW3 reduced over
the whole batch in one program (the kernels only, in train mode)."""


PROJECTION_CASES = [
    pytest.param(size, name, modes, gated, backward, id=f"{backward}-{size}-{name}-{mode_id}-{gate_id}")
    for backward in settings.PROJECTION_BACKWARDS
    for size in (SIZES if backward == "kernels" else ["small"])
    for name in ("spatial", "channel")
    for modes, mode_id in zip(MODES[:3] if size == "small" else MODES[:1], ("train", "eval", "mixed"))
    for gated, gate_id in ((False, "plain"), (True, "in-gate"))]


@pytest.mark.parametrize("size, name, modes, gated, backward", PROJECTION_CASES)
def test_projection_function_matches_autograd(size, name, modes, gated, backward, monkeypatch):
    """project: x (and the other branch's gate) -> tp, gx_mean, every input's gradient; differentiated
    by the kernels (every size) or the PyTorch formula (small)."""
    monkeypatch.setattr(settings, "PROJECTION_BACKWARD", backward)
    monkeypatch.setattr(rga_triton.ops.projection.backward_kernels, "WEIGHT_GRAD_PROGRAMS", 1)
    batch, c, h, w = SIZES[size]
    module = _module(c=c, h=h, w=w)
    branch = module.branch(name)
    _set_modes(branch, modes)
    x = torch.randn(batch, c, h, w, dtype=torch.float64)
    gate_width = c if name == "spatial" else h * w
    in_gate = torch.rand(3, gate_width, dtype=torch.float64) if gated else None
    bns = [seq[1] for seq in (branch.theta, branch.phi, branch.gx)]
    convs = [seq[0].weight for seq in (branch.theta, branch.phi, branch.gx)]
    params = convs + [p for bn in bns for p in (bn.weight, bn.bias)]

    x64 = x.clone().requires_grad_(True)
    g64 = in_gate.clone().requires_grad_(True) if gated else None
    feats = x64.flatten(2) if name == "spatial" else x64.flatten(2).transpose(1, 2)
    if gated:
        feats = feats * g64[:, :, None]
    theta, phi, gx_mean = relation_inputs(branch, feats, update=False)
    outputs = (torch.cat([theta, phi], 1), gx_mean[:, 0])
    grad_outs = (torch.randn_like(outputs[0]), torch.randn_like(outputs[1]))
    inputs = [x64] + ([g64] if gated else []) + params
    expected = _grads(outputs, inputs, grad_outs)

    fast_module = _module(c=c, h=h, w=w).float().to(DEVICE)
    fast_module.load_state_dict(module.state_dict())
    fast_branch = fast_module.branch(name)
    _set_modes(fast_branch, modes)
    fast_params = [p.detach().float().to(DEVICE).requires_grad_(True) for p in params]
    x32 = x.float().to(DEVICE).requires_grad_(True)
    g32 = in_gate.float().to(DEVICE).requires_grad_(True) if gated else None
    w3 = torch.cat([w.flatten(1) for w in fast_params[:3]])
    weight3 = torch.cat(fast_params[3::2])
    bias3 = torch.cat(fast_params[4::2])
    tp, gx = project(x32, g32, w3, weight3, bias3, [seq[1] for seq in (fast_branch.theta, fast_branch.phi,
                                                                        fast_branch.gx)], name, torch.float32)
    assert rel_err(tp.double().cpu(), outputs[0]) <= TOL and rel_err(gx.double().cpu(), outputs[1]) <= TOL
    actual = _grads((tp, gx), [x32] + ([g32] if gated else []) + fast_params,
                    tuple(g.float().to(DEVICE) for g in grad_outs))
    names = ["x"] + (["in_gate"] if gated else []) + ["w_theta", "w_phi", "w_gx"] + [
        f"{part} {p}" for part in ("theta", "phi", "gx") for p in ("weight", "bias")]
    _assert_grads_close(actual, expected, names)


def test_unknown_projection_backward_setting_names_the_variable(monkeypatch):
    monkeypatch.setattr(settings, "PROJECTION_BACKWARD", "cublas")
    module = _module().float().to(DEVICE)
    module.backend = "triton"
    x = torch.randn(2, 20, 6, 10, device=DEVICE, requires_grad=True)
    out = module(x)
    with pytest.raises(ValueError, match="RGA_TRITON_PROJECTION_BACKWARD must be one of .*'cublas'"):
        out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "in-gate"])
@pytest.mark.parametrize("view", ["spatial", "channel"])
def test_projection_grads_add_into_a_given_dx(view, gated, dtype, projection_backward):
    """projection_grads(dx=buffer), as the threaded eager backward calls it, adds x's gradient into
    the buffer in place (a slice of the batch at a time where x is half or gated): the same as a
    new dx added to it. 5 images: slices of uneven size."""
    gen = torch.Generator().manual_seed(3)
    batch, c, h, w, k = 5, 12, 3, 7, 4
    cin, length = (c, h * w) if view == "spatial" else (h * w, c)
    x = torch.randn(batch, c, h, w, generator=gen).to(dtype)
    in_gate = torch.rand(batch, cin, generator=gen) if gated else None
    norm = torch.stack([torch.ones(3 * k), torch.zeros(3 * k), torch.randn(3 * k, generator=gen),
                        torch.rand(3 * k, generator=gen) + 0.5])
    args = (x, in_gate, torch.randn(3 * k, cin, generator=gen).to(dtype), torch.rand(3 * k, generator=gen) + 0.5,
            torch.randn(3 * k, generator=gen), norm, view, dtype, [True, False, True],
            torch.randn(batch, 2 * k, length, generator=gen), torch.randn(batch, length, generator=gen))
    fresh, gate_grad, *param_grads = rga_triton.ops.projection.op.projection_grads(*args)
    start = torch.randn(x.shape, generator=gen).to(dtype)
    buffer = start.clone()
    into, gate_grad_into, *param_grads_into = rga_triton.ops.projection.op.projection_grads(*args, dx=buffer)
    assert into is buffer
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=4e-3)
    torch.testing.assert_close(buffer.float(), start.float() + fresh.float(), **tol)
    assert (gate_grad is None) == (not gated)
    for a, b in zip([gate_grad] + param_grads, [gate_grad_into] + param_grads_into, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert rga_triton.ops.projection.op.projection_grads(*args, needs=(False, True, True))[0] is None


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "expanded-grad"])
@pytest.mark.parametrize("gates", ["spatial", "channel", "both"])
def test_apply_gates_backward_matches_autograd(gates, layout):
    """apply_gates: out = x * spatial * channel; dx and both gates' gradients from one kernel pass
    (shapes with channel and position tails past the kernel's blocks and chunks)."""
    b, c, h, w = 2, 45, 13, 23           # 45 channels: a 32-channel block and a tail; 299 positions: two chunks
    x = torch.randn(b, c, h, w, dtype=torch.float64)
    spatial = torch.rand(b, h * w, dtype=torch.float64) if gates != "channel" else None
    channel = torch.rand(b, c, dtype=torch.float64) if gates != "spatial" else None
    grad_out = torch.randn((), dtype=torch.float64).expand(b, c, h, w) if layout == "expanded-grad" else \
        torch.randn(b, c, h, w, dtype=torch.float64)
    inputs = [t.clone().requires_grad_(True) for t in (x, spatial, channel) if t is not None]
    x64, *gates64 = inputs
    out = x64
    if spatial is not None:
        out = out * gates64.pop(0).view(b, 1, h, w)
    if channel is not None:
        out = out * gates64.pop(0).view(b, c, 1, 1)
    expected = torch.autograd.grad(out, inputs, grad_out)

    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    leaves = [t.float().to(DEVICE).requires_grad_(True) for t in (x, spatial, channel) if t is not None]
    x32 = leaves[0].detach().to(memory_format=memory_format).requires_grad_(True)
    spatial32 = leaves[1] if spatial is not None else None
    channel32 = leaves[-1] if channel is not None else None
    out32 = torch.ops.rga_triton.apply_gates(x32, spatial32, channel32)
    actual = torch.autograd.grad(out32, [x32] + leaves[1:], grad_out.float().to(DEVICE))
    assert actual[0].stride() == x32.stride()           # dx keeps x's memory format
    _assert_grads_close(actual, expected, ["x"] + [g for g in ("spatial", "channel") if g in gates or gates == "both"])


def _step_grads(fast, x, grad_out):
    out, gx, grads = step(fast, x, grad_out, dtype=torch.float32, device=DEVICE)
    return [out, gx] + [grads[n] for n in sorted(grads)]


@pytest.mark.parametrize("algorithm", ["reassociated", "tiled"])
def test_gradients_are_bitwise_repeatable_under_deterministic_algorithms(algorithm):
    ref, fast, x = make_pair(20, 6, 10, 3, cha_ratio=3, spa_ratio=8, down_ratio=4, device=DEVICE,
                             backend="triton")
    fast.algorithm = algorithm
    fast.eval()             # buffers fixed: both steps see the same statistics
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _step_grads(fast, x, grad_out), _step_grads(fast, x, grad_out)
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


class _RelationSpy:
    """The eager ops (triton_path.EAGER), recording whether each ``relation`` call kept Z."""

    def __init__(self):
        self.kept = []
        self.ops = triton_path.EAGER

    def __getattr__(self, name):
        return getattr(self.__dict__["ops"], name)

    def relation(self, *args):
        a, z = self.ops.relation(*args)
        self.kept.append(z.numel() > 0)
        return a, z


@pytest.mark.parametrize("keep", ["kept", "rebuilt"])
def test_z_kept_or_rebuilt_gives_the_reference_gradients(monkeypatch, keep, dz_slices):
    """Z in memory, or rebuilt from A and tp in every pass (dispatch.keeps_z): both exact."""
    monkeypatch.setattr(backend_mod, "RECOMPUTE_Z_MAX_K2", 0 if keep == "kept" else 10 ** 6)
    spy = _RelationSpy()
    monkeypatch.setattr(triton_path, "EAGER", spy)
    ref, fast, x = make_pair(20, 6, 10, 3, cha_ratio=3, spa_ratio=8, down_ratio=4, device=DEVICE,
                             backend="triton")
    compare_steps(ref, fast, x, train=True, tol=TOL, dtype=torch.float32, device=DEVICE, steps=2)
    assert len(spy.kept) == 4 and all(k == (keep == "kept") for k in spy.kept)


@pytest.mark.parametrize("order", ["sc", "cs", "parallel"])
def test_backward_holds_one_x_sized_gradient(order):
    """Eager backward threads x through the projections, so every branch adds its share of grad x
    into one buffer. The composition torch.compile traces (each projection hands autograd a new
    x-sized gradient to sum) holds two or more at once; the tracker must see that difference.
    At this shape no other backward intermediate is as large as x."""
    from bench.live_memory import LiveTensorBytes
    module = _module(c=16, h=6, w=5, order=order).float().to(DEVICE).train()
    x = torch.randn(3, 16, 6, 5, device=DEVICE, requires_grad=True)
    grad_out = torch.randn_like(x)
    grads, held = {}, {}
    for threaded in (True, False):
        out = backend_mod.run_triton(module, x, threaded=threaded)
        with LiveTensorBytes([x, grad_out, out], min_bytes=x.nbytes) as tracker:
            grads[threaded] = torch.autograd.grad(out, [x, *module.parameters()], grad_out)
        held[threaded] = tracker.peak / x.nbytes
    assert held[True] == 1 and held[False] >= 2, held
    for threaded_grad, composed_grad in zip(grads[True], grads[False], strict=True):
        assert rel_err(threaded_grad, composed_grad) <= 1e-6


def test_backward_twice_with_retain_graph_gives_the_same_gradients():
    """Backward must not overwrite what forward saved."""
    ref, fast, x = make_pair(20, 6, 10, 3, cha_ratio=3, spa_ratio=8, down_ratio=4, device=DEVICE,
                             backend="triton")
    fast.train()
    xin = x.float().to(DEVICE).requires_grad_(True)
    out = fast(xin)
    grad_out = torch.randn_like(out)
    first = torch.autograd.grad(out, [xin] + list(fast.parameters()), grad_out, retain_graph=True)
    second = torch.autograd.grad(out, [xin] + list(fast.parameters()), grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_double_backward_raises_pytorchs_error():
    """The kernels' backward is once differentiable: differentiating it again is PyTorch's RuntimeError,
    never a silently wrong second derivative (README: use backend="torch" for gradient penalties)."""
    _, fast, x = make_pair(12, 5, 6, 2, cha_ratio=2, spa_ratio=3, down_ratio=2, device=DEVICE, backend="triton")
    xin = x.float().to(DEVICE).requires_grad_(True)
    grad_x, = torch.autograd.grad(fast(xin).square().sum(), xin, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_x.square().sum().backward()


def test_eager_calls_bypass_the_dispatcher_and_traced_calls_do_not(monkeypatch):
    """Eager training calls the ops' implementations directly (triton_path.EAGER); under a dispatch
    mode (as make_fx and FakeTensor use) the same step goes through the registered ops, one per step,
    and gives the same result."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.name())
            return func(*args, **(kwargs or {}))

    _, fast, x = make_pair(20, 6, 10, 3, cha_ratio=3, spa_ratio=8, down_ratio=4, device=DEVICE, backend="triton")
    fast.train()
    results = {}
    for mode in ("eager", "dispatch-mode"):
        module = copy.deepcopy(fast)
        xin = x.float().to(DEVICE).requires_grad_(True)
        seen = Seen()
        if mode == "eager":
            out = module(xin)
            with seen:
                out.backward(torch.ones_like(out))
        else:
            with seen:
                out = module(xin)
                out.backward(torch.ones_like(out))
        ours = [name for name in seen.ops if name.startswith("rga_triton::")]
        results[mode] = (out.detach(), xin.grad, ours)
    assert results["eager"][2] == []      # nor does backward dispatch one
    assert {"rga_triton::projection_norm", "rga_triton::gate_logit", "rga_triton::apply_gates",
            "rga_triton::gate_logit_backward", "rga_triton::apply_gates_backward"} <= set(results["dispatch-mode"][2])
    assert torch.equal(results["eager"][0], results["dispatch-mode"][0])
    assert torch.equal(results["eager"][1], results["dispatch-mode"][1])


@pytest.mark.parametrize("wants", ["x", "params", "frozen-embeddings"])
def test_partial_requires_grad_matches_reference(wants):
    ref, fast, x = make_pair(20, 6, 10, 3, cha_ratio=3, spa_ratio=8, down_ratio=4, device=DEVICE,
                             backend="triton")
    ref.train(), fast.train()
    for module in (ref, fast):
        for name, p in module.named_parameters():
            if wants == "x" or (wants == "frozen-embeddings" and name.split("_")[0] in ("theta", "phi", "gx")):
                p.requires_grad_(False)
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    results = []
    for module, dtype in ((ref, torch.float64), (fast, torch.float32)):
        xin = x.to(DEVICE, dtype).requires_grad_(wants != "params")
        out = module(xin)
        inputs = ([xin] if wants != "params" else []) + [p for p in module.parameters() if p.requires_grad]
        results.append([out] + list(torch.autograd.grad(out, inputs, grad_out.to(out))))
    (fast_out, *fast_grads), (ref_out, *ref_grads) = results[1], [t.detach() for t in results[0]]
    assert len(fast_grads) == len(ref_grads) > 0
    assert rel_err(fast_out, ref_out) <= TOL
    if wants != "params":
        assert rel_err(fast_grads.pop(0), ref_grads.pop(0)) <= TOL         # grad x
    if ref_grads:
        whole = torch.cat([g.flatten() for g in ref_grads])
        for a, e in zip(fast_grads, ref_grads):
            assert grad_error(a, e, whole) <= TOL


def test_eval_mode_gradients_flow_with_frozen_statistics():
    """Fine-tuning with BatchNorms in eval (running statistics): buffers stay, gradients match."""
    ref, fast, x = make_pair(20, 6, 10, 3, cha_ratio=3, spa_ratio=8, down_ratio=4, device=DEVICE,
                             backend="triton")
    ref.eval(), fast.eval()
    before = {n: b.clone() for n, b in fast.state_dict().items()}
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    r_out, r_gx, r_grads = step(ref, x, grad_out)
    f_out, f_gx, f_grads = step(fast, x, grad_out, dtype=torch.float32, device=DEVICE)
    assert rel_err(f_out, r_out) <= TOL and rel_err(f_gx, r_gx) <= TOL
    whole = torch.cat([g.flatten() for g in r_grads.values()]).norm()
    for name in r_grads:
        scale = max(float(r_grads[name].norm()), 1e-3 * float(whole))
        assert float((f_grads[name] - r_grads[name]).norm()) / scale <= TOL, name
    for name, value in fast.state_dict().items():
        assert torch.equal(value, before[name]), name
