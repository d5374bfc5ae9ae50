"""``rga_triton.tune``: autotune every kernel over RGA-Net shapes and write the GPU's config file."""
from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import time

import torch
import triton
import triton.testing

try:
    import fcntl
except ImportError:     # Windows: save_config locks by creating its lock file exclusively
    fcntl = None

from .common.algorithm import ALGORITHMS, bucket
from .common.checks import is_positive_int
from .common.settings import config_dir
from .launch.tuned import MALFORMED, STORE, device_file_name, read_config
from .module import RGAModule

BRANCH_FLAGS = {"RGA-S": (True, False), "RGA-C": (False, True), "RGA-SC": (True, True)}
# The RGA-Net stages of a 256 x 128 input: (C, H, W).
DEFAULT_SHAPES = [(256, 64, 32), (512, 32, 16), (1024, 16, 8), (2048, 16, 8)]
LOCK_TIMEOUT = 60       # seconds: a write holds the lock for milliseconds


def tune(shapes=None, batch_sizes=(64,), branches=("RGA-SC",), dtypes=(torch.float32, torch.bfloat16),
         modes=("eval", "train"), device="cuda", algorithms=ALGORITHMS, path=None, time_limit=None,
         verbose=True) -> str:
    """Autotune the kernels for every (shape, batch, branch, dtype, mode, algorithm) and write the result.

    "eval" runs an inference forward; "train" a forward and backward step in train mode.
    With both algorithms listed, each branch is then timed with each (:func:`measure_algorithms`)
    and the faster one becomes what ``algorithm="auto"`` runs for that branch shape.

    shapes: (C, H, W) feature maps (default: RGA-Net stages of a 256 x 128 input). The file
    goes to ``path`` or ``<config dir>/<device name>.json`` (the packaged ``rga_triton/configs``
    unless ``RGA_TRITON_CONFIG_DIR`` is set), merged over the entries it holds when written (so
    runs tuning at once keep each other's; see :func:`save_config`). It is rewritten after every
    shape, so an interrupted run keeps what it tuned; ``time_limit`` (seconds) starts no new case
    once spent. A folder that cannot be written is refused before tuning. Returns the path
    written. The launches that follow use the new configs at once, over the device file's.
    """
    shapes = _check_selection(shapes or DEFAULT_SHAPES, batch_sizes, branches, dtypes, modes, algorithms)
    if time_limit is not None and (isinstance(time_limit, bool) or not isinstance(time_limit, (int, float))
                                   or not time_limit > 0):
        raise ValueError(f"time_limit must be a positive number of seconds or None, got {time_limit!r}")
    device = _check_device(device)
    device_name = torch.cuda.get_device_name(device)
    path = path or os.path.join(config_dir(), device_file_name(device_name))
    _check_target(path)                 # before minutes of tuning, not after the first shape
    STORE.ensure_loaded(device)
    loaded = STORE.table, STORE.algorithms
    chosen = {}                         # this run's algorithm choices
    STORE.table, STORE.recorded = {}, {}               # force every launch through the autotuner
    deadline = time.perf_counter() + time_limit if time_limit else float("inf")

    cases = [(b, br, dt, m, alg) for b in batch_sizes for br in branches for dt in dtypes for m in modes
             for alg in algorithms]
    progress = _progress(len(shapes) * len(cases), verbose)
    try:
        with torch.cuda.device(device):     # Triton launches, and do_bench times, on the current device
            try:
                for c, h, w in shapes:
                    for batch, branch, dtype, mode, algorithm in cases:
                        if time.perf_counter() > deadline:
                            raise TimeoutError
                        module = RGAModule(c, h * w, *BRANCH_FLAGS[branch], backend="triton", algorithm=algorithm)
                        _step(module, batch, h, w, dtype, mode, device)()     # every launch autotunes its bucket
                        torch.cuda.synchronize(device)
                        progress(f"{branch} {c}x{h}x{w} B={batch} {mode} {str(dtype)[6:]} {algorithm}")
                    if len(set(algorithms)) > 1:
                        chosen.update(measure_algorithms([(c, h, w)], batch_sizes, branches, dtypes, modes, device,
                                                         algorithms, verbose))
                    save_config(path, device_name, STORE.recorded, chosen)
            except TimeoutError:
                if verbose:
                    print(f"time limit of {time_limit:g} s reached: {path} keeps the shapes tuned so far", flush=True)
        written = save_config(path, device_name, STORE.recorded, chosen)
    except BaseException:
        STORE.table, STORE.algorithms = loaded      # launches go on with the configs they had
        raise
    STORE.table, STORE.algorithms = _merged(loaded[0], STORE.recorded), {**loaded[1], **chosen}
    if verbose:
        n = sum(len(v) for v in written["kernels"].values())
        print(f"wrote {n} tuned configs for {len(written['kernels'])} kernels and {len(written['algorithms'])} "
              f"algorithm choices to {path}")
    return path


