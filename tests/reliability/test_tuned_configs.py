"""Per-GPU configuration files: a stored config is loaded and launched with; a missing or
malformed file falls back to autotuning with one warning."""
import json
import warnings

import pytest
import torch

import rga_triton

from helpers import DEVICE, TOLERANCE, compare_steps, make_pair, rel_err

pytestmark = pytest.mark.needs_triton


def _device_file(tuned, tmp_path):
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    return tmp_path / tuned.device_file_name(name)


def _run_eval():
    ref, fast, x = make_pair(20, 6, 10, 3, cha_ratio=3, down_ratio=4, device=DEVICE, backend="triton")
    ref.eval(), fast.eval()
    with torch.no_grad():
        return rel_err(fast(x.float().to(DEVICE)), ref(x))


def test_file_name_normalises_the_device_name():
    from rga_triton.launch.tuned import device_file_name
    assert device_file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3.json"


def test_stored_config_is_loaded_and_launched(store):
    tuned, tmp_path = store
    _run_eval()                                               # learn the buckets this shape launches
    recorded = tuned.STORE.recorded
    assert "_projection_apply_kernel" in recorded
    # Store a config that is not the space's first (the one the interpreter pins) for every bucket.
    chosen = {"BLOCK_K": 16, "BLOCK_C": 32, "BLOCK_L": 128, "num_warps": 4, "num_stages": 2}
    table = {k: dict(v) for k, v in recorded.items()}
    table["_projection_apply_kernel"] = {b: chosen for b in recorded["_projection_apply_kernel"]}
    _device_file(tuned, tmp_path).write_text(json.dumps({"device": "x", "kernels": table}))
    tuned.STORE.reset()
    launches = []
    kernel = tuned.KERNELS["_projection_apply_kernel"]
    original = kernel.fn.__getitem__

    class Spy:
        def __getitem__(self, grid):
            launch = original(grid)

            def run(*args, **kwargs):
                launches.append({k: kwargs[k] for k in ("BLOCK_K", "BLOCK_C", "BLOCK_L", "num_warps", "num_stages")})
                return launch(*args, **kwargs)
            return run

    kernel.fn, real_fn = Spy(), kernel.fn
    kernel.fn.arg_names = real_fn.arg_names
    # Launches memoise their lookup; a new table (as tune() sets one) must be seen at once.
    other = dict(chosen, BLOCK_K=32, BLOCK_C=16, num_warps=8)
    try:
        assert _run_eval() <= TOLERANCE[torch.float32]
        assert kernel.last_source == "file"
        assert launches and all(launch == chosen for launch in launches)
        launches.clear()
        table["_projection_apply_kernel"] = {b: other for b in recorded["_projection_apply_kernel"]}
        tuned.STORE.table = {k: dict(v) for k, v in table.items()}
        assert _run_eval() <= TOLERANCE[torch.float32]
    finally:
        kernel.fn = real_fn
    assert launches and all(launch == other for launch in launches)


@pytest.mark.parametrize("content", [None, "{not json", json.dumps({"kernels": [1, 2]})],
                         ids=["missing", "malformed", "wrong-shape"])
