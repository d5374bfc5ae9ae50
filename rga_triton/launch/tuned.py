"""Launch configurations: per-GPU tuned JSON files first, Triton's autotuner otherwise.

Every kernel is wrapped by :func:`tuned`. A launch looks its (kernel, shape bucket) up in
the configuration file of the current GPU, ``rga_triton/configs/<device>.json`` (or the
folder named by ``RGA_TRITON_CONFIG_DIR``), and launches with the stored config, skipping
autotuning. On a miss it autotunes over the kernel's config space as
``triton.autotune`` does (cached in memory) and records the winner, which
:func:`rga_triton.tune` writes back to the file.

File format::

    {"device": "NVIDIA H100 80GB HBM3", "triton": "3.6.0",
     "kernels": {"_projection_apply_kernel": {"Cin=2048,DOT_PRECISION=tf32x3,K=256,L=256,P_IN=False,dtype=float32":
                 {"BLOCK_K": 64, "BLOCK_C": 32, "BLOCK_L": 128, "num_warps": 8, "num_stages": 3}}},
     "algorithms": {"K=32,L=2048,R=256,dtype=float32,pass=train": "reassociated"}}

A shape bucket is the kernel's autotune key (its shape arguments) plus the dtype of its
first tensor argument, written ``name=value`` joined by commas. A stored config must be one
of the kernel's own config space (block sizes, num_warps, num_stages): those are the configs
whose constraints the kernel relies on (dot shapes, chunk sizes) and that compile on every
supported GPU; any other entry autotunes with a warning. ``"algorithms"`` (optional)
holds the measured choice of ``algorithm="auto"`` per branch shape (``rga_triton.dispatch``).
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import warnings

import torch
import triton

from ..common.algorithm import ALGORITHMS
from ..common.settings import config_dir, pinned
from .precompile import config_kwargs, precompile
from .space import configs as config_space

LOG = logging.getLogger("rga_triton.tuning")
KERNELS: dict[str, TunedKernel] = {}
# Every tuned kernel's name. Some kernel modules are imported only when first used (affinity), so a
# file's kernel names are checked against this list, not just against the kernels registered so far.
KERNEL_NAMES = frozenset({
    "_affinity_kernel", "_apply_gates_backward_kernel", "_apply_gates_kernel", "_gate_logit_kernel",
    "_hidden_backward_kernel", "_hidden_stats_kernel", "_input_grad_kernel", "_projection_apply_kernel",
    "_projection_grad_kernel", "_projection_stats_kernel", "_relation_a_kernel", "_relation_backward_kernel",
    "_relation_z_tiled_kernel", "_weight_grad_kernel", "_z_stats_kernel"})


def device_file_name(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3.json'."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", device_name).strip("_") + ".json"


class ConfigStore:
    """The tuned configs of one device, loaded once from its JSON file."""

    def __init__(self):
        self.generation = 0         # counts the tables set: launches memoise their lookups per generation
        self.device_name: str | None = None
        self.table: dict[str, dict[str, dict]] = {}
        self.algorithms: dict[str, str] = {}          # algorithm bucket -> "reassociated" or "tiled"
        self.recorded: dict[str, dict[str, dict]] = {}
        self.rejected: set[tuple[str, str]] = set()     # (kernel, bucket) entries warned about
        self._names: dict[tuple, str] = {}            # (device type, index) -> device name

    @property
    def table(self) -> dict[str, dict[str, dict]]:
        """kernel -> bucket -> stored config. Set it whole (never edit it in place): setting it starts a
        new generation, which drops every launch's memoised lookup."""
        return self._table

    @table.setter
    def table(self, value: dict[str, dict[str, dict]]) -> None:
        self._table = value
        self.generation += 1

    def reset(self) -> None:
        self.device_name = None
        self.table = {}
        self.algorithms = {}
        self.recorded = {}
        self.rejected = set()

    def ensure_loaded(self, device: torch.device) -> None:
        key = (device.type, device.index)
        name = self._names.get(key)
        if name is None:        # asked once per device: every launch calls this
            name = self._names[key] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        if name == self.device_name:
            return
        self.device_name, self.table, self.algorithms, self.rejected = name, {}, {}, set()
        path = os.path.join(config_dir(), device_file_name(name))
        if device.type != "cuda" and not os.path.exists(path):
            return      # the interpreter pins one config: nothing to tune, nothing to say
        try:
            self.table, self.algorithms = read_config(path)
        except FileNotFoundError:
            warnings.warn(f"rga_triton: no tuned configuration for {name} ({path}); kernels autotune on first "
                          f"use of each shape (run `python bench/sweep.py --tune` to write one)", stacklevel=4)
            return
        except (OSError, *MALFORMED) as exc:
            warnings.warn(f"rga_triton: ignoring malformed tuned configuration {path} ({exc!r}); kernels "
                          f"autotune instead", stacklevel=4)
            return
        unknown = sorted(set(self.table) - KERNEL_NAMES - set(KERNELS))
        if unknown:     # a typo or a kernel since renamed: its entries would never be looked up
            warnings.warn(f"rga_triton: ignoring the tuned configs of {unknown} in {path}: no kernel has that "
                          f"name (known: {sorted(KERNEL_NAMES | set(KERNELS))})", stacklevel=4)

    def lookup(self, kernel: str, bucket: str, space: list[tuple[dict, int, int]]) -> triton.Config | None:
        """The stored config of (kernel, bucket), or None (autotune) when there is none or it is not
        in the kernel's config ``space`` of (blocks, num_warps, num_stages) (one warning per entry)."""
        entry = self.table.get(kernel, {}).get(bucket)
        if entry is None:
            return None
        problem = entry_problem(entry, space)
        if problem:
            if (kernel, bucket) not in self.rejected:
                self.rejected.add((kernel, bucket))
                warnings.warn(f"rga_triton: ignoring the tuned config of {kernel} [{bucket}] for {self.device_name} "
                              f"({problem}); this shape autotunes instead", stacklevel=4)
            return None
        meta = {k: v for k, v in entry.items() if k not in ("num_warps", "num_stages")}
        return triton.Config(meta, num_warps=entry.get("num_warps", 4), num_stages=entry.get("num_stages", 3))

    def record(self, kernel: str, bucket: str, config: triton.Config) -> None:
        self.recorded.setdefault(kernel, {})[bucket] = dict(config.kwargs, num_warps=config.num_warps,
                                                            num_stages=config.num_stages)


