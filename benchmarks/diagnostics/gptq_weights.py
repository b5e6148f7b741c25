"""What GPTQ does to the weights' own error, without any reconstruction.

    python benchmarks/diagnostics/gptq_weights.py BUILD_DIR [--profile tensorrt] [--bits 8] [--equalize all]
        [--out benchmarks/results/gptq_weights/NAME.json]

``BUILD_DIR`` is a build folder of the Fashion-MNIST benchmark (its ``fused.pt`` is used). The fused
model is equalized, split and quantized as ``build`` does, with min-max ranges from the 1024
calibration images; then the mean max-abs logit error against FP32 (test images and calibration
images) and the test images whose top-1 changes are reported with round-to-nearest weights and with
GPTQ-rounded ones (``calibrate.gptq.gptq_unit`` over the whole model, activation quantizers on, as
``--gptq`` runs it per unit), each with only the weights quantized and with everything quantized.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from repapq_deploy.artifacts import write_json
from repapq_deploy.calibrate import calibrate
from repapq_deploy.calibrate.gptq import gptq_unit
from repapq_deploy.calibrate.prepare import quantize_model
from repapq_deploy.environment import hardware
from repapq_deploy.quant.identity_split import decide_identity_split
from repapq_deploy.quant.placement import FakeQuantModel
from repapq_deploy.quant.scheme import QuantConfig
from repapq_deploy.reparam.equalize import EQUALIZE_MODES, equalize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _reference
from _reference import ensure_calib_set, ensure_test_set, logit_error, logits  # noqa: E402


def measure(qm: FakeQuantModel, weights_only: bool, data: dict[str, tuple[torch.Tensor, np.ndarray]]) -> dict:
    qm.set_mode("quant")
    if weights_only:
        for q in qm.act_quantizers.values():
            q.mode = "off"
    row = {}
    for name, (x, ref) in data.items():
        out = logits(qm.module, x)
        row[f"{name}_logit_error"] = logit_error(out, ref)
        if name == "test":
            row["flips"] = int((out.argmax(1) != ref.argmax(1)).sum())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build", type=Path)
    ap.add_argument("--profile", default="tensorrt")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--equalize", choices=EQUALIZE_MODES, default="all")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    fused = torch.load(args.build / "fused.pt", weights_only=False).eval()  # our own artifact
    calib = torch.from_numpy(np.load(ensure_calib_set(1024, 0))["x"])
    x = torch.from_numpy(np.load(ensure_test_set())["x"])
    fused, _ = equalize(fused, calib, args.equalize)
    config, _ = decide_identity_split(fused, calib, QuantConfig(args.profile, args.bits, 8, True))
    qm = quantize_model(fused, config)
    calibrate(qm, calib, "minmax")
    data = {"test": (x, logits(fused, x)), "calib": (calib, logits(fused, calib))}
    rows = [{"weights": "round-to-nearest", "quantized": q, **measure(qm, q == "weights", data)}
            for q in ("weights", "all")]
    qm.set_mode("quant")
    t0 = time.perf_counter()
    gptq_unit(qm.module, calib, 32, "cpu")
    seconds = time.perf_counter() - t0
    rows += [{"weights": "GPTQ", "quantized": q, **measure(qm, q == "weights", data)} for q in ("weights", "all")]
    table = Table(title=f"{args.build.name}: W{args.bits} {args.profile}, min-max ranges, no reconstruction")
    for col in ("weights", "quantized", "logit error test", "logit error calib", "test flips"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["weights"], r["quantized"], f"{r['test_logit_error']:.4f}", f"{r['calib_logit_error']:.4f}",
                      str(r["flips"]))
    Console().print(table)
    result = {"build": str(args.build), "profile": args.profile, "bits": args.bits, "equalize": args.equalize,
              "gptq_seconds": round(seconds, 1), "rows": rows, "hardware": hardware()}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result)


if __name__ == "__main__":
    main()
