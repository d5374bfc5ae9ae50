"""The Triton path's backward, piece by piece and whole, against float64 PyTorch autograd.

The block-level comparisons with the reference (every branch, order, algorithm, train and
eval, tails) are in test_triton_path.py; each step's autograd formula is checked alone in
test_op_projection.py, test_op_relation.py and test_op_gating.py, with BatchNorms mixing batch
and running statistics. Here: the properties the block's backward must keep (repeatable bits,
retain_graph, partial requires_grad, one grad-x buffer, the dispatcher bypass).
"""
import copy

import pytest
import torch

from rga_triton import dispatch, triton_path

from helpers import DEVICE, compare_steps, grad_error, make_pair, rel_err, step
from op_helpers import TOL, _module

pytestmark = pytest.mark.needs_triton


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
    monkeypatch.setattr(dispatch, "RECOMPUTE_Z_MAX_K2", 0 if keep == "kept" else 10 ** 6)
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
    from bench.lib.live_memory import LiveTensorBytes
    module = _module(c=16, h=6, w=5, order=order).float().to(DEVICE).train()
    x = torch.randn(3, 16, 6, 5, device=DEVICE, requires_grad=True)
    grad_out = torch.randn_like(x)
    grads, held = {}, {}
    for threaded in (True, False):
        out = dispatch.run_triton(module, x, module.branches(), threaded=threaded)
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
