"""Export a build's calibrated state again with this checkout's exporter, without calibrating again.

    python benchmarks/reexport.py BUILD_DIR [BUILD_DIR ...] --out DIR [--json benchmarks/results/NAME.json]

For each ``BUILD_DIR`` (a folder of ``repapq-deploy build`` with ``fused.pt``, ``qstate.pt`` and
``model.fp32.onnx``), writes ``DIR/<n>-<build name>/`` with the QDQ graph exported from that
``qstate.pt`` by the current ``export.onnx`` and a copy of the build's FP32 graph, so that two
exporters can be compared on the very same calibration (e.g. with ``fp16_constants.py``, or by the
export check printed here: the QDQ graph run by ONNX Runtime against the PyTorch fake-quant model on
``--calib-count`` training images of calibration draw ``--seed``). A build stage re-run would
calibrate again instead (every stage re-runs when the tool's code changes).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch
from _reference import ensure_calib_set, write_results
from rich.console import Console
from rich.table import Table

from repapq_deploy.calibrate.run import load_qstate
from repapq_deploy.export.graphs import FP32_ONNX, QDQ_ONNX
from repapq_deploy.export.onnx import check_against_torch, export_qdq, graph_summary
from repapq_deploy.pipeline import FUSED, QSTATE, load_fused


def reexport(build: Path, out: Path, x: torch.Tensor) -> dict:
    """Export ``build``'s qstate into ``out`` and check it against PyTorch on ``x``."""
    for name in (FUSED, QSTATE, FP32_ONNX):
        if not (build / name).is_file():
            raise SystemExit(f"{build}: no {name}; pass a build folder of repapq-deploy build")
    qm = load_qstate(load_fused(build / FUSED), build / QSTATE)
    out.mkdir(parents=True, exist_ok=True)
    export_qdq(qm, x[:8], out / QDQ_ONNX)
    shutil.copy(build / FP32_ONNX, out / FP32_ONNX)
    had_qdq = (build / QDQ_ONNX).is_file()  # a build stopped after calibrate has none
    return {"build": str(build), "out": str(out), "check": check_against_torch(qm, out / QDQ_ONNX, x).to_dict(),
            "check_before": check_against_torch(qm, build / QDQ_ONNX, x).to_dict() if had_qdq else None,
            "ops_before": graph_summary(build / QDQ_ONNX)["ops"] if had_qdq else None,
            "ops_after": graph_summary(out / QDQ_ONNX)["ops"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, required=True, help="folder for the re-exported graphs")
    ap.add_argument("--calib-count", type=int, default=1024, help="calibration images of the export check")
    ap.add_argument("--seed", type=int, default=0, help="calibration draw of the export check")
    ap.add_argument("--json", type=Path, help="JSON file of the rows")
    args = ap.parse_args()
    x = torch.from_numpy(np.load(ensure_calib_set(args.calib_count, args.seed))["x"])
    table = Table(title="re-exported with this checkout's exporter (check: ONNX Runtime vs PyTorch)")
    for col in ("build", "agreement % before / after", "max rel diff before / after", "ops changed"):
        table.add_column(col)
    rows = []
    for i, build in enumerate(args.builds):
        r = reexport(build, args.out / f"{i}-{build.name}", x)
        before, after = r["ops_before"] or {}, r["ops_after"]
        changed = {op: f"{before.get(op, 0)}->{after.get(op, 0)}" for op in sorted(set(before) | set(after))
                   if before.get(op, 0) != after.get(op, 0)}
        b, a = r["check_before"] or {"agreement_top1": float("nan"), "max_rel_diff": float("nan")}, r["check"]
        table.add_row(f"{build.parent.name}/{build.name}", f"{b['agreement_top1']:.2f} / {a['agreement_top1']:.2f}",
                      f"{b['max_rel_diff']:.4f} / {a['max_rel_diff']:.4f}",
                      ", ".join(f"{k} {v}" for k, v in changed.items()))
        rows.append(r)
    Console(width=160).print(table)
    if args.json:
        write_results(args.json, args, {"rows": rows})


if __name__ == "__main__":
    main()
