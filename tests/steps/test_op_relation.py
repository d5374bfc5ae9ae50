"""The relation gate step (rga_triton/ops/relation): tp, gx_mean -> logit, forward and every input's
gradient, against float64 PyTorch autograd of the same formula."""
import pytest
import torch
import torch.nn.functional as F

from rga_triton import dispatch
from rga_triton.common.batchnorm import batch_norm
from rga_triton.torch_path import relation_inputs, relation_preactivation
from rga_triton.triton_path import relation_gate

from helpers import DEVICE, rel_err
from op_helpers import MODES, TOL, _assert_grads_close, _grads, _module, _set_modes

pytestmark = pytest.mark.needs_triton


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
                        keep_z=dispatch.keeps_z(tp32.shape[1]))
    assert rel_err(out.double().cpu(), logit) <= TOL
    actual = _grads(out, [tp32, gx32] + list(fast.values()), dlogit.float().to(DEVICE))
    _assert_grads_close(actual, expected, ["tp", "gx_mean", "wg", "w1", "w2", "z weight", "z bias",
                                           "h weight", "h bias"])
