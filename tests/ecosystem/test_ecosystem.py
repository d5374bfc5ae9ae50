"""convert(), load_checkpoint(), torch.compile, inference_mode and activation checkpointing,
DistributedDataParallel, and the examples."""
from __future__ import annotations

import argparse
import copy
import logging
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rga_triton
from reference import RGA_Module
from rga_triton import RGAModule

from helpers import float32_tolerance, leave_worker, make_pair, rel_err, spawn_ranks
from paths import REPO_ROOT

ROOT = REPO_ROOT


# ----------------------------------------------------------------------------------- convert()

class AuthorsNet(nn.Module):
    """A model built with the literal (authors') RGA block in a few places, one of them shared."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.ModuleList([RGA_Module(16, 8 * 4, cha_ratio=4, spa_ratio=2, down_ratio=3), nn.ReLU()])
        self.tail = nn.Sequential(nn.Identity(), RGA_Module(16, 8 * 4, use_channel=False, spa_ratio=4, down_ratio=2),
                                  RGA_Module(16, 8 * 4, use_spatial=False, cha_ratio=2, down_ratio=4))
        self.again = self.blocks[0]            # the same block at a second path
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.blocks[1](self.blocks[0](self.stem(x)))
        x = self.again(self.tail(x))
        return self.head(x.mean(dim=(2, 3)))


def authors_net(seed=0):
    torch.manual_seed(seed)
    model = AuthorsNet().double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen, dtype=m.weight.dtype))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen, dtype=m.running_mean.dtype))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen, dtype=m.running_var.dtype))
    return model


def test_convert_keeps_function_tensors_and_modes(caplog):
    model = authors_net()
    original = copy.deepcopy(model)
    tensors = {k: v.data_ptr() for k, v in model.state_dict().items()}
    params_before = list(model.parameters())
    model.tail[1].eval()                                  # a block in another mode than its parent
    original.tail[1].eval()
    with caplog.at_level(logging.INFO, logger="rga_triton"):
        out = rga_triton.convert(model, backend="torch")
    assert out is model
    assert "converted 3 RGA block(s): blocks.0, tail.1, tail.2, again" in caplog.text
    assert all(isinstance(m, RGAModule) for m in (model.blocks[0], model.tail[1], model.tail[2], model.again))
    assert model.again is model.blocks[0]
    assert not any(isinstance(m, RGA_Module) for m in model.modules())
    # Same tensors (an optimizer built before convert keeps working), same keys in the same order.
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == tensors
    assert list(model.parameters()) == params_before
    assert list(model.state_dict()) == list(original.state_dict())
    assert not model.tail[1].training and model.blocks[0].training
    b = model.blocks[0]
    assert (b.cha_ratio, b.spa_ratio, b.down_ratio, b.backend) == (4, 2, 3, "torch")
    assert (model.tail[1].spa_ratio, model.tail[1].down_ratio) == (4, 2)
    assert (model.tail[2].cha_ratio, model.tail[2].down_ratio, model.tail[2].use_spatial) == (2, 4, False)
    assert all(t.device.type == "cpu" and t.dtype == torch.float64 for t in model.parameters())
    x = torch.randn(3, 3, 8, 4, dtype=torch.float64)
    for train in (True, False):
        model.train(train), original.train(train)
        assert rel_err(model(x), original(x)) < 1e-10
    for (k, u), v in zip(model.state_dict().items(), original.state_dict().values()):
        assert (torch.equal(u, v) if "num_batches" in k else rel_err(u, v) < 1e-10), k


def test_convert_an_rga_net_built_from_the_authors_blocks():
    from rga_triton.models import rga_net

    model = rga_net(3, height=32, width=16, spa_ratio=2, down_ratio=2, backend="torch").eval()
    authors = copy.deepcopy(model)
    for k in range(1, 5):
        block = getattr(model.backbone, f"rga_att{k}")
        ref = RGA_Module(block.in_channel, block.in_spatial, spa_ratio=2, down_ratio=2)
        ref.load_state_dict(block.state_dict())
        setattr(authors.backbone, f"rga_att{k}", ref.eval())
    converted = rga_triton.convert(copy.deepcopy(authors), backend="torch")
    assert [type(getattr(converted.backbone, f"rga_att{k}")) for k in range(1, 5)] == [RGAModule] * 4
    x = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        assert rel_err(converted(x), authors(x)) < 1e-4      # float32 network, contract per block 1e-5


def test_convert_block_itself_verbose_and_nothing_found(capsys):
    block = RGA_Module(8, 16, cha_ratio=2, spa_ratio=2, down_ratio=2)
    new = rga_triton.convert(block, verbose=True)
    assert isinstance(new, RGAModule) and new.theta_spatial is block.theta_spatial
    assert "converted 1 RGA block(s): <model>" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="converted 0 RGA block"):
        rga_triton.convert(nn.Sequential(nn.Conv2d(3, 3, 1)))
    assert rga_triton.convert(nn.Sequential(new))[0] is new      # already converted: left alone


def test_convert_keeps_the_branch_order():
    torch.manual_seed(0)
    block = RGA_Module(8, 16, cha_ratio=2, spa_ratio=2, down_ratio=2, order="parallel").double()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    expected = copy.deepcopy(block)(x)
    new = rga_triton.convert(block, backend="torch")
    assert new.order == "parallel" and rel_err(new(x), expected) < 1e-10


def test_load_checkpoint_refuses_pickled_objects_with_advice(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": small_net().state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(RuntimeError, match="weights_only=False"):
        rga_triton.load_checkpoint(small_net(), path)
    assert rga_triton.load_checkpoint(small_net(), path, weights_only=False).ok


def test_convert_rejects_blocks_it_cannot_rebuild():
    model = authors_net()
    model.tail[1].gg_spatial[0] = nn.Conv2d(2 * 32 + 1, 8, 1, bias=False).double()   # 2*in_spatial + 1 inputs
    with pytest.raises(ValueError, match=r"'tail\.1'.*gg_spatial\.0\.weight"):
        rga_triton.convert(model)
    assert isinstance(model.blocks[0], RGA_Module)        # nothing was changed
    model = authors_net()
    model.blocks[0].theta_spatial[0] = nn.Conv2d(16, 4, 3, padding=1, bias=False).double()
    with pytest.raises(ValueError, match=r"'blocks\.0'.*theta_spatial must be nn\.Sequential\(Conv2d 1x1"):
        rga_triton.convert(model)
    model = authors_net()
    model.tail[2].W_channel[0] = nn.Conv2d(9, 7, 1, bias=False).double()     # hidden 7 > 1 + 8: no down_ratio
    model.tail[2].W_channel[1] = nn.BatchNorm2d(7).double()
    model.tail[2].W_channel[3] = nn.Conv2d(7, 1, 1, bias=False).double()
    with pytest.raises(ValueError, match=r"'tail\.2'.*down_ratio"):
        rga_triton.convert(model)


@pytest.mark.parametrize("kwargs,words", [(dict(backend="bogus"), "backend must be one of"),
                                          (dict(algorithm="fft"), "algorithm must be one of")])
@pytest.mark.parametrize("with_block", [True, False], ids=["with-blocks", "no-block"])
def test_convert_checks_backend_and_algorithm_first(kwargs, words, with_block):
    model = authors_net() if with_block else nn.Linear(2, 2)
    with pytest.raises(ValueError, match=words) as info:
        rga_triton.convert(model, **kwargs)
    assert "cannot be rebuilt" not in str(info.value)          # the argument is named, not a block
    if with_block:
        assert isinstance(model.blocks[0], RGA_Module)        # nothing was changed


# ------------------------------------------------------------------------------ load_checkpoint()

def small_net(num_classes=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         RGAModule(16, 8 * 4, cha_ratio=4, spa_ratio=2, down_ratio=2, backend="torch"),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


def authors_format(model, nest=("state_dict",)):
    """The authors' checkpoint layout: DataParallel prefixes, no num_batches_tracked, inside a dict."""
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    for key in reversed(nest):
        state = {key: state}
    return dict(state, epoch=600, best_top1=0.745, optimizer={"state": {}, "param_groups": [{"lr": 8e-4}]})


