"""torch.compile(fullgraph=True) through the Triton path's custom ops (rga_triton/ops/).

Compiled and eager runs of the same module must agree (outputs, grad x, parameter gradients,
running statistics, num_batches_tracked), in train and eval mode, with and without
gradients, and the graphs must hold the rga_triton ops: no graph break, forward or backward.
``torch.library.opcheck`` tests each op the way PyTorch tests custom operators (schema and
declared mutations, fake implementation, autograd registration, AOT dispatch).
"""
import copy

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.testing import CompileCounterWithBackend

from rga_triton import RGAModule, dispatch
from rga_triton.common import settings
from rga_triton.ops.batchnorm.norm import batchnorm_args  # import rga_triton registers the ops

from helpers import DEVICE, make_pair, rel_err, train_step

pytestmark = pytest.mark.needs_triton
TOL = 1e-5
OPS = torch.ops.rga_triton


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _close(actual, expected, what):
    if what.endswith("num_batches_tracked"):
        assert torch.equal(actual, expected), what
    else:
        assert rel_err(actual, expected) <= TOL, f"{what}: {rel_err(actual, expected):.2e}"


def _block(seed=0, **kw):
    """A float32 Triton-path block, C=16 at 6x5 (K=4, R=10, hidden 5 / 2), non-trivial BatchNorm state."""
    args = dict(cha_ratio=4, spa_ratio=3, down_ratio=2)
    args.update(kw)
    _, fast, x = make_pair(16, 6, 5, 2, device=DEVICE, backend="triton", seed=seed, **args)
    return fast, x.float().to(DEVICE)



def _compare_runs(eager, compiled_module, compiled, x, steps=2, seed=1):
    """``steps`` train steps then no-grad forwards, in the modules' current mode: everything equal to TOL."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grad_out = torch.randn(x.shape, generator=gen).to(DEVICE)
        e_out, e_gx, e_grads = train_step(eager, x, grad_out)
        c_out, c_gx, c_grads = train_step(compiled, x, grad_out)
        _close(c_out, e_out, "output")
        _close(c_gx, e_gx, "grad x")
        for name, grad in e_grads.items():
            _close(c_grads[name], grad, f"grad {name}")
    with torch.no_grad():
        _close(compiled(x), eager(x), "no-grad output")
    compiled_state = compiled_module.state_dict()
    for name, value in eager.state_dict().items():
        _close(compiled_state[name], value, name)


@pytest.mark.parametrize("order,algorithm", [("sc", "reassociated"), ("cs", "tiled"), ("parallel", "reassociated")])
def test_block_compiles_without_graph_breaks_and_matches_eager(order, algorithm):
    eager, x = _block(order=order)
    eager.algorithm = algorithm
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")     # fullgraph: a break raises
    for train in (True, False):
        eager.train(train), compiled_module.train(train)
        _compare_runs(eager, compiled_module, compiled, x)


def test_new_batch_size_and_autocast_compile_and_match_eager():
    """A second batch size recompiles once with a dynamic batch, and a third reuses that graph;
    float16 autocast (a guard change: one more compile; backward formulas stay float32, as in
    eager) gives eager's bits."""
    eager, _ = _block()
    compiled_module = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_module, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(2)
    for batch, autocast, frames in ((2, False, 1), (3, False, 2), (5, False, 2), (4, True, 3)):
        x = torch.randn(batch, 16, 6, 5, generator=gen).to(DEVICE)
        grad_out = torch.randn(x.shape, generator=gen).to(DEVICE)
        outs, grads = [], []
        for module in (eager, compiled):
            xin = x.clone().requires_grad_(True)
            with torch.autocast(DEVICE, dtype=torch.float16, enabled=autocast):
                out = module(xin)
            out.backward(grad_out.to(out.dtype))            # backward outside autocast, as AMP recommends
            outs.append(out.detach()), grads.append(xin.grad)
        _close(outs[1], outs[0], f"output, batch {batch}")
        _close(grads[1], grads[0], f"grad x, batch {batch}")
        assert counter.frame_count == frames, f"batch {batch}: {counter.frame_count} compiles, expected {frames}"


