"""Pool repeated ``benchmarks/calibration.py`` runs of one model into per-row means.

    python benchmarks/seed_summary.py RUN_DIR [RUN_DIR ...] --arch mobileone_s0
        [--target default/W8A8=0.03,default/W6A6=0.15,fast/W6A6=0.4] [--out summary.json]

Each ``RUN_DIR`` is an ``--out`` folder of ``benchmarks/calibration.py`` holding ``<arch>.json`` (one seed,
one thread count). Rows are matched by (method, preset, setting, profile). For each it prints the drop of
every run, their mean, sample standard deviation and the standard error of the mean, and, for ``repapq``
rows, the mean against the project's goal for that preset and setting. A row's runs differ in the
calibration seed (which also draws the calibration images) and in the thread count
(``threads_per_build``): on the CPU both change a reconstruction's result (docs/method.md, "On the
CPU"), so every run is one draw of the same random drop; a run calibrated on CUDA (the row's ``device``)
is another such draw, since its float sums run in yet another order, and is labelled ``cuda`` in place of its
thread count.
All runs must measure the same checkpoint: the same FP32 top-1 and, among the runs that record one, the same
``model_digest`` (content hash) and the same ``model_sha256`` (file hash, recorded by older runs).

A row met twice in the same draw (same seed, thread count and device: two folders that both hold it) is
counted once, the first folder's, and named on stderr: pooling it twice would weigh that draw double.
Rows of one setting and profile that share draws are also compared draw by draw (a ``repapq`` default
row first): the mean paired difference of their drops and its standard error, usually smaller than
the two rows' own because a draw's calibration images tend to move both rows alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from repapq_deploy.artifacts import write_json

KEY = ("method", "preset", "setting", "profile")


def load_runs(dirs: list[Path], arch: str) -> list[dict]:
    """The ``<arch>.json`` of every run folder; exits with a one-line error on a missing file or mixed
    checkpoints."""
    runs = []
    for d in dirs:
        path = d / f"{arch}.json"
        if not path.is_file():
            sys.exit(f"error: {path} not found: pass --out folders of benchmarks/calibration.py for --arch {arch}")
        runs.append({"dir": str(d), **json.loads(path.read_text())})
    fp32 = {r["fp32"] for r in runs}
    for field in ("model_digest", "model_sha256"):
        seen = {row[field] for r in runs for row in r["rows"] if row.get(field)}
        if len(seen) > 1:
            sys.exit(f"error: the runs measured different checkpoints ({len(seen)} values of {field}); "
                     "pool only runs of one model")
    if len(fp32) > 1:
        sys.exit(f"error: the runs measured different checkpoints (FP32 {sorted(fp32)}); pool only runs of one model")
    return runs


def _draw(run: dict) -> tuple:
    """What makes one run of a row another random draw: its seed, and its thread count or CUDA."""
    return run["seed"], "cuda" if run["device"] == "cuda" else run["threads"]


def summarize(runs: list[dict], targets: dict[str, float]) -> list[dict]:
    """One entry per row key, with each run's drop and the pooled statistics; a draw seen twice counts once."""
    cells: dict[tuple, list[dict]] = {}
    for run in runs:
        for row in run["rows"]:
            got = cells.setdefault(tuple(row[k] for k in KEY), [])
            entry = {"dir": run["dir"], "seed": run["seed"], "threads": run["threads_per_build"],
                     "device": row.get("device", "cpu"), "drop_pp": round(run["fp32"] - row["top1"], 4),
                     "agreement": row["agreement"], "lost": row.get("lost"), "gained": row.get("gained")}
            first = next((g for g in got if _draw(g) == _draw(entry)), None)
            if first is not None:
                print(f"warning: {row['method']} {row['preset']} {row['setting']} {row['profile']}: draw "
                      f"(seed {entry['seed']}, {_draw(entry)[1]}) is in {first['dir']} and {entry['dir']}; "
                      f"counted once (drops {first['drop_pp']:+.2f} / {entry['drop_pp']:+.2f})", file=sys.stderr)
                continue
            got.append(entry)
    out = []
    for key, got in cells.items():
        drops = [g["drop_pp"] for g in got]
        sd = statistics.stdev(drops) if len(drops) > 1 else None
        target = targets.get(f"{key[1]}/{key[2]}") if key[0].startswith("repapq") else None
        mean = statistics.fmean(drops)
        out.append({**dict(zip(KEY, key, strict=True)), "runs": got, "n": len(drops), "mean_drop_pp": mean,
                    "sd_pp": sd, "sem_pp": sd / len(drops) ** 0.5 if sd is not None else None,
                    "mean_agreement": statistics.fmean(g["agreement"] for g in got),
                    "target_pp": target, "meets_target": None if target is None else mean <= target})
    return out