def trained(model):
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 8, 4))
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def test_load_checkpoint_reads_the_authors_files(tmp_path):
    source = trained(small_net())
    path = tmp_path / "checkpoint_600.pth.tar"
    torch.save(authors_format(source), path, _use_new_zipfile_serialization=False)   # pre-1.6 file format
    target = small_net(seed=1)
    report = rga_triton.load_checkpoint(target, path)
    assert report.ok and report.stripped_prefixes == ["module."] and report.source == "'state_dict'"
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in target.modules())
    assert len(report.filled_keys) == n_bn and all(k.endswith("num_batches_tracked") for k in report.filled_keys)
    assert f"set {n_bn} num_batches_tracked" in str(report)
    for k, v in target.state_dict().items():
        assert torch.equal(v, torch.zeros((), dtype=torch.long) if k.endswith("num_batches_tracked")
                           else source.state_dict()[k]), k
    x = torch.randn(2, 3, 8, 4)
    with torch.no_grad():
        assert torch.equal(target.eval()(x), source(x))


@pytest.mark.parametrize("layout", ["bare", "nested", "model", "dataparallel_target", "compiled_keys"])
def test_load_checkpoint_layouts(layout):
    source = trained(small_net())
    target = small_net(seed=1)
    state = source.state_dict()
    if layout == "bare":
        ckpt = dict(state)
    elif layout == "nested":
        ckpt = authors_format(source, nest=("model", "state_dict"))
    elif layout == "model":
        ckpt = {"model": {f"module.module.{k}": v for k, v in state.items()}, "epoch": 3}
    elif layout == "dataparallel_target":
        ckpt, target = authors_format(source), nn.DataParallel(target)
    else:
        ckpt = {f"_orig_mod.{k}": v for k, v in state.items()}
    report = rga_triton.load_checkpoint(target, ckpt)
    assert report.ok
    got = (target.module if isinstance(target, nn.DataParallel) else target).state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items() if not k.endswith("num_batches_tracked"))