def _check_target(path: str) -> None:
    """Named errors, before any tuning, for a configuration file that cannot be written (a read-only
    folder such as an installed package's) or that holds something other than a configuration."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".rga_triton-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise ValueError(f"cannot write the tuned configuration {path} ({exc}): set RGA_TRITON_CONFIG_DIR to a "
                         f"writable folder, or pass tune(path=...) a writable file") from exc
    try:
        read_config(path)
    except FileNotFoundError:
        pass
    except (OSError, *MALFORMED) as exc:
        raise ValueError(f"{path} is not a readable configuration file ({exc!r}), and tune() merges over it: "
                         f"fix or remove it, or pass tune(path=...) another file") from exc


def save_config(path: str, device_name: str, recorded: dict, algorithms: dict) -> dict:
    """Merge ``recorded`` (kernel -> bucket -> config) and ``algorithms`` over the file's entries and write
    it; returns the file's new content. The merge reads the file under a lock (``<path>.lock``), so
    processes tuning at once keep each other's entries; the file is replaced whole by a rename, so
    readers never see half of it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with _locked(path):
        try:
            kernels, chosen = read_config(path)
        except FileNotFoundError:
            kernels, chosen = {}, {}
        data = {"device": device_name, "triton": triton.__version__, "torch": torch.__version__,
                "kernels": {k: dict(sorted(v.items())) for k, v in sorted(_merged(kernels, recorded).items())},
                "algorithms": dict(sorted({**chosen, **algorithms}.items()))}
        # a name of its own: two writers sharing one temporary file truncate each other's
        fd, partial = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".partial")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())        # the rename must not land before the content does
            # mkstemp makes the file private; keep the mode of the file it replaces
            os.chmod(partial, stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else 0o644)
            os.replace(partial, path)
        except BaseException:
            os.remove(partial)
            raise
    return data


def _merged(kernels: dict, recorded: dict) -> dict:
    """kernel -> bucket -> config: ``recorded``'s buckets over ``kernels``'."""
    merged = {k: dict(v) for k, v in kernels.items()}
    for kernel, buckets in recorded.items():
        merged.setdefault(kernel, {}).update(buckets)
    return merged


@contextlib.contextmanager
def _locked(path: str):
    """Holds ``<path>.lock`` exclusively, and removes it when done: ``flock`` where there is one (released
    if the process dies), else creating the file exclusively, with an error naming it if it stays."""
    lock = path + ".lock"
    if fcntl is None:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                break
            except FileExistsError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{lock} has been held for {LOCK_TIMEOUT} s: remove it if no tune() is "
                                       f"writing {path}") from None
                time.sleep(0.01)
        try:
            yield
        finally:
            os.remove(lock)
        return
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:        # the holder before us may have removed the file we locked: then lock the new one
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        os.remove(lock)     # before unlocking: a waiter on this file then sees it gone and retries
        os.close(fd)


def _progress(total: int, verbose: bool):
    """A callable that prints '[i/total] what: elapsed, ETA' per finished case."""
    start, done = time.perf_counter(), [0]

    def report(what: str) -> None:
        done[0] += 1
        if verbose:
            elapsed = time.perf_counter() - start
            print(f"[{done[0]}/{total}] {what}: {elapsed:.0f}s elapsed, ETA "
                  f"{elapsed / done[0] * (total - done[0]):.0f}s", flush=True)
    return report


