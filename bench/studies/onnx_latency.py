"""onnxruntime CPU latency of RGA-Net: the authors' blocks against the same model converted by
``rga_triton.convert(..., backend="torch")``, both exported the same way (torch.onnx.export, dynamo).

Needs onnx, onnxscript and onnxruntime (the toolbox venv of ``.ci/run`` has them):

    python bench/studies/onnx_latency.py --size 256x128 --batches 1,8
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import rga_triton  # noqa: E402
from reference import RGA_Module  # noqa: E402
from rga_triton.models import rga_net  # noqa: E402
from rga_triton.testing import rel_err  # noqa: E402


def models(height: int, width: int, num_classes: int = 751):
    """(the authors' RGA-Net: reference blocks, that model converted), eval mode, the same weights."""
    torch.manual_seed(0)
    model = rga_net(num_classes, height=height, width=width, backend="torch").eval()
    authors = copy.deepcopy(model)
    for k in range(1, 5):
        block = getattr(model.backbone, f"rga_att{k}")
        ref = RGA_Module(block.in_channel, block.in_spatial)
        ref.load_state_dict(block.state_dict())
        setattr(authors.backbone, f"rga_att{k}", ref.eval())
    return authors, rga_triton.convert(copy.deepcopy(authors), backend="torch").eval()


def main(argv=None) -> int:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256x128", help="input H x W (default 256x128)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per batch (median reported)")
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.lower().split("x"))
    batches = [int(b) for b in args.batches.split(",")]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sessions = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, model in zip(("authors", "converted"), models(height, width)):
            path = os.path.join(folder, f"{name}.onnx")
            started = time.time()
            torch.onnx.export(model, (torch.randn(2, 3, height, width),), path, dynamo=True,
                              dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
                              input_names=["images"], output_names=["features"])
            print(f"{name}: exported in {time.time() - started:.1f} s", flush=True)
            sessions[name] = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    print(f"RGA-Net {height}x{width}, onnxruntime {ort.__version__} CPU, {opts.intra_op_num_threads} threads, "
          f"median of {args.runs} runs")
    for batch in batches:
        images = np.random.RandomState(batch).randn(batch, 3, height, width).astype(np.float32)
        out, ms = {}, {}
        for name, session in sessions.items():
            out[name] = session.run(None, {"images": images})[0]        # warm-up
            times = []
            for _ in range(args.runs):
                started = time.perf_counter()
                session.run(None, {"images": images})
                times.append(time.perf_counter() - started)
            ms[name] = statistics.median(times) * 1e3
        err = rel_err(torch.from_numpy(out["converted"]), torch.from_numpy(out["authors"]))
        print(f"  B={batch}: authors {ms['authors']:.1f} ms, converted {ms['converted']:.1f} ms "
              f"(x{ms['authors'] / ms['converted']:.2f}); outputs differ by rel err {err:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