def test_load_checkpoint_names_what_does_not_match(tmp_path):
    source = trained(small_net(num_classes=7))
    ckpt = authors_format(source)
    del ckpt["state_dict"]["module.3.W_spatial.1.running_var"]
    ckpt["state_dict"]["module.extra.weight"] = torch.ones(3)
    target = small_net(num_classes=5, seed=1)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(RuntimeError) as err:
        rga_triton.load_checkpoint(target, ckpt)
    msg = str(err.value)
    assert "1 key(s) missing from the checkpoint" in msg and "3.W_spatial.1.running_var" in msg
    assert "1 unexpected key(s)" in msg and "extra.weight" in msg
    assert "6.weight: checkpoint (7, 16) vs model (5, 16)" in msg and "6.bias: checkpoint (7,) vs model (5,)" in msg
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())     # nothing loaded
    report = rga_triton.load_checkpoint(target, ckpt, strict=False)
    assert not report.ok and report.missing_keys == ["3.W_spatial.1.running_var"]
    assert report.unexpected_keys == ["extra.weight"] and set(report.mismatched_shapes) == {"6.weight", "6.bias"}
    assert torch.equal(target[0].weight, source[0].weight) and not torch.equal(target[6].bias, before["6.bias"][:0])
    assert torch.equal(target[6].weight, before["6.weight"])
    with pytest.raises(ValueError, match="found no state_dict"):
        rga_triton.load_checkpoint(target, {"epoch": 3})
    with pytest.raises(FileNotFoundError):
        rga_triton.load_checkpoint(target, tmp_path / "missing.pth")


