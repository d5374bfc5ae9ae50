"""``rga_triton.tune``: autotune every kernel over RGA-Net shapes and write the GPU's config file."""
from __future__ import annotations

import json
import os
import time

import torch
import triton

from .kernels.tuned import KERNELS, STORE, config_dir, device_file_name
from .module import RGAModule

BRANCH_FLAGS = {"RGA-S": (True, False), "RGA-C": (False, True), "RGA-SC": (True, True)}
# The RGA-Net stages of a 256 x 128 input: (C, H, W).
DEFAULT_SHAPES = [(256, 64, 32), (512, 32, 16), (1024, 16, 8), (2048, 16, 8)]


def tune(shapes=None, batch_sizes=(64,), branches=("RGA-SC",), dtypes=(torch.float32, torch.bfloat16),
         modes=("eval", "train"), device="cuda", algorithms=("reassociated", "tiled"), path=None,
         verbose=True) -> str:
    """Autotune the kernels for every (shape, batch, branch, dtype, mode, algorithm) and write the result.

    "eval" runs an inference forward; "train" a forward and backward step in train mode.

    shapes: (C, H, W) feature maps (default: RGA-Net stages of a 256 x 128 input). The file
    goes to ``path`` or ``<config dir>/<device name>.json`` (the packaged ``rga_triton/configs``
    unless ``RGA_TRITON_CONFIG_DIR`` is set), merged over the entries already there.
    Returns the path written. The launches that follow use the new configs at once.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device must be a CUDA device to tune for, got {device}: Triton's interpreter "
                         f"runs one pinned config")
    for name in branches:
        if name not in BRANCH_FLAGS:
            raise ValueError(f"branches must be drawn from {tuple(BRANCH_FLAGS)}, got {name!r}")
    shapes = list(shapes or DEFAULT_SHAPES)
    device_name = torch.cuda.get_device_name(device)
    STORE.ensure_loaded(device)
    existing = {k: dict(v) for k, v in STORE.table.items()}
    STORE.table, STORE.recorded = {}, {}               # force every launch through the autotuner

    cases = [(s, b, br, dt, m, alg) for s in shapes for b in batch_sizes for br in branches
             for dt in dtypes for m in modes for alg in algorithms]
    start = time.perf_counter()
    for i, ((c, h, w), batch, branch, dtype, mode, algorithm) in enumerate(cases, 1):
        module = RGAModule(c, h * w, *BRANCH_FLAGS[branch], backend="triton", algorithm=algorithm)
        module = module.to(device=device, dtype=dtype).train(mode == "train")
        x = torch.randn(batch, c, h, w, device=device, dtype=dtype)
        if mode == "train":         # a training step: the autograd path's forward and the backward kernels
            x.requires_grad_(True)
            module(x).backward(torch.randn_like(x))
        else:
            with torch.no_grad():
                module(x)
        torch.cuda.synchronize(device)
        if verbose:
            elapsed = time.perf_counter() - start
            eta = elapsed / i * (len(cases) - i)
            print(f"[{i}/{len(cases)}] {branch} {c}x{h}x{w} B={batch} {mode} {str(dtype)[6:]} {algorithm}: "
                  f"{elapsed:.0f}s elapsed, ETA {eta:.0f}s", flush=True)

    kernels = existing
    for kernel, buckets in STORE.recorded.items():
        kernels.setdefault(kernel, {}).update(buckets)
    path = path or os.path.join(config_dir(), device_file_name(device_name))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"device": device_name, "triton": triton.__version__, "torch": torch.__version__,
                   "kernels": {k: dict(sorted(v.items())) for k, v in sorted(kernels.items())}}, f, indent=1)
    STORE.table = kernels
    if verbose:
        n = sum(len(v) for v in kernels.values())
        print(f"wrote {n} tuned configs for {len(KERNELS)} kernels to {path}")
    return path
