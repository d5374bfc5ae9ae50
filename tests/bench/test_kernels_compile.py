"""Every kernel compiles for Hopper (sm_90) and Ampere (sm_80), ahead of time, on a machine with no GPU.

Triton's interpreter runs kernels through numpy and never lowers them. Three kinds of error
would first show on a user's GPU: a block shape ``tl.dot`` rejects, a layout the backend cannot
convert, or a type error in a branch only a GPU takes. ``triton.compile`` lowers a kernel to PTX
and cubin for a named target without a GPU, so CI catches them here. It checks every
block-size config of each kernel's autotune space, every constexpr switch, and
half-precision operands.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import triton

from bench.lib import compile_kernels

from paths import REPO_ROOT

try:
    HAS_CUDA_BACKEND = "nvidia" in triton.backends.backends
except AttributeError:
    HAS_CUDA_BACKEND = False
pytestmark = pytest.mark.skipif(not HAS_CUDA_BACKEND, reason="this Triton has no NVIDIA backend to compile for")


ROOT = REPO_ROOT


def _compile_tool(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a compiling script (path from the repo root) in a subprocess without TRITON_INTERPRET (which
    replaces @triton.jit); it must succeed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def results():
    """Compile every case in one subprocess."""
    done = _compile_tool("bench/lib/compile_kernels.py", timeout=1500)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case_id", [case[0] for case in compile_kernels.cases()])
def test_kernel_compiles_for_cuda(results, case_id):
    assert results[case_id] == "ok", results[case_id]


def test_compile_threads_tool_runs():
    """bench/studies/compile_threads.py (the premise of concurrent precompilation) compiles and reports."""
    done = _compile_tool("bench/studies/compile_threads.py", "--cases", "2", "--threads", "2")
    assert "2 kernel variants for sm_90" in done.stdout and "on 2 threads" in done.stdout


def test_kernel_resources_tool_reports_every_config(tmp_path):
    """bench/studies/kernel_resources.py compiles each config of a space (block sizes x num_warps x num_stages) and
    reads registers and spills from ptxas. The gating backward, a memory-bound pass over x, spills nothing
    in any config (its space dropped the tiles that did)."""
    import csv
    out = tmp_path / "resources.csv"
    done = _compile_tool("bench/studies/kernel_resources.py", "--kernels", "_apply_gates_backward_kernel", "--quiet",
                         "--out", str(out))
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    from rga_triton.launch import tuned
    expected = {(" ".join(f"{k}={v}" for k, v in sorted(b.items())), str(w), str(s))
                for b, w, s in tuned.KERNELS["_apply_gates_backward_kernel"].allowed}
    assert {(r["blocks"], r["num_warps"], r["num_stages"]) for r in rows} == expected
    assert {r["precision"] for r in rows} == {"float32-3xtf32", "bfloat16"}     # no dot: no TF32 case
    for row in rows:
        assert not row["error"] and 0 < int(row["registers"]) <= 255, row
        assert int(row["spill_store_bytes"]) == 0, row
        assert row["dot_instruction"] == "none" and int(row["occupancy_warps"]) >= int(row["num_warps"]), row
    for precision in ("float32-3xtf32", "bfloat16"):
        assert f"| _apply_gates_backward_kernel | {precision} | {len(expected)} / {len(expected)} | 0 |" in done.stdout


def test_first_configs_spill_nothing_on_hopper(tmp_path):
    """Every kernel's first config (the one pinned and interpreted launches use, and the untuned kernels'
    launch) compiles for sm_90 without spilling registers, with float32 operands and 3xTF32 dots and with
    bfloat16 operands (the precision cases launches use), read from ptxas by
    bench/studies/kernel_resources.py. One compile per kernel and case: about a minute on 2 cores."""
    import csv
    out = tmp_path / "first.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench/studies/kernel_resources.py"), "--first",
                           "--check", "--quiet", "--arch", "90", "--precisions", "float32-3xtf32,bfloat16",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["kernel"] for r in rows} == set(compile_kernels.kernel_names())
    for row in rows:
        assert (int(row["num_warps"]), int(row["num_stages"])) == compile_kernels.first_launch(row["kernel"]), row
        assert not row["error"] and 0 < int(row["registers"]) <= 255, row
        assert int(row["spill_store_bytes"]) == 0, (f"{row['kernel']} ({row['precision']}) spills "
                                                   f"{row['spill_store_bytes']} B in its first config: {row}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
