"""Concurrent compilation of a kernel's configs before autotuning (rga_triton/launch/precompile.py).

Triton's interpreter compiles nothing, so these tests drive the orchestration with a stand-in
kernel: every config reaches ``warmup`` inside Triton's ``AsyncCompileMode``, once per shape
bucket, and any failure leaves the autotuner to compile as usual.
"""
import threading
import warnings

import pytest
import torch
import triton

from rga_triton.launch import precompile as pc
from rga_triton.launch import tuned

from helpers import make_pair

CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w, num_stages=2) for b in (32, 64) for w in (4, 8)]


class FakeKernel:
    """Records warmup calls: the launch arguments and the thread each one ran on."""

    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def warmup(self, *args, grid, **kwargs):
        if self.fail:
            raise RuntimeError("no GPU here")
        self.calls.append((args, kwargs, threading.current_thread().name))


@pytest.mark.skipif(not hasattr(triton, "AsyncCompileMode"), reason="this Triton has no AsyncCompileMode")
def test_every_config_is_warmed_up_with_its_launch_arguments(monkeypatch):
    monkeypatch.setenv("RGA_TRITON_COMPILE_THREADS", "3")
    fn = FakeKernel()
    assert pc.precompile(fn, CONFIGS, (1,), ("x", 7), {"FLAG": True}) == len(CONFIGS)
    seen = sorted((kw["BLOCK"], kw["num_warps"]) for _, kw, _ in fn.calls)
    assert seen == [(32, 4), (32, 8), (64, 4), (64, 8)]
    assert all(args == ("x", 7) and kw["FLAG"] is True and kw["num_stages"] == 2 for args, kw, _ in fn.calls)


@pytest.mark.parametrize("threads", ["0", "1"])
def test_one_thread_or_fewer_turns_it_off(monkeypatch, threads):
    monkeypatch.setenv("RGA_TRITON_COMPILE_THREADS", threads)
    fn = FakeKernel()
    assert pc.precompile(fn, CONFIGS, (1,), (), {}) == 0 and not fn.calls


def test_a_single_config_needs_no_precompilation(monkeypatch):
    monkeypatch.setenv("RGA_TRITON_COMPILE_THREADS", "4")
    assert pc.precompile(FakeKernel(), CONFIGS[:1], (1,), (), {}) == 0


def test_bad_thread_count_names_the_variable(monkeypatch):
    monkeypatch.setenv("RGA_TRITON_COMPILE_THREADS", "many")
    with pytest.raises(ValueError, match="RGA_TRITON_COMPILE_THREADS must be an integer, got 'many'"):
        pc.compile_threads()


@pytest.mark.skipif(not hasattr(triton, "AsyncCompileMode"), reason="this Triton has no AsyncCompileMode")
def test_failure_warns_once_and_leaves_it_to_the_autotuner(monkeypatch):
    monkeypatch.setenv("RGA_TRITON_COMPILE_THREADS", "2")
    monkeypatch.setattr(pc, "_failed_once", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pc.precompile(FakeKernel(fail=True), CONFIGS, (1,), (), {}) == 0
        assert pc.precompile(FakeKernel(fail=True), CONFIGS, (1,), (), {}) == 0
    messages = [str(w.message) for w in caught if "concurrent compilation failed" in str(w.message)]
    assert len(messages) == 1 and "no GPU here" in messages[0]


def test_without_async_compile_mode_nothing_is_submitted(monkeypatch):
    monkeypatch.setenv("RGA_TRITON_COMPILE_THREADS", "4")
    monkeypatch.delattr(triton, "AsyncCompileMode", raising=False)
    fn = FakeKernel()
    assert pc.precompile(fn, CONFIGS, (1,), (), {}) == 0 and not fn.calls


@pytest.mark.needs_triton
def test_each_bucket_is_precompiled_once_before_autotuning(monkeypatch, tmp_path):
    """On a file miss, a kernel precompiles its configs once per shape bucket, then autotunes."""
    monkeypatch.setenv("RGA_TRITON_CONFIG_DIR", str(tmp_path))
    tuned.STORE.reset()
    calls = []
    monkeypatch.setattr(tuned, "pinned", lambda: False)       # the interpreter pins; pretend it does not
    monkeypatch.setattr(tuned, "precompile", lambda fn, configs, grid, args, kwargs: calls.append(fn.__name__))
    for kernel in tuned.KERNELS.values():
        monkeypatch.setattr(kernel, "precompiled", set())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, fast, x = make_pair(20, 6, 10, 3, cha_ratio=3, down_ratio=4, device=device, backend="triton")
    fast.eval()
    with torch.no_grad():
        fast(x.float().to(device))
        first = list(calls)
        fast(x.float().to(device))
    tuned.STORE.reset()
    assert "_projection_apply_kernel" in first and "_gate_logit_kernel" in first
    assert calls == first, "a bucket seen before was precompiled again"
    # One call per (kernel, bucket): both branches launch the projection, with different shapes.
    assert first.count("_projection_apply_kernel") == 2