def entry_problem(entry, space: list[tuple[dict, int, int]]) -> str | None:
    """Why a stored config is not one of ``space``'s (blocks, num_warps, num_stages) (a file
    written for an older config space, or edited by hand); None when it is."""
    if not isinstance(entry, dict):
        return f"expected a dict of block sizes, got {type(entry).__name__}"
    floats = {k: v for k, v in entry.items() if type(v) is not int}
    if floats:      # 32.0 == 32 would pass the space check below and then fail inside Triton
        return f"values must be ints, got {floats}"
    blocks = {k: v for k, v in entry.items() if k not in ("num_warps", "num_stages")}
    names = set(space[0][0])
    if set(blocks) != names:
        return f"block sizes {sorted(blocks)} differ from the kernel's {sorted(names)}"
    if (blocks, entry.get("num_warps", 4), entry.get("num_stages", 3)) not in space:
        return "not a config of the kernel's space " + ", ".join(
            f"{b} warps={w} stages={st}" for b, w, st in space[:2]) + (", ..." if len(space) > 2 else "")
    return None




# A file that json or the table's shape refuses. RecursionError: JSON nested past Python's recursion
# limit, which json.load raises as such rather than as a ValueError.
MALFORMED = (ValueError, KeyError, TypeError, AttributeError, RecursionError)


def read_config(path: str) -> tuple[dict[str, dict[str, dict]], dict[str, str]]:
    """(kernel -> bucket -> config, algorithm bucket -> algorithm) of a configuration file. Raises
    FileNotFoundError, another OSError, or one of :data:`MALFORMED`; entries are checked at lookup."""
    with open(path) as f:
        data = json.load(f)
    table = {kernel: dict(buckets) for kernel, buckets in data["kernels"].items()}
    algorithms = dict(data.get("algorithms", {}))
    odd = {k: v for k, v in algorithms.items() if v not in ALGORITHMS}
    if odd:
        raise ValueError(f"'algorithms' values must be one of {ALGORITHMS}, got {odd}")
    return table, algorithms


STORE = ConfigStore()