def _rga_ops(gm) -> list:
    """The rga_triton ops an FX graph calls, mutating ones through auto_functionalized included."""
    names = []
    for node in gm.graph.nodes:
        if node.op == "call_function":
            target = node.args[0] if "auto_functionalized" in str(node.target) else node.target
            if str(target).startswith("rga_triton."):
                names.append(str(target).split(".")[1])
    return names


def _recording_backend(seen):
    """aot_autograd that records the rga_triton ops in the forward and backward graphs, then runs them."""
    def compiler(kind):
        def compile_graph(gm, example_inputs):
            seen[kind] += _rga_ops(gm)
            return make_boxed_func(gm.forward)
        return compile_graph
    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))


@pytest.mark.parametrize("projection_backward", ["kernels", "torch"])
def test_graphs_hold_the_ops_forward_and_backward(projection_backward, monkeypatch):
    """One graph each way: train mode calls every op per branch (the mutating ones functionalized),
    eval mode no mutating op (running statistics fold in PyTorch). The projection's backward is an
    op with its kernels, PyTorch ops traced into the graph with its PyTorch formula."""
    monkeypatch.setattr(settings, "PROJECTION_BACKWARD", projection_backward)
    module, x = _block()
    seen = {"forward": [], "backward": []}
    compiled = torch.compile(module.train(), fullgraph=True, backend=_recording_backend(seen))
    compiled(x.clone().requires_grad_(True)).sum().backward()
    per_branch = ["projection_norm", "projection", "relation", "relation_norm", "gate_logit"]
    assert sorted(seen["forward"]) == sorted(2 * per_branch + ["apply_gates"])
    assert sorted(seen["backward"]) == sorted(["apply_gates_backward"] + ["gate_logit_backward"] * 2
                                              + ["projection_backward"] * 2 * (projection_backward == "kernels"))
    seen["forward"].clear()
    with torch.no_grad():
        compiled.eval()(x)
    assert sorted(seen["forward"]) == sorted(2 * ["projection", "relation", "gate_logit"] + ["apply_gates"])
    explanation = torch._dynamo.explain(module)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_cumulative_momentum_and_affine_free_batchnorms_compile():
    """momentum=None (num_batches_tracked read inside the ops) and affine=False BatchNorms, mixed.

    The last BatchNorm runs in PyTorch, where momentum=None breaks fullgraph as it does for
    nn.BatchNorm2d itself (1 / num_batches_tracked becomes a data-dependent float): it keeps 0.1.
    """
    eager, x = _block()
    for name, bn in eager.named_modules():
        if isinstance(bn, torch.nn.BatchNorm2d) and not name.endswith("W_spatial.4") and \
                not name.endswith("W_channel.4"):
            bn.momentum = None
    for bn in (eager.theta_spatial[1], eager.gg_channel[1]):
        bn.weight, bn.bias, bn.affine = None, None, False
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    _compare_runs(eager.train(), compiled_module.train(), compiled, x)


