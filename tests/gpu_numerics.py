"""A GPU's ``tl.dot`` numerics inside Triton's interpreter, so CI can test them without a GPU.

On the CPU the interpreter multiplies float32 operands in full float32 and the library asks
for 'ieee' dots (``launch/space.dot_precision``). On a GPU the library asks for what CUDA
gets, and tensor cores then read float32 operands as TF32 (10 mantissa bits: the low 13
bits dropped). 'tf32x3' is three such products, as Triton (3.6 to 3.9 checked, in the TTGIR
they emit for sm_90) lowers it: hi = a rounded to TF32 (cvt.rna), lo = a - hi, then
small = lo a' hi b' + hi a' lo b', with NaN in small replaced by 0 (an infinite operand
makes lo NaN), and the result hi a' hi b' + small + acc. :func:`gpu_dot_numerics` makes the
interpreter do both: precision decisions that only fail on a GPU then fail in CI.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton.runtime.interpreter as interpreter

from rga_triton.launch import space as tuning

_TF32_MASK = np.uint32(0xFFFFE000)     # sign, exponent and the 10 mantissa bits TF32 keeps


def tf32_truncated(a: np.ndarray) -> np.ndarray:
    """float32 values as a tensor core reads them for a 'tf32' dot: the low 13 mantissa bits dropped."""
    return (np.ascontiguousarray(a, dtype=np.float32).view(np.uint32) & _TF32_MASK).view(np.float32)


def tf32_rounded(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest TF32 (ties away from zero, as PTX's cvt.rna.tf32.f32)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & _TF32_MASK).view(np.float32)


def _emulated_dot(original):
    def create_dot(self, a, b, acc, input_precision, max_num_imprecise_acc):
        mode = str(input_precision).rsplit(".", 1)[-1].upper()     # INPUT_PRECISION.TF32x3 -> TF32X3
        if a.dtype.primitive_bitwidth != 32 or mode not in ("TF32", "TF32X3"):
            return original(self, a, b, acc, input_precision, max_num_imprecise_acc)
        lhs, rhs = a.data.astype(np.float32), b.data.astype(np.float32)

        def tf32_dot(x, y):
            return np.matmul(tf32_truncated(x), tf32_truncated(y), dtype=np.float32)

        if mode == "TF32":
            out = tf32_dot(lhs, rhs)
        else:
            lhs_hi, rhs_hi = tf32_rounded(lhs), tf32_rounded(rhs)
            with np.errstate(invalid="ignore"):         # inf - inf: NaN, masked below as Triton masks it
                small = tf32_dot(lhs - lhs_hi, rhs_hi) + tf32_dot(lhs_hi, rhs - rhs_hi)
            out = tf32_dot(lhs_hi, rhs_hi) + np.where(np.isnan(small), np.float32(0), small)
        return interpreter.TensorHandle(out + acc.data, acc.dtype.scalar)
    return create_dot


@contextlib.contextmanager
def gpu_dot_numerics(precision=None):
    """Inside: the interpreter's float32 dots round as a GPU's tensor cores do, and the kernels
    ask for the precision they would ask for on CUDA (or ``precision``, to force one), which
    follows ``torch.backends.cuda.matmul.allow_tf32`` as it would there."""
    builder = interpreter.InterpreterBuilder
    original_dot, original_precision = builder.create_dot, tuning.dot_precision
    builder.create_dot = _emulated_dot(original_dot)
    tuning.dot_precision = lambda device, tf32_ok=False: precision or original_precision(torch.device("cuda"), tf32_ok)
    try:
        yield
    finally:
        builder.create_dot, tuning.dot_precision = original_dot, original_precision


_TF32_OPS = ("convolution.default", "convolution_backward.default", "mm.default", "bmm.default", "addmm.default",
             "baddbmm.default", "addbmm.default")


class _PytorchTF32(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).removeprefix("aten.") in _TF32_OPS:
            args = torch.utils._pytree.tree_map(_tf32_tensor, args)
        return func(*args, **(kwargs or {}))


def _tf32_tensor(value):
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return torch.from_numpy(tf32_truncated(value.detach().cpu().numpy())).view(value.shape)
    return value


@contextlib.contextmanager
def pytorch_tf32():
    """Inside: PyTorch's float32 matmuls and convolutions (forward and backward) read their operands as
    TF32 (truncated, as :func:`tf32_truncated`), as cuBLAS and cuDNN do with TF32 allowed: what PyTorch's
    own TF32 gives, on the CPU. Operands only; products still accumulate in float32."""
    with _PytorchTF32():
        yield