def test_missing_or_malformed_file_falls_back_with_one_warning(store, content):
    tuned, tmp_path = store
    if DEVICE == "cpu":          # on the CPU a missing file is the normal case and stays silent
        content = content or "{not json"
    if content is not None:
        _device_file(tuned, tmp_path).write_text(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _run_eval() <= TOLERANCE[torch.float32]
        assert _run_eval() <= TOLERANCE[torch.float32]
    messages = [str(w.message) for w in caught if "tuned configuration" in str(w.message)]
    assert len(messages) == 1, messages
    assert tuned.KERNELS["_projection_apply_kernel"].last_source == "autotune"


def test_channel_gate_gradient_partials_stay_in_their_chunk(store):
    """The gating backward sums the channel gate's gradient per 256-position chunk: a config
    whose BLOCK_N reached past its chunk used to count the next chunk twice. Such a config is
    refused from files (not in the space), and the kernel masks at its chunk's end anyway:
    here it is let in on purpose."""
    from rga_triton.ops.gating import kernels as gating
    tuned, tmp_path = store
    gen = torch.Generator().manual_seed(0)
    x, grad = (torch.randn(1, 4, 3, 100, generator=gen, dtype=torch.float64) for _ in range(2))   # N = 300: 2 chunks
    s = torch.rand(1, 300, generator=gen, dtype=torch.float64)
    c = torch.rand(1, 4, generator=gen, dtype=torch.float64)
    expected_dc = (grad * x).flatten(2).mul(s[:, None, :]).sum(2)
    wide = {"BLOCK_N": 512, "num_warps": 4, "num_stages": 1}
    _device_file(tuned, tmp_path).write_text(json.dumps(
        {"device": "x", "kernels": {"_apply_gates_backward_kernel": {"C=4,N=300,dtype=float32": wide}}}))
    kernel = tuned.KERNELS["_apply_gates_backward_kernel"]
    saved = kernel.allowed
    kernel.allowed = saved + [({"BLOCK_N": 512}, 4, 1)]
    try:
        _, _, dc = gating.apply_gates_backward(grad.float().to(DEVICE), x.float().to(DEVICE),
                                               s.float().to(DEVICE), c.float().to(DEVICE))
    finally:
        kernel.allowed = saved
    assert kernel.last_source == "file"
    assert rel_err(dc, expected_dc) <= TOLERANCE[torch.float32]


def _exercise_every_kernel(tuned) -> set[str]:
    """One RGA-SC train and eval step, both algorithms, against the float64 reference, and
    affinity(): every tuned kernel launches. Returns the kernels a stored config launched."""
    launched = set()

    def from_file():
        return {n for n, k in tuned.KERNELS.items() if k.last_source == "file"}

    for algorithm in ("reassociated", "tiled"):
        for train in (True, False):
            ref, fast, x = make_pair(20, 6, 10, 3, cha_ratio=3, down_ratio=4, device=DEVICE, backend="triton")
            fast.algorithm = algorithm
            compare_steps(ref, fast, x, train, TOLERANCE[torch.float32], torch.float32, device=DEVICE)
            launched |= from_file()
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(2, 9, 70, generator=gen, dtype=torch.float64)
    phi = torch.randn(2, 9, 45, generator=gen, dtype=torch.float64)
    g = rga_triton.affinity(theta.float().to(DEVICE), phi.float().to(DEVICE), backend="triton")
    assert rel_err(g, theta.transpose(1, 2) @ phi) <= TOLERANCE[torch.float32]
    return launched | from_file()


SPACE_SIZE = 8      # the largest config space (block sizes) of any kernel


@pytest.mark.parametrize("index", range(SPACE_SIZE))
def test_every_config_of_every_kernel_is_exact(store, index):
    """The interpreter pins each kernel to its space's first config; a stored file launches any
    other. Config ``index`` of every kernel (its last when the space is shorter) runs one RGA-SC
    train and eval step, both algorithms, against the float64 reference, and affinity()."""
    tuned, tmp_path = store
    _exercise_every_kernel(tuned)              # learns the buckets (and imports every kernel module)
    assert max(len(k.space) for k in tuned.KERNELS.values()) == SPACE_SIZE
    table = {}
    for name, kernel in tuned.KERNELS.items():
        blocks = kernel.space[min(index, len(kernel.space) - 1)]
        _, warps, stages = next(a for a in kernel.allowed if a[0] == blocks)
        table[name] = {b: dict(blocks, num_warps=warps, num_stages=stages) for b in tuned.STORE.recorded.get(name, ())}
    _device_file(tuned, tmp_path).write_text(json.dumps({"device": "x", "kernels": table}))
    tuned.STORE.reset()
    launched = _exercise_every_kernel(tuned)
    assert launched == set(tuned.KERNELS), set(tuned.KERNELS) - launched


def test_tune_needs_a_gpu():
    with pytest.raises(ValueError, match="CUDA"):
        rga_triton.tune(device="cpu")


def test_saved_file_merges_and_is_read_back(store):
    """tune()'s writer: recorded buckets merge over the file's, algorithm choices are kept, and the
    store reads back exactly what was written (no temporary or lock file left behind)."""
    from rga_triton.tuning import save_config
    tuned, tmp_path = store
    path = _device_file(tuned, tmp_path)
    old = {"_gate_logit_kernel": {"R=7": {"BLOCK_R": 32, "num_warps": 4, "num_stages": 2}},
           "_affinity_kernel": {"M=8": {"BLOCK_M": 64, "num_warps": 8, "num_stages": 3}}}
    new = {"_gate_logit_kernel": {"R=9": {"BLOCK_R": 64, "num_warps": 8, "num_stages": 3}}}
    choice = {"K=6,L=60,R=7,dtype=float32,pass=train": "tiled"}
    other = {"K=6,L=60,R=7,dtype=float32,pass=forward": "reassociated"}
    save_config(str(path), "cpu", old, choice)
    save_config(str(path), "cpu", new, other)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    tuned.STORE.ensure_loaded(torch.device(DEVICE))
    assert tuned.STORE.table["_gate_logit_kernel"].keys() == {"R=7", "R=9"}
    assert tuned.STORE.table["_affinity_kernel"] == old["_affinity_kernel"]
    assert tuned.STORE.algorithms == {**choice, **other}
    config = tuned.STORE.lookup("_gate_logit_kernel", "R=9", [({"BLOCK_R": 64}, 8, 3)])
    assert config.kwargs == {"BLOCK_R": 64} and (config.num_warps, config.num_stages) == (8, 3)


@pytest.mark.parametrize("entry,words", [
    ({"BLOCK_C": 64, "BLOCK_L": 128, "num_warps": 4, "num_stages": 2}, "differ from the kernel's"),
    ({"BLOCK_K": "x", "BLOCK_C": 64, "BLOCK_L": 128}, "must be ints"),
    ({"BLOCK_K": 8, "BLOCK_C": 64, "BLOCK_L": 128}, "not a config of the kernel's space"),   # a dot under 16
    ({"BLOCK_K": 16, "BLOCK_C": 32, "BLOCK_L": 128, "num_warps": 3}, "not a config of the kernel's space"),
    ({"BLOCK_K": 16, "BLOCK_C": 32, "BLOCK_L": 128, "num_stages": 5}, "not a config of the kernel's space"),
    ([16, 64, 128], "expected a dict"),
], ids=["missing-block", "string", "dot-under-16", "warps", "stages", "list"])
def test_stale_entry_autotunes_with_one_warning(store, entry, words):
    """An entry outside the kernel's config space (a file from an older space, a hand edit:
    blocks the kernel's dots or chunks do not allow) is skipped with one warning naming the
    kernel; the launch autotunes and stays exact."""
    tuned, tmp_path = store
    _run_eval()
    recorded = tuned.STORE.recorded
    table = {k: dict(v) for k, v in recorded.items()}
    table["_projection_apply_kernel"] = {b: entry for b in recorded["_projection_apply_kernel"]}
    _device_file(tuned, tmp_path).write_text(json.dumps({"device": "x", "kernels": table}))
    tuned.STORE.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _run_eval() <= TOLERANCE[torch.float32]
        assert _run_eval() <= TOLERANCE[torch.float32]
    messages = [str(w.message) for w in caught if "_projection_apply_kernel" in str(w.message)]
    assert len(messages) == len(recorded["_projection_apply_kernel"]), messages
    assert all(words in m for m in messages), messages
    assert tuned.KERNELS["_projection_apply_kernel"].last_source == "autotune"
    assert tuned.KERNELS["_gate_logit_kernel"].last_source == "file"     # the good entries still launch


def test_a_kernel_that_adds_into_its_output_is_restored_between_autotune_trials():
    """grad x's kernel adds into the gradient the block's later readers of x left (ACCUMULATE): each
    autotune trial must start from that gradient, not from the previous trial's sum."""
    from rga_triton.launch import tuned
    from rga_triton.ops.projection import backward_kernels as projection_backward
    kernel = tuned.KERNELS[projection_backward._input_grad_kernel.name]
    assert kernel.autotuned.restore_value == ["dx_ptr"]
    assert all(k.autotuned.restore_value == [] for name, k in tuned.KERNELS.items() if k is not kernel)


def test_tune_runs_end_to_end_and_its_file_is_launched_with(store, monkeypatch, capsys):
    """tune()'s whole loop. It writes every kernel a train and an eval step launch and one algorithm
    choice per branch and pass, reports progress with an ETA, and the next launches use the file. A
    time limit already spent keeps the file as it was. On the CPU, the GPU-only calls around the
    kernels are stood in for (the device check, its name, the device context, synchronize, do_bench:
    a fake clock on which the algorithm timed first wins) and the kernels run in Triton's
    interpreter, one pinned config each."""
    import contextlib

    import triton.testing

    from rga_triton import tuning
    tuned, tmp_path = store
    if DEVICE == "cpu":
        monkeypatch.setattr(tuning, "_check_device", lambda device: torch.device("cpu"))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "cpu")
        monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
        timings = iter(range(1, 1000))

        def do_bench(step, quantiles):
            step()
            return float(next(timings))

        monkeypatch.setattr(triton.testing, "do_bench", do_bench)

    path = rga_triton.tune(shapes=[(64, 8, 16)], batch_sizes=(2,), dtypes=(torch.float32,))
    assert path == str(_device_file(tuned, tmp_path))
    data = json.loads(open(path).read())
    out = capsys.readouterr().out
    assert "[4/4] RGA-SC 64x8x16 B=2" in out and "ETA" in out, out
    # one choice per branch (their (R, K, L) differ at this shape) and pass
    assert len(data["algorithms"]) == 4 and data["algorithms"] == tuned.STORE.algorithms, data["algorithms"]
    if DEVICE == "cpu":
        assert set(data["algorithms"].values()) == {"reassociated"} and out.count("-> reassociated") == 4, out
    launched = {"_projection_apply_kernel", "_gate_logit_kernel", "_relation_backward_kernel",
                "_hidden_backward_kernel", "_input_grad_kernel", "_weight_grad_kernel", "_apply_gates_kernel"}
    assert launched <= set(data["kernels"]), launched - set(data["kernels"])
    assert tuned.STORE.table == data["kernels"]

    kernel = tuned.KERNELS["_gate_logit_kernel"]
    kernel.last_source = None
    module = rga_triton.RGAModule(64, 128, backend="triton").to(DEVICE).train()
    module(torch.randn(2, 64, 8, 16, device=DEVICE, requires_grad=True)).sum().backward()
    assert kernel.last_source == "file"

    before = open(path).read()
    rga_triton.tune(shapes=[(64, 8, 16)], batch_sizes=(2,), dtypes=(torch.float32,), time_limit=1e-9)
    assert "time limit of 1e-09 s reached" in capsys.readouterr().out
    assert json.loads(open(path).read())["kernels"] == json.loads(before)["kernels"]