def test_load_checkpoint_into_rga_net_from_authors_layout(tmp_path):
    """Keys of the authors' ResNet50_RGA_Model (backbone.*, feat_bn.*, cls.*) load into rga_net."""
    from rga_triton.models import rga_net

    source = rga_net(4, height=32, width=16, spa_ratio=2, down_ratio=2)
    path = tmp_path / "model_best.pth.tar"
    torch.save(authors_format(source), path)
    target = rga_net(4, height=32, width=16, spa_ratio=2, down_ratio=2)
    report = rga_triton.load_checkpoint(target, path)
    assert report.ok and len(report.loaded_keys) == len(target.state_dict())
    assert torch.equal(target.cls.weight, source.cls.weight)
    other_size = rga_net(4, height=64, width=32, spa_ratio=2, down_ratio=2)
    with pytest.raises(RuntimeError, match="trained at another input height/width"):
        rga_triton.load_checkpoint(other_size, path)


# ------------------------------------------------------------------------------- torch.compile

def test_torch_compile_fullgraph_matches_eager():
    """The "torch" path compiles without graph breaks (aot_eager: inductor's first compile is ~40 s here)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = RGAModule(16, 8 * 4, spa_ratio=2, down_ratio=2, backend="torch")
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(3, 16, 8, 4, generator=gen)
        grad = torch.randn(x.shape, generator=gen)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        ye.backward(grad), yc.backward(grad)
        assert rel_err(yc, ye) < 1e-6 and rel_err(xc.grad, xe.grad) < 1e-6
        for (name, p), q in zip(eager.named_parameters(), compiled_module.parameters()):
            assert rel_err(q.grad, p.grad) < 1e-5 or float((q.grad - p.grad).norm()) < 1e-6, name
    for (name, u), v in zip(eager.state_dict().items(), compiled_module.state_dict().values()):
        assert torch.equal(u, v) if "num_batches" in name else rel_err(v, u) < 1e-6, name
    eager.eval(), compiled_module.eval()
    with torch.no_grad():
        x = torch.randn(2, 16, 8, 4, generator=gen)
        assert rel_err(compiled(x), eager(x)) < 1e-6
    explanation = torch._dynamo.explain(eager)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


# ----------------------------------------------- inference_mode, activation checkpointing

BACKENDS_HERE = ["torch"] + (["triton"] if torch.cuda.is_available() or rga_triton.dispatch.interpreting() else [])


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_inference_mode_matches_reference(backend):
    """Feature extraction under torch.inference_mode (re-ID evaluation), eval and train mode."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for train in (False, True):
        ref, fast, x = make_pair(12, 5, 6, 3, cha_ratio=2, spa_ratio=3, down_ratio=2, backend=backend, device=device)
        ref.train(train), fast.train(train)
        with torch.inference_mode():
            out = fast(x.float().to(device))
        assert rel_err(out.double().cpu(), ref(x)) <= float32_tolerance(device)
        bn = fast.gg_spatial[1]
        assert rel_err(bn.running_var.double().cpu(), ref.gg_spatial[1].running_var) <= float32_tolerance(device)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_activation_checkpointing_matches_reference(backend):
    """torch.utils.checkpoint re-runs forward in backward; gradients and BatchNorm statistics
    (moved twice, as by the reference under the same checkpoint) match."""
    from torch.utils.checkpoint import checkpoint
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref, fast, x = make_pair(12, 5, 6, 3, cha_ratio=2, spa_ratio=3, down_ratio=2, backend=backend, device=device)
    grads = []
    for module, xin in ((ref, x.clone()), (fast, x.float().to(device))):
        xin.requires_grad_(True)
        out = checkpoint(module, xin, use_reentrant=False)
        out.backward(torch.cos(out.detach()))
        grads.append([xin.grad] + [p.grad for p in module.parameters()])
    for expected, actual in zip(*grads):
        assert rel_err(actual.double().cpu(), expected) <= float32_tolerance(device)
    for name, buf in ref.named_buffers():
        actual = dict(fast.named_buffers())[name]
        assert rel_err(actual.double().cpu(), buf.double()) <= float32_tolerance(device), name


