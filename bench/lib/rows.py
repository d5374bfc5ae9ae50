"""Reading a sweep CSV: its rows with numbers as numbers, and the implementations in plot order.
A leaf of bench/: plots.py, report.py and goals.py read rows through it."""
from __future__ import annotations

import csv

ORDER = ["reference", "compile", "compile-max-autotune", "torch", "triton", "triton-tiled", "triton-graphs"]
NUMERIC = ("batch", "C", "H", "W", "N", "time_ms_median", "time_ms_p20", "time_ms_p80", "peak_mem_mb", "flops",
           "min_bytes", "intensity", "tflops", "gbps", "speedup_vs_reference", "ceiling_tflops", "ceiling_gbps",
           "spec_tflops", "spec_gbps", "rel_err", "rel_err_grad_x", "host_ms", "graphs_skipped",
           "speedup_p20", "speedup_p80", "ci_low", "ci_high", "load_avg", "cpu_cores", "threads")


def load_rows(csv_path: str) -> list[dict]:
    """The CSV's rows with numbers as numbers (None where empty), ``correct`` as True/False/None and
    ``noisy`` as True/False."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in NUMERIC:
            value = row.get(key, "")
            row[key] = float(value) if value not in ("", None) else None
        for key in ("batch", "C", "H", "W", "N"):
            row[key] = int(row[key]) if row[key] is not None else None
        row["correct"] = {"True": True, "False": False}.get(row.get("correct", ""))
        row["noisy"] = row.get("noisy") == "True"    # older CSVs have no such column: not marked
    return rows


def impls_in(rows) -> list[str]:
    """The implementations present in ``rows``, in plot order (unknown ones last, sorted)."""
    present = {r["impl"] for r in rows}
    return [i for i in ORDER if i in present] + sorted(present - set(ORDER))


def megabytes(mb: float) -> str:
    """A peak memory for people: KB under 1 MB (never "0 MB"), else MB."""
    if mb < 1:
        return f"{mb * 1024:.3g} KB"
    return f"{mb:.0f} MB" if mb >= 10 else f"{mb:.2g} MB"
