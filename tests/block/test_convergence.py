"""Same training, same accuracy: the authors' RGA-Net and ours trained side by side (issue 31).

Three models from one seed and one batch stream, with the authors' recipe (Adam, label-smoothed
cross-entropy + batch-hard triplet, BNNeck; ``bench/lib/reid_train.py``) on the synthetic re-ID set
(``bench/lib/reid_data.py``): the authors' blocks (``reference/``), the same model ``convert``ed
to the torch path, and converted to the Triton path (under the interpreter on a CPU, fewer steps).

Training this model is chaotic: float32 rounding in the first step grows by about 10-100x per step
(train-mode BatchNorm over a small batch, hard-example mining, and Adam, which turns a gradient element
whose sign rounding flips into a full 2 x lr step), so after a few steps two exact float32 runs differ
by as much as the loss changes. An elementwise tolerance is the wrong test. The criterion is
noise-aware (:func:`checks`, :func:`violations`): the authors' model in float64 is the truth; the
authors' model in float32, on the stream and on the stream with each batch's images reordered (the
same loss and gradients, another rounding), shows how far float32 rounding alone moves training from
it. Each float32 implementation must stay within ``FACTOR`` x that deviation: step 1's loss and
BatchNorm buffers (forward rounding only) against the noise runs there; later steps against the
noise level the noise runs reach ``LAG`` steps later (a flipped Adam step lets one run lead the
chaotic growth); after training, the parameters and eval features, and rank-1/mAP within the noise
runs' difference plus one query's worth. In float64 the noise runs are the authors' float64 model on
the reordered streams, and the torch path must also stay under 1e-9 for the first ``TIGHT_STEPS``
steps. The measured figures and the tolerances are in docs/numerics.md ("Training side by side").

``test_planted_errors_are_rejected`` proves the criterion is sharp: a BatchNorm momentum off by 1%
in one block, or one BatchNorm's epsilon dropped, fails it.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from bench.lib import reid_train
from bench.lib.reid_data import SyntheticReID
from bench.lib.retrieval import rank1_map

from helpers import one_thread

SEED = int(os.environ.get("RGA_CONVERGENCE_SEED", "0"))   # another seed: a robustness check, as in docs/numerics.md
SIZE = dict(height=32, width=16)          # stage maps 8x4, 4x2, 2x1, 2x1: every W network non-empty at ratio 2
WIDTHS = (8, 16, 32, 64)
P, K = 2, 2                               # identities x images per batch: the Triton interpreter's cost grows with B
STEPS = 30
TRITON_STEPS = 2
SNAPSHOTS = (1, 2, 3, 5, 10, 20, 30)
TIGHT_STEPS = 5                           # float64: steps before rounding's growth reaches 1e-9 (measured: docs)
FACTOR = 4.0                              # "a small factor" of the reference's own rounding deviation
NOISE_ORDERS = (-1, 1, 2)                 # the noise runs' image orders (see reordered)
LAG = 3                                   # steps by which one run's chaotic growth may lead another's
FLOOR = {torch.float32: 1e-6, torch.float64: 1e-14}   # relative: the noise of a single rounding, below which
                                                        # a zero deviation of the noise run is not evidence


def triton_runs_here() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(scope="module")
def stream():
    """(data set, the batch list, the query/gallery split): one seed, one stream for every model."""
    data = SyntheticReID(**SIZE, num_train_ids=8, num_test_ids=4, gallery_per_id=2, seed=SEED)
    return data, list(data.batches(STEPS, P, K)), data.query_gallery()


def reordered(batches, order: int):
    """The same batches with the images in another order (0: as they are; -1: reversed; k: rolled by k):
    the same loss and gradients, another rounding."""
    if order == -1:
        return [(images.flip(0), labels.flip(0)) for images, labels in batches]
    return [(images.roll(order, 0), labels.roll(order, 0)) for images, labels in batches]


def probe_for(split):
    """Eval features of the query and gallery images (one tensor), float64."""
    images = torch.cat([split.query, split.gallery])
    return lambda model: reid_train.features(model, images)


def authors(data, dtype=torch.float64):
    return reid_train.authors_model(data.num_classes, **SIZE, widths=WIDTHS, seed=SEED, dtype=dtype)


def train(model, batches, split, steps=STEPS, snapshots=SNAPSHOTS):
    with one_thread():
        return reid_train.train(model, batches[:steps], snapshots=[s for s in snapshots if s <= steps] + [steps],
                                probe=probe_for(split))


@pytest.fixture(scope="module")
def runs(stream):
    """Every model trained on the stream: "truth" (the authors' model in float64), the noise runs (the authors'
    model in float32 on the stream and on NOISE_ORDERS reorderings of it; in float64 on the reorderings),
    "torch32" and "torch64" (converted), and "model" (the initial weights)."""
    data, batches, split = stream
    truth = authors(data)
    return {
        "truth": train(reid_train.in_dtype(truth, torch.float64), batches, split),
        "noise32": [train(reid_train.in_dtype(truth, torch.float32), reordered(batches, order), split)
                    for order in (0, *NOISE_ORDERS)],
        "noise64": [train(reid_train.in_dtype(truth, torch.float64), reordered(batches, order), split)
                    for order in NOISE_ORDERS],
        "torch32": train(reid_train.converted(truth, "torch", torch.float32), batches, split),
        "torch64": train(reid_train.converted(truth, "torch", torch.float64), batches, split),
        "model": truth,
    }


# ---- the criterion ---------------------------------------------------------------------------------------

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def stats_error(stats: dict, truth: dict) -> float:
    """The largest relative error over the BatchNorm layers (one block's layer off must count): a running
    variance against its norm, a running mean against the norm of the running standard deviation (a mean
    near zero is not relatively small); inf when a num_batches_tracked differs."""
    worst = 0.0
    for name, value in truth.items():
        if name.endswith("running_mean"):
            scale = truth[name[:-len("mean")] + "var"].clamp_min(0).sqrt().norm()
            worst = max(worst, float((stats[name] - value).norm() / scale.clamp_min(1e-300)))
        elif name.endswith("running_var"):
            worst = max(worst, rel(stats[name], value))
        elif not torch.equal(stats[name], value):
            return math.inf
    return worst


def metrics(features: torch.Tensor, split) -> tuple[float, float]:
    q = len(split.query)
    return rank1_map(features[:q], features[q:], split.query_pids, split.gallery_pids, split.query_camids,
                     split.gallery_camids)


def deviations(run: dict, truth: dict, split, steps: int) -> dict:
    """Per-step loss deviations (relative to the truth's loss), and at the snapshot steps the parameter,
    BatchNorm-buffer and eval-feature deviations; rank-1 and mAP after ``steps``."""
    out = {"loss": [abs(a - b) / abs(b) for a, b in zip(run["losses"][:steps], truth["losses"])],
           "stats": {step: stats_error(have, want) for step, (have, want)
                     in enumerate(zip(run["stats"][:steps], truth["stats"]), start=1)},
           "params": {}, "features": {}}
    for step, snap in run["snapshots"].items():
        if step <= steps:
            ref = truth["snapshots"][step]
            out["params"][step] = rel(snap["params"], ref["params"])
            out["features"][step] = rel(snap["probe"], ref["probe"])
    out["metrics"] = metrics(run["snapshots"][steps]["probe"], split)
    return out


def envelope(values: dict | list, until) -> float:
    """The noise level reached by step ``until``: the running maximum of a deviation."""
    items = values.items() if isinstance(values, dict) else enumerate(values, start=1)
    return max((v for s, v in items if s <= until), default=0.0)


def noise_deviations(runs: list[dict], truth: dict, split, steps: int) -> dict:
    """The deviations of several noise runs, merged: the largest at each step, the metrics furthest off."""
    each = [deviations(run, truth, split, steps) for run in runs]
    want = metrics(truth["snapshots"][steps]["probe"], split)
    out = {"loss": [max(d["loss"][i] for d in each) for i in range(steps)],
           "metrics": tuple(max((d["metrics"][j] for d in each), key=lambda v: abs(v - want[j])) for j in range(2))}
    for key in ("params", "stats", "features"):
        out[key] = {step: max(d[key][step] for d in each) for step in each[0][key]}
    return out


def checks(candidate: dict, noise: dict, dtype, lag: int = LAG) -> list[tuple[str, float, float]]:
    """(what, the candidate's deviation, the noise level it is held to) for every step and quantity.

    - Step 1's loss and the BatchNorm buffers after step 1 come from the initial weights (forward rounding
      alone): held to the noise runs' largest deviation there.
    - Later steps: held to the noise level the noise runs reach ``lag`` steps later (the running maximum
      of their deviations). Adam turns a gradient element whose sign rounding flips into a full 2 x lr step,
      so one run can enter the chaotic growth a step or two before another (see the module docstring);
      the lag allows that lead and nothing more.
    - After training: the parameters and the eval features, held to the noise runs' deviation.
    A level under ``FLOOR[dtype]`` counts as ``FLOOR[dtype]``.
    """
    floor, steps = FLOOR[dtype], len(candidate["loss"])
    last = max(candidate["params"])

    def level(values, step):
        return max(envelope(values, step if step == 1 else min(step + lag, steps)), floor)

    out = [(f"loss at step {step}", dev, level(noise["loss"], step))
           for step, dev in enumerate(candidate["loss"], start=1)]
    out += [(f"BatchNorm buffers after step {step}", dev, level(noise["stats"], step))
            for step, dev in candidate["stats"].items()]
    out += [(f"{key} after step {last}", candidate[key][last], level(noise[key], last))
            for key in ("params", "features")]
    return out


def needed_factor(candidate: dict, noise: dict, dtype) -> float:
    """The smallest factor the candidate passes with: its largest deviation / noise level ratio."""
    return max(dev / allowed for _, dev, allowed in checks(candidate, noise, dtype))


def violations(candidate: dict, noise: dict, truth_metrics, dtype, split, factor: float = FACTOR) -> list[str]:
    """What ``candidate`` (deviations from the truth) misses, empty when it trains as the authors' model:
    every deviation of :func:`checks` within ``factor`` x its noise level; rank-1 and mAP within the noise
    runs' difference from the truth plus one query's worth."""
    found = [f"{what}: relative deviation {dev:.2e} > {factor:g} x {level:.2e}"
             for what, dev, level in checks(candidate, noise, dtype) if not dev <= factor * level]
    slack = 1.0 / len(split.query) + 1e-9
    for name, have, noisy, want in zip(("rank-1", "mAP"), candidate["metrics"], noise["metrics"], truth_metrics):
        if not abs(have - want) <= abs(noisy - want) + slack:
            found.append(f"{name}: {have:.4f} vs the truth's {want:.4f} (float noise moved it to {noisy:.4f})")
    return found


def report(name: str, dev: dict) -> str:
    return (f"{name}: max loss deviation {max(dev['loss']):.2e} (step 1: {dev['loss'][0]:.2e}), params "
            f"{max(dev['params'].values()):.2e}, BN buffers {max(dev['stats'].values()):.2e}, features "
            f"{max(dev['features'].values()):.2e}, rank-1/mAP {dev['metrics'][0]:.3f}/{dev['metrics'][1]:.3f}")


# ---- the tests -------------------------------------------------------------------------------------------

def test_training_learns(runs, stream):
    """The setting is a real training run: the loss falls, and retrieval along training beats the initial
    weights' (mAP, averaged over the snapshots from step 5 on). One snapshot alone is no evidence: with
    four queries its mAP moves by a query's worth from one step to the next, and which way differs between
    CPUs (the float64 truth's rounding, and so its chaotic path, depends on the machine's kernels; one
    run here read 0.60 at step 1, 0.82 at step 20 and 0.54 at step 30)."""
    _, _, split = stream
    truth = runs["truth"]
    before = metrics(probe_for(split)(runs["model"]), split)[1]
    along = [metrics(truth["snapshots"][step]["probe"], split)[1] for step in SNAPSHOTS if step >= 5]
    assert sum(along) / len(along) > before, (before, along)
    assert sum(truth["losses"][-10:]) / 10 < truth["losses"][0], truth["losses"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_torch_path_trains_as_the_authors_model(runs, stream, dtype):
    _, _, split = stream
    truth = runs["truth"]
    truth_metrics = metrics(truth["snapshots"][STEPS]["probe"], split)
    name, noise_name = ("torch32", "noise32") if dtype == torch.float32 else ("torch64", "noise64")
    candidate = deviations(runs[name], truth, split, STEPS)
    noise = noise_deviations(runs[noise_name], truth, split, STEPS)
    print(f"\ntruth rank-1/mAP {truth_metrics[0]:.3f}/{truth_metrics[1]:.3f}\n" + report(noise_name, noise)
          + "\n" + report(name, candidate)
          + f"\n{name} needs factor {needed_factor(candidate, noise, dtype):.2f}")
    assert not violations(candidate, noise, truth_metrics, dtype, split)
    if dtype == torch.float32:    # the float32 reference itself passes its own criterion (a sanity check)
        assert not violations(noise, noise, truth_metrics, dtype, split, factor=1.0)


def test_float64_torch_path_tracks_tightly(runs, stream):
    """In float64 the converted model follows the authors' model to 1e-9 over the first TIGHT_STEPS steps,
    before chaotic growth takes rounding there, and within FACTOR x the float64 noise throughout (the test above)."""
    _, _, split = stream
    dev = deviations(runs["torch64"], runs["truth"], split, STEPS)
    assert max(dev["loss"][:TIGHT_STEPS]) < 1e-9, dev["loss"]
    assert max(dev["stats"][s] for s in range(1, TIGHT_STEPS + 1)) < 1e-9 and dev["params"][TIGHT_STEPS] < 1e-9


@pytest.mark.skipif(not (triton_runs_here()), reason="the Triton path runs on CPU tensors under TRITON_INTERPRET=1")
def test_triton_path_trains_as_the_authors_model(runs, stream):
    """The Triton path (interpreter) on the first TRITON_STEPS batches of the same stream."""
    _, batches, split = stream
    run = train(reid_train.converted(runs["model"], "triton", torch.float32), batches, split, steps=TRITON_STEPS,
                snapshots=())     # eval features once, after the last step: the interpreter's eval pass is slow
    truth = runs["truth"]
    truth_metrics = metrics(truth["snapshots"][TRITON_STEPS]["probe"], split)
    candidate = deviations(run, truth, split, TRITON_STEPS)
    noise = noise_deviations(runs["noise32"], truth, split, TRITON_STEPS)
    print("\n" + report("noise32", noise) + "\n" + report("triton32", candidate)
          + f"\ntriton32 needs factor {needed_factor(candidate, noise, torch.float32):.2f}")
    assert not violations(candidate, noise, truth_metrics, torch.float32, split)


def plant(model, error: str):
    """A small deliberate error in one block of a converted model: the first block's relation-embedding
    BatchNorm (gg_spatial, the one whose batch variance is smallest at step 1, 4e-3) with momentum
    0.101 instead of 0.1, or with its epsilon dropped (1e-12 instead of 1e-5)."""
    bn = model.backbone.rga_att1.gg_spatial[1]
    if error == "momentum":
        bn.momentum = bn.momentum * 1.01
    else:
        bn.eps = 1e-12        # F.batch_norm refuses 0 in training; 1e-12 is the dropped term for any real variance
    return model


@pytest.mark.parametrize("error", ["momentum", "eps"])
def test_planted_errors_are_rejected(runs, stream, error):
    _, batches, split = stream
    truth = runs["truth"]
    steps = 5
    model = plant(reid_train.converted(runs["model"], "torch", torch.float32), error)
    candidate = deviations(train(model, batches, split, steps=steps), truth, split, steps)
    noise = noise_deviations(runs["noise32"], truth, split, steps)
    found = violations(candidate, noise, metrics(truth["snapshots"][steps]["probe"], split), torch.float32, split)
    print(f"\nplanted {error}: needs factor {needed_factor(candidate, noise, torch.float32):.1f}; "
          + "; ".join(found[:3]))
    assert found, f"the criterion accepted a planted {error} error: {report('planted', candidate)}"
