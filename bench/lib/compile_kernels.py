"""Compile every kernel for CUDA targets without a GPU; print one JSON object {case id: "ok" or the error}.

Run without TRITON_INTERPRET (``@triton.jit`` must give compilable functions):
``python bench/lib/compile_kernels.py``. ``tests/bench/test_kernels_compile.py`` runs it in a subprocess.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import triton  # noqa: E402

import rga_triton.ops  # noqa: E402
from rga_triton.common.settings import MAX_HIDDEN  # noqa: E402
from rga_triton.launch import tuned  # noqa: E402
from rga_triton.ops.gating import kernels as gating  # noqa: E402

# Every step's kernel files (ops/<step>/*kernels.py), found rather than listed: a new one is compiled too.
KERNEL_MODULES = tuple(sorted(f"{step.name}.{module.name}" for step in pkgutil.iter_modules(rga_triton.ops.__path__)
                              if step.ispkg for module in pkgutil.iter_modules([os.path.join(
                                  rga_triton.ops.__path__[0], step.name)]) if module.name.endswith("kernels")))
for _name in KERNEL_MODULES:
    importlib.import_module(f"rga_triton.ops.{_name}")

# Boolean switches: the value launches use most first, the other one compiled once.
SWITCHES = {"HAS_GATE": (False, True), "Z_IN_MEMORY": (False, True), "APPLY_GATE": (False, True),
            "SUMS": (True, False), "WRITE": (True, False), "HAS_SPATIAL": (True, False),
            "HAS_CHANNEL": (True, False), "HAS_AFFINE": (True, False), "UPDATE": (True, False),
            "STORE_DP": (True, False), "WRITE_DX": (True, False), "ACCUMULATE": (True, False),
            "STORE_P": (True, False), "P_IN": (False, True)}
FIXED = {"SPLIT": 256, "CHUNK_N": 256, "DOT_PRECISION": "tf32x3", "BLOCK_H": 32, "BLOCK_C": 64, "BLOCK_COLS": 64}
FIXED_BY_KERNEL = {"_apply_gates_backward_kernel": {"BLOCK_C": gating.GATE_BLOCK_C, "CHUNK_N": gating.GATE_CHUNK_N}}
FLOAT_SCALARS = {"factor", "eps"}
# in the compute dtype under float16/bfloat16
HALF_POINTERS = {"x_ptr", "w_ptr", "wg_ptr", "out_ptr", "grad_ptr", "dx_ptr"}
from rga_triton.ops.batchnorm import kernels as _batchnorm  # noqa: E402
from rga_triton.ops.projection import backward_kernels as _projection_backward  # noqa: E402

# The kernels launched without autotuning: (module, [their launch's block sizes], (num_warps, num_stages)).
UNTUNED = {"_bn_finalize_kernel": ("batchnorm.kernels", [dict(_batchnorm.FINALIZE_BLOCKS)],
                                   (_batchnorm.FINALIZE_WARPS, 3)),
           "_projection_dp_kernel": ("projection.backward_kernels", [dict(_projection_backward.DP_BLOCKS)],
                                     (_projection_backward.DP_WARPS, 3))}


def kernel(name: str):
    """(the @triton.jit object, its block-size space) of a kernel, by name."""
    if name in UNTUNED:
        module, space, _ = UNTUNED[name]
        return getattr(importlib.import_module(f"rga_triton.ops.{module}"), name), space
    return tuned.KERNELS[name].fn, tuned.KERNELS[name].space


def untuned_launch(name: str) -> tuple[int, int]:
    """(num_warps, num_stages) an untuned kernel is launched with."""
    return UNTUNED[name][2]


def first_launch(name: str) -> tuple[int, int]:
    """(num_warps, num_stages) of a kernel's first config: the one pinned and interpreted launches use."""
    if name in UNTUNED:
        return untuned_launch(name)
    _, warps, stages = tuned.KERNELS[name].allowed[0]
    return warps, stages


def has_half_operands(name: str) -> bool:
    """Whether the kernel reads operands in the compute dtype (float16/bfloat16 blocks)."""
    return bool(HALF_POINTERS & set(inspect.signature(kernel(name)[0].fn).parameters))


