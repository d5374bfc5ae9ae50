"""No stale answers (issue 26): every change an ordinary PyTorch idiom makes to a parameter, a buffer or
a module attribute shows in the next call, on every backend.

The Triton path derives stacked weights and folded BatchNorm rows from the module on each call. A memo
keyed on ``(data_ptr, _version)`` served outputs from old weights after updates through ``.data``
(EMA / mean-teacher), after a parameter was re-pointed at other storage and that storage changed,
and after a BatchNorm's ``eps`` changed. Each case here is checked against the reference in float64,
after a first call that would have memoised.
"""
import copy

import pytest
import torch

import rga_triton

from helpers import assert_close, float32_tolerance, make_pair

BACKENDS = ["torch", "triton"]


def _eval_call(module, x):
    with torch.no_grad():
        return module(x.float()).double()


def _check(ref, fast, x, what):
    with torch.no_grad():
        expected = ref(x)
    assert_close(_eval_call(fast, x), expected, float32_tolerance("cpu"), what)


def _ema(teacher, student, momentum=0.5):
    """mean-teacher / MoCo: teacher <- m teacher + (1 - m) student, through .data (no version bump)."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.data.mul_(momentum).add_(s.data, alpha=1 - momentum)


@pytest.fixture(scope="module")
def pairs():
    """(reference float64, backend block float32, x) per backend, in eval."""
    out = {}
    for backend in BACKENDS:
        ref, fast, x = make_pair(16, 8, 4, down_ratio=2, backend=backend, seed=3)
        out[backend] = (ref.eval(), fast.eval(), x)
    return out


def _fresh(pairs, backend):
    ref, fast, x = pairs[backend]
    return copy.deepcopy(ref), copy.deepcopy(fast), x


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_through_data_shows(pairs, backend):
    ref, fast, x = _fresh(pairs, backend)
    _eval_call(fast, x)                                     # a first call (the old memo stored its folds here)
    student_ref, student_fast, _ = make_pair(16, 8, 4, down_ratio=2, backend=backend, seed=4)
    _ema(ref, student_ref)
    _ema(fast, student_fast)
    with torch.no_grad():
        for (_, t), (_, s) in zip(fast.named_buffers(), ref.named_buffers()):
            t.data.copy_(s.data)                            # buffers too (EMA of BatchNorm statistics)
    _check(ref, fast, x, f"{backend}: output after an update through .data")


@pytest.mark.parametrize("backend", BACKENDS)
def test_aliased_storage_change_shows(pairs, backend):
    ref, fast, x = _fresh(pairs, backend)
    _eval_call(fast, x)
    weight = fast.gg_spatial[0].weight
    buf = weight.detach().clone()
    weight.data = buf                                       # the parameter now lives in buf's storage
    _eval_call(fast, x)
    buf.mul_(-1.5)                                          # buf changes; the parameter's version does not
    with torch.no_grad():
        ref.gg_spatial[0].weight.mul_(-1.5)
    _check(ref, fast, x, f"{backend}: output after its storage changed through an alias")


@pytest.mark.parametrize("backend", BACKENDS)
def test_changed_batchnorm_eps_shows(pairs, backend):
    ref, fast, x = _fresh(pairs, backend)
    _eval_call(fast, x)
    for block in (ref, fast):
        block.gg_spatial[1].eps = 0.5
        block.W_channel[1].eps = 0.25
    _check(ref, fast, x, f"{backend}: output after BatchNorm eps changed")


@pytest.mark.parametrize("backend", BACKENDS)
def test_changed_momentum_and_affine_swap_show(pairs, backend):
    """Other attribute-level changes: a BatchNorm's weight replaced by a new Parameter, momentum changed
    before a train step (running statistics move by the new momentum)."""
    ref, fast, x = _fresh(pairs, backend)
    _eval_call(fast, x)
    for block in (ref, fast):
        bn = block.theta_spatial[1]
        bn.weight = torch.nn.Parameter(bn.weight.detach() * 2 - 0.25)
    _check(ref, fast, x, f"{backend}: output after a BatchNorm weight was replaced")
    for block in (ref, fast):
        block.gx_channel[1].momentum = 0.7
        block.train()
    with torch.no_grad():
        fast(x.float())
        ref(x)
    assert_close(fast.gx_channel[1].running_mean.double(), ref.gx_channel[1].running_mean, 1e-5,
                 f"{backend}: running mean after momentum changed")


def test_block_holds_no_derived_state(pairs):
    """Nothing derived from the weights stays on a module between calls: no key, however cheap, is
    trusted to notice every change (``.data`` updates bump no version)."""
    _, fast, x = _fresh(pairs, "triton")
    _eval_call(fast, x)
    held = [name for m in fast.modules() for name in vars(m) if name.startswith("_rga_triton")]
    assert not held, f"derived state kept on the modules: {held}"


@pytest.mark.needs_triton
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_threads_calling_one_block_under_the_interpreter(pairs, train):
    """Triton's interpreter is not thread-safe: block calls from several threads are serialised there,
    so each returns the single-threaded answer and every BatchNorm counts every batch once."""
    import threading

    _, fast, x = _fresh(pairs, "triton")
    fast.train(train)
    xf = x.float()
    tracked = [int(bn.num_batches_tracked) for bn in fast.modules() if isinstance(bn, torch.nn.BatchNorm2d)]
    results, errors = [], []

    def call():
        try:
            out = fast(xf.clone().requires_grad_(train))
            if train:
                out.sum().backward()
            results.append(out.detach())
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 4
    if not train:
        assert all(torch.equal(r, results[0]) for r in results)
    now = [int(bn.num_batches_tracked) for bn in fast.modules() if isinstance(bn, torch.nn.BatchNorm2d)]
    assert now == [t + (4 if train else 0) for t in tracked]


@pytest.mark.needs_triton
def test_frozen_derives_once_and_forgets_on_exit(pairs):
    """rga_triton.frozen(model): eval no-grad calls reuse what the first derived (a .data update inside is
    not seen, as documented); a train-mode call inside drops it; leaving the context forgets it."""
    ref, fast, x = _fresh(pairs, "triton")
    expected = _eval_call(fast, x)
    with rga_triton.frozen(fast):
        assert torch.equal(_eval_call(fast, x), expected)
        with torch.no_grad():
            fast.gg_spatial[0].weight.data.mul_(-1.5)       # broken promise: not seen inside
        assert torch.equal(_eval_call(fast, x), expected)
        fast.train()
        fast(x.float().requires_grad_(True)).sum().backward()   # a train step (ops route) drops them too
        fast.eval()
        with torch.no_grad():
            ref.gg_spatial[0].weight.mul_(-1.5)
            for (_, t), (_, s) in zip(fast.named_buffers(), ref.named_buffers()):
                s.copy_(t)
        _check(ref, fast, x, "inside frozen, after a train call")
    with torch.no_grad():
        fast.gg_spatial[0].weight.data.mul_(-1.0)
        ref.gg_spatial[0].weight.mul_(-1.0)
    _check(ref, fast, x, "after frozen")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        with rga_triton.frozen("not a model"):
            pass