def compiled_resources(fn, config: triton.Config, grid, args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """(bytes of local memory per thread, i.e. spilled registers, and shared memory bytes) of ``fn`` compiled
    for ``config`` with these arguments (a cache hit after :func:`precompile`), or None when it cannot tell."""
    try:
        compiled = fn.warmup(*args, **kwargs, **config_kwargs(config), grid=grid)
        shared = int(compiled.metadata.shared)
    except Exception:  # noqa: BLE001 - unknown resources: the config stays and the autotuner meets the error
        return None
    try:
        if getattr(compiled, "n_spills", None) is None:
            compiled._init_handles()        # loads the binary: the driver reports registers and local memory
        return 4 * int(compiled.n_spills), shared       # n_spills counts 4-byte words of local memory
    except Exception:  # noqa: BLE001 - e.g. Triton's OutOfResources for shared memory: judged by `shared`
        return 0, shared


def max_shared_memory(device: torch.device) -> int | None:
    """Shared memory one block may use on ``device`` (opt-in maximum), or None when unknown."""
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"])
    except Exception:  # noqa: BLE001
        return None


def prune_unfit(configs: list[triton.Config], resources: list[tuple[int, int] | None],
                max_shared: int | None) -> tuple[list[triton.Config], dict[str, int]]:
    """The configs worth timing: those that spill nothing and fit the device's shared memory (``resources``:
    (spilled bytes, shared bytes) per config, None where unknown: kept). When no config is left, the ones
    that fit the shared memory and spill least. Returns (configs, counts of what was pruned and why)."""
    over = [max_shared is not None and r is not None and r[1] > max_shared for r in resources]
    spills = [r is not None and r[0] > 0 for r in resources]
    keep = [c for c, o, s in zip(configs, over, spills) if not o and not s]
    if not keep:
        fitting = [(r[0] if r else 0, i) for i, (r, o) in enumerate(zip(resources, over)) if not o]
        least = min((spill for spill, _ in fitting), default=None)
        keep = [configs[i] for spill, i in fitting if spill == least] or list(configs)
    counts = dict(spill=sum(s and not o for s, o in zip(spills, over)), shared=sum(over))
    return keep, counts


class TunedKernel:
    """A ``@triton.jit`` kernel launched with a stored config when the GPU's file has one."""

    def __init__(self, fn, space: list[dict], key: list[str], restore_value: tuple = (), **config_kw):
        self.fn = fn
        self.name = fn.__name__
        self.key = key
        self.space = space            # block-size dicts, before num_warps x num_stages
        if any(set(s) != set(space[0]) for s in space):
            raise ValueError(f"{self.name}: every config in the space must set the same blocks {sorted(space[0])}")
        full = config_space(space, **config_kw)
        # every (blocks, num_warps, num_stages) the space holds, pinned or not: what a stored config may be
        self.allowed = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in full]
        # restore_value: buffers a launch reads and writes, reset between the autotuner's trials
        # pruning compiles every config with the launch's arguments (self._launch, set by each launch)
        prune = None if pinned() else {"early_config_prune": self._prune}
        self.autotuned = triton.autotune(configs=full[:1] if pinned() else full, key=key,
                                         restore_value=list(restore_value) or None, prune_configs_by=prune)(fn)
        self._launch = threading.local()
        self.timed: dict[str, tuple[int, int]] = {}   # bucket -> (configs timed, configs in the space)
        self.last_source: str | None = None       # "file" or "autotune": which one chose the last launch
        self.precompiled: set[str] = set()        # buckets whose configs were compiled ahead of autotuning
        self.resolved: dict[str, tuple[int, triton.Config | None]] = {}   # bucket -> (STORE generation, lookup)
        KERNELS[self.name] = self

    def stored_config(self, bucket: str) -> triton.Config | None:
        """``STORE.lookup`` of this kernel's bucket, memoised until the store's table is replaced."""
        generation, config = self.resolved.get(bucket, (None, None))
        if generation != STORE.generation:
            config = STORE.lookup(self.name, bucket, self.allowed)
            self.resolved[bucket] = (STORE.generation, config)
        return config

    def _prune(self, configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        """Triton's ``early_config_prune``: drop the configs that spill or need more shared memory than the
        device has (:func:`prune_unfit`) before they are timed, and log how many are timed for this shape."""
        launch = getattr(self._launch, "current", None)
        if launch is None or len(configs) < 2:
            return configs
        bucket, device, grid, args, call_kwargs = launch
        resources = [compiled_resources(self.fn, c, grid, args, call_kwargs) for c in configs]
        keep, counts = prune_unfit(configs, resources, max_shared_memory(device))
        self.timed[bucket] = (len(keep), len(configs))
        LOG.info("%s [%s]: timing %d of %d configs (pruned: %d spill, %d need more shared memory than the device "
                 "has)", self.name, bucket, len(keep), len(configs), counts["spill"], counts["shared"])
        return keep

    def bucket(self, bound: dict) -> str:
        dtype = next((v.dtype for v in bound.values() if isinstance(v, torch.Tensor)), None)
        parts = [f"{k}={bound[k]}" for k in sorted(self.key)]
        return ",".join(parts + [f"dtype={str(dtype).replace('torch.', '')}"])

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            bound = dict(zip(self.fn.arg_names, args), **kwargs)
            device = next(v.device for v in bound.values() if isinstance(v, torch.Tensor))
            STORE.ensure_loaded(device)
            bucket = self.bucket(bound)
            config = self.stored_config(bucket)
            if config is not None:
                self.last_source = "file"
                meta = dict(config.kwargs)
                shape = grid(meta) if callable(grid) else grid
                return self.fn[shape](*args, **kwargs, **meta, num_warps=config.num_warps,
                                      num_stages=config.num_stages)
            self.last_source = "autotune"
            if bucket not in self.precompiled and not pinned():
                self.precompiled.add(bucket)
                precompile(self.fn, self.autotuned.configs, grid, args, kwargs)
            self._launch.current = (bucket, device, grid, args, kwargs)
            try:
                out = self.autotuned[grid](*args, **kwargs)
            finally:
                self._launch.current = None
            best = getattr(self.autotuned, "best_config", None)
            if best is not None:
                STORE.record(self.name, bucket, best)
            return out
        return launch


def tuned(space: list[dict], key: list[str], restore_value: tuple = (), **config_kw):
    """Decorator: ``@tuned(space, key)`` over ``@triton.jit``; see the module docstring. ``restore_value``:
    the pointer arguments a launch adds into, which autotuning restores after each trial."""
    return lambda fn: TunedKernel(fn, space, key, restore_value, **config_kw)
