"""Calibration methods, RepAPQ ablations and ONNX Runtime's own quantizer on one reference model.

    python benchmarks/calibration.py [--model examples/fashion_mnist/model.safetensors] [--calib-count 1024]
        [--presets fast,default] [--out benchmarks/results/calibration]

Evaluation: the full Fashion-MNIST test set (10 000 images, Debian's dataset-fashion-mnist);
calibration: ``--calib-count`` training images drawn with a fixed seed. Every row is a real
``repapq-deploy build`` (TensorRT profile: ONNX Runtime's reference execution of the exact QDQ
graph; ONNX Runtime profile: the real INT8 engine). W6A6 keeps the first conv and the classifier at
8 bits. Peers: ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights, uint8
activations; MinMax / Entropy / Percentile) on the same fused FP32 ONNX and calibration images.
Prints a table and writes ``calibration.json``, ``calibration.md`` and ``calibration.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from rich.console import Console
from rich.table import Table

from repapq_deploy.calibrate import reconstruct as R
from repapq_deploy.data import fashion_mnist as fm
from repapq_deploy.environment import hardware, versions
from repapq_deploy.pipeline import Build, BuildOptions

SETTINGS = [("W8A8", "onnxruntime", 8, 8), ("W8A8", "tensorrt", 8, 8), ("W6A6", "onnxruntime", 6, 8),
            ("W6A6", "tensorrt", 6, 8), ("W6A6 all 6-bit", "tensorrt", 6, 6)]
ABLATIONS = {
    "repapq (no affine)": {"affine": False},
    "repapq (MSE loss)": {"loss": "mse"},
    "repapq (block-wise)": {"granularity": "block"},
    "repapq (no LSQ steps)": {"learn_scales": False},
}


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray) -> None:
        self.items = iter([{"input": x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.items, None)


def data(cache: Path, calib_count: int, seed: int) -> tuple[Path, Path]:
    cache.mkdir(parents=True, exist_ok=True)
    calib, test = cache / f"calib{calib_count}_s{seed}.npz", cache / "test10k.npz"
    if not calib.exists():
        x, _ = fm.load_raw("train")
        idx = np.random.default_rng(seed).choice(len(x), calib_count, replace=False)
        np.savez(calib, x=fm.to_model_input(x[idx]))
    if not test.exists():
        x, y = fm.load_raw("test")
        np.savez(test, x=fm.to_model_input(x), y=y)
    return calib, test


def run_build(model: str, calib: Path, test: Path, out: Path, **kw) -> dict:
    opts = BuildOptions(model=model, calib=str(calib), calib_count=None, eval=str(test), out=str(out),
                        backend="onnxruntime", bench_seconds=0.5, **kw)
    t0 = time.perf_counter()
    r = Build(opts).run()
    acc = r["accuracy"]
    return {"fp32": acc["fp32"]["top1"], "top1": acc["engine"]["top1"], "agreement": acc["agreement_top1"],
            "calib_seconds": r["calibration"]["seconds"],
            "peak_memory_mib": r["calibration"].get("details", {}).get("peak_memory_mib"),
            "engine": r["engine"]["backend"], "build_seconds": time.perf_counter() - t0}


def ort_peer(fp32_onnx: Path, calib: Path, test: Path, method: CalibrationMethod, out: Path) -> dict:
    x = np.load(calib)["x"]
    qdq = out / f"ort_{method.name}.onnx"
    t0 = time.perf_counter()
    quantize_static(str(fp32_onnx), str(qdq), _Reader(x), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method)
    seconds = time.perf_counter() - t0
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(qdq), so, providers=["CPUExecutionProvider"])
    t = np.load(test)
    pred = np.concatenate([sess.run(None, {"input": t["x"][i:i + 500]})[0].argmax(1)
                           for i in range(0, len(t["x"]), 500)])
    return {"top1": float((pred == t["y"]).mean() * 100), "calib_seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="examples/fashion_mnist/model.safetensors")
    ap.add_argument("--calib-count", type=int, default=1024)
    ap.add_argument("--methods", default="minmax,percentile,entropy,mse,mae,brecq,repapq")
    ap.add_argument("--presets", default="fast,default")
    ap.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--settings", default=",".join(f"{s[0]}:{s[1]}" for s in SETTINGS),
                    help="comma-separated LABEL:PROFILE pairs out of the default list")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/calibration"))
    args = ap.parse_args()
    cache = Path.home() / ".cache" / "repapq-deploy" / "calibration"
    calib, test = data(cache, args.calib_count, args.seed)
    work = cache / Path(args.model).stem
    settings = [s for s in SETTINGS if f"{s[0]}:{s[1]}" in args.settings.split(",")]
    rows = []
    for method in args.methods.split(","):
        presets = args.presets.split(",") if method in R.RECONSTRUCTION else ["-"]
        for preset in presets:
            for label, profile, bits, fl in settings:
                if fl == 6 and method not in ("percentile", "repapq"):
                    continue
                out = work / f"{method}-{preset}-{profile}-w{bits}-fl{fl}"
                r = run_build(args.model, calib, test, out, method=method,
                              preset=preset if preset != "-" else "default", profile=profile, bits=bits,
                              first_last_bits=fl, seed=args.seed)
                rows.append({"method": method, "preset": preset, "setting": label, "profile": profile, **r})
                Console(stderr=True).print(rows[-1])
    if args.ablations:
        base = R.RECONSTRUCTION["repapq"]
        for name, change in ABLATIONS.items():
            R.RECONSTRUCTION["ablation"] = replace(base, name=name, **change)
            for label, profile, bits, fl in [s for s in settings if s[0] == "W6A6"]:
                out = work / f"ablation-{name.replace(' ', '_')}-{profile}-w{bits}"
                r = run_build(args.model, calib, test, out, method="ablation", preset="default", profile=profile,
                              bits=bits, first_last_bits=fl, seed=args.seed)
                rows.append({"method": name, "preset": "default", "setting": label, "profile": profile, **r})
    fp32_onnx = work / "minmax---onnxruntime-w8-fl8" / "model.fp32.onnx"
    if fp32_onnx.exists():
        for method in (CalibrationMethod.MinMax, CalibrationMethod.Entropy, CalibrationMethod.Percentile):
            r = ort_peer(fp32_onnx, calib, test, method, work)
            rows.append({"method": f"ORT quantize_static {method.name}", "preset": "-", "setting": "W8A8",
                         "profile": "onnxruntime", "fp32": rows[0]["fp32"], "agreement": None, **r})
    fp32 = rows[0]["fp32"]
    table = Table(title=f"{args.model}: Fashion-MNIST test top-1 (10 000 images), FP32 {fp32:.2f} %")
    for col in ("method", "preset", "setting", "profile", "top-1 %", "drop pp", "calib s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["method"], r["preset"], r["setting"], r["profile"], f"{r['top1']:.2f}",
                      f"{fp32 - r['top1']:.2f}", f"{r['calib_seconds']:.1f}")
    Console().print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"model": args.model, "calib_images": args.calib_count, "eval_images": 10000, "fp32": fp32,
               "rows": rows, "hardware": hardware(), "versions": versions()}
    (args.out / "calibration.json").write_text(json.dumps(payload, indent=2) + "\n")
    md = ["| method | preset | setting | profile | top-1 % | drop (pp) | calibration s |", "|" + " --- |" * 7]
    md += [f"| {r['method']} | {r['preset']} | {r['setting']} | {r['profile']} | {r['top1']:.2f} | "
           f"{fp32 - r['top1']:.2f} | {r['calib_seconds']:.1f} |" for r in rows]
    (args.out / "calibration.md").write_text("\n".join(md) + "\n")
    _chart(rows, fp32, args.out / "calibration.png")


def _chart(rows: list[dict], fp32: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked = [r for r in rows if r["setting"] == "W6A6" and r["profile"] == "tensorrt"]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(picked) + 1.2))
    labels = [f"{r['method']} ({r['preset']})" if r["preset"] != "-" else r["method"] for r in picked]
    ax.barh(labels, [fp32 - r["top1"] for r in picked], color="#2a7ab9")
    ax.set_xlabel("top-1 drop vs FP32 (pp), W6A6, TensorRT profile")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
