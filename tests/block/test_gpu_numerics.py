"""The Triton path under a GPU's dot numerics: on CUDA for real; on the CPU through Triton's
interpreter with the tensor cores' TF32 rounding emulated (``gpu_numerics.py``).

The interpreter's float32 dots are exact, so precision choices that only a GPU exposes (a
plain TF32 product where sums cancel) pass the other CPU tests. Before the kernels used
3xTF32 for every float32 dot, these cases missed the float16 contract by up to 10x
(grad x 2.1e-1, RGA-SC "cs", seed 0).
"""
import contextlib

import numpy as np
import pytest
import torch

from rga_triton.ops.affinity.kernels import affinity

from gpu_numerics import gpu_dot_numerics, tf32_rounded, tf32_truncated
from helpers import DEVICE, TOLERANCE, compare_steps, make_pair, rel_err

pytestmark = pytest.mark.needs_triton
interpreter_only = pytest.mark.skipif(DEVICE == "cuda", reason="the emulation stands in for a GPU; this one has one")


@pytest.fixture
def gpu_numerics():
    with gpu_dot_numerics() if DEVICE == "cpu" else contextlib.nullcontext():
        yield


def test_tf32_conversions():
    one_plus = np.float32(1 + 2.0 ** -11)           # halfway between 1 and the next TF32 value
    assert tf32_truncated(np.array([one_plus]))[0] == 1.0
    assert tf32_rounded(np.array([one_plus]))[0] == np.float32(1 + 2.0 ** -10)
    assert tf32_rounded(np.array([-one_plus]))[0] == np.float32(-(1 + 2.0 ** -10))
    exact = np.array([1.5, -0.75, 2.0 ** -20], dtype=np.float32)
    assert np.array_equal(tf32_truncated(exact), exact) and np.array_equal(tf32_rounded(exact), exact)


@interpreter_only
def test_emulated_dots_round_as_tensor_cores_do():
    """A plain TF32 dot loses about 1e-3 of float32; 3xTF32 and IEEE keep it: the emulation is live."""
    gen = torch.Generator().manual_seed(0)
    theta, phi = (torch.randn(2, 40, n, generator=gen) for n in (48, 36))
    exact = torch.bmm(theta.double().transpose(1, 2), phi.double())
    with gpu_dot_numerics("tf32"):
        assert 1e-4 < rel_err(affinity(theta, phi), exact) < 1e-2
    with gpu_dot_numerics():            # what CUDA gets: 3xTF32
        assert rel_err(affinity(theta, phi), exact) < 1e-6
    assert rel_err(affinity(theta, phi), exact) < 1e-6


# (order, seed, shape (C, H, W, B, cha_ratio, spa_ratio, down_ratio)): cases that missed 2e-2
# with a plain TF32 relation product or a gated operand rounded to float16
HALF_CASES = [("cs", 0, (64, 16, 8, 4, 8, 8, 8)), ("cs", 3, (40, 6, 10, 3, 8, 8, 4)),
              ("sc", 2, (64, 16, 8, 4, 8, 8, 8)), ("sc", 0, (40, 6, 10, 3, 8, 8, 4)),
              ("parallel", 1, (40, 6, 10, 3, 8, 8, 4))]


@pytest.mark.parametrize("order,seed,shape", HALF_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else str(v))
def test_float16_train_meets_contract(gpu_numerics, order, seed, shape):
    c, h, w, b, cr, sr, dr = shape
    ref, fast, x = make_pair(c, h, w, b, True, True, cr, sr, dr, dtype=torch.float16, device=DEVICE,
                             backend="triton", seed=seed, order=order)
    compare_steps(ref, fast, x, True, TOLERANCE[torch.float16], torch.float16, device=DEVICE, steps=2)


@pytest.mark.parametrize("order", ["sc", "cs"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_float32_keeps_float32_accuracy(gpu_numerics, order, train):
    ref, fast, x = make_pair(40, 6, 10, 3, cha_ratio=8, spa_ratio=8, down_ratio=4, device=DEVICE,
                             backend="triton", seed=1, order=order)
    compare_steps(ref, fast, x, train, TOLERANCE[torch.float32], torch.float32, device=DEVICE, steps=2)
