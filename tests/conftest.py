import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # reference/, bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                   # helpers

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _fp32_matmul_exact():
    """Keep float32 matmuls IEEE (no TF32) unless a test says otherwise."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(autouse=True)
def _gpu_numerics_if_asked():
    """RGA_TEST_GPU_NUMERICS=1 runs every test with a GPU's dot numerics emulated in Triton's
    interpreter (``gpu_numerics.py``): on a CPU, the kernels then round as tensor cores do."""
    if os.environ.get("RGA_TEST_GPU_NUMERICS", "0") in ("", "0") or torch.cuda.is_available():
        yield
        return
    from gpu_numerics import gpu_dot_numerics
    with gpu_dot_numerics():
        yield
