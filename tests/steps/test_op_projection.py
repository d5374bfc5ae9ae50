"""The projection step (rga_triton/ops/projection): x -> tp, gx_mean, forward and every input's gradient
(kernels and the PyTorch A/B formula), against float64 PyTorch autograd."""
import pytest
import torch

import rga_triton.ops.projection.backward_kernels
import rga_triton.ops.projection.op
from rga_triton.common import settings
from rga_triton.torch_path import relation_inputs
from rga_triton.triton_path import project

from helpers import DEVICE, rel_err
from op_helpers import MODES, TOL, _assert_grads_close, _grads, _module, _set_modes

pytestmark = pytest.mark.needs_triton


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
