"""summary.md from a sweep CSV: headline ratios per implementation and per shape."""
from __future__ import annotations

import math
from collections import defaultdict

from bench.lib.rows import impls_in, load_rows

FAST = ("torch", "triton", "triton-tiled", "triton-graphs")   # rga_triton's implementations (impls.FAST_IMPLS)


def _case(row) -> tuple:
    return (row["C"], row["H"], row["W"], row["batch"], row["branch"], row["mode"], row["dtype"])


def _good(row) -> bool:
    """Timed and not failing its correctness check (unchecked rows count; they are flagged elsewhere)."""
    return row is not None and row["status"] == "ok" and row["correct"] is not False


def _steady(row) -> bool:
    """Good and not noisy: a row the headline means may use."""
    return _good(row) and not row.get("noisy")


def direction(row) -> str | None:
    """For a row timed against the reference in pairs: "faster" or "slower" where the whole 95 % interval of its
    median paired ratio lies on one side of x1, else None. A noisy row can still say which is faster, with
    95 % confidence, when the load leaves only its size unsettled."""
    if row is None or row.get("impl") == "reference" or row.get("speedup_p20") is None or row.get("ci_low") is None:
        return None
    if row["ci_low"] > 1.0:
        return "faster"
    return "slower" if row["ci_high"] < 1.0 else None


def _noisy_mark(row) -> str:
    if not row.get("noisy"):
        return ""
    way = direction(row)
    return f" (noisy, {way})" if way else " (noisy)"


def _geomean(values) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _ratio(value) -> str:
    return "-" if value is None else f"x{value:.3g}"


HOST_BOUND = 0.9
"""A row whose host time (``host_ms``: Python, dispatch, launches) is at least this share of its
median time is host-bound: timed alone, the GPU waits for the host between kernels."""


def graphs_skipped(row) -> bool:
    """A graphed row whose step torch.compile ran (in part) without CUDA graphs (its note says why)."""
    return bool(row.get("graphs_skipped"))


def host_bound(row) -> bool:
    return bool(row.get("host_ms") and row["time_ms_median"] and row["host_ms"] >= HOST_BOUND * row["time_ms_median"])


def _cell(row) -> str:
    if row is None:
        return ""
    if row["status"] == "ok":
        text = f"{row['time_ms_median']:.3g}" + (" (host)" if host_bound(row) else "") + \
            (" (no graphs)" if graphs_skipped(row) else "")
        return text + (" (wrong)" if row["correct"] is False else "") + _noisy_mark(row)
    return {"oom": "OOM", "skipped": "skip", "error": "ERR", "interpreted": "interp."}.get(row["status"], row["status"])


def best_fast(by_impl: dict) -> dict | None:
    """The fastest correct rga_triton row of a case."""
    rows = [by_impl[i] for i in FAST if _good(by_impl.get(i))]
    return min(rows, key=lambda r: r["time_ms_median"]) if rows else None


def _time_ratio(a, b, good=_good) -> float | None:
    """Time of ``a`` over time of ``b``: for ``a`` the reference and ``b`` timed with it interleaved, the
    median of their paired ratios (``speedup_vs_reference``), else the ratio of the medians."""
    if a is not None and a["impl"] == "reference" and b is not None and b.get("speedup_p20") is not None:
        # Paired: the pairs cancel the load the reference's own times saw; b's ratio spread decides.
        return b["speedup_vs_reference"] if _good(a) and good(b) else None
    if not (good(a) and good(b)):
        return None
    return a["time_ms_median"] / b["time_ms_median"]


def _vs_baseline(baseline, best) -> str:
    """A per-shape ratio cell: the baseline's time over ours. A baseline that ran but missed the float64
    oracle still took its time, so the ratio is shown, marked (a wrong row of ours is never a win)."""
    if _good(best) and baseline is not None and baseline["status"] == "ok" and baseline["correct"] is False:
        return _ratio(baseline["time_ms_median"] / best["time_ms_median"]) + " (vs wrong)"
    text = _ratio(_time_ratio(baseline, best))
    if text == "-":
        return text
    paired = baseline["impl"] == "reference" and best.get("speedup_p20") is not None
    if paired:
        text += f" ({best['speedup_p20']:.3g}-{best['speedup_p80']:.3g})"
    if best.get("noisy"):       # the direction is that of the paired ratio against the reference only
        return text + (_noisy_mark(best) if baseline["impl"] == "reference" else " (noisy)")
    return text + (" (noisy)" if baseline.get("noisy") and not paired else "")


def _mem_ratio(a, b) -> float | None:
    if _good(a) and _good(b) and a["peak_mem_mb"] and b["peak_mem_mb"]:
        return a["peak_mem_mb"] / b["peak_mem_mb"]
    return None


