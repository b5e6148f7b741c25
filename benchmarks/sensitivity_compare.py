"""Compare two ``quant_sensitivity.py`` runs quantizer by quantizer (e.g. the two profiles' grids).

    python benchmarks/sensitivity_compare.py A.json B.json [--json]

For activation and for weight quantizers separately, over the tensors both runs quantize: how many
there are, the sum of their single-quantizer flips in A and in B, and the median over tensors of A's
mean max-abs logit error divided by B's. Where one grid is coarser than the other for a kind of
tensor, that median shows it (2 for twice the step); the flip sums, which double-count low-margin
images, only rank. Prints a table, or the rows as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

KINDS = ("activation", "weights")


def compare(rows_a: list[dict], rows_b: list[dict]) -> list[dict]:
    """One row per quantizer kind over the single-quantizer rows named alike in both runs."""
    a = {r["quantized"]: r for r in rows_a}
    b = {r["quantized"]: r for r in rows_b}
    out = []
    for kind in KINDS:
        names = [n for n in a if n.split(" ", 1)[0] == kind and n in b]
        ratios = [a[n]["mean_max_abs_logit_error"] / b[n]["mean_max_abs_logit_error"] for n in names
                  if b[n]["mean_max_abs_logit_error"] > 0]
        out.append({"kind": kind, "tensors": len(names),
                    "only_a": sum(n.split(" ", 1)[0] == kind and n not in b for n in a),
                    "only_b": sum(n.split(" ", 1)[0] == kind and n not in a for n in b),
                    "flips_a": sum(a[n]["flips"] for n in names), "flips_b": sum(b[n]["flips"] for n in names),
                    "median_error_ratio": statistics.median(ratios) if ratios else None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args()
    runs = []
    for path in (args.a, args.b):
        try:
            runs.append(json.loads(path.read_text())["rows"])
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"{path}: not a quant_sensitivity.py JSON ({e}); pass the file its --out wrote") from None
    rows = compare(*runs)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    table = Table(title=f"A = {args.a.name}, B = {args.b.name}: quantizers in both runs")
    for col in ("kind", "tensors", "only in A / B", "flips A", "flips B", "median error A / B"):
        table.add_column(col)
    for r in rows:
        ratio = "-" if r["median_error_ratio"] is None else f"{r['median_error_ratio']:.2f}"
        table.add_row(r["kind"], str(r["tensors"]), f"{r['only_a']} / {r['only_b']}", str(r["flips_a"]),
                      str(r["flips_b"]), ratio)
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
