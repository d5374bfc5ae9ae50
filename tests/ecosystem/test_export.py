"""torch.export and AOTInductor: an exported RGA block or RGA-Net is the eager module's function.

Deployment exports a model once (dynamic batch) and runs the program elsewhere: in the same
process (``ExportedProgram.module()``), after ``torch.export.save``/``load`` in a fresh process, or
compiled to a package by AOTInductor. Each must give what the eager module gives (outputs,
gradients, BatchNorm running statistics in train mode), and the Triton path's program must call
its custom ops, not fall back to PyTorch. A fresh process finds those ops after ``import
rga_triton``, which registers them and stays light (no torch._dynamo).
"""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rga_triton import dispatch
from rga_triton.common import tracing

from helpers import DEVICE, float32_tolerance, make_pair, rel_err, train_step
from paths import REPO_ROOT

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.needs_triton)]
SAME = 1e-6         # exported vs eager: the same ops on the same inputs, up to reduction order
pytestmark = [      # PyTorch's own, raised inside torch.export and AOTInductor
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"),
]
REPO = REPO_ROOT


def _run_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with this environment (TRITON_INTERPRET included) and the repo importable."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=600)


def _export(module, x):
    batch = torch.export.Dim("batch", min=1, max=4096)
    return torch.export.export(module, (x,), dynamic_shapes={"x": {0: batch}})


def _rga_ops(program) -> set:
    """The rga_triton ops an exported program calls, in nested graphs (grad-mode regions) too, mutating ones
    through auto_functionalized included."""
    targets = [node.args[0] if "auto_functionalized" in str(node.target) else node.target
               for gm in program.graph_module.modules() if isinstance(gm, torch.fx.GraphModule)
               for node in gm.graph.nodes if node.op == "call_function"]
    return {str(t).split(".")[1] for t in targets if str(t).startswith("rga_triton.")}


def _block(backend, train):
    """(float64 reference, float32 block on DEVICE, x float64): C=16 at 6x5, tails everywhere, BatchNorms moved."""
    ref, fast, x = make_pair(16, 6, 5, batch=2, cha_ratio=4, spa_ratio=3, down_ratio=2, device=DEVICE,
                             backend=backend)
    return ref.train(train), fast.train(train), x



def test_import_registers_the_ops_without_torch_dynamo():
    done = _run_python("""
        import sys
        import torch
        import rga_triton
        assert "torch._dynamo" not in sys.modules, "import rga_triton imported torch._dynamo"
        assert hasattr(torch.ops.rga_triton, "projection"), "the Triton path's ops are not registered"
    """)
    assert done.returncode == 0, done.stderr


def test_import_and_torch_path_without_triton():
    """Where Triton cannot be imported (macOS, Windows), the package imports without its ops and runs on torch."""
    done = _run_python("""
        import sys, warnings
        sys.modules["triton"] = None            # import triton now raises ImportError
        import torch
        import rga_triton
        assert not [m for m in sys.modules if m.startswith("rga_triton.ops") and m.endswith(("op", "kernels"))]
        auto = rga_triton.RGAModule(16, 30, cha_ratio=4, spa_ratio=3, down_ratio=2)
        plain = rga_triton.RGAModule(16, 30, cha_ratio=4, spa_ratio=3, down_ratio=2, backend="torch")
        plain.load_state_dict(auto.state_dict())
        x = torch.randn(2, 16, 6, 5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = auto(x)
        assert any("triton is not installed" in str(w.message) for w in caught), [str(w.message) for w in caught]
        assert torch.equal(out, plain(x))
    """)
    assert done.returncode == 0, done.stderr


def test_kernels_that_fail_to_import_leave_the_torch_path():
    """A Triton that imports but cannot build our kernels: import rga_triton warns once, the Triton path
    gives that as its reason (ValueError when asked for, fallback under "auto"), the torch path runs."""
    done = _run_python("""
        import sys, warnings
        sys.modules["rga_triton.ops.gating.kernels"] = None     # importing it now raises ImportError
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import rga_triton
        assert [str(w.message) for w in caught if "Triton path is unavailable" in str(w.message)], caught
        args = (16, 30, True, True, 4, 3, 2)
        x = torch.randn(2, 16, 6, 5)
        try:
            rga_triton.RGAModule(*args, backend="triton")(x)
        except ValueError as exc:
            assert "operators failed to import (ModuleNotFoundError" in str(exc), exc
        else:
            raise AssertionError("backend='triton' ran without its operators")
        auto, plain = rga_triton.RGAModule(*args), rga_triton.RGAModule(*args, backend="torch")
        plain.load_state_dict(auto.state_dict())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = auto(x)
        assert any("operators failed to import" in str(w.message) for w in caught), caught
        assert torch.equal(out, plain(x))
    """)
    assert done.returncode == 0, done.stderr