def write_summary(csv_path: str, md_path: str) -> str:
    rows = load_rows(csv_path)
    cases: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        cases[_case(r)][r["impl"]] = r
    names = impls_in(rows)
    lines = []
    first = rows[0] if rows else {}
    lines.append(f"# RGA sweep: {first.get('device', '?')}\n")
    if rows:
        lines.append(f"torch {first['torch']}, triton {first['triton'] or '-'}, python {first['python']}, "
                     f"driver {first['driver'] or '-'}, TF32 {first['tf32'] or '-'}, git {first['git_commit'] or '-'}; "
                     f"{len(rows)} rows from `{csv_path}`.\n")
        counts = defaultdict(int)
        for r in rows:
            counts[r["status"]] += 1
        failed = [r for r in rows if r["correct"] is False]
        unchecked = [r for r in rows if r["status"] == "ok" and r["correct"] is None]
        lines.append("Status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                     + f"; correctness failures {len(failed)}; unchecked {len(unchecked)}.\n")
        loads = [(r["load_avg"], r["cpu_cores"]) for r in rows if r.get("load_avg") is not None and r.get("cpu_cores")]
        busy = [(load, cores) for load, cores in loads if load > cores]
        if busy:
            load, cores = max(busy)
            lines.append(f"**The machine was busy**: load average up to {load:.1f} on {int(cores)} cores while "
                         f"these rows ran ({len(busy)} of {len(rows)} rows). CPU times then measure the load as "
                         "much as the code; the speed-ups come from interleaved, paired runs, which hold up "
                         "better, and rows whose median ratio stayed uncertain are marked `(noisy)` and left out "
                         "of the "
                         "headline. For clean numbers: an idle machine (bench/README.md: what `--threads 1` does and "
                         f"does not fix). Threads per step here: "
                         f"{', '.join(sorted({str(int(r['threads'])) for r in rows if r.get('threads')})) or '-'}.\n")
        noisy = [r for r in rows if r.get("noisy")]
        if noisy:
            # a ratio's noise and a baseline time's noise are different news: count them apart
            timed_only = sum(1 for r in noisy if r.get("impl") == "reference")
            ratios = len(noisy) - timed_only
            count = (f"{ratios} speed-up{'s' * (ratios != 1)} and {timed_only} reference time{'s' * (timed_only != 1)}"
                     if timed_only else str(len(noisy)))
            lines.append(f"Noisy rows: {count} (`(noisy)`: the 95 % confidence interval of the row's median "
                         "paired ratio, or of its median time where it has none (`ci_low`, `ci_high`), still spanned "
                         "more than 1.5x when its time budget ran out, or its ratio rests on fewer than 6 rounds "
                         "that no load spike hit, or the middle half of those rounds' ratios spans more than 2x; "
                         "left out of the headline means). `(noisy, faster)`: the interval lies wholly above x1, so "
                         "the row is faster than the reference with 95 % confidence, by an amount the load left "
                         "unsettled.\n")
            sure = [r for r in noisy if direction(r)]
            if sure:
                lines.append(f"Of the {len([r for r in noisy if r.get('speedup_p20') is not None])} noisy paired "
                             f"rows, {len(sure)} still say which is faster: "
                             + ", ".join(f"{r['impl']} {r['C']}x{r['H']}x{r['W']} {r['mode']} {direction(r)} "
                                         f"(x{r['ci_low']:.3g}-x{r['ci_high']:.3g})" for r in sure) + ".\n")
        if counts["interpreted"]:
            lines.append("`interp.`: run by Triton's interpreter on the CPU; its correctness check counts, it is not "
                         "timed and is left out of every ratio.\n")
        ceil = [f"copy {first['ceiling_gbps']:.0f} GB/s"] if first["ceiling_gbps"] else []
        by_dtype = {r["dtype"]: r["ceiling_tflops"] for r in rows if r["ceiling_tflops"]}
        ceil += [f"{d} matmul {t:.3g} TFLOP/s" for d, t in by_dtype.items()]
        lines.append("Measured ceilings: " + ", ".join(ceil) + ".")
        if first.get("spec_label"):
            spec = {r["dtype"]: r["spec_tflops"] for r in rows if r["spec_tflops"]}
            lines.append(f"{first['spec_label']}: {first['spec_gbps']:.0f} GB/s, "
                         + ", ".join(f"{d} {t:g} TFLOP/s" for d, t in spec.items()) + " (dense).")
        lines.append("")

    # Headline: geometric means over cases where both sides ran and passed.
    lines.append("## Headline\n")
    lines.append("Geometric mean over every case (shape x batch x branch x mode x dtype) where both rows ran, "
                 "passed the correctness check and are not noisy. `xK vs Y` = time of Y / time of the "
                 "implementation (higher is "
                 "better); memory = peak of the reference / peak of the implementation. `rga_triton best` is the "
                 "fastest correct of " + ", ".join(FAST) + " per case.\n")
    lines.append("| implementation | vs reference | vs compile | vs torch | memory vs reference | cases |")
    lines.append("|---|---|---|---|---|---|")
    for name in [n for n in names if n != "reference"] + ["rga_triton best"]:
        pairs = []
        for by_impl in cases.values():
            row = best_fast(by_impl) if name == "rga_triton best" else by_impl.get(name)
            if _steady(row):
                pairs.append((row, by_impl))
        if not pairs:
            continue
        vs = [None if other == name else _geomean([_time_ratio(b.get(other), r, _steady) for r, b in pairs])
              for other in ("reference", "compile", "torch")]
        mem = _geomean([_mem_ratio(b.get("reference"), r) for r, b in pairs])
        lines.append(f"| {name} | {_ratio(vs[0])} | {_ratio(vs[1])} | {_ratio(vs[2])} | {_ratio(mem)} | {len(pairs)} |")
    lines.append("")

    # Per shape, for each (mode, dtype, branch).
    groups = defaultdict(list)
    for key in cases:
        groups[(key[5], key[6], key[4])].append(key)
    for (mode, dtype, branch), keys in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        lines.append(f"## {mode}{' (forward + backward)' if mode == 'train' else ' (forward)'}, {dtype}, {branch}\n")
        lines.append("Median ms per implementation; ratios for the fastest correct rga_triton implementation. "
                     f"`(host)`: host-bound, the host took at least {HOST_BOUND:.0%} of that time to issue the step "
                     "(column `host_ms`), so the GPU idled between kernels; in a model, earlier work queued on "
                     "the GPU hides that. `(no graphs)`: torch.compile skipped CUDA graphs in this graphed row "
                     "(its `note` says why), so it timed the compiled step without them. `(vs wrong)`: a ratio "
                     "against a baseline that failed its correctness check. On a CPU, `vs reference` is the median of "
                     "ratios paired round by round (interleaved timing; rounds a load spike hit, whose pair time is "
                     "over twice that of the fastest tenth of rounds, left out), with the 20th-80th percentile "
                     "of the kept single-round ratios in brackets; `(noisy)`: the median's 95 % confidence interval "
                     "still spanned more than 1.5x, fewer than 6 rounds were kept, or their ratios' middle half "
                     "spans more than 2x: the ratio is not to be trusted.\n")
        head = ["shape CxHxW", "input", "B"] + [f"{n} ms" for n in names] + \
               ["rga_triton best", "vs reference", "vs compile", "vs torch", "memory vs reference"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for key in keys:
            by_impl = cases[key]
            any_row = next(iter(by_impl.values()))
            best = best_fast(by_impl)
            cells = [f"{key[0]}x{key[1]}x{key[2]}",
                     f"{any_row['input_hw']} s{any_row['stage']}" if any_row.get("input_hw") else "", str(key[3])]
            cells += [_cell(by_impl.get(n)) for n in names]
            if best:
                cells += [best["impl"]]
                cells += [_vs_baseline(by_impl.get(o), best) for o in ("reference", "compile", "torch")]
                cells.append(_ratio(_mem_ratio(by_impl.get("reference"), best)))
            else:
                cells += ["-"] * 5
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    problems = [r for r in rows if r["correct"] is False or r["status"] in ("error", "oom")]
    if problems:
        lines.append("## Failures, errors and out-of-memory rows\n")
        for r in problems[:200]:
            what = "WRONG" if r["correct"] is False else r["status"].upper()
            err = f" rel err {r['rel_err']:.2e}" if r["rel_err"] is not None else ""
            if r["rel_err_grad_x"] is not None:
                err += f", grad x {r['rel_err_grad_x']:.2e}"
            lines.append(f"- {what} {r['impl']} {r['branch']} {r['C']}x{r['H']}x{r['W']} B={r['batch']} "
                         f"{r['mode']} {r['dtype']}:{err} {r.get('note') or ''}".rstrip())
        if len(problems) > 200:
            lines.append(f"- ... and {len(problems) - 200} more (see the CSV)")
        lines.append("")
    skipped = sorted({(r["impl"], r.get("note") or "") for r in rows if r["status"] == "skipped"})
    if skipped:
        lines.append("## Skipped\n")
        lines += [f"- {impl}: {note}" for impl, note in skipped]
        lines.append("")
    with open(md_path, "w") as f:
        f.write("\n".join(lines))
    return md_path