def test_rga_net_compiles_without_graph_breaks_and_matches_eager():
    """RGA-Net (ResNet-50 with four RGA-S blocks on the Triton path; the channel branch is left
    out to keep the interpreter's time small: the block tests cover it): one train step and
    an eval forward, fullgraph."""
    from rga_triton.models import rga_net

    torch.manual_seed(0)
    eager = rga_net(4, height=32, width=16, use_channel=False, cha_ratio=64, spa_ratio=2, down_ratio=2,
                    backend="triton")
    eager = eager.to(DEVICE)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = []
    for model in (eager, compiled):
        logits, feats = model(x)
        (logits.square().sum() + feats.sum()).backward()
        results.append((logits.detach(), feats.detach()))
    _close(results[1][0], results[0][0], "logits")
    _close(results[1][1], results[0][1], "features")
    # a gradient under 1e-3 of the whole is a cancellation residue (tests/helpers.py): measured against that
    whole = float(torch.cat([p.grad.flatten() for p in eager.parameters() if p.grad is not None]).norm())
    for (name, p), q in zip(eager.named_parameters(), compiled_module.parameters()):
        if p.grad is None:          # BNNeck's frozen bias
            assert q.grad is None, name
            continue
        assert float((q.grad - p.grad).norm()) <= TOL * max(float(p.grad.norm()), 1e-3 * whole), name
    eager.eval(), compiled_module.eval()
    with torch.no_grad():
        _close(compiled(x), eager(x), "eval features")
    for (name, value), other in zip(eager.state_dict().items(), compiled_module.state_dict().values()):
        _close(other, value, name)


@pytest.mark.parametrize("trainer", ["eager no-grad", "eager", "compiled"])
def test_eval_after_training_reads_the_moved_running_statistics(trainer):
    """A train step between two eval calls shows in the second, whoever moved the statistics: kernels,
    F.batch_norm (the last BatchNorm), or a compiled graph copying functionalized buffers back
    (regression: when eager inference memoised folded BatchNorms, kernels and F.batch_norm bumped no version)."""
    module, x = _block()
    with torch.no_grad():
        module.eval()(x)
    module.train()
    if trainer == "compiled":
        torch.compile(module, fullgraph=True, backend="aot_eager")(x.clone().requires_grad_(True)).sum().backward()
    else:
        with torch.set_grad_enabled(trainer == "eager"):
            module(x.clone().requires_grad_(trainer == "eager") * 3 + 1)
    fresh = copy.deepcopy(module).eval()
    with torch.no_grad():
        assert torch.equal(module.eval()(x), fresh(x))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")   # inductor's own
def test_block_compiles_with_inductor():
    """inductor: PyTorch code between the ops (the last BatchNorm, backward matmuls) becomes
    generated kernels, the ops stay calls. About a minute on a CPU with a cold compile cache."""
    eager, x = _block()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="inductor")
    for train in (True, False):
        eager.train(train), compiled_module.train(train)
        _compare_runs(eager, compiled_module, compiled, x, steps=1)


def test_auto_backend_fallback_warns_and_compiles():
    """backend='auto' on a CPU tensor: the fallback warning is given while tracing, no graph break."""
    module = RGAModule(16, 30, cha_ratio=4, spa_ratio=3, down_ratio=2)
    x = torch.randn(2, 16, 6, 5)
    dispatch._warned_reasons.clear()
    with pytest.warns(UserWarning, match="using the 'torch' backend"):
        out = torch.compile(module, fullgraph=True, backend="aot_eager")(x)
    assert rel_err(out, module(x)) <= TOL


# ------------------------------------------------------------------------------------- opcheck

def _branch_inputs(name="spatial", train=True):
    """A block's x, and its ``name`` branch: the branch, the embedding BatchNorms and W3 (3K, Cin)."""
    module, x = _block()
    module.train(train)
    branch = module.branch(name)
    embeds = (branch.theta, branch.phi, branch.gx)
    return x, branch, [seq[1] for seq in embeds], torch.cat([seq[0].weight.flatten(1) for seq in embeds])


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("view", ["spatial", "channel"])
def test_opcheck_projection_ops(view, train):
    x, branch, bns, w3 = _branch_inputs(view, train)
    bns[1].momentum = None
    in_gate = torch.rand(x.shape[0], x.shape[1], device=DEVICE) if view == "spatial" else None
    args = (x, in_gate, w3.detach(), view, torch.float32)
    torch.library.opcheck(OPS.projection_norm, args, batchnorm_args(bns))
    norm, p = OPS.projection_norm(*args, **batchnorm_args(bns))
    weight, bias = torch.cat([bn.weight for bn in bns]), torch.cat([bn.bias for bn in bns])
    batch_stats = [bn.training for bn in bns]
    for kept in (p, None):          # P as projection_norm kept it, or multiplied again
        torch.library.opcheck(OPS.projection, (_leaf(x), in_gate, _leaf(w3), _leaf(weight), _leaf(bias), norm, view,
                                               torch.float32, batch_stats, kept))
    tp, gx_mean = OPS.projection(x, in_gate, w3, weight, bias, norm, view, torch.float32, batch_stats, p)
    torch.library.opcheck(OPS.projection_backward, (x, in_gate, w3.detach(), weight.detach(), bias.detach(), norm,
                                                    view, torch.float32, batch_stats, torch.randn_like(tp),
                                                    torch.randn_like(gx_mean), [True, in_gate is not None, True]))