def test_constant_marker_is_the_one_torch_compiler_sets():
    """tracing.assume_constant_result sets what torch.compiler.assume_constant_result sets, and only that."""
    def probe():
        return None
    before = set(vars(probe))
    torch.compiler.assume_constant_result(probe)
    assert set(vars(probe)) - before == {tracing.MARKER}
    for fn in (dispatch._capability, dispatch.warn_once, dispatch.choose, dispatch.exporting_to_onnx):
        assert getattr(fn, tracing.MARKER) is True, fn.__name__


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_exported_block_matches_eager_at_other_batch_sizes(backend, train):
    """Export at B=2 with a dynamic batch; run B=3 then B=1 forward + backward: output (also against the
    float64 reference), grad x, parameter gradients and running statistics as the eager block's."""
    ref, fast, x = _block(backend, train)
    eager = copy.deepcopy(fast)
    program = _export(fast, x.float().to(DEVICE))
    if backend == "triton":
        per_branch = {"projection", "relation", "gate_logit"}
        per_branch |= {"projection_norm", "relation_norm"} if train else set()
        assert _rga_ops(program) == per_branch | {"apply_gates"}
    exported = program.module()
    gen = torch.Generator().manual_seed(1)
    for batch in (3, 1):
        xb = torch.randn(batch, *x.shape[1:], generator=gen, dtype=torch.float64)
        grad_out = torch.randn(xb.shape, generator=gen).to(DEVICE)
        e_out, e_gx, e_grads = train_step(eager, xb.float().to(DEVICE), grad_out)
        out, gx, grads = train_step(exported, xb.float().to(DEVICE), grad_out)
        assert rel_err(out, e_out) <= SAME, f"output, B={batch}"
        assert rel_err(gx, e_gx) <= SAME, f"grad x, B={batch}"
        for name, grad in e_grads.items():     # 10x: some are cancellation residues (helpers.grad_error)
            assert rel_err(grads[name], grad) <= 10 * SAME, f"grad {name}, B={batch}"
        with torch.no_grad():
            expected = ref(xb)
        assert rel_err(out, expected) <= float32_tolerance(DEVICE), f"output vs the reference, B={batch}"
    state = exported.state_dict()
    for name, value in eager.state_dict().items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(state[name], value), name
        else:
            assert rel_err(state[name], value) <= SAME, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_decomposed_train_program_matches_eager(backend):
    """run_decompositions() (the step before AOTInductor) keeps the ops, functionalizing the ones that move
    running statistics: output and running statistics as eager's, in train mode."""
    _, fast, x = _block(backend, train=True)
    eager = copy.deepcopy(fast)
    program = _export(fast, x.float().to(DEVICE)).run_decompositions()
    if backend == "triton":
        assert {"projection_norm", "relation_norm", "apply_gates"} <= _rga_ops(program)
    decomposed = program.module()
    xb = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        assert rel_err(decomposed(xb), eager(xb)) <= SAME
    state = decomposed.state_dict()
    for name, value in eager.state_dict().items():
        assert rel_err(state[name].double(), value.double()) <= SAME, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_program_loads_in_a_fresh_process(backend, tmp_path):
    """torch.export.save, then torch.export.load where only rga_triton is imported: the same output."""
    _, fast, x = _block(backend, train=False)
    xf = x.float().to(DEVICE)
    torch.export.save(_export(fast, xf), tmp_path / "rga.pt2")
    torch.save({"x": xf[:1].cpu(), "out": fast(xf[:1]).detach().cpu()}, tmp_path / "io.pt")
    done = _run_python(f"""
        import torch
        import rga_triton
        program = torch.export.load({str(tmp_path / "rga.pt2")!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        out = program.module()(io["x"].to({DEVICE!r})).cpu()
        err = float((out - io["out"]).norm() / io["out"].norm())
        assert err <= {SAME}, err
    """)
    assert done.returncode == 0, done.stderr


@pytest.mark.needs_triton
def test_exported_rga_net_matches_eager():
    """RGA-Net on the Triton path (RGA-S blocks, small input: the block tests cover the rest), eval mode,
    exported with a dynamic batch: features as eager's at another batch size."""
    from rga_triton.models import rga_net

    torch.manual_seed(0)
    net = rga_net(4, height=32, width=16, use_channel=False, cha_ratio=64, spa_ratio=2, down_ratio=2,
                  backend="triton").to(DEVICE).eval()
    gen = torch.Generator().manual_seed(1)
    program = _export(net, torch.randn(2, 3, 32, 16, generator=gen).to(DEVICE))
    assert {"projection", "relation", "gate_logit", "apply_gates"} <= _rga_ops(program)
    x = torch.randn(3, 3, 32, 16, generator=gen).to(DEVICE)
    with torch.no_grad():
        assert rel_err(program.module()(x), net(x)) <= SAME


@pytest.mark.slow
@pytest.mark.needs_triton
def test_aoti_package_runs_the_triton_path(tmp_path):
    """AOTInductor compiles the exported eval block into a package; loaded, it calls the custom ops
    (through Python: the process imports rga_triton) and gives eager's output at another batch size."""
    _, fast, x = _block("triton", train=False)
    path = torch._inductor.aoti_compile_and_package(_export(fast, x.float().to(DEVICE)),
                                                    package_path=str(tmp_path / "rga.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    xb = torch.randn(5, *x.shape[1:], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        assert rel_err(loaded(xb), fast(xb)) <= SAME