def kernel_names() -> list[str]:
    return sorted(tuned.KERNELS) + sorted(UNTUNED)


def constexpr_args(jit) -> list[str]:
    # works on JITFunction and on the interpreter's InterpretedFunction alike
    return [n for n, p in inspect.signature(jit.fn).parameters.items() if "constexpr" in str(p.annotation)]


def base_constexprs(name: str) -> dict:
    """The constexpr values launches use most, block sizes aside: switches at their usual value, fixed sizes."""
    constexpr = constexpr_args(kernel(name)[0])
    base = {a: SWITCHES[a][0] for a in constexpr if a in SWITCHES}
    base.update({a: v for a, v in {**FIXED, **FIXED_BY_KERNEL.get(name, {})}.items() if a in constexpr})
    return base


def config_variants(name: str) -> list[tuple[str, dict]]:
    """(id, constexpr values) of each block-size config of the kernel's space, and again with the widest
    hidden layer where the kernel has one (BLOCK_H: 512 x 256 inputs' first stage)."""
    jit, space = kernel(name)
    base = base_constexprs(name)
    out = [(f"{name}-config{i}", {**base, **blocks}) for i, blocks in enumerate(space)]
    if "BLOCK_H" in constexpr_args(jit):
        out += [(f"{name}-BLOCK_H={MAX_HIDDEN}-config{i}", {**base, **blocks, "BLOCK_H": MAX_HIDDEN})
                for i, blocks in enumerate(space)]
    return out


def variants(name: str) -> list[tuple[str, dict, bool]]:
    """(id, constexpr values, half-precision pointers?) to compile for one kernel on Hopper."""
    jit, space = kernel(name)
    constexpr = constexpr_args(jit)
    base = base_constexprs(name)
    found = config_variants(name)
    out = [(vid, values, False) for vid, values in found if "BLOCK_H=" not in vid]
    for switch in (a for a in constexpr if a in SWITCHES):
        out.append((f"{name}-{switch}={SWITCHES[switch][1]}", {**base, **space[0], switch: SWITCHES[switch][1]}, False))
    out += [(vid, values, False) for vid, values in found if "BLOCK_H=" in vid]
    if HALF_POINTERS & set(inspect.signature(jit.fn).parameters):
        values = {**base, **space[0]}
        if "HAS_GATE" in values:        # a gated half-precision operand takes its own branch (hi + lo)
            values["HAS_GATE"] = True
        out.append((f"{name}-bfloat16", values, True))
    return out


def cases() -> list[tuple[str, str, dict, bool, int]]:
    """(case id, kernel name, constexprs, half, arch): every variant on sm_90, the first on sm_80."""
    out = []
    for name in kernel_names():
        found = variants(name)
        out += [(f"sm90-{vid}", name, values, half, 90) for vid, values, half in found]
        out.append((f"sm80-{found[0][0]}", name, found[0][1], found[0][2], 80))
    return out


def compile_case(name: str, constexprs: dict, half: bool, arch: int, num_warps: int = 4, num_stages: int = 2):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    jit, _ = kernel(name)
    signature, values = {}, {}
    for i, arg in enumerate(jit.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
            values[(i,)] = constexprs[arg]
        elif arg.endswith("_ptr"):
            signature[arg] = "*bf16" if half and arg in HALF_POINTERS else "*fp32"
        else:
            signature[arg] = "fp32" if arg.rstrip("0123456789") in FLOAT_SCALARS else "i32"    # eps0, factor1, ...
    return triton.compile(ASTSource(fn=jit, signature=signature, constexprs=values),
                          target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def main() -> int:
    results = {}
    for case_id, name, constexprs, half, arch in cases():
        try:
            compiled = compile_case(name, constexprs, half, arch)
            results[case_id] = "ok" if compiled.asm.get("ptx") else "no PTX produced"
        except Exception:  # noqa: BLE001  (reported per case)
            results[case_id] = traceback.format_exc(limit=4)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
