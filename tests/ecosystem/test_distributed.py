"""SyncBatchNorm on the Triton path, across processes: two ranks on the gloo backend, the kernels
under Triton's interpreter, against the float64 reference run by one process on the whole batch.

One spawn of two processes runs every case (a process costs seconds to start); each rank saves
what it computed and which path ran, and the tests compare.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

import rga_triton

from helpers import allowance, grad_error, leave_worker, make_pair, rel_err, spawn_ranks, tolerance

pytestmark = pytest.mark.needs_triton

WORLD = 2
SHAPE = dict(c=16, h=8, w=4, cha_ratio=4, spa_ratio=2, down_ratio=2)
SPLITS = {"even": (2, 2), "uneven": (3, 5), "empty": (3, 0)}
"""Images per rank in each case: the even split, an uneven one, and a rank with no image."""


def pair(batch: int, seed: int):
    """(float64 reference, float32 RGA-SC block on the Triton path with SyncBatchNorms, x) sharing parameters."""
    ref, fast, x = make_pair(SHAPE["c"], SHAPE["h"], SHAPE["w"], batch=batch, cha_ratio=SHAPE["cha_ratio"],
                             spa_ratio=SHAPE["spa_ratio"], down_ratio=SHAPE["down_ratio"], backend="triton",
                             seed=seed)
    return ref, nn.SyncBatchNorm.convert_sync_batchnorm(fast), x


def grad_out(batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(batch, SHAPE["c"], SHAPE["h"], SHAPE["w"], generator=gen, dtype=torch.float64)


def ddp_net(backend: str, dtype) -> nn.Module:
    """A small model with an RGA block between a conv + BatchNorm and a classifier, the same weights each call."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         rga_triton.RGAModule(16, 8 * 4, cha_ratio=4, spa_ratio=2, down_ratio=2, backend=backend),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)).to(dtype)


def ddp_batch():
    gen = torch.Generator().manual_seed(2)
    return torch.randn(2 * WORLD, 3, 8, 4, generator=gen), torch.randint(0, 3, (2 * WORLD,), generator=gen)


