"""Configs that cannot win are pruned before the autotuner times them (``launch/tuned.py``).

On a GPU every config of a space is compiled first (``launch/precompile.py``); the driver then
reports each binary's local memory (spilled registers) and shared memory. A config that spills,
or that needs more shared memory than the device has, is dropped in Triton's
``early_config_prune`` hook, and the count timed per shape is logged. Here the compile result
is stubbed: no GPU, no compiler.
"""
from __future__ import annotations

import logging

import pytest
import torch
import triton

import rga_triton.ops.gating.kernels  # noqa: F401  (registers _apply_gates_backward_kernel)
from rga_triton.launch import tuned


def _configs(n):
    return [triton.Config({"BLOCK": 16 * (i + 1)}, num_warps=4, num_stages=2) for i in range(n)]


def test_prune_drops_spilling_and_oversized_configs():
    configs = _configs(5)
    resources = [(0, 1024), (96, 1024), (0, 300_000), None, (0, 232_448)]
    keep, counts = tuned.prune_unfit(configs, resources, max_shared=232_448)
    assert keep == [configs[0], configs[3], configs[4]]       # unknown resources stay; the device's maximum fits
    assert counts == {"spill": 1, "shared": 1}


def test_prune_keeps_the_least_spilling_when_every_config_spills():
    configs = _configs(4)
    resources = [(64, 0), (8, 0), (8, 900_000), (32, 0)]
    keep, _ = tuned.prune_unfit(configs, resources, max_shared=232_448)
    assert keep == [configs[1]]
    keep, _ = tuned.prune_unfit(configs, [(0, 900_000)] * 4, max_shared=232_448)
    assert keep == configs                 # nothing fits: the autotuner reports the error itself
    keep, _ = tuned.prune_unfit(configs, [(0, 900_000)] * 4, max_shared=None)
    assert keep == configs                 # unknown device limit: shared memory prunes nothing


def test_early_config_prune_hook_uses_the_launch_and_logs_the_count(monkeypatch, caplog):
    """The hook Triton's autotuner calls compiles each config with the launch's own arguments (stubbed
    here), keeps those that spill nothing, records and logs how many are timed for the shape."""
    kernel = tuned.KERNELS["_apply_gates_backward_kernel"]
    configs = _configs(4)
    stub = {16: (0, 512), 32: (148, 512), 48: (0, 512), 64: (0, 400_000)}
    seen = []

    def fake_resources(fn, config, grid, args, kwargs):
        seen.append((fn, args, kwargs))
        return stub[config.kwargs["BLOCK"]]

    monkeypatch.setattr(tuned, "compiled_resources", fake_resources)
    monkeypatch.setattr(tuned, "max_shared_memory", lambda device: 232_448)
    assert kernel._prune(configs, {}) == configs               # no launch under way (e.g. a warmup): unchanged
    kernel._launch.current = ("C=8,N=64,dtype=float32", torch.device("cpu"), (1,), ("x",), {"C": 8})
    try:
        with caplog.at_level(logging.INFO, logger="rga_triton.tuning"):
            keep = kernel._prune(configs, {})
    finally:
        kernel._launch.current = None
    assert keep == [configs[0], configs[2]]
    assert all(fn is kernel.fn and args == ("x",) and kwargs == {"C": 8} for fn, args, kwargs in seen)
    assert kernel.timed["C=8,N=64,dtype=float32"] == (2, 4)
    assert "timing 2 of 4 configs (pruned: 1 spill, 1 need more shared memory" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (pinned) setup")
def test_pinned_kernels_are_not_pruned():
    """Under the interpreter (or RGA_TRITON_PIN_CONFIG=1) a kernel has one config and no prune hook."""
    from rga_triton.common.settings import pinned
    if not pinned():
        pytest.skip("runs under TRITON_INTERPRET=1 or RGA_TRITON_PIN_CONFIG=1")
    kernel = tuned.KERNELS["_apply_gates_backward_kernel"]
    assert len(kernel.autotuned.configs) == 1 and kernel.autotuned.early_config_prune is None


def test_compiled_resources_reads_the_driver_report_from_a_stubbed_compile():
    """Spilled bytes come from the driver's local-memory count (4-byte words), shared memory from the
    compile metadata; a binary the driver refuses (Triton's OutOfResources) is judged by its shared memory,
    and a config that does not compile at all is kept for the autotuner to report."""
    from types import SimpleNamespace

    class Compiled:
        def __init__(self, spills, shared, refuse=False):
            self.metadata = SimpleNamespace(shared=shared)
            self._spills, self._refuse = spills, refuse

        def _init_handles(self):
            if self._refuse:
                raise RuntimeError("out of resources: shared memory")
            self.n_spills = self._spills

    class Fn:
        def __init__(self, result):
            self.result, self.calls = result, []

        def warmup(self, *args, grid, **kwargs):
            self.calls.append((args, grid, kwargs))
            if isinstance(self.result, Exception):
                raise self.result
            return self.result

    config = triton.Config({"BLOCK": 32}, num_warps=8, num_stages=3)
    fn = Fn(Compiled(spills=37, shared=4096))
    assert tuned.compiled_resources(fn, config, (4,), ("a",), {"N": 2}) == (148, 4096)
    args, grid, kwargs = fn.calls[0]
    assert args == ("a",) and grid == (4,) and kwargs["BLOCK"] == 32 and kwargs["num_warps"] == 8 and kwargs["N"] == 2
    assert tuned.compiled_resources(Fn(Compiled(0, 300_000, refuse=True)), config, (1,), (), {}) == (0, 300_000)
    assert tuned.compiled_resources(Fn(ValueError("bad block")), config, (1,), (), {}) is None
