"""The machine: names, versions, spec-sheet numbers and measured roofline ceilings."""
from __future__ import annotations

import os
import platform
import re
import subprocess

import torch

from bench.lib import timing

# Dense (no structured sparsity) spec-sheet numbers. float32 is the TF32 tensor-core rate
# (what cuBLAS/cuDNN reach when TF32 is allowed); "fp32" is the non-tensor-core rate.
# Sources: NVIDIA H100 / H200 / A100 datasheets (sparsity figures halved).
SPEC_SHEETS = [
    # (pattern in the device name, label, GB/s, TFLOP/s by dtype)
    (r"H200", "H200 SXM", 4800, {"tf32": 494.7, "bfloat16": 989.4, "float16": 989.4, "fp32": 67.0}),
    (r"H100.*NVL", "H100 NVL", 3900, {"tf32": 417.5, "bfloat16": 835.5, "float16": 835.5, "fp32": 60.0}),
    (r"H100.*PCIe", "H100 PCIe", 2000, {"tf32": 378.0, "bfloat16": 756.0, "float16": 756.0, "fp32": 51.0}),
    (r"H100", "H100 SXM", 3350, {"tf32": 494.7, "bfloat16": 989.4, "float16": 989.4, "fp32": 67.0}),
    (r"A100.*80GB.*PCIe", "A100 80GB PCIe", 1935, {"tf32": 156.0, "bfloat16": 312.0, "float16": 312.0, "fp32": 19.5}),
    (r"A100.*80GB", "A100 80GB SXM", 2039, {"tf32": 156.0, "bfloat16": 312.0, "float16": 312.0, "fp32": 19.5}),
    (r"A100", "A100 40GB", 1555, {"tf32": 156.0, "bfloat16": 312.0, "float16": 312.0, "fp32": 19.5}),
]


def tf32_state() -> str:
    """Which float32 ops may use TF32 tensor cores, e.g. "matmul off, cudnn on" (PyTorch's default):
    the two switches differ by default, and the reference's 1x1 convs follow cuDNN's."""
    on = {True: "on", False: "off"}
    return (f"matmul {on[bool(torch.backends.cuda.matmul.allow_tf32)]}, "
            f"cudnn {on[bool(torch.backends.cudnn.allow_tf32)]}")


def spec_sheet(device_name: str) -> dict | None:
    """{'label', 'gbps', 'tflops': {dtype: TFLOP/s}} for a recognised GPU, else None."""
    for pattern, label, gbps, rates in SPEC_SHEETS:
        if re.search(pattern, device_name, re.IGNORECASE):
            # the measured float32 ceiling is a torch.matmul: the spec line follows the matmul switch
            fp32 = rates["tf32"] if torch.backends.cuda.matmul.allow_tf32 else rates["fp32"]
            tflops = {"float32": fp32, "bfloat16": rates["bfloat16"], "float16": rates["float16"]}
            return {"label": f"{label} spec sheet", "gbps": gbps, "tflops": tflops}
    return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_name()} ({torch.get_num_threads()} threads)"


def results_dir_name(device: torch.device) -> str:
    """Directory name for a device: lowercase, non-alphanumerics -> '_'; CPU names start with 'cpu'."""
    raw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu {cpu_name()}"
    return re.sub(r"_+", "_", re.sub(r"[^a-z0-9]", "_", raw.lower())).strip("_")


def driver_version(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return f"cuda {torch.version.cuda}"


def git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: torch.device) -> dict:
    """Environment columns of every CSV row."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "device": device_name(device),
        "driver": driver_version(device),
        "cuda": torch.version.cuda or "",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "tf32": tf32_state() if device.type == "cuda" else "",
        "git_commit": git_commit(),
    }


def measure_ceilings(device: torch.device, dtypes: list[str]) -> dict:
    """Measured roofline ceilings: copy bandwidth (GB/s, bytes read + written) and matmul TFLOP/s per dtype.

    GPU: a device-to-device copy of up to 1 GiB and an 8192^3 matmul. CPU: a 256 MiB copy and a
    1024^3 matmul (float32 only). float32 matmuls run under the current TF32 setting.
    """
    cuda = device.type == "cuda"
    if cuda:
        free, _ = torch.cuda.mem_get_info(device)
        nbytes = int(min(1 << 30, free // 4))
    else:
        nbytes = 256 << 20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = timing.time_fn(lambda: dst.copy_(src), device, repeat=10 if cuda else 5)
    copy_gbps = 2 * nbytes / (t.median_ms * 1e-3) / 1e9
    src = dst = None            # freed before the matmuls allocate
    matmul = {}
    n = 8192 if cuda else 1024
    for name in dtypes:
        dtype = getattr(torch, name)
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        t = timing.time_fn(lambda: torch.matmul(a, b), device, repeat=10 if cuda else 5)
        matmul[name] = 2 * n ** 3 / (t.median_ms * 1e-3) / 1e12
        a = b = None
    if cuda:
        torch.cuda.empty_cache()
    return {"copy_gbps": copy_gbps, "matmul_tflops": matmul, "matmul_n": n, "copy_bytes": nbytes}
