"""Every baseline method x bit width x profile on reference models trained on Fashion-MNIST.

    python benchmarks/matrix.py [--archs repvgg_a0,mobileone_s0] [--methods ...] [--out benchmarks/results]

Trains each reference model once (``examples/fashion_mnist/train.py``; cached under
``~/.cache/repapq-deploy/fmnist/<arch>/``), writes the full 10 000-image test set as the
evaluation file, then runs ``repapq-deploy build`` for every combination and collects the
reports. Prints a table and writes ``matrix.json`` and ``matrix.md``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from _reference import CACHE, ensure_model, ensure_test_set
from rich.console import Console
from rich.table import Table

from repapq_deploy.artifacts import write_json, write_text
from repapq_deploy.environment import hardware
from repapq_deploy.options import BuildOptions
from repapq_deploy.pipeline import Build

# Short schedules: this benchmark proves that every method x bits x profile builds and verifies on the
# real architectures; the accuracy benchmark of the calibration methods trains longer.
EPOCHS = {"repvgg_a0": 1, "mobileone_s0": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="repvgg_a0,mobileone_s0")
    ap.add_argument("--methods", default="minmax,percentile,entropy,mse,mae")
    ap.add_argument("--bits", default="8,6")
    ap.add_argument("--profiles", default="onnxruntime,tensorrt")
    ap.add_argument("--epochs", type=int, help="training epochs of the reference models (default: per arch)")
    ap.add_argument("--eval-count", type=int, help="evaluate on this many test images (default: all 10 000)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    test = ensure_test_set()
    rows = []
    for arch in args.archs.split(","):
        folder = ensure_model(arch, args.epochs or EPOCHS.get(arch, 8))
        combos = itertools.product(args.profiles.split(","), [int(b) for b in args.bits.split(",")],
                                   args.methods.split(","))
        for profile, bits, method in combos:
            out = CACHE / "builds" / f"{arch}-{profile}-w{bits}-{method}"
            opts = BuildOptions.from_flat(model=str(folder / "model.safetensors"), calib=str(folder / "calib.npz"),
                                eval=str(test), eval_count=args.eval_count, bits=bits, method=method, profile=profile,
                                backend="onnxruntime", out=str(out), bench_seconds=1.0)
            r = Build(opts).run()
            acc = r["accuracy"]
            rows.append({"arch": arch, "epochs": args.epochs or EPOCHS.get(arch, 8), "profile": profile, "bits": bits,
                         "method": method,
                         "fp32": acc["fp32"]["top1"], "fake_quant": acc["fake_quant"]["top1"],
                         "engine": acc["engine"]["top1"], "agreement": acc["agreement_top1"],
                         "cosine": acc["cosine"], "engine_backend": r["engine"]["backend"],
                         "int8_op_fraction": r["engine"]["int8_op_fraction"],
                         "export_agreement": r["export"]["check"]["agreement_top1"],
                         "export_max_abs_diff": r["export"]["check"]["max_abs_diff"],
                         "fuse_max_rel_error": r["reparam"]["max_rel_error"],
                         "calib_seconds": r["calibration"]["seconds"], "calib_images": r["calibration"]["images"]})
    table = Table(title=f"repapq-deploy build matrix (Fashion-MNIST test set, {args.eval_count or 10000} images)")
    cols = ["arch", "profile", "bits", "method", "fp32", "engine", "agreement", "int8_op_fraction",
            "export_agreement", "fuse_max_rel_error"]
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols])
    Console().print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "matrix.json", {"rows": rows, "eval_images": args.eval_count or 10000,
                                          "hardware": hardware()})
    md = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    md += ["| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |"
           for r in rows]
    write_text(args.out / "matrix.md", "\n".join(md) + "\n")
    print(f"wrote {args.out}/matrix.json and matrix.md", file=sys.stderr)


if __name__ == "__main__":
    main()
