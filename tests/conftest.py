import atexit
import os
import shutil
import sys
import tempfile

# A fresh inductor cache per test session: PyTorch's compile caches do not see changes to a custom
# op's autograd formula or fake (pytorch/pytorch#144344), and a stale entry would test old code.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="rga_triton_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # reference/, bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                   # helpers

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "needs_triton: runs the Triton kernels (a GPU, or TRITON_INTERPRET=1 on the CPU)")


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.needs_triton`` (or a module's ``pytestmark``): skipped, with the way to run it,
    where the kernels cannot run."""
    from helpers import TRITON_RUNS

    if TRITON_RUNS:
        return
    skip = pytest.mark.skip(reason="no GPU: set TRITON_INTERPRET=1 to run the kernels on the CPU")
    for item in items:
        if "needs_triton" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty per-GPU configuration store in a temporary folder (``RGA_TRITON_CONFIG_DIR``):
    (``launch.tuned``, that folder)."""
    from rga_triton.launch import tuned

    monkeypatch.setenv("RGA_TRITON_CONFIG_DIR", str(tmp_path))
    tuned.STORE.reset()
    yield tuned, tmp_path
    tuned.STORE.reset()


@pytest.fixture(params=["dz-whole", "dz-sliced"])
def dz_slices(request, monkeypatch):
    """The relation backward's dZ written and consumed in one piece (test shapes are small), or a slice
    of the batch at a time."""
    import rga_triton.ops.relation.op

    if request.param == "dz-sliced":
        monkeypatch.setattr(rga_triton.ops.relation.op, "DZ_SLICE_MIN_BYTES", 0)
    return request.param


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
