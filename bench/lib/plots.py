"""Plots from a sweep CSV: speed-up, peak memory, roofline, time vs resolution.

    python bench/lib/plots.py bench/results/<device>/sweep.csv [--out DIR]

One figure per (mode, dtype) for each kind, drawn for one branch (RGA-SC when present) at
the largest batch size of that mode and dtype (roofline: every branch and batch). A row
whose correctness check failed gets no bar, only a "WRONG" mark in its colour: a wrong
answer is never drawn as a win. Rows that were not checked (the float64 oracle ran out of
memory) are hatched in their colour; noisy rows (timing that never settled, column ``noisy``) are
drawn pale with a "noisy" label. On a CPU the speed-up bars are the median paired ratios, with their
20th-80th percentile as error bars. Rows run by Triton's interpreter on a CPU are checked
but not timings, so they are left out and named in the note under the plot.
Also rewrites summary.md next to the PNGs.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap

import matplotlib

# run as a script (python bench/lib/plots.py): the repository root holds the `bench` package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator  # noqa: E402

from bench.lib.rows import ORDER, impls_in, load_rows, megabytes  # noqa: E402,F401  (load_rows: part of this module's API)

COLORS = {"reference": "#7f7f7f", "compile": "#ff7f0e", "compile-max-autotune": "#8c564b", "torch": "#1f77b4",
          "triton": "#2ca02c", "triton-tiled": "#9467bd", "triton-graphs": "#17becf"}
MARKERS = {"reference": "o", "compile": "s", "compile-max-autotune": "D", "torch": "^", "triton": "*",
           "triton-tiled": "P", "triton-graphs": "X"}
FIGSIZE, DPI = (10, 6), 110
def _plain_log_labels(axis, low: float, high: float) -> None:
    """Tick labels like 0.5, 2, 300 instead of 5x10^-1 on a log axis; minor labels only within ~2 decades."""
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    few = low > 0 and high / low < 100
    # minor ticks at 2x and 5x a power of ten only: 2, 3, ..., 9 crowd into one another
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else "")
                             if few else NullFormatter())


def shape_label(row: dict) -> str:
    label = f"{row['C']}x{row['H']}x{row['W']}"
    if row.get("input_hw"):
        label += f"\n{row['input_hw']} s{row['stage']}"
    return label


def default_branch(rows) -> str:
    branches = {r["branch"] for r in rows}
    return "RGA-SC" if "RGA-SC" in branches else sorted(branches)[0]


def facets(rows):
    """(mode, dtype, branch, batch, rows of that slice) for the bar and line plots."""
    out = []
    for mode in ("eval", "train"):
        for dtype in ("float32", "bfloat16", "float16"):
            part = [r for r in rows if r["mode"] == mode and r["dtype"] == dtype]
            if not part:
                continue
            branch = default_branch(part)
            part = [r for r in part if r["branch"] == branch]
            batch = max(r["batch"] for r in part)
            out.append((mode, dtype, branch, batch, [r for r in part if r["batch"] == batch]))
    return out


def shapes_of(rows) -> list[tuple]:
    seen = []
    for r in rows:
        key = (r["C"], r["H"], r["W"])
        if key not in seen:
            seen.append(key)
    return seen


def _by(rows, impl, shape):
    for r in rows:
        if r["impl"] == impl and (r["C"], r["H"], r["W"]) == shape:
            return r
    return None


def _bar_style(row, impl):
    """Face colour, hatch, edge colour for a bar: unchecked -> hatched."""
    if row["correct"] is None:
        return COLORS.get(impl, "#333333"), "//", "white"
    return COLORS.get(impl, "#333333"), None, "none"


def _ran(rows, names, measured=("ok",)) -> list[str]:
    """The implementations with a ``measured`` (status) or out-of-memory row among ``rows``."""
    return [n for n in names if any(r["impl"] == n and r["status"] in (*measured, "oom") for r in rows)]


def _skip_note(fig, rows) -> None:
    reasons: dict[str, list[str]] = {}      # one line per reason, naming every implementation it skipped
    for r in rows:
        if r["status"] == "skipped" and r["impl"] not in reasons.setdefault(r.get("note") or "", []):
            reasons[r.get("note") or ""].append(r["impl"])
    interpreted = sorted({r["impl"] for r in rows if r["status"] == "interpreted"})
    errors = sorted({r["impl"] for r in rows if r["status"] == "error"})
    parts = [f"skipped {', '.join(names)}: {note}" for note, names in list(reasons.items())[:3]]
    if interpreted:
        parts.append(f"not timed: {', '.join(interpreted)} (Triton's interpreter on the CPU; checked only)")
    if errors:
        parts.append(f"errors: {', '.join(errors)} (see the CSV)")
    if parts:
        lines = textwrap.wrap("; ".join(parts), width=170)
        text = "\n".join(lines[:2]) + (" ..." if len(lines) > 2 else "")
        fig.text(0.01, 0.005, text, fontsize=7, color="#555555", ha="left", va="bottom")


def _grouped_bars(ax, rows, shapes, names, value, ylabel, title, log=True, mark_oom=True, base=0.0,
                  measured=("ok",), fmt=lambda h: f"{h:.3g}", spread=None):
    """Grouped bars (groups: shapes, bars: implementations). ``value(row)`` -> height or None.

    Bars start at ``base`` (1 for speed-ups: slower-than-reference bars point down). Rows
    whose status is in ``measured`` get a bar, labelled ``fmt(height)``; ``spread(row)`` -> (low,
    high) or None draws an error bar. A noisy row's bar is pale and labelled "noisy".
    """
    width = 0.8 / max(1, len(names))
    flagged = {"failed": False, "unchecked": False, "noisy": False}
    heights, drawn = [], set()
    label_bars = len(names) * len(shapes) <= 24
    for i, impl in enumerate(names):
        for j, shape in enumerate(shapes):
            row = _by(rows, impl, shape)
            xpos = j - 0.4 + width * (i + 0.5)
            if row is None:
                continue
            if row["status"] == "oom" and mark_oom:
                drawn.add(impl)
                ax.text(xpos, 0.02, "OOM", transform=ax.get_xaxis_transform(), rotation=90, ha="center",
                        va="bottom", fontsize=7, color="#d62728", fontweight="bold")
                continue
            h = value(row) if row["status"] in measured else None
            if h is None or h <= 0:
                continue
            if row["correct"] is False:        # no bar: a wrong answer is not a result
                drawn.add(impl)
                flagged["failed"] = True
                ax.text(xpos, 0.02, "WRONG", transform=ax.get_xaxis_transform(), rotation=90, ha="center",
                        va="bottom", fontsize=7, color=COLORS.get(impl, "#333333"), fontweight="bold")
                continue
            face, hatch, edge = _bar_style(row, impl)
            flagged["unchecked"] |= row["correct"] is None
            noisy = bool(row.get("noisy"))
            flagged["noisy"] |= noisy
            ax.bar(xpos, h - base, width, bottom=base if base else None, color=face, hatch=hatch, edgecolor=edge,
                   linewidth=0.5, alpha=0.35 if noisy else 1.0)
            band = spread(row) if spread else None
            if band and band[0] and band[1]:
                ax.errorbar(xpos, h, yerr=[[max(0.0, h - band[0])], [max(0.0, band[1] - h)]], color="black",
                            linewidth=0.8, capsize=2)
            if label_bars:
                up = h >= base
                ax.annotate(fmt(h) + ("\nnoisy" if noisy else ""), (xpos, h), ha="center",
                            va="bottom" if up else "top", fontsize=7, xytext=(0, 2 if up else -2),
                            textcoords="offset points")
            heights.append(h)
            drawn.add(impl)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([shape_label(_first(rows, s)) for s in shapes], fontsize=8)
    ax.set_xlim(-0.6, len(shapes) - 0.4)
    if log and heights:
        ax.set_yscale("log")
        low, high = min(heights + [1.0]), max(heights + [1.0])
        ax.set_ylim(low / 1.5, high * 1.5)
        _plain_log_labels(ax.yaxis, low, high)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("feature map C x H x W (input size, RGA-Net stage)")
    ax.set_title(title)
    ax.grid(axis="y", which="both", alpha=0.3)
    handles = [Patch(color=COLORS.get(n, "#333333"), label=n) for n in names if n in drawn]
    if flagged["failed"]:
        handles.append(Patch(facecolor="white", edgecolor="white", label="WRONG: failed its correctness check"))
    if flagged["unchecked"]:
        handles.append(Patch(facecolor="white", hatch="//", edgecolor="#555555", label="not checked (oracle OOM)"))
    if flagged["noisy"]:
        handles.append(Patch(facecolor="#bbbbbb", alpha=0.35, label="noisy: timing never settled (busy machine?)"))
    ax.legend(handles=handles, fontsize=8, loc="best")
    return heights


def _first(rows, shape):
    return next(r for r in rows if (r["C"], r["H"], r["W"]) == shape)


def _save(fig, out_dir, name) -> str:
    path = os.path.join(out_dir, name)
    fig.tight_layout(rect=(0, 0.03, 1, 1))   # room for the skipped/errors note at the bottom
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_speedup(mode, dtype, branch, batch, rows, out_dir) -> str:
    shapes = shapes_of(rows)
    names = _ran(rows, [n for n in impls_in(rows) if n != "reference"])
    fig, ax = plt.subplots(figsize=FIGSIZE)
    _skip_note(fig, rows)

    def speedup(row):
        ref = _by(rows, "reference", (row["C"], row["H"], row["W"]))
        if ref is None or ref["status"] != "ok" or not row["time_ms_median"]:
            return None
        if row.get("speedup_p20") is not None:        # paired (interleaved) ratios: their median
            return row["speedup_vs_reference"]
        return ref["time_ms_median"] / row["time_ms_median"]

    def paired_band(row):
        return (row["speedup_p20"], row["speedup_p80"]) if row.get("speedup_p20") is not None else None

    _grouped_bars(ax, rows, shapes, names, speedup, "speed-up over the eager reference (x, log scale)",
                  f"RGA speed-up over the reference: {branch}, {mode}"
                  f"{' (forward + backward)' if mode == 'train' else ' (forward)'}, {dtype}, batch {batch}",
                  base=1.0, spread=paired_band)
    ax.axhline(1.0, color="black", linewidth=0.8)
    for j, shape in enumerate(shapes):
        ref = _by(rows, "reference", shape)
        if ref is None or ref["status"] != "ok":
            why = "reference OOM" if ref is not None and ref["status"] == "oom" else "no reference time"
            ax.text(j, 0.5, why, transform=ax.get_xaxis_transform(), ha="center", fontsize=7, color="#d62728",
                    rotation=90)
    return _save(fig, out_dir, f"speedup_{mode}_{dtype}.png")


def plot_memory(mode, dtype, branch, batch, rows, out_dir) -> str:
    shapes = shapes_of(rows)
    measured = ("ok", "interpreted")     # the interpreter's tensors are real: its memory counts, its time not
    names = _ran(rows, impls_in(rows), measured)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    _skip_note(fig, [r for r in rows if r["status"] != "interpreted"])
    title = f"RGA peak memory of one step: {branch}, {mode}, {dtype}, batch {batch}"
    if all(r["peak_mem_mb"] is None for r in rows if r["status"] in measured):
        ax.set_title(title)
        ax.text(0.5, 0.5, "no peak memory was measured\n(this sweep ran on "
                f"{rows[0].get('device', 'a CPU')})", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, out_dir, f"memory_{mode}_{dtype}.png")
    on_cpu = str(rows[0].get("device", "")).lower().startswith("cpu")
    label = ("peak live tensors of the step (MB, log scale;\nATen outputs on the CPU, compiled steps not measured)"
             if on_cpu else "peak memory allocated by the step (MB, log scale)")
    _grouped_bars(ax, rows, shapes, names, lambda r: r["peak_mem_mb"], label, title, measured=measured,
                  fmt=megabytes)
    return _save(fig, out_dir, f"memory_{mode}_{dtype}.png")


def plot_roofline(mode, dtype, rows, out_dir) -> str | None:
    """Achieved TFLOP/s vs arithmetic intensity (analytic FLOPs / minimum bytes), every branch and batch."""
    ok = [r for r in rows if r["status"] == "ok" and r["tflops"] and r["intensity"]]
    if not ok:
        return None
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for impl in impls_in(ok):
        pts = [r for r in ok if r["impl"] == impl]
        good = [r for r in pts if r["correct"] is not False]
        bad = [r for r in pts if r["correct"] is False]
        if good:
            ax.scatter([r["intensity"] for r in good], [r["tflops"] for r in good], marker=MARKERS.get(impl, "o"),
                       color=COLORS.get(impl), label=impl, s=40, alpha=0.8, edgecolors="black", linewidths=0.3)
        if bad:
            ax.scatter([r["intensity"] for r in bad], [r["tflops"] for r in bad], marker=MARKERS.get(impl, "o"),
                       facecolors="none", edgecolors="#555555", s=40, label=f"{impl} (failed correctness)")
    # Each marker's shape (and batch, branch where the plot mixes several), once per point position.
    mixed_batch = len({r["batch"] for r in ok}) > 1
    mixed_branch = len({r["branch"] for r in ok}) > 1
    labelled: dict[tuple, list[str]] = {}
    for r in ok:
        text = f"{r['C']}x{r['H']}x{r['W']}" + (f" B={r['batch']}" if mixed_batch else "") + \
            (f" {r['branch']}" if mixed_branch else "") + (" noisy" if r.get("noisy") else "")
        labelled.setdefault((round(math.log10(r["intensity"]), 2), round(math.log10(r["tflops"]), 2)), []).append(text)
    for (lx, ly), texts in labelled.items():
        ax.annotate(" / ".join(dict.fromkeys(texts)), (10 ** lx, 10 ** ly), fontsize=6, color="#333333",
                    xytext=(4, 3), textcoords="offset points")
    lo = min(r["intensity"] for r in ok) / 3
    hi = max(r["intensity"] for r in ok) * 3
    first = ok[0]
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    for peak, bw, style, label in ((first["ceiling_tflops"], first["ceiling_gbps"], "-", "measured"),
                                   (first["spec_tflops"], first["spec_gbps"], "--",
                                    first.get("spec_label") or "spec sheet")):
        if peak and bw:
            ax.plot(xs, [min(peak, x * bw / 1e3) for x in xs], style, color="black", linewidth=1.2,
                    label=f"{label}: {bw:.3g} GB/s, {peak:.3g} TFLOP/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_labels(ax.xaxis, lo, hi)
    _plain_log_labels(ax.yaxis, *ax.get_ylim())
    ax.set_xlabel("arithmetic intensity (FLOP / byte; analytic FLOPs over minimum bytes)")
    ax.set_ylabel("achieved TFLOP/s (analytic FLOPs / median time)")
    ax.set_title(f"RGA roofline: {mode}{' (forward + backward)' if mode == 'train' else ''}, {dtype}, "
                 f"all branches and batch sizes")
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, out_dir, f"roofline_{mode}_{dtype}.png")


def plot_time_vs_n(mode, dtype, branch, batch, rows, out_dir) -> str | None:
    """Median time vs N = H x W, one panel per channel count C (RGA-Net stage), one line per impl.
    The x ticks are the panel's N values; the title explains only the marks drawn."""
    channels = sorted({r["C"] for r in rows})
    cols = min(2, len(channels))
    nrows = math.ceil(len(channels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=FIGSIZE, squeeze=False)
    drawn = set()       # which marks the figure holds: "wrong", "noisy", "oom"
    for ax, c in zip(axes.flat, channels):
        part = [r for r in rows if r["C"] == c]
        for impl in impls_in(part):
            for r in (r for r in part if r["impl"] == impl and r["status"] == "oom"):
                ax.annotate("OOM", xy=(r["N"], 0.03), xycoords=("data", "axes fraction"), color=COLORS.get(impl),
                            fontsize=7, ha="center", fontweight="bold")
                drawn.add("oom")
            pts = sorted((r for r in part if r["impl"] == impl and r["status"] == "ok"), key=lambda r: r["N"])
            if not pts:
                continue
            ax.plot([r["N"] for r in pts], [r["time_ms_median"] for r in pts], "-", color=COLORS.get(impl),
                    label=impl, linewidth=1.2)
            for r in pts:
                wrong = r["correct"] is False
                drawn.update(k for k, on in (("wrong", wrong), ("noisy", r.get("noisy"))) if on)
                ax.errorbar(r["N"], r["time_ms_median"],
                            yerr=[[r["time_ms_median"] - (r["time_ms_p20"] or r["time_ms_median"])],
                                  [(r["time_ms_p80"] or r["time_ms_median"]) - r["time_ms_median"]]],
                            marker=MARKERS.get(impl, "o"), color=COLORS.get(impl),
                            mfc="none" if wrong else COLORS.get(impl), capsize=2,
                            alpha=0.35 if r.get("noisy") else 1.0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ok = [r for r in part if r["status"] == "ok"]
        if ok:
            _plain_log_labels(ax.yaxis, min(r["time_ms_median"] for r in ok), max(r["time_ms_median"] for r in ok))
        # a tick at every N measured (a log axis's own ticks can miss all of them)
        ns = sorted({r["N"] for r in part if r["status"] in ("ok", "oom")})
        ax.set_xticks(ns, [f"{n:g}" for n in ns])
        ax.xaxis.set_minor_locator(NullLocator())
        if len(ns) == 1:
            ax.set_xlim(ns[0] / 1.5, ns[0] * 1.5)
        ax.set_title(f"C = {c}", fontsize=10)
        ax.set_xlabel("N = H x W (positions)")
        ax.set_ylabel("median time (ms)")
        ax.grid(which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(channels):]:
        ax.set_axis_off()
    marks = ["bars: 20th-80th percentile"] + [text for key, text in (
        ("wrong", "hollow: failed correctness"), ("noisy", "pale: noisy"), ("oom", "OOM: out of memory"))
        if key in drawn]
    fig.suptitle(f"RGA time vs resolution: {branch}, {mode}, {dtype}, batch {batch} ({'; '.join(marks)})",
                 fontsize=11)
    return _save(fig, out_dir, f"time_vs_n_{mode}_{dtype}.png")


def plot_all(csv_path: str, out_dir: str | None = None) -> list[str]:
    """Every figure for the CSV; returns the PNG paths written."""
    out_dir = out_dir or os.path.dirname(os.path.abspath(csv_path))
    os.makedirs(out_dir, exist_ok=True)
    rows = load_rows(csv_path)
    paths = []
    for mode, dtype, branch, batch, part in facets(rows):
        paths.append(plot_speedup(mode, dtype, branch, batch, part, out_dir))
        paths.append(plot_memory(mode, dtype, branch, batch, part, out_dir))
        paths.append(plot_time_vs_n(mode, dtype, branch, batch, part, out_dir))
        paths.append(plot_roofline(mode, dtype, [r for r in rows if r["mode"] == mode and r["dtype"] == dtype],
                                   out_dir))
    return [p for p in paths if p]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/lib/plots.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", help="a sweep.csv written by bench/sweep.py")
    parser.add_argument("--out", help="output directory (default: the CSV's directory)")
    args = parser.parse_args(argv)
    out_dir = args.out or os.path.dirname(os.path.abspath(args.csv))
    for path in plot_all(args.csv, out_dir):
        print(f"wrote {path}")
    from bench.lib import report
    print(f"wrote {report.write_summary(args.csv, os.path.join(out_dir, 'summary.md'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