def _step(module: RGAModule, batch: int, h: int, w: int, dtype, mode: str, device):
    """A callable running one inference forward ("eval") or forward + backward ("train") of ``module``."""
    module = module.to(device=device, dtype=dtype).train(mode == "train")
    x = torch.randn(batch, module.in_channel, h, w, device=device, dtype=dtype)
    if mode == "eval":
        return lambda: _no_grad_call(module, x)
    x.requires_grad_(True)
    grad = torch.randn_like(x)
    return lambda: module(x).backward(grad)


@torch.no_grad()
def _no_grad_call(module, x):
    return module(x)


def median_ms(step) -> float:
    """Median time of ``step()`` in ms on the current GPU (``triton.testing.do_bench``)."""
    return triton.testing.do_bench(step, quantiles=[0.5])


TUNABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_selection(shapes, batch_sizes, branches, dtypes, modes, algorithms) -> list[tuple[int, int, int]]:
    """Named errors for a bad selection; returns shapes as a list of (C, H, W)."""
    for arg, values, allowed in (("branches", branches, tuple(BRANCH_FLAGS)), ("modes", modes, ("eval", "train")),
                                 ("algorithms", algorithms, ALGORITHMS), ("dtypes", dtypes, TUNABLE_DTYPES)):
        odd = [v for v in values if v not in allowed]
        if odd or not values:
            raise ValueError(f"{arg} must be a non-empty selection from {allowed}, got {tuple(values)!r}")
    shapes = [tuple(s) if isinstance(s, (tuple, list)) else s for s in shapes]
    if not shapes or any(not isinstance(s, tuple) or len(s) != 3 or not all(is_positive_int(d) for d in s)
                         for s in shapes):
        raise ValueError(f"shapes must be a non-empty list of (C, H, W) positive ints, got {shapes!r}")
    if not batch_sizes or not all(is_positive_int(b) for b in batch_sizes):
        raise ValueError(f"batch_sizes must be a non-empty selection of positive ints, got {tuple(batch_sizes)!r}")
    return shapes


def _check_device(device) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device must be a CUDA device to tune for, got {device}: Triton's interpreter "
                         f"runs one pinned config")
    if not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but this machine has no CUDA GPU (torch {torch.__version__}): "
                         f"tuning measures kernels on the GPU they are tuned for")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={str(device)!r} but there are {torch.cuda.device_count()} CUDA devices")
    return device


def measure_algorithms(shapes, batch_sizes, branches, dtypes, modes, device, algorithms=ALGORITHMS,
                       verbose=True, timer=median_ms) -> dict[str, str]:
    """Time each branch (spatial, channel) alone with each algorithm; the faster per branch shape.

    A branch's time is its single-branch block's (RGA-S or RGA-C) ``timer(step)`` summed over
    ``batch_sizes``: the projection and gating cost the same under both algorithms, so the
    difference is the relation embedding's. Returns {algorithm bucket: algorithm}.
    """
    names = [name for i, name in enumerate(("spatial", "channel")) if any(BRANCH_FLAGS[br][i] for br in branches)]
    cases = [(s, dt, m, name) for s in shapes for dt in dtypes for m in modes for name in names]
    progress = _progress(len(cases), verbose)
    chosen = {}
    for (c, h, w), dtype, mode, name in cases:
        totals = dict.fromkeys(algorithms, 0.0)
        for algorithm in algorithms:
            for batch in batch_sizes:
                module = RGAModule(c, h * w, use_spatial=name == "spatial", use_channel=name == "channel",
                                   backend="triton", algorithm=algorithm)
                step = _step(module, batch, h, w, dtype, mode, device)
                step()
                totals[algorithm] += timer(step)
        best = min(totals, key=totals.get)
        key = bucket(*module.branch(name).dims, dtype, "train" if mode == "train" else "forward")
        chosen[key] = best
        progress(f"{name} branch of {c}x{h}x{w} {mode} {str(dtype)[6:]}: "
                 + ", ".join(f"{a} {t:.3f} ms" for a, t in totals.items()) + f" -> {best}")
    return chosen