def paired(cells: list[dict]) -> list[dict]:
    """Draw-by-draw differences (second row's drop minus the first's) between rows of one setting and
    profile that share at least two draws; a ``repapq`` default row is always the first of a pair."""
    def rank(c: dict) -> int:
        return 0 if c["method"].startswith("repapq") and c["preset"] == "default" else 1

    out = []
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["setting"], c["profile"]), []).append(c)
    for group in groups.values():
        group = sorted(group, key=rank)  # stable: the input order otherwise
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                da = {_draw(r): r["drop_pp"] for r in a["runs"]}
                diffs = [r["drop_pp"] - da[_draw(r)] for r in b["runs"] if _draw(r) in da]
                if len(diffs) < 2:
                    continue
                sd = statistics.stdev(diffs)
                out.append({"setting": a["setting"], "profile": a["profile"],
                            "first": {k: a[k] for k in ("method", "preset")},
                            "second": {k: b[k] for k in ("method", "preset")}, "n": len(diffs),
                            "mean_diff_pp": statistics.fmean(diffs), "sem_pp": sd / len(diffs) ** 0.5})
    return out


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--arch", required=True)
    ap.add_argument("--target", default="default/W8A8=0.03,default/W6A6=0.15,fast/W6A6=0.4",
                    help="PRESET/SETTING=PP pairs: the largest mean repapq drop that meets the target")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    try:
        targets = {k: float(v) for k, v in (p.split("=") for p in args.target.split(",") if p)}
    except ValueError:
        sys.exit(f"error: --target {args.target!r}: write PRESET/SETTING=PP pairs, e.g. default/W8A8=0.03")
    runs = load_runs(args.runs, args.arch)
    cells = summarize(runs, targets)
    table = Table(title=f"{args.arch}: top-1 drop in pp over {len(runs)} runs (FP32 {runs[0]['fp32']:.2f} %)")
    for col in ("method", "preset", "setting", "profile", "drops (seed/threads or cuda)", "mean", "s.d.", "s.e.m.",
                "agreement %", "target"):
        table.add_column(col, justify="right")
    for c in cells:
        drops = " ".join(f"{r['drop_pp']:+.2f}({r['seed']}/{'cuda' if r['device'] == 'cuda' else r['threads']})"
                         for r in c["runs"])
        verdict = "-" if c["target_pp"] is None else f"≤ {c['target_pp']}: {'yes' if c['meets_target'] else 'no'}"
        table.add_row(c["method"], c["preset"], c["setting"], c["profile"], drops, f"{c['mean_drop_pp']:+.3f}",
                      _num(c["sd_pp"]), _num(c["sem_pp"]), f"{c['mean_agreement']:.2f}", verdict)
    console = Console(width=200)
    console.print(table)
    pairs = paired(cells)
    if pairs:
        ptable = Table(title="paired by draw: second row's drop minus the first's (pp)")
        for col in ("setting", "profile", "first", "second", "draws", "mean difference", "s.e."):
            ptable.add_column(col, justify="right")
        for p in pairs:
            ptable.add_row(p["setting"], p["profile"], f"{p['first']['method']} {p['first']['preset']}",
                           f"{p['second']['method']} {p['second']['preset']}", str(p["n"]),
                           f"{p['mean_diff_pp']:+.3f}", f"{p['sem_pp']:.3f}")
        console.print(ptable)
    if args.out:
        write_json(args.out, {"arch": args.arch, "fp32": runs[0]["fp32"], "targets": targets, "cells": cells,
                              "paired": pairs})


if __name__ == "__main__":
    main()
