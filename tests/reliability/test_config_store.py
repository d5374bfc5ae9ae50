"""Writing configuration files: processes tuning at once keep each other's entries and readers
never see half a file; tune() merges over the file it writes, refuses a folder it cannot write
before tuning, and leaves the loaded table in place when it fails; a file naming no kernel warns.
No kernel runs here: tune()'s per-case step is stood in for by one that records a bucket."""
import contextlib
import importlib
import json
import multiprocessing
import os
import pkgutil
import warnings

import pytest
import torch

import rga_triton
from rga_triton import tuning
from rga_triton.launch import tuned

ENTRY = {"BLOCK_R": 32, "num_warps": 4, "num_stages": 2}
TUNED = {"BLOCK_R": 64, "num_warps": 8, "num_stages": 3}
CPU = torch.device("cpu")


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("RGA_TRITON_CONFIG_DIR", str(tmp_path))
    tuned.STORE.reset()
    yield tmp_path / "cpu.json"         # the file the store reads for the CPU, and tune() writes below
    tuned.STORE.reset()


@pytest.fixture
def fake_gpu(store, monkeypatch):
    """tune() on the CPU, named "cpu": the GPU-only calls are stood in for, and each case's step records
    one bucket of _gate_logit_kernel (C=<channels>) as an autotuned launch would."""
    monkeypatch.setattr(tuning, "_check_device", lambda device: CPU)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "cpu")
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)

    def step(module, batch, h, w, dtype, mode, device):
        return lambda: tuned.STORE.recorded.setdefault("_gate_logit_kernel", {}).update(
            {f"C={module.in_channel}": TUNED})
    monkeypatch.setattr(tuning, "_step", step)
    return store


def _tune(**kw):
    return rga_triton.tune(shapes=[(64, 8, 16)], batch_sizes=(2,), dtypes=(torch.float32,), modes=("eval",),
                           algorithms=("reassociated",), verbose=False, **kw)


def _write(path, kernels=None, algorithms=None):
    path.write_text(json.dumps({"device": "cpu", "kernels": kernels or {}, "algorithms": algorithms or {}}))


def _save_many(path: str, name: str, count: int) -> None:
    bulk = {f"{name}-{j}": ENTRY for j in range(100)}      # a file of many writes, not one
    for i in range(count):
        tuning.save_config(path, "cpu", {"_gate_logit_kernel": {f"{name}{i}": ENTRY}, "_affinity_kernel": bulk},
                               {f"{name}{i}": "tiled"})


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork to be fast")
@pytest.mark.parametrize("lock", ["flock", "exclusive-create"])
def test_processes_saving_at_once_keep_both_sets_and_readers_see_whole_files(store, monkeypatch, lock):
    if lock == "exclusive-create":          # the fallback where fcntl does not exist (Windows)
        monkeypatch.setattr(tuning, "fcntl", None)
    count, path = 25, str(store)
    fork = multiprocessing.get_context("fork")      # children inherit the patched module, and start at once
    writers = [fork.Process(target=_save_many, args=(path, name, count)) for name in ("a", "b")]
    for writer in writers:
        writer.start()
    reads, invalid = 0, []
    while any(writer.is_alive() for writer in writers):
        try:
            text = store.read_text()
        except FileNotFoundError:
            continue
        reads += 1
        try:
            json.loads(text)
        except ValueError:
            invalid.append(text[-40:])
    for writer in writers:
        writer.join()
    assert [writer.exitcode for writer in writers] == [0, 0]
    assert reads and not invalid, f"{len(invalid)} of {reads} reads saw a partial file"
    data = json.loads(store.read_text())
    expected = {f"{name}{i}" for name in "ab" for i in range(count)}
    assert set(data["kernels"]["_gate_logit_kernel"]) == expected
    assert set(data["algorithms"]) == expected
    assert os.listdir(store.parent) == [store.name]        # no temporary or lock file left behind


def test_tune_into_a_custom_file_merges_over_its_entries(fake_gpu, tmp_path):
    """tune(path=) keeps the custom file's entries (the device file's do not overwrite them), and the
    launches that follow use the device file's configs with the tuned ones over them."""
    _write(fake_gpu, {"_gate_logit_kernel": {"R=7": ENTRY, "R=8": ENTRY}})
    custom = tmp_path / "custom" / "mine.json"
    custom.parent.mkdir()
    mine = {"_gate_logit_kernel": {"R=7": dict(ENTRY, num_warps=8)}, "_affinity_kernel": {"M=8": {"BLOCK_M": 64}}}
    _write(custom, mine, {"K=6,L=60,R=7,dtype=float32,pass=train": "tiled"})
    assert _tune(path=str(custom)) == str(custom)
    data = json.loads(custom.read_text())
    assert data["kernels"] == {"_gate_logit_kernel": {**mine["_gate_logit_kernel"], "C=64": TUNED},
                               "_affinity_kernel": mine["_affinity_kernel"]}
    assert data["algorithms"] == {"K=6,L=60,R=7,dtype=float32,pass=train": "tiled"}
    assert tuned.STORE.table == {"_gate_logit_kernel": {"R=7": ENTRY, "R=8": ENTRY, "C=64": TUNED}}


