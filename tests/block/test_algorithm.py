"""algorithm="auto": per branch, the measured choice from the GPU's configuration file, else the
algorithm with fewer multiply-adds; the choice runs and still matches the reference."""
import json
import warnings

import pytest
import torch

import rga_triton
from rga_triton import tuning
from rga_triton.common import algorithm
from rga_triton.ops.relation import kernels as relation_kernels

from helpers import DEVICE, TOLERANCE, compare_steps, make_pair

# C=20 at 6x10, cha_ratio=3, spa_ratio=8, down_ratio=4: spatial (R, K, L) = (7, 6, 60), channel (7, 6, 20).
SHAPE = dict(c=20, h=6, w=10, batch=3, cha_ratio=3, spa_ratio=8, down_ratio=4)
# (C, H, W) that tune() can measure with the default ratios (8, 8, 8): hidden widths stay >= 1.
TUNE_SHAPE = (128, 8, 8)


def test_multiply_adds_by_hand():
    # reassociated: A (R x 2K) reduces over L: 2 R K L; Z = A [theta; phi] reduces over 2K: 2 R K L.
    assert algorithm.multiply_adds("reassociated", r=7, k=6, length=60) == 2 * 7 * 6 * 60 + 7 * 12 * 60
    # tiled: G (L x L) reduces over K; Z = W_in G^T + W_out G reduces over 2L.
    assert algorithm.multiply_adds("tiled", r=7, k=6, length=60) == 60 * 60 * 6 + 7 * 120 * 60
    with pytest.raises(ValueError, match="algorithm must be one of"):
        algorithm.multiply_adds("auto", 1, 1, 1)


@pytest.mark.parametrize("c,h,w", [(256, 64, 32), (512, 32, 16), (1024, 16, 8), (2048, 16, 8)])
def test_cost_model_picks_reassociated_at_rga_net_shapes(c, h, w):
    module = rga_triton.RGAModule(c, h * w)
    for name in ("spatial", "channel"):
        assert algorithm.fewest_multiply_adds(*module.branch(name).dims) == "reassociated"


def test_cost_model_picks_tiled_when_theta_is_wide_and_r_is_l():
    # spa_ratio=1 (R = L) and K > 2L/3: K L^2 + 2 L^3 < 4 K L^2.
    assert algorithm.fewest_multiply_adds(r=6, k=10, length=6) == "tiled"
    assert algorithm.fewest_multiply_adds(r=6, k=4, length=6) == "reassociated"     # a tie goes to reassociated


def test_bucket_names_every_key_and_checks_the_pass():
    assert algorithm.bucket(256, 32, 2048, torch.bfloat16, "train") == "K=32,L=2048,R=256,dtype=bfloat16,pass=train"
    with pytest.raises(ValueError, match="grad_pass must be one of"):
        algorithm.bucket(1, 1, 1, torch.float32, "eval")


