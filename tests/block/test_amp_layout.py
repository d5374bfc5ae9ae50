"""Mixed precision (torch.autocast) and memory formats, on both backends."""
import copy

import pytest
import torch

from rga_triton import dispatch

from helpers import TOLERANCE, allowance, grad_error, make_pair, rel_err

BACKENDS = ["torch"] + (["triton"] if dispatch.interpreting() else [])


def _run(module, x, grad_out, autocast_dtype=None):
    """(out, grad x, {parameter name: grad}) of one forward + backward, under autocast if given."""
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = module(x)
    names, params = zip(*module.named_parameters())
    grad_x, *grads = torch.autograd.grad(out, [x, *params], grad_out.to(out.dtype))
    return out, grad_x, dict(zip(names, grads))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("autocast_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_autocast_matches_reference(backend, autocast_dtype, train):
    """Under torch.autocast the module keeps float32 BatchNorm statistics and products that
    cancel, and is at least as accurate as the reference under the same autocast: output,
    grad x and every parameter gradient within the contract's 2e-2 (rga_triton.testing) of the float64 reference,
    or, where the autocast reference itself misses that, within 4x its error up to 2x 2e-2
    (the rule of ``helpers.compare_steps``). The output dtype matches."""
    if backend == "triton" and autocast_dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bfloat16 arithmetic")
    # x and the parameters exactly representable in the autocast dtype, so that the test measures
    # the arithmetic, not autocast's rounding of its inputs (which alone moves bfloat16 grad x by ~1e-1)
    ref, fast, x = make_pair(64, 16, 8, 4, dtype=autocast_dtype, backend=backend)
    fast.float()
    amp_ref = copy.deepcopy(ref).float()
    for m in (ref, amp_ref, fast):
        m.train(train)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact, exact_grad, exact_params = _run(ref, x, grad_out)
    amp_out, amp_grad, amp_params = _run(amp_ref, x.float(), grad_out.float(), autocast_dtype)
    out, grad_x, params = _run(fast, x.float(), grad_out.float(), autocast_dtype)
    assert out.dtype == amp_out.dtype
    tol = TOLERANCE[autocast_dtype]
    assert rel_err(out, exact) <= allowance(tol, rel_err(amp_out, exact), autocast_dtype)
    assert rel_err(grad_x, exact_grad) <= allowance(tol, rel_err(amp_grad, exact_grad), autocast_dtype)
    whole = torch.cat([g.flatten() for g in exact_params.values()])
    for name, expected in exact_params.items():
        err = grad_error(params[name], expected, whole)
        amp_err = grad_error(amp_params[name], expected, whole)
        assert err <= allowance(tol, amp_err, autocast_dtype), f"grad {name}: {err:.3e}"
    for name in ref.state_dict():     # running statistics stay float32 and move alike
        if "running" in name:
            assert fast.state_dict()[name].dtype == torch.float32
            assert rel_err(fast.state_dict()[name], amp_ref.state_dict()[name]) <= tol, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_same_answer_and_layout(backend):
    """channels_last input: same output as the contiguous one, in x's memory format. The
    Triton path reads x through its strides (no copy); the torch path's reshape to (B, C, N)
    is a view of a channels_last x (H and W merge), so it copies nothing either."""
    ref, fast, x = make_pair(20, 6, 10, 3, cha_ratio=3, down_ratio=4, backend=backend)
    ref.eval(), fast.eval()
    x_cl = x.float().to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = fast(x_cl)
        assert rel_err(out, ref(x)) <= TOLERANCE[torch.float32]
    assert out.is_contiguous(memory_format=torch.channels_last)
