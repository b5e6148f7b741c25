"""Which quantized tensors flip top-1 predictions: one quantizer at a time against FP32.

    python benchmarks/quant_sensitivity.py BUILD_DIR --profile tensorrt --bits 8 --method minmax \
        [--preset fast] [--equalize all] [--holdout 10000] [--out benchmarks/results/sensitivity/NAME.json]

``BUILD_DIR`` is a build folder with a ``fused.pt`` (as for ``recipe_screen.py``). The model is
calibrated once with ``--method`` (equalization and the identity split as build does them); then
every activation quantizer, and every weight quantizer, is switched on alone and the images whose
top-1 differs from the FP32 model's are counted (with those lost and gained against the labels and
the mean max-abs logit error). Flips do not add up: the row with everything quantized is the
measure, the single rows show where the error enters. With a reconstruction method the single rows
keep its learned weights and QPRep affine, so they mix the quantizer's error with the learned change.
Prints a table (largest first) and writes the rows as JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _reference import ensure_calib_set, ensure_holdout_set, ensure_test_set, write_results
from recipe_screen import logits
from rich.console import Console
from rich.table import Table

from repapq_deploy.calibrate import calibrate
from repapq_deploy.calibrate.prepare import quantize_model
from repapq_deploy.quant.identity_split import decide_identity_split
from repapq_deploy.quant.placement import FakeQuantModel
from repapq_deploy.quant.scheme import QuantConfig
from repapq_deploy.reparam.equalize import EQUALIZE_MODES, equalize


def _row(name: str, out: np.ndarray, ref: np.ndarray, y: np.ndarray) -> dict:
    o, r = out.argmax(1), ref.argmax(1)
    return {"quantized": name, "flips": int((o != r).sum()), "lost": int(((o != y) & (r == y)).sum()),
            "gained": int(((o == y) & (r != y)).sum()),
            "mean_max_abs_logit_error": float(np.abs(out - ref).max(1).mean())}


def sensitivity(qm: FakeQuantModel, x: torch.Tensor, y: np.ndarray, ref: np.ndarray) -> list[dict]:
    """Everything quantized, then each activation and each weight quantizer alone."""
    qm.set_mode("quant")
    rows = [_row("all", logits(qm.module, x), ref, y)]
    # name an activation quantizer by the tensor it quantizes (the graph node that feeds it)
    source = {n.target: n.args[0].name for n in qm.module.graph.nodes
              if n.op == "call_module" and n.target in qm.act_quantizers and n.args}
    for name, q in qm.act_quantizers.items():
        qm.set_mode("off")
        q.mode = "quant"
        rows.append(_row(f"activation {source.get(name, name)}", logits(qm.module, x), ref, y))
    for name, layer in qm.weight_layers.items():
        qm.set_mode("off")
        layer.weight_quantizer.enabled = True
        rows.append(_row(f"weights {name}", logits(qm.module, x), ref, y))
    qm.set_mode("quant")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build", type=Path)
    ap.add_argument("--profile", choices=["tensorrt", "onnxruntime"], default="tensorrt")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--method", default="minmax")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--equalize", choices=EQUALIZE_MODES, default="all")
    ap.add_argument("--calib-count", type=int, default=1024)
    ap.add_argument("--holdout", type=int, default=0, help="evaluate on this many held-out training images")
    ap.add_argument("--out", type=Path, help="JSON file of the rows")
    args = ap.parse_args()
    if not (args.build / "fused.pt").exists():
        raise SystemExit(f"{args.build}: no fused.pt; pass a build folder of repapq-deploy build")
    fused = torch.load(args.build / "fused.pt", weights_only=False).eval()  # our own artifact
    calib = torch.from_numpy(np.load(ensure_calib_set(args.calib_count, 0))["x"])
    data = np.load(ensure_holdout_set(args.holdout, args.calib_count, 0) if args.holdout else ensure_test_set())
    x, y = torch.from_numpy(data["x"]), data["y"]
    ref = logits(fused, x)
    fused, _ = equalize(fused, calib, args.equalize)
    config, _ = decide_identity_split(fused, calib, QuantConfig(args.profile, args.bits, 8, True))
    qm = quantize_model(fused, config)
    calibrate(qm, calib, args.method, preset=args.preset)
    rows = sensitivity(qm, x, y, ref)
    table = Table(title=f"{args.method} {args.profile} W{args.bits}A{args.bits}: flips vs FP32 "
                        f"({'holdout' if args.holdout else 'test'}, {len(x)} images)")
    for col in ("quantized", "flips", "lost", "gained", "mean max |logit err|"):
        table.add_column(col)
    for r in [rows[0]] + sorted(rows[1:], key=lambda r: -r["flips"]):
        if r["flips"] or r is rows[0]:
            table.add_row(r["quantized"], str(r["flips"]), str(r["lost"]), str(r["gained"]),
                          f"{r['mean_max_abs_logit_error']:.4f}")
    Console(width=120).print(table)
    if args.out:
        write_results(args.out, args, {"rows": rows})


if __name__ == "__main__":
    main()
