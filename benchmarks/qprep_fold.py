"""QPRep fold check: ONNX Runtime's execution of the exported QDQ graph vs PyTorch *with* the affine layers.

    python benchmarks/qprep_fold.py [--model examples/fashion_mnist/model.safetensors]
        [--calib examples/fashion_mnist/calib.npz] [--iters 200] [--out benchmarks/results/qprep_fold.json]

For each profile x bit width: fuse the model, run RepAPQ (``--iters`` per unit) but keep the affine
layers, copy that model, fold, export, and run the QDQ graph with ONNX Runtime's reference execution
(no graph optimizations) on the calibration images. Reports the top-1 agreement and the per-sample
relative logit difference ``max|a - b| / max|a|`` (max, median, and the share of samples <= 1e-5).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from repapq_deploy.artifacts import write_json
from repapq_deploy.calibrate import calibrate
from repapq_deploy.calibrate import reconstruct as R
from repapq_deploy.calibrate.prepare import quantize_model
from repapq_deploy.environment import hardware, versions
from repapq_deploy.export import export_qdq
from repapq_deploy.export.onnx import reference_session
from repapq_deploy.load import load_model
from repapq_deploy.quant.identity_split import decide_identity_split
from repapq_deploy.quant.placement import FakeQuantModel
from repapq_deploy.quant.scheme import QuantConfig
from repapq_deploy.reparam import fuse_model


def check(qm: FakeQuantModel, x: torch.Tensor) -> dict:
    """Fold ``qm``'s affine layers, export, and compare ONNX Runtime with the unfolded model."""
    affine = copy.deepcopy(qm)
    qm.fold_affine()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_qdq(qm, x, path)
        sess = reference_session(path)
        b = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        a = affine.module(x).numpy()
    rel = np.abs(a - b).max(1) / np.abs(a).max(1)
    return {"samples": len(x), "agreement_top1": float((a.argmax(1) == b.argmax(1)).mean() * 100),
            "max_rel_diff": float(rel.max()), "median_rel_diff": float(np.median(rel)),
            "share_within_1e-5": float((rel <= 1e-5).mean() * 100)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="examples/fashion_mnist/model.safetensors")
    ap.add_argument("--calib", default="examples/fashion_mnist/calib.npz")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/qprep_fold.json"))
    args = ap.parse_args()
    model = load_model(args.model).module
    x = torch.from_numpy(np.ascontiguousarray(np.load(args.calib)["x"], dtype=np.float32))
    fused, _ = fuse_model(model, x[:32])
    R.PRESETS["check"] = {"iters": args.iters}
    rows = []
    for profile in ("tensorrt", "onnxruntime"):
        for bits in (8, 6):
            # the identity split decided on the calibration images, as build does
            config, _ = decide_identity_split(fused, x, QuantConfig(profile, bits, 8))
            qm = quantize_model(fused, config)
            calibrate(qm, x, "repapq", preset="check", overrides={"fold": False})  # keep the affine layers
            rows.append({"profile": profile, "bits": bits, **check(qm, x)})
    table = Table(title=f"QPRep fold: ONNX Runtime (exported QDQ) vs PyTorch with the affine, {args.model}")
    for col in ("profile", "bits", "agreement %", "max rel", "median rel", "within 1e-5 %"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["profile"], str(r["bits"]), f"{r['agreement_top1']:.2f}", f"{r['max_rel_diff']:.2e}",
                      f"{r['median_rel_diff']:.2e}", f"{r['share_within_1e-5']:.2f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"model": args.model, "calib": args.calib, "iters": args.iters, "rows": rows,
                          "hardware": hardware(), "versions": versions()})


if __name__ == "__main__":
    main()
