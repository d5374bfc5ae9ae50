"""Time every RGA implementation side by side over RGA-Net shapes; write CSV, plots and a summary.

    python bench/sweep.py                      # quick preset on a CPU, paper preset on a GPU
    python bench/sweep.py --preset paper --dtypes bfloat16 --batch 64 --branches RGA-SC
    python bench/sweep.py --shapes 256x64x32 --impls reference,torch,triton --modes train
    python bench/lib/plots.py bench/results/<device>/sweep.csv   # redraw plots and summary.md

Implementations (same inputs, same parameters: one state_dict loaded into each):
  reference             reference.RGA_Module, eager (materialised N x N affinity)
  compile               torch.compile(reference), default mode (--max-autotune adds
                        compile-max-autotune)
  torch                 rga_triton.RGAModule(backend="torch"): reassociated, plain PyTorch
  triton, triton-tiled  rga_triton.RGAModule(backend="triton") with its default algorithm and
                        with algorithm="tiled" (CUDA; skipped on a CPU unless TRITON_INTERPRET=1,
                        which runs them through Triton's interpreter: a check, not a timing)
  triton-graphs         torch.compile(RGAModule(backend="triton"), mode="reduce-overhead"): CUDA
                        graphs replay the step's kernel launches, for shapes where host time
                        dominates (opt-in, like compile-max-autotune)

Every timed row is preceded by a correctness check against the reference run in float64
on the same inputs (output, and grad of x in train mode). On a CPU the implementations of a case
are timed interleaved and each speed-up is the median of paired ratios, less the rounds a load
spike hit; a row whose median stays uncertain (its 95 % confidence interval spans more than 1.5x,
it rests on fewer than 6 unspiked rounds, or their ratios' middle half spans more than 2x) is marked
noisy and left out of the headline means. Results go to
bench/results/<device>/ (sweep.csv, PNG plots, summary.md, errors.log if anything failed).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)   # `reference`, `bench` and an uninstalled `rga_triton`

import torch  # noqa: E402

import rga_triton  # noqa: E402
from bench.lib import cost_model, hardware, impls, report, timing  # noqa: E402
from bench.lib.impls import Case  # noqa: E402
from bench.lib.rows import megabytes  # noqa: E402
from rga_triton.testing import rel_err  # noqa: E402

# Input resolution H x W -> feature maps of ResNet-50 stages in RGA-Net (last stride 1):
# stage: (channels, downsampling factor).
STAGES = {1: (256, 4), 2: (512, 8), 3: (1024, 16), 4: (2048, 16)}
PRESETS = {
    "quick": {"shapes": ["64x16x8", "64x32x16"], "batch": [2], "branches": ["RGA-SC"],
              "modes": ["eval", "train"], "dtypes": ["float32"]},
    "paper": {"inputs": ["256x128", "384x128", "512x256"], "stages": [1, 2, 3, 4], "batch": [1, 16, 64],
              "branches": ["RGA-S", "RGA-C", "RGA-SC"], "modes": ["eval", "train"],
              "dtypes": ["float32", "bfloat16", "float16"]},
}
MODES = ("eval", "train")
DTYPES = ("float32", "bfloat16", "float16")

COLUMNS = [
    "impl", "algorithm", "branch", "mode", "dtype", "batch", "C", "H", "W", "N", "input_hw", "stage",
    "status", "correct", "rel_err", "rel_err_grad_x", "tolerance", "tolerance_grad_x", "checked_against",
    "time_ms_median", "time_ms_p20", "time_ms_p80", "runs", "host_ms", "graphs_skipped", "first_call_s",
    "peak_mem_mb", "flops", "min_bytes", "intensity", "tflops", "gbps", "speedup_vs_reference",
    "speedup_p20", "speedup_p80", "ci_low", "ci_high", "noisy", "load_avg", "cpu_cores", "threads",
    "ceiling_tflops", "ceiling_gbps", "spec_tflops", "spec_gbps", "spec_label", "note",
    "device", "driver", "cuda", "torch", "triton", "python", "tf32", "git_commit", "timestamp",
]
KEY = ("impl", "branch", "mode", "dtype", "batch", "C", "H", "W")


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _dims(text: str, n: int) -> tuple[int, ...]:
    parts = text.lower().split("x")
    if len(parts) != n or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"{text!r} is not {'x'.join(['<int>'] * n)}")
    return tuple(int(p) for p in parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/sweep.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="quick: C=64 at 16x8 and 32x16, B=2, RGA-SC, float32 (default on a CPU); "
                        "paper: RGA-Net stages 1-4 of 256x128, 384x128, 512x256 inputs, B=1,16,64, all "
                        "branches, modes and dtypes (default on a GPU). Other flags override parts of it.")
    p.add_argument("--impls", help=f"comma list from {','.join(impls.IMPLS)} (default: "
                                   f"{','.join(impls.DEFAULT_IMPLS)})")
    p.add_argument("--shapes", help="comma list of feature-map shapes CxHxW, e.g. 256x64x32 (overrides --inputs)")
    p.add_argument("--inputs", help="comma list of input image sizes HxW, e.g. 256x128; RGA-Net stage shapes "
                                    "are derived from them (see --stages)")
    p.add_argument("--stages", help="comma list of RGA-Net stages 1-4 for --inputs (default 1,2,3,4)")
    p.add_argument("--batch", help="comma list of batch sizes")
    p.add_argument("--branches", help="comma list from RGA-S,RGA-C,RGA-SC")
    p.add_argument("--modes", help="comma list from eval,train (train = forward + backward)")
    p.add_argument("--dtypes", help="comma list from float32,bfloat16,float16 (CPU: float32 only)")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available)")
    p.add_argument("--out", help="output directory (default bench/results/<device name>)")
    p.add_argument("--repeat", type=int, help="GPU: timed runs per row (default 50; fewer for steps slower than "
                                              f"{timing.BUDGET_S:g} s / repeat, at least {timing.MIN_RUNS}). CPU: "
                                              "the least number of interleaved rounds (default 5); more follow "
                                              "until the ratios settle, up to --case-budget")
    p.add_argument("--case-budget", type=float, default=timing.CASE_BUDGET_S, metavar="SECONDS",
                   help="CPU: seconds of interleaved rounds per implementation and case before an unsettled row "
                        f"is left noisy (default {timing.CASE_BUDGET_S:g}; at least {timing.MIN_RUNS} rounds; a "
                        f"case that would leave a row noisy goes on, up to {timing.BUDGET_STRETCH:g}x it)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU: torch.set_num_threads(N) for every implementation (default: PyTorch's own, one per "
                        "core or OMP_NUM_THREADS). 1 measures one core, not the machine, and "
                        "does not give a busy machine the idle one's ratios (measured: bench/README.md)")
    p.add_argument("--max-autotune", action="store_true", help="also time torch.compile(mode='max-autotune')")
    p.add_argument("--tf32", choices=("default", "on", "off"), default="default",
                   help="float32 TF32 for cuBLAS and cuDNN: leave PyTorch's defaults, or force on/off")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in <out>/sweep.csv and run only the missing ones")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="start no new case after this many seconds (then write plots; --resume continues; "
                        "with --tune, the tuned shapes are kept)")
    p.add_argument("--no-plots", action="store_true", help="write the CSV and summary only")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--tune", action="store_true",
                   help="run rga_triton.tune(...) for the selected shapes and dtypes, print where it wrote the "
                        "configuration file, and exit")
    return p


def resolve_args(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """(device, impl names, cases) from the flags and the preset."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    preset = dict(PRESETS[args.preset or ("paper" if device.type == "cuda" else "quick")])
    for name in ("batch", "branches", "modes", "dtypes", "inputs", "stages"):
        if getattr(args, name):
            preset[name] = _csv_list(getattr(args, name))
    if args.shapes:
        preset["shapes"] = _csv_list(args.shapes)
        preset.pop("inputs", None)
    elif args.inputs:
        preset.pop("shapes", None)
        preset.setdefault("stages", [1, 2, 3, 4])

    names = _csv_list(args.impls) if args.impls else list(impls.DEFAULT_IMPLS)
    if args.max_autotune and "compile-max-autotune" not in names:
        names.insert(names.index("compile") + 1 if "compile" in names else len(names), "compile-max-autotune")
    for name in names:
        if name not in impls.IMPLS:
            parser.error(f"--impls: unknown implementation {name!r}; choose from {', '.join(impls.IMPLS)}")
    names = sorted(dict.fromkeys(names), key=lambda n: n != "reference")   # reference first: speed-ups

    shapes = []   # (C, H, W, input_hw, stage)
    try:
        for text in preset.get("shapes", []):
            shapes.append((*_dims(text, 3), "", ""))
        for text in preset.get("inputs", []):
            ih, iw = _dims(text, 2)
            for stage in preset.get("stages", [1, 2, 3, 4]):
                channels, down = STAGES[int(stage)]
                if ih % down or iw % down:
                    raise ValueError(f"input {text} is not divisible by {down} (stage {stage})")
                shapes.append((channels, ih // down, iw // down, f"{ih}x{iw}", int(stage)))
        batches = sorted({int(b) for b in preset["batch"]})
        if batches[0] < 1:
            raise ValueError(f"batch sizes must be >= 1, got {batches[0]}")
    except (ValueError, KeyError) as exc:
        parser.error(f"bad shape, input, stage or batch: {exc}")
    for value, allowed, flag in ((preset["branches"], cost_model.BRANCHES, "--branches"),
                                 (preset["modes"], MODES, "--modes"), (preset["dtypes"], DTYPES, "--dtypes")):
        bad = [v for v in value if v not in allowed]
        if bad:
            parser.error(f"{flag}: unknown {bad}; choose from {', '.join(allowed)}")
    dtypes = list(preset["dtypes"])
    if device.type == "cpu" and dtypes != ["float32"]:
        dropped = [d for d in dtypes if d != "float32"]
        dtypes = ["float32"]
        if not args.quiet:
            print(f"note: the CPU sweep runs float32 only; dropping {', '.join(dropped)}")
    for c, h, w, _, _ in shapes:
        for branch in preset["branches"]:
            try:
                rga_triton.common.checks.block_sizes(c, h * w, *cost_model.BRANCHES[branch], 8, 8, 8)
            except ValueError as exc:
                parser.error(f"shape {c}x{h}x{w} ({branch}) is too small for RGA with ratios 8: {exc}")

    cases = [Case(c, h, w, batch, branch, mode, dtype, input_hw, stage)
             for c, h, w, input_hw, stage in shapes
             for branch in preset["branches"]
             for dtype in dtypes
             for mode in preset["modes"]
             for batch in batches]
    return device, names, cases


def set_tf32(choice: str) -> None:
    if choice != "default":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = choice == "on"


def run_tune(device, cases, args) -> int:
    """``--tune``: rga_triton.tune over the selected cases' shapes, batches, branches, dtypes and modes."""
    try:
        path = rga_triton.tune(shapes=sorted({(c.c, c.h, c.w) for c in cases}),
                               batch_sizes=sorted({c.batch for c in cases}),
                               branches=sorted({c.branch for c in cases}),
                               dtypes=sorted({getattr(torch, c.dtype) for c in cases}, key=str),
                               modes=sorted({c.mode for c in cases}), device=device,
                               time_limit=args.time_limit, verbose=not args.quiet)
    except ValueError as exc:       # e.g. no GPU: tuning needs one
        print(f"--tune: {exc}", file=sys.stderr)
        return 2
    print(f"tuned configuration written to {path}")
    return 0


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _key(row: dict) -> tuple:
    return tuple(str(row[k]) for k in KEY)


class Sweep:
    """Runs the cases, one row per implementation, appending to the CSV as it goes."""

    def __init__(self, device, names, cases, args, out_dir):
        self.device, self.names, self.cases, self.args, self.out_dir = device, names, cases, args, out_dir
        self.repeat = args.repeat or (50 if device.type == "cuda" else 5)
        self.env = hardware.environment(device)
        self.csv_path = os.path.join(out_dir, "sweep.csv")
        self.errors_path = os.path.join(out_dir, "errors.log")
        self.oom_at: dict[tuple, int] = {}       # (impl, shape, branch, mode, dtype) -> batch that ran out
        self.triton_reason = impls.triton_unavailable(device)
        self.done: set[tuple] = set()
        self.previous_reference_ms: dict[tuple, float] = {}   # --resume: reference times already in the CSV
        self.reference_grad_err: dict[tuple, float] = {}      # the reference's own grad x error per case
        self.failures = 0
        self.pending: dict[str, tuple] = {}   # CPU: impl -> (step, resets), timed interleaved after the case's checks
        self.skip_reasons_shown: set[str] = set()
        self.rows_run = 0       # rows measured by this process (the ETA's rate; --resume skips the rest)

    def log(self, text: str) -> None:
        if not self.args.quiet:
            print(text, flush=True)

    # ---- ceilings ------------------------------------------------------------------------------
    def measure_ceilings(self) -> None:
        dtypes = sorted({c.dtype for c in self.cases})
        self.ceilings = hardware.measure_ceilings(self.device, dtypes)
        self.spec = hardware.spec_sheet(self.env["device"]) if self.device.type == "cuda" else None
        rates = ", ".join(f"{d} {t:.3g}" for d, t in self.ceilings["matmul_tflops"].items())
        tf32 = f" (TF32: {hardware.tf32_state()})" if self.device.type == "cuda" else ""
        load, cores = timing.machine_load()
        if load is not None and load > cores:
            self.log(f"note: the machine is busy: load average {load:.1f} on {cores} cores. CPU times then measure "
                     f"the load as much as the code; the interleaved, paired ratios hold up better, and rows whose "
                     f"median ratio stays uncertain are marked noisy. For clean CPU numbers use an idle machine "
                     f"(bench/README.md says what --threads 1 does and does not fix)")
        self.log(f"device: {self.env['device']}; torch {self.env['torch']}, triton {self.env['triton']}, "
                 f"driver {self.env['driver'] or '-'}")
        self.log(f"measured ceilings: copy {self.ceilings['copy_gbps']:.0f} GB/s (read + write), "
                 f"{self.ceilings['matmul_n']}^3 matmul TFLOP/s: {rates}{tf32}")
        if self.spec:
            spec = ", ".join(f"{d} {t:g}" for d, t in self.spec["tflops"].items())
            self.log(f"{self.spec['label']}: {self.spec['gbps']} GB/s, dense TFLOP/s: {spec}")

    # ---- one row ---------------------------------------------------------------------------------
    def base_row(self, impl: str, case: Case, algorithm: str | None = None) -> dict:
        """The row's fixed columns; ``algorithm``: the Triton module's label (``impls.build``)."""
        algo = cost_model.algorithm_for(impl, algorithm)
        flops = cost_model.flops(case.c, case.h, case.w, case.batch, case.branch, case.mode, algo, **case.ratios)
        nbytes = cost_model.min_bytes(case.c, case.h, case.w, case.batch, case.branch, case.mode, algo,
                                      case.dtype, **case.ratios)
        label = algorithm or algo
        load, cores = timing.machine_load()
        row = {k: None for k in COLUMNS}
        row.update(impl=impl, algorithm=label, branch=case.branch, mode=case.mode, dtype=case.dtype,
                   batch=case.batch, C=case.c, H=case.h, W=case.w, N=case.n, input_hw=case.input_hw,
                   stage=case.stage, tolerance=impls.TOLERANCE[case.dtype], flops=flops, min_bytes=nbytes,
                   intensity=flops / nbytes, ceiling_tflops=self.ceilings["matmul_tflops"].get(case.dtype),
                   ceiling_gbps=self.ceilings["copy_gbps"], load_avg=load, cpu_cores=cores,
                   threads=torch.get_num_threads() if self.device.type == "cpu" else None,
                   timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
                   **self.env)
        if self.spec:
            row.update(spec_tflops=self.spec["tflops"].get(case.dtype), spec_gbps=self.spec["gbps"],
                       spec_label=self.spec["label"])
        return row

    def measure(self, impl: str, case: Case, state, x, grad_out, get_oracle, row: dict) -> None:
        """Build, check against the float64 oracle, measure peak memory, time. Fills ``row``."""
        train = case.mode == "train"
        ref = get_oracle()     # before the implementation holds any memory
        module, algorithm = impls.build(impl, case, state, self.device)
        row.update(self.base_row(impl, case, algorithm))
        fn, resets, leaf = impls.make_step(module, x, grad_out, train,
                                           cudagraphs=impl in impls.GRAPHED_IMPLS and self.device.type == "cuda")
        start = time.perf_counter()
        try:
            with impls.watch_graph_skips() as skips:     # compiles: whether CUDA graphs were left out shows here
                out = fn()
        except ValueError as exc:
            if impl.startswith("triton"):
                raise impls.Unavailable(f"{type(exc).__name__}: {exc}") from exc
            raise
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        row["first_call_s"] = time.perf_counter() - start
        notes = []
        if impl in impls.GRAPHED_IMPLS:
            row["graphs_skipped"] = skips.count
            notes.append(skips.note())
        if ref is not None:
            row["checked_against"] = ref.against
            row["rel_err"] = rel_err(out, ref.out)
            errors = [row["rel_err"]]
            tolerances = [row["tolerance"]]
            if train:
                # Float32 gradients through train-mode BatchNorm and the gates lose ~1e-3 to
                # rounding even in the reference itself; a grad x no worse than 4x the
                # reference's own error in this dtype counts as correct. The reference's own
                # grad x sets that bar, so its row is judged on its output alone.
                row["rel_err_grad_x"] = rel_err(leaf.grad, ref.grad_x)
                key = _key(dict(row, impl=""))
                if impl == "reference":
                    self.reference_grad_err[key] = row["rel_err_grad_x"]
                else:
                    row["tolerance_grad_x"] = max(row["tolerance"], 4 * self.reference_grad_err.get(key, 0.0))
                    errors.append(row["rel_err_grad_x"])
                    tolerances.append(row["tolerance_grad_x"])
            row["correct"] = all(e <= t for e, t in zip(errors, tolerances))
        else:
            notes.append(f"not checked: {get_oracle.why}")
        row["note"] = "; ".join(n for n in notes if n) or None
        del out
        held = None if impls.compiled(impl) else [x, grad_out, *module.parameters(), *module.buffers()]
        row["peak_mem_mb"], estimate_ms = timing.peak_memory(fn, self.device, resets, held)
        if impl.startswith("triton") and self.device.type != "cuda":
            # Triton's interpreter runs the kernels through NumPy: the check and the live tensors
            # count, a time would not, so none is taken.
            row.update(status="interpreted", note="; ".join(filter(None, [
                row["note"], "Triton's interpreter on the CPU: checked, not timed"])))
            return
        if self.device.type != "cuda":      # timed with the case's other implementations, interleaved
            self.pending[impl] = (fn, resets)
            return
        t = timing.time_fn(fn, self.device, self.repeat, resets, estimate_ms)
        t.noisy = timing.is_noisy(t)
        self.record_timing(row, t)
        row["host_ms"] = timing.host_ms(fn, self.device, resets)

    @staticmethod
    def record_timing(row: dict, t: timing.Timing) -> None:
        row.update(time_ms_median=t.median_ms, time_ms_p20=t.p20_ms, time_ms_p80=t.p80_ms, runs=t.runs,
                   ci_low=t.ci_low, ci_high=t.ci_high, noisy=t.noisy, status="ok")
        if t.ratio_median is not None:
            row.update(speedup_vs_reference=t.ratio_median, speedup_p20=t.ratio_p20, speedup_p80=t.ratio_p80)
        if t.pairs is not None and t.pairs < t.runs:
            row["note"] = "; ".join(filter(None, [row.get("note"), f"ratio from {t.pairs} of {t.runs} rounds, "
                                                  "the others hit by a load spike"]))
        seconds = t.median_ms * 1e-3
        row["tflops"] = row["flops"] / seconds / 1e12
        row["gbps"] = row["min_bytes"] / seconds / 1e9

    def run_row(self, impl: str, case: Case, state, x, grad_out, get_oracle) -> dict:
        row = self.base_row(impl, case)
        oom_key = (impl, case.shape, case.branch, case.mode, case.dtype)
        if impl.startswith("triton") and self.triton_reason:
            row.update(status="skipped", note=self.triton_reason)
            return row
        if oom_key in self.oom_at:
            row.update(status="oom", note=f"not run: out of memory at B={self.oom_at[oom_key]}")
            return row
        try:
            self.measure(impl, case, state, x, grad_out, get_oracle, row)
        except impls.Unavailable as exc:
            row.update(status="skipped", note=str(exc))
        except Exception as exc:   # noqa: BLE001 - a failing row is a result; the sweep goes on
            if impls.is_oom(exc):
                row.update(status="oom", note=f"{type(exc).__name__}")
                self.oom_at[oom_key] = case.batch
            else:
                row.update(status="error", note=f"{type(exc).__name__}: {exc}"[:300])
                with open(self.errors_path, "a") as f:
                    f.write(f"=== {impl} {case}\n{traceback.format_exc()}\n")
        finally:
            if impls.compiled(impl) and impl not in self.pending:
                torch._dynamo.reset()    # drop compiled graphs (and CUDA-graph pools) before the next row
            impls.free_memory(self.device)
        return row

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        os.makedirs(self.out_dir, exist_ok=True)
        if self.args.resume and os.path.exists(self.csv_path):
            with open(self.csv_path, newline="") as f:
                reader = csv.DictReader(f)
                previous = list(reader)
            if reader.fieldnames != COLUMNS:     # written by an older sweep: same rows, today's columns
                with open(self.csv_path, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="", extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows(previous)
            self.done = {_key(r) for r in previous}
            for r in previous:
                case_key = _key(dict(r, impl=""))
                if r["impl"] == "reference" and r["status"] == "ok":
                    self.previous_reference_ms[case_key] = float(r["time_ms_median"])
                    if r.get("rel_err_grad_x"):      # the train rows' tolerance rests on it
                        self.reference_grad_err[case_key] = float(r["rel_err_grad_x"])
                if r["status"] == "oom":
                    oom_key = (r["impl"], f"{r['C']}x{r['H']}x{r['W']}", r["branch"], r["mode"], r["dtype"])
                    self.oom_at[oom_key] = min(int(r["batch"]), self.oom_at.get(oom_key, 1 << 30))
            mode = "a"
        else:
            mode = "w"
            if os.path.exists(self.errors_path):
                os.remove(self.errors_path)
        self.measure_ceilings()
        total = len(self.cases) * len(self.names)
        self.log(f"{len(self.cases)} cases x {len(self.names)} implementations = {total} rows -> {self.csv_path}")
        if self.device.type != "cuda" and impls.interpreting() and any(n.startswith("triton") for n in self.names):
            self.log("note: TRITON_INTERPRET=1: the triton rows run through Triton's interpreter; their correctness "
                     "checks count, their times do not")
        start, counter = time.perf_counter(), 0
        with open(self.csv_path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if mode == "w" or f.tell() == 0:
                writer.writeheader()
            for case in self.cases:
                if self.args.time_limit and time.perf_counter() - start > self.args.time_limit:
                    self.log(f"time limit of {self.args.time_limit:g} s reached after {counter}/{total} rows; "
                             f"rerun with --resume to continue")
                    break
                counter += self.run_case(case, writer, f, counter, total, start)
        self.log(f"wrote {self.csv_path} in {_duration(time.perf_counter() - start)}")
        return 1 if self.failures else 0

    def run_case(self, case: Case, writer, f, counter: int, total: int, start: float) -> int:
        todo = [impl for impl in self.names
                if _key({"impl": impl, "branch": case.branch, "mode": case.mode, "dtype": case.dtype,
                         "batch": case.batch, "C": case.c, "H": case.h, "W": case.w}) not in self.done]
        if not todo:
            return len(self.names)
        state = self.state_for(case)
        x, grad_out = impls.make_inputs(case, self.device)
        cache = {}

        def get_oracle():
            if "value" not in cache:
                try:
                    cache["value"] = impls.oracle(case, state, x, grad_out, self.device)
                    get_oracle.why = "the float64 oracle ran out of memory"
                except Exception as exc:   # noqa: BLE001 - the rows still get timed, marked unchecked
                    cache["value"] = None
                    get_oracle.why = f"the float64 oracle failed: {type(exc).__name__}: {exc}"[:200]
                    with open(self.errors_path, "a") as log:
                        log.write(f"=== oracle {case}\n{traceback.format_exc()}\n")
                    self.log(f"oracle failed for {case}: {type(exc).__name__}: {exc}")
            return cache["value"]

        reference_ms = self.previous_reference_ms.get(
            _key({"impl": "", "branch": case.branch, "mode": case.mode, "dtype": case.dtype, "batch": case.batch,
                  "C": case.c, "H": case.h, "W": case.w}))
        done = len(self.names) - len(todo)
        self.pending = {}
        rows = [self.run_row(impl, case, state, x, grad_out, get_oracle) for impl in todo]
        if self.pending:
            self.time_interleaved(case, rows)
        for row in rows:
            impl = row["impl"]
            if impl == "reference" and row["status"] == "ok":
                reference_ms = row["time_ms_median"]
            if row["correct"] is False:      # a wrong answer is no win
                row.update(speedup_vs_reference=None, speedup_p20=None, speedup_p80=None)
            elif reference_ms and row["status"] == "ok" and row["speedup_vs_reference"] is None:
                row["speedup_vs_reference"] = reference_ms / row["time_ms_median"]
            if row["correct"] is False or row["status"] == "error":
                self.failures += 1
            writer.writerow({k: _fmt(v) for k, v in row.items()})
            f.flush()
            done += 1
            self.rows_run += 1
            self.progress(row, case, counter + done, total, start)
        x = grad_out = None         # the case's tensors (and the oracle's) go before the next case's
        cache.clear()
        impls.free_memory(self.device)
        return len(self.names)

    def time_interleaved(self, case: Case, rows: list[dict]) -> None:
        """CPU: time the case's checked steps together, one call of each per round; speed-ups from the pairs."""
        by_impl = {r["impl"]: r for r in rows}
        baseline = "reference" if "reference" in self.pending else None
        try:
            results, errors = timing.interleaved(self.pending, baseline, self.repeat,
                                                 self.args.case_budget * len(self.pending))
        finally:
            if any(impls.compiled(i) for i in self.pending):
                torch._dynamo.reset()
            self.pending = {}
            impls.free_memory(self.device)
        for impl, t in results.items():
            self.record_timing(by_impl[impl], t)
        for impl, exc in errors.items():
            by_impl[impl].update(status="error", note=f"{type(exc).__name__}: {exc}"[:300])
            with open(self.errors_path, "a") as f:
                f.write(f"=== {impl} {case} (timing)\n{''.join(traceback.format_exception(exc))}\n")

    def state_for(self, case: Case) -> dict:
        key = (case.c, case.h, case.w, case.branch)
        if getattr(self, "_state_key", None) != key:
            self._state = impls.master_state(case, self.device)
            self._state_key = key
        return self._state

    def progress(self, row: dict, case: Case, index: int, total: int, start: float) -> None:
        if self.args.quiet:
            return
        head = (f"[{index}/{total}] {row['impl']} {case.branch} {case.shape} B={case.batch} {case.mode} "
                f"{case.dtype}:")
        if row["status"] == "ok":
            text = f"{row['time_ms_median']:.3g} ms"
            if row["speedup_vs_reference"] and row["impl"] != "reference":
                text += f" (x{row['speedup_vs_reference']:.3g} vs reference"
                if row["speedup_p20"] is not None:
                    text += f", paired p20-p80 x{row['speedup_p20']:.3g}-x{row['speedup_p80']:.3g}"
                text += ")"
            if row["peak_mem_mb"] is not None:
                text += f", {megabytes(row['peak_mem_mb'])}"
            if row["noisy"]:
                interval = f"median's 95 % interval {row['ci_low']:.3g}-{row['ci_high']:.3g}; " \
                    if row["ci_low"] is not None else ""
                text += f" NOISY ({interval}left out of the headline)"
                way = report.direction(row)
                if way:         # the interval on one side of x1: which is faster is settled
                    text += f", but {way} than the reference with 95 % confidence"
            if row["correct"] is False:
                text += f" WRONG (rel err {row['rel_err']:.2e}"
                text += f", grad x {row['rel_err_grad_x']:.2e})" if row["rel_err_grad_x"] is not None else ")"
            if row.get("graphs_skipped") or "load spike" in (row.get("note") or ""):
                text += f" [{row['note']}]"
        elif row["status"] == "interpreted":
            verdict = {True: "correct", False: "WRONG", None: "not checked"}[row["correct"]]
            text = f"{verdict} under Triton's interpreter (rel err {_fmt(row['rel_err'])}; not timed)"
        elif row["status"] == "skipped":
            if row["note"] in self.skip_reasons_shown:
                text = "skipped (as above)"
            else:
                self.skip_reasons_shown.add(row["note"])
                text = f"skipped: {row['note']}"
        else:
            text = f"{row['status'].upper()} {row['note'] or ''}".rstrip()
        # The rate of rows run by this process: rows an earlier run left in the CSV took no time here.
        elapsed = time.perf_counter() - start
        eta = elapsed / self.rows_run * (total - index) if self.rows_run else 0.0
        print(f"{head} {text} ETA {_duration(eta)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    set_tf32(args.tf32)
    threads = torch.get_num_threads()
    try:
        if args.threads is not None:
            if args.threads < 1:
                parser.error(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        return _run(args, parser)
    finally:
        torch.set_num_threads(threads)     # a caller's (a test's) process keeps its own


def _run(args, parser) -> int:
    device, names, cases = resolve_args(args, parser)
    if args.tune:
        return run_tune(device, cases, args)
    out_dir = args.out or os.path.join(ROOT, "bench", "results", hardware.results_dir_name(device))
    sweep = Sweep(device, names, cases, args, out_dir)
    status = sweep.run()
    from bench.lib import plots
    if not args.no_plots:
        for path in plots.plot_all(sweep.csv_path, out_dir):
            sweep.log(f"wrote {path}")
    summary = report.write_summary(sweep.csv_path, os.path.join(out_dir, "summary.md"))
    sweep.log(f"wrote {summary}")
    if status and not args.quiet:
        print(f"{sweep.failures} row(s) failed their correctness check or raised; see the CSV"
              f"{' and ' + sweep.errors_path if os.path.exists(sweep.errors_path) else ''}")
    return status


if __name__ == "__main__":
    sys.exit(main())
