"""A GPU's ``tl.dot`` numerics inside Triton's interpreter, so CI can test them without a GPU.

On the CPU the interpreter multiplies float32 operands in full float32 and the library asks
for 'ieee' dots (``kernels/tuning.dot_precision``). On a GPU the library asks for what CUDA
gets, and tensor cores then round float32 operands: to TF32 (10 mantissa bits, the low 13
bits dropped) for 'tf32', and to a TF32 pair (hi, lo) for 'tf32x3', which sums
hi*hi' + hi*lo' + lo*hi'. :func:`gpu_dot_numerics` makes the interpreter do both: precision
decisions that only fail on a GPU then fail in CI.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton.runtime.interpreter as interpreter

from rga_triton.kernels import tuning

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
        if mode == "TF32":
            out = np.matmul(tf32_truncated(lhs), tf32_truncated(rhs), dtype=np.float32)
        else:
            lhs_hi, rhs_hi = tf32_rounded(lhs), tf32_rounded(rhs)
            lhs_lo, rhs_lo = tf32_rounded(lhs - lhs_hi), tf32_rounded(rhs - rhs_hi)
            out = (np.matmul(lhs_hi, rhs_lo, dtype=np.float32) + np.matmul(lhs_lo, rhs_hi, dtype=np.float32)
                   + np.matmul(lhs_hi, rhs_hi, dtype=np.float32))
        return interpreter.TensorHandle(out + acc.data, acc.dtype.scalar)
    return create_dot


@contextlib.contextmanager
def gpu_dot_numerics(precision=None):
    """Inside: the interpreter's float32 dots round as a GPU's tensor cores do, and the kernels
    ask for the precision they would ask for on CUDA (or ``precision``, to force one)."""
    builder = interpreter.InterpreterBuilder
    original_dot, original_precision = builder.create_dot, tuning.dot_precision
    builder.create_dot = _emulated_dot(original_dot)
    tuning.dot_precision = lambda device: precision or original_precision(torch.device("cuda"))
    try:
        yield
    finally:
        builder.create_dot, tuning.dot_precision = original_dot, original_precision