def snapshot(module) -> dict:
    """A copy of ``module``'s state (state_dict() holds the live buffers, which later calls move)."""
    return {k: v.clone() for k, v in module.state_dict().items()}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import rga_triton.dispatch as dispatch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    calls = {"all_gather": 0, "all_reduce": 0, "torch_path": 0}

    def counted(name, fn):
        def run(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return run

    dist.all_gather = counted("all_gather", dist.all_gather)       # every collective, whoever calls it
    dist.all_reduce = counted("all_reduce", dist.all_reduce)
    dispatch.torch_forward = counted("torch_path", dispatch.torch_forward)
    results = {}
    try:
        for case, sizes in SPLITS.items():
            start, mine = sum(sizes[:rank]), sizes[rank]
            _, block, x = pair(sum(sizes), seed=len(case))
            x_local = x[start:start + mine].float().requires_grad_(True)
            dy = grad_out(sum(sizes))[start:start + mine].float()
            before = dict(calls)
            out = block.train()(x_local)
            forward_calls = {k: calls[k] - before[k] for k in calls}
            out.backward(dy)
            backward_calls = {k: calls[k] - before[k] - forward_calls[k] for k in calls}
            result = {"out": out.detach(), "grad:x": x_local.grad, "state": snapshot(block),
                      "grads": {k: p.grad for k, p in block.named_parameters()},
                      "forward_calls": forward_calls, "backward_calls": backward_calls}
            if case == "even":      # a train-mode call without a gradient (route "kernels"), then eval
                with torch.no_grad():
                    result["no_grad_out"] = block(x_local.detach())
                result["no_grad_state"] = snapshot(block)
                result["eval_out"] = block.eval()(x_local.detach())
            results[case] = result
        # torch.compile (aot_eager: dynamo and autograd tracing; inductor adds nothing to what synchronises)
        _, block, x = pair(4, seed=11)
        x_local = x[2 * rank:2 * rank + 2].float().requires_grad_(True)
        out = torch.compile(block.train(), backend="aot_eager")(x_local)
        out.backward(grad_out(4)[2 * rank:2 * rank + 2].float())
        results["compiled"] = {"out": out.detach(), "grad:x": x_local.grad, "state": snapshot(block)}
        # DistributedDataParallel around a model whose block runs the kernels (plain BatchNorms: DDP refuses
        # SyncBatchNorm modules on CPUs): the averaged gradients of one step
        model = DDP(ddp_net("triton", torch.float32))
        images, labels = ddp_batch()
        mine = slice(2 * rank, 2 * rank + 2)
        torch.nn.functional.cross_entropy(model(images[mine]), labels[mine]).backward()
        results["ddp"] = {k: p.grad for k, p in model.module.named_parameters()}
    except Exception as err:                          # recorded for the test's message
        import traceback
        results = {"error": traceback.format_exc() + repr(err)}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    leave_worker()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("syncbn")
    spawn_ranks(_worker, out, WORLD)
    results = [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]
    errors = [f"rank {rank}: {result['error']}" for rank, result in enumerate(results) if "error" in result]
    assert not errors, "\n".join(errors)
    return results


def reference_step(case: str, dtype=torch.float64):
    """The reference in ``dtype`` on the whole batch of ``case``: (out, grad x, parameter grads, state after)."""
    sizes = SPLITS[case]
    ref, _, x = pair(sum(sizes), seed=len(case))
    ref, x = ref.to(dtype), x.to(dtype).requires_grad_(True)
    out = ref.train()(x)
    out.backward(grad_out(sum(sizes)).to(dtype))
    return out.detach(), x.grad, {k: p.grad for k, p in ref.named_parameters()}, ref.state_dict()


def close(actual, expected, what):
    err = rel_err(actual, expected)
    assert err < tolerance(torch.float32), f"{what}: {err:.2e}"


@pytest.mark.parametrize("case", list(SPLITS))
def test_synchronised_train_step_equals_one_process_on_the_whole_batch(ranks, case):
    """Each rank's output and input gradient are its slice of the whole batch's, the ranks' parameter
    gradients add up to the whole batch's, and every rank's running statistics are the whole batch's.
    Parameter gradients as ``helpers.compare_steps`` measures them: the one-element weight of the last
    BatchNorm is a cancellation residue that float32 cannot do better on than the float32 reference does."""
    out, grad_x, grads, state = reference_step(case)
    low_grads = reference_step(case, torch.float32)[2]
    start = 0
    for rank, result in enumerate(ranks):
        mine = SPLITS[case][rank]
        got = result[case]
        if mine:
            close(got["out"], out[start:start + mine], f"rank {rank} output")
            close(got["grad:x"], grad_x[start:start + mine], f"rank {rank} grad x")
        else:
            assert got["out"].shape == (0, SHAPE["c"], SHAPE["h"], SHAPE["w"])
        for k, v in state.items():
            if "num_batches" in k:
                assert torch.equal(got["state"][k], v), (rank, k)
            else:
                close(got["state"][k], v, f"rank {rank} {k}")
        start += mine
    whole = torch.cat([g.flatten() for g in grads.values()])
    for k, g in grads.items():
        err = grad_error(sum(result[case]["grads"][k].double() for result in ranks), g, whole)
        allowed = allowance(tolerance(torch.float32), grad_error(low_grads[k], g, whole), torch.float32)
        assert err <= allowed, f"grad {k}: {err:.2e} > {allowed:.2e}"


@pytest.mark.parametrize("case", list(SPLITS))
def test_the_kernels_ran_with_one_collective_per_batchnorm_group_and_pass(ranks, case):
    """No fallback: the torch path never ran, and each branch gathered its four BatchNorm groups'
    statistics in forward (the projection's three BatchNorms, the relation's, the hidden one's, the last
    one) and reduced their backward sums, once each, on every rank (an empty one included)."""
    for result in ranks:
        got = result[case]
        assert got["forward_calls"] == {"all_gather": 2 * 4, "all_reduce": 0, "torch_path": 0}
        assert got["backward_calls"] == {"all_gather": 0, "all_reduce": 2 * 4, "torch_path": 0}


def test_train_mode_without_a_gradient_and_eval(ranks):
    """A train-mode call under no_grad (the launchers' route, the last BatchNorm gathered too) moves the
    running statistics as the whole batch does; eval then normalises with them, rank by rank."""
    sizes = SPLITS["even"]
    ref, _, x = pair(sum(sizes), seed=len("even"))
    ref.train()(x)                  # the train step's update
    with torch.no_grad():
        expected = ref.train()(x)
    eval_out = ref.eval()(x)
    for rank, result in enumerate(ranks):
        rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        got = result["even"]
        close(got["no_grad_out"], expected[rows], f"rank {rank} no-grad output")
        for k, v in ref.state_dict().items():
            if "num_batches" not in k:
                close(got["no_grad_state"][k], v, f"rank {rank} {k}")
        close(got["eval_out"], eval_out[rows], f"rank {rank} eval output")


def test_ddp_around_the_kernels_averages_the_gradients_of_one_process(ranks):
    """DDP with the block on the Triton path: each rank's gradients are the mean of the float64 torch path's
    gradients on each half batch (what DDP computes, BatchNorms per replica)."""
    images, labels = ddp_batch()
    model = ddp_net("torch", torch.float64)
    for rank in range(WORLD):
        mine = slice(2 * rank, 2 * rank + 2)
        (torch.nn.functional.cross_entropy(model(images[mine].double()), labels[mine]) / WORLD).backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    whole = torch.cat([g.flatten() for g in grads.values()])
    for result in ranks:
        for k, g in grads.items():
            assert grad_error(result["ddp"][k], g, whole) <= tolerance(torch.float32), k


def test_compiled_block_synchronises(ranks):
    """Under torch.compile the ops gather and reduce inside (opaque to the compiler); the last one-channel
    BatchNorm's PyTorch formula synchronises too (a graph break at its count)."""
    ref, _, x = pair(4, seed=11)
    x = x.clone().requires_grad_(True)
    out = ref.train()(x)
    out.backward(grad_out(4))
    for rank, result in enumerate(ranks):
        rows = slice(2 * rank, 2 * rank + 2)
        close(result["compiled"]["out"], out[rows], f"rank {rank} output")
        close(result["compiled"]["grad:x"], x.grad[rows], f"rank {rank} grad x")
        for k, v in ref.state_dict().items():
            if "running" in k:
                close(result["compiled"]["state"][k], v, f"rank {rank} {k}")