@pytest.mark.parametrize("tiled,for_backward,keep_z", [(False, False, False), (True, False, False),
                                                       (False, True, True), (False, True, False), (True, True, False)])
def test_opcheck_relation_ops(tiled, for_backward, keep_z):
    x, branch, bns, w3 = _branch_inputs()
    with torch.no_grad():
        norm, p = OPS.projection_norm(x, None, w3, "spatial", torch.float32, **batchnorm_args(bns))
        weight, bias = torch.cat([bn.weight for bn in bns]), torch.cat([bn.bias for bn in bns])
        tp, gx_mean = OPS.projection(x, None, w3, weight, bias, norm, "spatial", torch.float32, [True] * 3, p)
    conv1, bn1, _, conv2, _ = branch.W
    gate_bns = [branch.gg[1], bn1]
    gate_bns[1].eval()          # one BatchNorm with running statistics, one with the batch's
    wg = branch.gg[0].weight.detach()
    torch.library.opcheck(OPS.relation, (tp, wg, tiled, for_backward, keep_z, torch.float32))
    a, z = OPS.relation(tp, wg, tiled, for_backward, keep_z, torch.float32)
    args = (tp, gx_mean, a, z, conv1.weight.detach())
    torch.library.opcheck(OPS.relation_norm, args, batchnorm_args(gate_bns))
    norm = OPS.relation_norm(*args, **batchnorm_args(gate_bns))
    weight = torch.cat([bn.weight for bn in gate_bns]).detach()
    bias = torch.cat([bn.bias for bn in gate_bns]).detach()
    flags = [bn.training for bn in gate_bns]
    if for_backward:
        torch.library.opcheck(OPS.gate_logit, (_leaf(tp), _leaf(gx_mean), _leaf(wg), _leaf(conv1.weight),
                                               _leaf(conv2.weight), _leaf(weight), _leaf(bias), a, z, norm, flags,
                                               torch.float32))
        dlogit = torch.randn_like(gx_mean)
        torch.library.opcheck(OPS.gate_logit_backward, (dlogit, tp, gx_mean, a, z, conv1.weight.detach(),
                                                        conv2.weight.detach(), weight, bias, norm, flags))
    else:       # inference operands (A or Z alone): no autograd to check
        torch.library.opcheck(OPS.gate_logit, (tp, gx_mean, wg, conv1.weight.detach(), conv2.weight.detach(),
                                               weight, bias, a, z, norm, flags, torch.float32))


def test_opcheck_apply_gates():
    x = torch.randn(2, 16, 6, 5, device=DEVICE)
    spatial, channel = torch.rand(2, 30, device=DEVICE), torch.rand(2, 16, device=DEVICE)
    torch.library.opcheck(OPS.apply_gates, (_leaf(x), _leaf(spatial), _leaf(channel)))
    torch.library.opcheck(OPS.apply_gates, (x.to(memory_format=torch.channels_last), None, channel))
    torch.library.opcheck(OPS.apply_gates, (x[:, :, :, :4], spatial[:, :24], None))     # H, W do not merge
