"""ONNX export: tell the dispatch that ``torch.onnx.export`` is tracing, so it picks the torch path.

The Triton path calls custom operators (``torch.ops.rga_triton.*``) that ONNX has no function
for: ``torch.onnx.export(model, ..., dynamo=True)`` fails on them with ``DispatchError: No ONNX
function found for rga_triton.projection``. The torch path computes the same function from
standard ATen ops, which every ONNX runtime runs. So while an ONNX export traces a model, every
RGA block should run the torch path, whatever its ``backend`` says; the exported graph is then
the torch path's, the same for every backend.

``exporting_to_onnx`` lives in ``rga_triton/common/tracing.py`` (a leaf the dispatch imports)
and imports nothing of torch.onnx: it only looks at the flags the exporters set, in the modules
that set them, if they have been imported at all (``import torch`` does not import torch.onnx;
the exporters import these modules before they trace).

Checked on torch 2.13 and 2.14:

- the dynamo exporter (``dynamo=True``, the default since torch 2.9) wraps
  ``torch.onnx.export`` in ``_flags.set_onnx_exporting_flag``, which sets
  ``torch.onnx._internal.exporter._flags._is_onnx_exporting`` for the whole call, the
  ``torch.export.export`` capture included;
- the TorchScript exporter (``dynamo=False``) sets ``GLOBALS.in_onnx_export`` in
  ``torch.onnx._internal.torchscript_exporter._globals`` (``torch.onnx.utils`` on older torch).

``torch.onnx.is_in_onnx_export()`` reads the same two flags, but it imports torch.onnx on every
call, and torch.compile's dynamo replaces a call to it by the constant ``False``; this function
is marked ``assume_constant_result`` (``common/tracing.py``) so that dynamo calls it once and
keeps its answer as a constant of the graph instead.
"""
from ..common.tracing import exporting_to_onnx  # noqa: F401  (the function this module documents)
