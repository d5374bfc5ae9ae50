"""The gating step (rga_triton/ops/gating): out = x * spatial * channel, and its one-pass backward."""
import pytest
import torch

from helpers import DEVICE
from op_helpers import _assert_grads_close

pytestmark = pytest.mark.needs_triton


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