def test_a_folder_that_cannot_be_written_is_refused_before_tuning(fake_gpu, tmp_path, monkeypatch):
    """An installed package's folder is read-only: the error comes before any tuning, names both ways
    out, and the loaded table stays."""
    folder = tmp_path / "site-packages"
    folder.mkdir()
    _write(folder / "cpu.json", {"_gate_logit_kernel": {"R=7": ENTRY}})
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):       # root writes anyway; a path under a plain file nobody can
            (tmp_path / "a-file").write_text("")
            folder = tmp_path / "a-file" / "configs"
        monkeypatch.setenv("RGA_TRITON_CONFIG_DIR", str(folder))
        tuned.STORE.reset()
        tuned.STORE.ensure_loaded(CPU)
        loaded = tuned.STORE.table

        def step(*args):
            raise AssertionError("tuned before the folder was checked")
        monkeypatch.setattr(tuning, "_step", step)
        with pytest.raises(ValueError, match=r"cannot write .*RGA_TRITON_CONFIG_DIR.*path="):
            _tune()
        assert tuned.STORE.table == loaded
    finally:
        (tmp_path / "site-packages").chmod(0o755)


def test_an_existing_file_that_is_no_configuration_is_refused_before_tuning(fake_gpu, tmp_path):
    (tmp_path / "notes.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"notes.json is not a readable configuration.*path="):
        _tune(path=str(tmp_path / "notes.json"))


def test_an_error_while_tuning_leaves_the_loaded_table(fake_gpu, monkeypatch):
    """A failed tune() (out of memory, Ctrl-C) puts back the configs the launches had, not an empty table."""
    algorithms = {"K=6,L=60,R=7,dtype=float32,pass=train": "tiled"}
    _write(fake_gpu, {"_gate_logit_kernel": {"R=7": ENTRY}}, algorithms)
    tuned.STORE.ensure_loaded(CPU)

    def step(*args):
        def fail():
            raise RuntimeError("CUDA out of memory")
        return fail
    monkeypatch.setattr(tuning, "_step", step)
    with pytest.raises(RuntimeError, match="out of memory"):
        _tune()
    assert tuned.STORE.table == {"_gate_logit_kernel": {"R=7": ENTRY}}
    assert tuned.STORE.algorithms == algorithms


@pytest.mark.parametrize("entry", [{"BLOCK_K": 16.0, "BLOCK_C": 32, "BLOCK_L": 128},
                                   {"BLOCK_K": 16, "BLOCK_C": 32, "BLOCK_L": 128, "num_warps": 4.0},
                                   {"BLOCK_K": True, "BLOCK_C": 32, "BLOCK_L": 128}],
                         ids=["float-block", "float-warps", "bool-block"])
def test_a_block_size_that_is_no_int_is_refused_with_one_warning(store, entry):
    """16.0 == 16, so a float passed the space check and then failed inside Triton's compiler. Like any
    entry outside the space, it is refused (the launch autotunes) with one warning naming it."""
    kernel = tuned.KERNELS["_projection_apply_kernel"]
    _write(store, {kernel.name: {"K=4": entry}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned.STORE.ensure_loaded(CPU)
        assert tuned.STORE.lookup(kernel.name, "K=4", kernel.allowed) is None
        assert tuned.STORE.lookup(kernel.name, "K=4", kernel.allowed) is None
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "values must be ints" in messages[0] and kernel.name in messages[0], messages


def test_a_file_nested_past_the_recursion_limit_is_ignored_with_one_warning(store):
    """json raises RecursionError, which escaped the loader and so every forward."""
    store.write_text('{"kernels": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned.STORE.ensure_loaded(CPU)
        tuned.STORE.ensure_loaded(CPU)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "ignoring malformed tuned configuration" in messages[0], messages
    assert tuned.STORE.table == {}


def test_kernel_names_no_kernel_has_warn_once(store):
    """A misspelt kernel name warns once, naming it; a kernel imported only on first use does not."""
    _write(store, {"_gate_logit_kernal": {"R=7": ENTRY}, "_affinity_kernel": {"M=8": {"BLOCK_M": 64}},
                   "_gate_logit_kernel": {"R=7": ENTRY}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            tuned.STORE.ensure_loaded(CPU)
            assert tuned.STORE.lookup("_gate_logit_kernel", "R=7", [({"BLOCK_R": 32}, 4, 2)]) is not None
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "'_gate_logit_kernal'" in messages[0], messages
    assert "no kernel has that name" in messages[0] and "ignoring the tuned configs of ['_gate_logit_kernal']" \
        in messages[0], messages


def test_kernel_names_lists_every_kernel():
    """KERNEL_NAMES is what a file's names are checked against: every kernel module's kernels."""
    import rga_triton.ops
    for module in pkgutil.walk_packages(rga_triton.ops.__path__, "rga_triton.ops."):
        if module.name.endswith("kernels"):
            importlib.import_module(module.name)
    assert set(tuned.KERNELS) == tuned.KERNEL_NAMES
