"""Peak memory of a step on the CPU, where no allocator keeps statistics: the bytes of live tensors.

``LiveTensorBytes`` is a dispatch mode that sees every tensor an ATen op returns, forward
and backward, and counts each storage once from its first appearance until the last tensor
on it dies (autograd-saved tensors keep theirs alive, as they keep the GPU's). It does not
see what an op allocates and frees inside itself (a matmul's workspace, a custom op's
temporaries: only its outputs), nor the interpreter's copies of kernel arguments; so it is
a lower bound on what the CUDA caching allocator would report for the same step, and
directly comparable between implementations that run through ATen.
"""
from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class LiveTensorBytes(TorchDispatchMode):
    """Tracks ``live`` and ``peak`` bytes of the storages of tensors ops return while active.

    exclude: tensors alive before the step (inputs, parameters); views of them count nothing.
    min_bytes: count only storages at least this large (say x's size, to count x-sized buffers).
    snapshot: keep ``at_peak``, the (bytes, "shape dtype") of every storage live at the peak,
    largest first: what a step's peak is made of.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), min_bytes: int = 1, snapshot: bool = False):
        super().__init__()
        self.excluded = {_storage_key(t) for t in exclude}
        self.min_bytes = max(1, min_bytes)
        self.tensors_on = {}        # storage key -> number of live tensors on it
        self.live = 0
        self.peak = 0
        self.snapshot = snapshot
        self.described = {}         # storage key -> its first tensor's "shape dtype" (snapshot only)
        self.at_peak = []

    def _release(self, key) -> None:
        self.tensors_on[key] -= 1
        if self.tensors_on[key] == 0:
            del self.tensors_on[key]
            self.described.pop(key, None)
            self.live -= key[1]

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or t.is_sparse:
            return
        key = _storage_key(t)
        if key[1] < self.min_bytes or key in self.excluded:
            return
        if key not in self.tensors_on:
            self.tensors_on[key] = 0
            self.live += key[1]
            if self.snapshot:
                self.described[key] = f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
            if self.live > self.peak:
                self.peak = self.live
                if self.snapshot:
                    self.at_peak = sorted(((k[1], self.described[k]) for k in self.tensors_on), reverse=True)
        self.tensors_on[key] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def peak_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Peak bytes of tensors alive during ``fn()`` beyond ``exclude`` (what it returns included)."""
    gc.collect()
    with LiveTensorBytes(exclude) as tracker:
        out = fn()
        del out
    return tracker.peak
