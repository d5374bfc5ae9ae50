"""examples/train_distributed.py launched as its docstring says: torchrun, two CPU processes on gloo.

With every BatchNorm that normalises with the batch synchronised (``--sync-bn --freeze-bn``) and a loss
that is a mean over images (``--loss ce``), two ranks on half batches compute what one process computes
on the whole batch: the losses, and the parameters and buffers after the steps, read back from each
run's sharded checkpoint (torch.distributed.checkpoint). In float64: float32 rounding through a
ResNet-50 whose BatchNorms are frozen at initialisation (no normalisation) moves the gradient by a few
percent, which would hide the distributed semantics. DDP and FSDP2 (``fully_shard`` per stage and
block, then the whole model) both.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from helpers import rel_err
from paths import REPO_ROOT

EXAMPLE = os.path.join(REPO_ROOT, "examples", "train_distributed.py")
ARGS = ["--steps", "2", "--sync-bn", "--freeze-bn", "--loss", "ce", "--backend", "torch", "--optimizer", "sgd",
        "--lr", "0.05", "--dtype", "float64"]


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, os.path.dirname(EXAMPLE))
    try:
        import train_distributed
        yield train_distributed
    finally:
        sys.path.remove(os.path.dirname(EXAMPLE))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(output: str) -> list[float]:
    return [float(v) for v in re.findall(r"step \d+/\d+  loss ([0-9.]+)", output)]


@pytest.fixture(scope="module")
def runs(example, tmp_path_factory):
    """{name: (losses, checkpoint folder)} for one process in this one, and two ranks through torchrun with
    DDP and with FSDP2."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("train_distributed")
    results = {}
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        results["one process"] = (example.main([*ARGS, "--save", str(out / "one")]), out / "one")
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    for name, extra in (("DDP", []), ("FSDP2", ["--fsdp"])):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              EXAMPLE, *ARGS, *extra, "--save", str(out / name)],
                             capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, f"{name}: torchrun failed\n{run.stdout}\n{run.stderr[-3000:]}"
        assert "2 ranks (gloo)" in run.stdout, run.stdout
        results[name] = (losses(run.stdout), out / name)
    return results


def checkpoint(example, folder) -> dict:
    """The model state a run saved, read in this process (no process group: DCP reads all shards)."""
    import torch.distributed.checkpoint as dcp

    state = {"model": example.build_model(example.parse_args(ARGS)).state_dict()}
    dcp.load(state, checkpoint_id=str(folder))
    return state["model"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")   # DCP read in one process
@pytest.mark.parametrize("name", ["DDP", "FSDP2"])
def test_two_ranks_train_as_one_process_on_the_whole_batch(example, runs, name):
    one_losses, one_folder = runs["one process"]
    got_losses, got_folder = runs[name]
    assert len(one_losses) == len(got_losses) == 2
    for step, (got, want) in enumerate(zip(got_losses, one_losses), 1):
        assert abs(got - want) <= 1e-6 * abs(want), (step, got, want)     # the printed 6 decimals
    one, got = checkpoint(example, one_folder), checkpoint(example, got_folder)
    initial = example.build_model(example.parse_args(ARGS)).state_dict()
    moved = [k for k in one if one[k].is_floating_point() and not torch.equal(one[k], initial[k])]
    assert any("rga_att" in k and "running_var" in k for k in moved)        # the steps moved what is compared
    for k, v in one.items():
        if k.endswith("num_batches_tracked"):
            assert torch.equal(got[k], v), k
        else:       # relative, or absolute below 1 (a one-element BatchNorm bias near 0 is a rounding residue)
            assert float((got[k] - v).norm()) <= 1e-10 * max(float(v.norm()), 1.0), (k, rel_err(got[k], v))