@pytest.fixture
def store(store):
    """conftest's empty store, with the file this device reads in place of its folder."""
    tuned, folder = store
    return tuned, folder / tuned.device_file_name(torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu")


@pytest.fixture
def tiled_calls(monkeypatch):
    """Counts launches of the tiled algorithm's kernel (eager inference and the custom ops both call it)."""
    calls = []
    real = relation_kernels.relation_z_tiled

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(relation_kernels, "relation_z_tiled", spy)
    monkeypatch.setattr("rga_triton.triton_path.relation_z_tiled", spy)
    return calls


def _write(path, algorithms, kernels=None):
    path.write_text(json.dumps({"device": "test", "kernels": kernels or {}, "algorithms": algorithms}))


@pytest.mark.needs_triton
def test_stored_choice_runs_per_branch_and_matches_the_reference(store, tiled_calls):
    _, path = store
    ref, fast, x = make_pair(**SHAPE, device=DEVICE, backend="triton")
    assert fast.algorithm == "auto"
    spatial = fast.branch("spatial").dims
    # Tiled for the spatial branch (L = 60) in both passes; the channel branch keeps the cost model's choice.
    _write(path, {algorithm.bucket(*spatial, torch.float32, p): "tiled" for p in algorithm.PASSES})
    for train in (True, False):
        compare_steps(ref, fast, x, train, TOLERANCE[torch.float32], torch.float32, device=DEVICE, steps=2)
    lengths = {shape[-1] for shape in tiled_calls}
    assert lengths == {60}, f"tiled ran on branches of length {lengths}, expected the spatial branch (60) only"
    with torch.no_grad():                      # eager inference takes the fused path: it reads the file too
        before = len(tiled_calls)
        fast.eval()(x.float().to(DEVICE))
        assert len(tiled_calls) == before + 1


@pytest.mark.needs_triton
def test_without_a_file_auto_follows_the_cost_model(store, tiled_calls):
    # spa_ratio=1 and cha_ratio=2: the spatial branch has R = L = 6 and K = 10 > 2L/3, so tiled is cheaper.
    ref, fast, x = make_pair(20, 2, 3, 4, cha_ratio=2, spa_ratio=1, down_ratio=4, use_channel=False,
                             device=DEVICE, backend="triton")
    assert algorithm.fewest_multiply_adds(*fast.branch("spatial").dims) == "tiled"
    compare_steps(ref, fast, x, True, TOLERANCE[torch.float32], torch.float32, device=DEVICE)
    assert tiled_calls, "the cost model chose tiled, but the tiled kernel never ran"


@pytest.mark.needs_triton
def test_explicit_algorithm_ignores_the_file(store, tiled_calls):
    _, path = store
    _, fast, x = make_pair(**SHAPE, device=DEVICE, backend="triton")
    _write(path, {algorithm.bucket(*fast.branch(n).dims, torch.float32, p): "tiled"
                  for n in ("spatial", "channel") for p in algorithm.PASSES})
    fast.algorithm = "reassociated"
    fast(x.float().to(DEVICE)).sum().backward()
    assert not tiled_calls


@pytest.mark.needs_triton
def test_unknown_algorithm_in_the_file_is_malformed(store):
    _, path = store
    _, fast, x = make_pair(**SHAPE, device=DEVICE, backend="triton")
    _write(path, {algorithm.bucket(*fast.branch("spatial").dims, torch.float32, "forward"): "fastest"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            fast.eval()(x.float().to(DEVICE))
    messages = [str(w.message) for w in caught if "malformed" in str(w.message)]
    assert len(messages) == 1 and "fastest" in messages[0], messages


@pytest.mark.needs_triton
def test_measure_algorithms_records_the_faster_per_branch(store):
    """tune()'s second half, with a stand-in timer: tiled measures faster for the spatial branch only."""
    times = []

    def timer(step):
        times.append(step)
        return [2.0, 1.0, 1.0, 2.0][len(times) - 1]     # spatial: reassociated, tiled; channel: the same

    c, h, w = TUNE_SHAPE
    chosen = tuning.measure_algorithms([(c, h, w)], [2], ["RGA-SC"], [torch.float32], ["train"],
                                           torch.device(DEVICE), verbose=False, timer=timer)
    module = rga_triton.RGAModule(c, h * w)        # tune() measures the authors' default ratios
    expected = {algorithm.bucket(*module.branch("channel").dims, torch.float32, "train"): "reassociated",
                algorithm.bucket(*module.branch("spatial").dims, torch.float32, "train"): "tiled"}
    assert len(times) == 4 and chosen == expected


@pytest.mark.parametrize("kwargs,words", [
    (dict(modes=("eval", "inference")), "modes must be a non-empty selection"),
    (dict(algorithms=("tiled", "fft")), "algorithms must be a non-empty selection"),
    (dict(branches=()), "branches must be a non-empty selection"),
    (dict(dtypes=("float32",)), "dtypes must be a non-empty selection"),
    (dict(dtypes=(torch.float64,)), "dtypes must be a non-empty selection"),
    (dict(shapes=[(256, 64)]), r"shapes must be a non-empty list of \(C, H, W\)"),
    (dict(shapes=[(256, 64, 0)]), r"shapes must be a non-empty list of \(C, H, W\)"),
    (dict(batch_sizes=(0,)), "batch_sizes must be"),
    (dict(batch_sizes=(2.5,)), "batch_sizes must be"),
    (dict(time_limit=-1), "time_limit must be a positive number"),
], ids=["modes", "algorithms", "branches", "dtype-string", "float64", "2-d-shape", "zero-dim", "batch-0",
        "batch-float", "time-limit"])
def test_tune_checks_its_selections(kwargs, words):
    with pytest.raises(ValueError, match=words):
        rga_triton.tune(device="cuda", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_tune_without_a_gpu_says_so():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        rga_triton.tune()


@pytest.mark.needs_triton
def test_stored_choice_compiles_fullgraph(store, tiled_calls):
    """Under torch.compile the choice is a constant of the graph: no break, and the stored algorithm runs."""
    _, path = store
    ref, fast, x = make_pair(**SHAPE, device=DEVICE, backend="triton")
    _write(path, {algorithm.bucket(*fast.branch("channel").dims, torch.float32, p): "tiled"
                  for p in algorithm.PASSES})
    fast.compile(fullgraph=True, backend="aot_eager")        # in place: parameter names stay
    compare_steps(ref, fast, x, True, TOLERANCE[torch.float32], torch.float32, device=DEVICE)
    assert {shape[-1] for shape in tiled_calls} == {SHAPE["c"]}
