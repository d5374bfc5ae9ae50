"""ONNX export from every backend: one exported file (dynamic batch) run by onnxruntime equals eager.

The Triton path's exported program calls custom ops (``torch.ops.rga_triton.*``) that ONNX has no
function for. While ``torch.onnx.export`` traces, the dispatch asks
``rga_triton.integrations.onnx.exporting_to_onnx()`` and picks the torch path, so a model whose
blocks say ``backend="triton"`` exports the torch path's graph: standard ONNX ops only, the same
graph as ``backend="torch"``. Eval mode (what deployment runs), float32: within the numerical
contract (rel err < 1e-4) of the eager module, at batch 1 and 5 through one file.
"""

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

import rga_triton  # noqa: E402
from rga_triton.integrations.onnx import exporting_to_onnx  # noqa: E402
from rga_triton.models import rga_net  # noqa: E402
from rga_triton.testing import rel_err  # noqa: E402

from helpers import DEVICE  # noqa: E402

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.needs_triton)]
FLOAT32 = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def export_onnx(model: torch.nn.Module, x: torch.Tensor, path) -> None:
    """The deployment recipe (docs/toolboxes.md): eval mode, the dynamo exporter, a dynamic batch axis."""
    model.eval()
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes={"x": {0: batch}},
                      input_names=["images"], output_names=["features"])


def _export_or_explain(model, x, path):
    try:
        export_onnx(model, x, path)
    except Exception as exc:   # noqa: BLE001 - the exporter's errors are many; say what is missing
        if "rga_triton" in str(exc):
            pytest.fail(f"the exported graph holds rga_triton's custom ops: the dispatch does not pick the torch path "
                        f"while rga_triton.integrations.onnx.exporting_to_onnx() is True ({type(exc).__name__})")
        raise


def _onnxruntime(path, batches, eager):
    """rel err of onnxruntime's output against ``eager(x)`` for each batch size, through one session."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "images"
    errors = {}
    for batch, x in batches.items():
        out, = session.run(None, {"images": x.cpu().numpy()})
        with torch.no_grad():
            errors[batch] = rel_err(torch.from_numpy(out), eager(x))
    return errors


def _graph(path) -> list[tuple[str, str]]:
    """(domain, op type) of every node of an ONNX file, in order."""
    return [(node.domain, node.op_type) for node in onnx.load(str(path)).graph.node]


def test_exporting_to_onnx_is_true_only_while_torch_onnx_export_traces(tmp_path):
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(exporting_to_onnx())
            return x * 2

    assert not exporting_to_onnx()
    torch.onnx.export(Probe().eval(), (torch.randn(2, 3),), str(tmp_path / "probe.onnx"), dynamo=True)
    assert seen and all(seen)
    assert not exporting_to_onnx()
    torch.export.export(Probe(), (torch.randn(2, 3),))          # torch.export alone keeps the backend's ops
    assert seen[-1] is False


def _block(backend):
    torch.manual_seed(0)
    block = rga_triton.RGAModule(16, 6 * 5, cha_ratio=4, spa_ratio=3, down_ratio=2, backend=backend).to(DEVICE)
    block(torch.randn(4, 16, 6, 5, device=DEVICE))             # running statistics move off their initial values
    return block.eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_exports_from_every_backend(backend, tmp_path):
    block = _block(backend)
    _export_or_explain(block, torch.randn(2, 16, 6, 5, device=DEVICE), tmp_path / "block.onnx")
    graph = _graph(tmp_path / "block.onnx")
    assert {domain for domain, _ in graph} <= {"", "ai.onnx"}, graph       # standard ops only
    if backend != "torch":
        export_onnx(_block("torch"), torch.randn(2, 16, 6, 5, device=DEVICE), tmp_path / "torch.onnx")
        assert graph == _graph(tmp_path / "torch.onnx")                   # the torch path's graph
    batches = {b: torch.randn(b, 16, 6, 5, device=DEVICE) for b in (1, 5)}
    errors = _onnxruntime(tmp_path / "block.onnx", batches, block)
    assert all(err < FLOAT32 for err in errors.values()), errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_rga_net_exports_from_every_backend(backend, tmp_path):
    torch.manual_seed(0)
    model = rga_net(5, height=64, width=32, spa_ratio=2, down_ratio=2, backend="torch").to(DEVICE)
    model(torch.randn(4, 3, 64, 32, device=DEVICE))                       # train mode: BatchNorms move
    blocks = [m for m in model.modules() if isinstance(m, rga_triton.RGAModule)]
    for block in blocks:
        block.backend = backend                                           # eager and the export: this backend
    _export_or_explain(model, torch.randn(2, 3, 64, 32, device=DEVICE), tmp_path / "rga_net.onnx")
    graph = _graph(tmp_path / "rga_net.onnx")
    assert {domain for domain, _ in graph} <= {"", "ai.onnx"}
    assert model.training is False and len(blocks) == 4
    batches = {b: torch.randn(b, 3, 64, 32, device=DEVICE) for b in (1, 5)}
    errors = _onnxruntime(tmp_path / "rga_net.onnx", batches, model)
    assert all(err < FLOAT32 for err in errors.values()), errors
    out, = ort.InferenceSession(str(tmp_path / "rga_net.onnx")).run(None, {"images": batches[5].cpu().numpy()})
    assert out.shape == (5, 2048)                                         # eval: the re-ID feature