# --------------------------------------------------------------------- DistributedDataParallel

WORLD, HALF, STEPS, LR = 2, 4, 2, 0.1


def ddp_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         RGAModule(16, 8 * 4, cha_ratio=4, spa_ratio=2, down_ratio=2, backend="torch"),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)).double()


def ddp_data():
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(WORLD * HALF, 3, 8, 4, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (WORLD * HALF,), generator=gen)) for _ in range(STEPS)]


def sync_block():
    torch.manual_seed(3)
    x = torch.randn(WORLD * HALF, 16, 8, 4, dtype=torch.float64)
    return RGAModule(16, 8 * 4, cha_ratio=4, spa_ratio=2, down_ratio=2, backend="torch").double(), x


def _ddp_worker(rank, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    sl = slice(rank * HALF, (rank + 1) * HALF)
    try:
        # 1. DDP over the gloo backend: two SGD steps, each replica on its half of the batch.
        model = ddp_net()
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        for x, y in ddp_data():
            loss = F.cross_entropy(ddp(x[sl]), y[sl])
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save(model.state_dict(), os.path.join(out_dir, f"plain{rank}.pt"))
        # 2. SyncBatchNorm inside an RGA block. On CPU, DDP refuses SyncBatchNorm modules and
        #    SyncBatchNorm.forward refuses CPU tensors, so the block runs unwrapped: does it sync?
        block, x = sync_block()
        block = nn.SyncBatchNorm.convert_sync_batchnorm(block).train()
        try:
            x_local = x[sl].clone().requires_grad_(True)
            out = block(x_local)
            out.backward(torch.cos(out.detach()))
            result = {**block.state_dict(), "grad:x": x_local.grad,
                      **{f"grad:{k}": p.grad for k, p in block.named_parameters()}}
        except Exception as err:                      # recorded for the test's message
            result = {"error": repr(err)}
        torch.save(result, os.path.join(out_dir, f"syncbn{rank}.pt"))
    finally:
        dist.destroy_process_group()
    leave_worker()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    spawn_ranks(_ddp_worker, out, WORLD)
    return {name: torch.load(out / f"{name}.pt") for name in ("plain0", "plain1", "syncbn0", "syncbn1")}


def emulate_ddp(model):
    """One process doing what DDP does: per-replica BatchNorm, averaged gradients, rank 0's buffers broadcast."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    buffers = dict(model.named_buffers())
    per_rank = []
    for x, y in ddp_data():
        start = {k: b.clone() for k, b in buffers.items()}
        opt.zero_grad()
        per_rank = []
        for rank in range(WORLD):
            with torch.no_grad():
                for k, b in buffers.items():
                    b.copy_(start[k])          # every replica starts the step from rank 0's buffers
            sl = slice(rank * HALF, (rank + 1) * HALF)
            (F.cross_entropy(model(x[sl]), y[sl]) / WORLD).backward()
            per_rank.append({k: b.clone() for k, b in buffers.items()})
        opt.step()
        with torch.no_grad():
            for k, b in buffers.items():
                b.copy_(per_rank[0][k])
    return model, per_rank


def test_ddp_two_cpu_processes_match_one_process(ddp_results):
    model, per_rank = emulate_ddp(ddp_net())
    params = dict(model.named_parameters())
    for rank in range(WORLD):
        state = ddp_results[f"plain{rank}"]
        for k, p in params.items():
            assert rel_err(state[k], p) < 1e-10, (rank, k)
        for k, b in per_rank[rank].items():
            assert (torch.equal(state[k], b) if "num_batches" in k else rel_err(state[k], b) < 1e-10), (rank, k)


def test_syncbatchnorm_inside_rga_synchronises(ddp_results):
    # Synchronised BatchNorm on two half batches = one process on the whole batch.
    # Gradients too: each rank's input gradient is its slice of the whole batch's, and the ranks'
    # parameter gradients add up to the whole batch's (the cross-rank terms travel in backward).
    block, x = sync_block()
    x.requires_grad_(True)
    out = block.train()(x)
    out.backward(torch.cos(out.detach()))
    states = [ddp_results[f"syncbn{rank}"] for rank in range(WORLD)]
    for rank, state in enumerate(states):
        assert "error" not in state, state.get("error")
        for k, v in block.state_dict().items():
            assert (torch.equal(state[k], v) if "num_batches" in k else rel_err(state[k], v) < 1e-8), (rank, k)
        assert rel_err(state["grad:x"], x.grad[rank * HALF:(rank + 1) * HALF]) < 1e-8, rank
    for k, p in block.named_parameters():
        assert rel_err(sum(state[f"grad:{k}"] for state in states), p.grad) < 1e-8, k


def test_synchronised_batchnorms_take_the_triton_path_unless_they_span_several_groups(monkeypatch):
    """Train-mode SyncBatchNorms in one process group of several ranks (faked here: one process) run on the
    Triton path (tests/ecosystem/test_distributed.py runs them on two); spread over two groups, or beside a
    BatchNorm that normalises with the rank's batch alone, they take the torch path: backend="triton"
    refuses with a ValueError, "auto" warns once and runs "torch"."""
    import rga_triton.dispatch as module_mod
    monkeypatch.setattr(module_mod, "distributed", lambda: True)
    monkeypatch.setattr(module_mod, "synchronised", lambda m: isinstance(m, nn.SyncBatchNorm) and m.training)
    monkeypatch.setattr(module_mod, "process_group_name", lambda m: m.process_group or "world")
    monkeypatch.setattr(rga_triton.dispatch, "_warned_reasons", set())
    block = nn.SyncBatchNorm.convert_sync_batchnorm(
        RGAModule(16, 8 * 4, cha_ratio=4, spa_ratio=2, down_ratio=2, backend="triton")).train()
    x = torch.randn(2, 16, 8, 4)
    assert module_mod.sync_group(block) == "world"
    assert module_mod.sync_group(block.eval()) == ""
    assert module_mod.backend_for(block.train(), x, module_mod.sync_group(block)) == "triton"
    block.gg_spatial[1].process_group = "another"
    assert module_mod.sync_group(block) is None
    with pytest.raises(ValueError, match="SyncBatchNorm layers span several process groups"):
        block(x)
    block.gg_spatial[1].process_group = None
    block.W_channel[4] = nn.BatchNorm2d(1)
    assert module_mod.sync_group(block) is None
    block.backend = "auto"
    ran = []
    monkeypatch.setattr(module_mod, "torch_forward", lambda m, x, branches: ran.append("torch") or x)
    with pytest.warns(UserWarning, match="train-mode SyncBatchNorms span several process groups or sit beside"):
        block(x)
    assert ran == ["torch"]


# ------------------------------------------------------------------------------------- examples

@pytest.fixture
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))


def test_example_train_synthetic(examples_on_path, capsys):
    import train_synthetic

    results = train_synthetic.main(["--backend", "torch", "--device", "cpu", "--height", "32", "--width", "16",
                                    "--identities", "2", "--instances", "2", "--num-classes", "4", "--steps", "2"])
    out = capsys.readouterr().out
    assert "[torch] step 2/2" in out and "images/s" in out
    assert len(results["torch"]["losses"]) == 2 and all(s > 0 for s in results["torch"]["images_per_s"])


def test_example_relation_maps(examples_on_path, tmp_path):
    pytest.importorskip("matplotlib")
    import relation_maps

    out = tmp_path / "maps.png"
    path = relation_maps.main(["--height", "64", "--width", "32", "--spa-ratio", "2", "--down-ratio", "2",
                               "--backend", "torch", "--device", "cpu", "--out", str(out)])
    assert path == str(out) and out.stat().st_size > 10_000
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
