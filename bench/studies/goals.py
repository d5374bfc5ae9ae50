"""Which training goals (issues 6 and 7) a GPU's results meet: the sweep's RGA-SC rows, RGA-Net's steps.

The goals, for one RGA-SC training step (forward + backward) at B=64 on the stages of a 256 x 128 input:

- the Triton path >= 25x the reference and >= 10x torch.compile of it at the first stage, float32;
- the Triton path >= 1.5x the torch path at every stage (each dtype the CSV holds);
- the step's peak memory <= 5 % of the reference's at the first stage, float32.

And for whole RGA-Net training steps (``bench/studies/rga_net_step.py``'s CSV, 256 x 128): converted blocks on the
Triton path >= 2x the authors' blocks in images/s, per precision, with and without torch.compile.

A goal is judged only from rows that ran and passed their correctness check; a baseline that failed its
own check still took its time, so a ratio against it is given and flagged. Missing rows say so.

    python bench/studies/goals.py [bench/results/<device>/sweep.csv] [--impl triton-graphs] [--net FILE]
    # default: this GPU's sweep.csv, and its rga_net_step.csv beside it when there is one
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.lib.rows import load_rows  # noqa: E402

BATCH = 64
INPUT = "256x128"


@dataclass
class Verdict:
    goal: str
    measured: str
    holds: bool | None          # None: the rows it needs are missing or failed


def _rows(rows, impl, dtype, stage):
    return [r for r in rows if r["impl"] == impl and r["mode"] == "train" and r["branch"] == "RGA-SC"
            and r["batch"] == BATCH and r["input_hw"] == INPUT and str(r["stage"]) == str(stage)
            and r["dtype"] == dtype]


def _one(rows, impl, dtype, stage):
    found = _rows(rows, impl, dtype, stage)
    return found[-1] if found else None        # --resume keeps the latest row last


def _missing(row, impl: str) -> str | None:
    """Why a row cannot be judged, or None."""
    if row is None:
        return f"no {impl} row"
    if row["status"] != "ok":
        return f"{impl}: {row['status']}"
    return None


def _ratio(rows, impl: str, baseline: str, dtype: str, stage: int, goal: str, at_least: float) -> Verdict:
    """Verdict on baseline time / ``impl`` time >= ``at_least`` at one stage and dtype."""
    ours, theirs = _one(rows, impl, dtype, stage), _one(rows, baseline, dtype, stage)
    why = _missing(ours, impl) or ("our row failed its correctness check" if ours["correct"] is False else None) \
        or _missing(theirs, baseline)
    if why:
        return Verdict(goal, why, None)
    ratio = theirs["time_ms_median"] / ours["time_ms_median"]
    flag = f" ({baseline} failed its check)" if theirs["correct"] is False else ""
    return Verdict(goal, f"x{ratio:.3g} ({theirs['time_ms_median']:.3g} / {ours['time_ms_median']:.3g} ms){flag}",
                   ratio >= at_least)


def verdicts(rows: list[dict], impl: str = "triton") -> list[Verdict]:
    out = [_ratio(rows, impl, "reference", "float32", 1, "stage 1 float32: >= 25x the reference", 25),
           _ratio(rows, impl, "compile", "float32", 1, "stage 1 float32: >= 10x torch.compile of the reference", 10)]
    dtypes = sorted({r["dtype"] for r in rows if r["impl"] == impl and r["mode"] == "train"}) or ["float32"]
    for dtype in dtypes:
        for stage in (1, 2, 3, 4):
            out.append(_ratio(rows, impl, "torch", dtype, stage, f"stage {stage} {dtype}: >= 1.5x the torch path", 1.5))
    ours, ref = _one(rows, impl, "float32", 1), _one(rows, "reference", "float32", 1)
    goal = "stage 1 float32: peak memory <= 5 % of the reference's"
    why = _missing(ours, impl) or _missing(ref, "reference")
    if why or ours["correct"] is False or not (ours["peak_mem_mb"] and ref["peak_mem_mb"]):
        out.append(Verdict(goal, why or "our row failed its check or has no peak memory", None))
    else:
        share = ours["peak_mem_mb"] / ref["peak_mem_mb"]
        out.append(Verdict(goal, f"{share:.1%} ({ours['peak_mem_mb']:.0f} / {ref['peak_mem_mb']:.0f} MB)",
                           share <= 0.05))
    return out


def net_verdicts(rows: list[dict]) -> list[Verdict]:
    """Issue 7: RGA-Net steps with converted blocks (Triton path) >= 2x the authors' blocks in images/s, for
    each (precision, compiled) the CSV holds. ``rows``: rga_net_step.csv as read (strings)."""
    out = []
    keys = dict.fromkeys((r["precision"], r["compiled"]) for r in rows)
    for precision, compiled in keys:
        goal = f"RGA-Net step, {precision}{', compiled' if compiled == 'True' else ''}: >= 2x images/s"
        pick = {r["impl"]: r for r in rows if (r["precision"], r["compiled"]) == (precision, compiled)}
        ours, theirs = pick.get("triton"), pick.get("reference")
        mismatch = ours is not None and ours["status"] == "mismatch"
        why = ("triton's first loss missed the reference's" if mismatch else _missing(ours, "triton")) \
            or _missing(theirs, "reference")
        if why:
            out.append(Verdict(goal, why, None))
            continue
        ratio = float(ours["images_per_s"]) / float(theirs["images_per_s"])
        out.append(Verdict(goal, f"x{ratio:.3g} ({ours['images_per_s']} / {theirs['images_per_s']} images/s, "
                                 f"B={ours['batch']}, {ours['height']}x{ours['width']})", ratio >= 2))
    return out


def table(found: list[Verdict], title: str) -> str:
    lines = [f"| {title} | measured | holds |", "|---|---|---|"]
    lines += [f"| {v.goal} | {v.measured} | {'-' if v.holds is None else 'yes' if v.holds else 'no'} |"
              for v in found]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="?", help="a sweep.csv (default: this GPU's, bench/results/<device>/sweep.csv)")
    parser.add_argument("--impl", default="triton", help="the rga_triton row judged (default triton)")
    parser.add_argument("--net", default=None, help="rga_net_step.csv (default: beside the sweep's, if there)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = args.csv is not None
    if not given:
        import torch

        from bench.lib import hardware
        if not torch.cuda.is_available():
            parser.error("csv: no GPU here to name the results folder; give the CSV's path")
        args.csv = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                hardware.results_dir_name(torch.device("cuda")), "sweep.csv")
    if os.path.exists(args.csv):
        print(table(verdicts(load_rows(args.csv), args.impl),
                    f"goal ({args.impl}, RGA-SC train step, B={BATCH}, {INPUT} stages)"))
    elif given:
        parser.error(f"csv: no file {args.csv}")
    else:
        print(f"no sweep results yet ({args.csv})")
    net = args.net or os.path.join(os.path.dirname(os.path.abspath(args.csv)), "rga_net_step.csv")
    if os.path.exists(net):
        with open(net, newline="") as f:
            print("\n" + table(net_verdicts(list(csv.DictReader(f))), "goal (RGA-Net training step, converted vs "
                                                                         "the authors' blocks)"))
    elif args.net:
        parser.error(f"--net: no file {args.net}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
