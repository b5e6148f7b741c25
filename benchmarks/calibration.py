"""Every calibration method, the RepAPQ ablations and the peers on the Fashion-MNIST reference models.

    python benchmarks/calibration.py [--models repvgg_a0:15,mobileone_s0:15:w1] [--calib-count 1024]
        [--methods minmax,percentile,entropy,mse,mae,init,brecq,repapq,auto] [--presets fast,default]
        [--brecq-presets default] [--settings W8A8:onnxruntime,...] [--ablations/--no-ablations]
        [--modelopt-python /path/to/venv/bin/python] [--device cpu|cuda] [--seed N] [--merge] [--report-only]
        [--no-split-identity] [--equalize none|depthwise|all]
        [--out benchmarks/results/calibration]

Reference models: timm ``repvgg_a0`` and ``mobileone_s0`` (10 classes, 32x32 grey input) trained on
Fashion-MNIST by ``examples/fashion_mnist/train.py`` for the given epochs, trained when missing and
cached under ``~/.cache/repapq-deploy/fmnist/``. Calibration: ``--calib-count`` training images
drawn with a fixed seed. Evaluation: the full 10 000-image test set.

Every row of this project is a real ``repapq-deploy build`` run in a fresh process (so the peak
memory is that build's): ``onnxruntime`` profile = the real INT8 engine; ``tensorrt`` profile = ONNX
Runtime's reference execution of the exact TensorRT-profile QDQ graph. W6A6 keeps the first conv
and the classifier at 8 bits; "W6A6 all 6-bit" does not. ``init`` is RepAPQ's range initialisation
alone (MAE activations, min-max weights, no training).

Peers, on the same fused FP32 ONNX and the same calibration images, W8A8 only (neither offers a
6-bit grid): ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights, uint8
activations; MinMax / Entropy / Percentile) and, with ``--modelopt-python`` pointing at a virtual
environment with ``nvidia-modelopt[onnx]``, ModelOpt's ONNX INT8 PTQ with its default (rest of the
graph in FP16) and with ``--high_precision_dtype fp32``; both peers' graphs run in ONNX Runtime CPU.

Builds run with PyTorch's and oneDNN's kernels capped at AVX2 on x86 (``_reference.isa_caps``, recorded
as ``hardware.kernels_capped_at``): so capped, an AVX-512 machine repeated an AVX2 machine's build to the
last digit, where uncapped kernels sum floats in another order.
Writes ``<arch>.json``, ``<arch>.md`` and ``<arch>.png`` per model to ``--out`` and prints tables.
Re-running resumes: finished builds are reused through their manifests (a changed package re-runs
them). ``--merge`` re-measures only the selected rows and keeps the other rows of an existing
``<arch>.json``; every row records when it was measured (``measured_at``) and the checkpoint it
measured: ``model_digest`` (``artifacts.model_digest``: the same for the same weights however the
safetensors header is ordered) or, in older rows, ``model_sha256``, the
file's bytes, which a re-save of the same weights can change. ``--report-only``
rewrites the tables and charts from the JSON. "± s.e." is the paired standard error of the drop
(from the images each engine lost and gained against FP32; rows measured before it was recorded
show "-").
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import _reference as ref
import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from rich.console import Console
from rich.table import Table

from repapq_deploy.artifacts import atomic_path, model_digest, write_json, write_text
from repapq_deploy.environment import hardware, versions
from repapq_deploy.quant.scheme import OFFSET_RELU_MODES, resolve_offset_relu
from repapq_deploy.reparam.equalize import EQUALIZE_MODES

SETTINGS = [("W8A8", "onnxruntime", 8, 8), ("W8A8", "tensorrt", 8, 8), ("W6A6", "onnxruntime", 6, 8),
            ("W6A6", "tensorrt", 6, 8), ("W6A6 all 6-bit", "tensorrt", 6, 6)]
# the all-6-bit row: the headline method and the strongest range method only
ALL_SIX_METHODS = ("percentile", "repapq")
ABLATIONS = {
    "repapq (no affine)": {"affine": False},
    "repapq (MSE loss)": {"loss": "mse"},
    "repapq (block-wise)": {"granularity": "block"},
    "repapq (no LSQ steps)": {"learn_scales": False},
    "repapq (frozen weights)": {"lr_weight": 0.0},
    "repapq (+ AdaRound)": {"adaround": True},
}
console = Console(stderr=True)


def _build(kwargs: dict, recipe: dict | None) -> dict:
    """One ``repapq-deploy build`` (run in a fresh process); ``recipe`` overrides repapq's settings."""
    from repapq_deploy.calibrate import reconstruct as R
    from repapq_deploy.options import BuildOptions
    from repapq_deploy.pipeline import Build

    R.PRESETS["init"] = {"iters": 0}
    if recipe is not None:
        R.RECONSTRUCTION["repapq-variant"] = replace(R.RECONSTRUCTION["repapq"], name="repapq-variant", **recipe)
    t0 = time.perf_counter()
    r = Build(BuildOptions.from_flat(**kwargs)).run()
    acc, cal = r["accuracy"], r["calibration"]
    return {"fp32": acc["fp32"]["top1"], "top1": acc["engine"]["top1"], "fake_quant": acc["fake_quant"]["top1"],
            "agreement": acc["agreement_top1"], "cosine": acc["cosine"], "calib_seconds": cal["seconds"],
            "lost": acc["drop"]["lost"], "gained": acc["drop"]["gained"], "drop_se_pp": acc["drop"]["drop_se_pp"],
            "peak_memory_mib": cal["details"].get("peak_memory_mib"),
            "peak_cuda_memory_mib": cal["details"].get("peak_cuda_memory_mib"), "engine": r["engine"]["backend"],
            "int8_op_fraction": r["engine"]["int8_op_fraction"],
            "export_agreement": r["export"]["check"]["agreement_top1"],
            "export_max_rel_diff": r["export"]["check"]["max_rel_diff"], "build_seconds": time.perf_counter() - t0}


def run_builds(specs: list[tuple[dict, dict | None]], jobs: int) -> list[dict]:
    """Run ``(build options, recipe)`` specs, each in a fresh process, ``jobs`` at a time."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = [pool.submit(_build, kwargs, recipe) for kwargs, recipe in specs]
        return [f.result() for f in futures]


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray) -> None:
        self.items = iter([{"input": x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.items, None)


def top1_onnx(path: Path, test: Path) -> float:
    """Top-1 (%) of an ONNX model run by ONNX Runtime CPU (all optimizations) on the test set."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    t = np.load(test)
    pred = np.concatenate([sess.run(None, {name: t["x"][i:i + 500]})[0].argmax(1)
                           for i in range(0, len(t["x"]), 500)])
    return float((pred == t["y"]).mean() * 100)


def ort_peer(fp32_onnx: Path, calib: Path, test: Path, out: Path, method: CalibrationMethod) -> dict:
    qdq = out / f"ort_{method.name}.onnx"
    t0 = time.perf_counter()
    quantize_static(str(fp32_onnx), str(qdq), _Reader(np.load(calib)["x"]), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=method)
    return {"top1": top1_onnx(qdq, test), "calib_seconds": time.perf_counter() - t0}


def modelopt_peer(fp32_onnx: Path, calib: Path, test: Path, out: Path, python: str, fp32_rest: bool) -> dict:
    """ModelOpt's ONNX INT8 PTQ (its CLI, in its own environment) on the same graph and images."""
    npy = out / "calib.npy"
    np.save(npy, np.load(calib)["x"])
    qdq = out / f"modelopt_{'fp32' if fp32_rest else 'default'}.onnx"
    cmd = [python, "-m", "modelopt.onnx.quantization", "--onnx_path", str(fp32_onnx), "--quantize_mode", "int8",
           "--calibration_data_path", str(npy), "--calibration_eps", "cpu", "--output_path", str(qdq)]
    if fp32_rest:
        cmd += ["--high_precision_dtype", "fp32"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"ModelOpt failed: {done.stderr.strip().splitlines()[-1:]}")
    return {"top1": top1_onnx(qdq, test), "calib_seconds": seconds}


def peer_rows(arch: str, fp32: float, fp32_onnx: Path, calib: Path, test: Path, work: Path,
              modelopt_python: str | None) -> list[dict]:
    """ONNX Runtime's quantize_static and (with its environment) ModelOpt, W8A8."""
    rows = []
    peers = [(f"ORT quantize_static {m.name}", ort_peer, (m,))
             for m in (CalibrationMethod.MinMax, CalibrationMethod.Entropy, CalibrationMethod.Percentile)]
    if modelopt_python:
        peers += [("ModelOpt INT8 (FP16 rest, its default)", modelopt_peer, (modelopt_python, False)),
                  ("ModelOpt INT8 (--high_precision_dtype fp32)", modelopt_peer, (modelopt_python, True))]
    for name, fn, extra in peers:
        rows.append({"method": name, "preset": "-", "setting": "W8A8", "profile": "peer", "fp32": fp32,
                     **fn(fp32_onnx, calib, test, work, *extra)})
        console.print(f"{arch} {name}: {rows[-1]['top1']:.2f} %")
    return rows


def plan(methods: list[str], presets: list[str], brecq_presets: list[str], settings: list[tuple]) -> list[dict]:
    """The project's rows: method x preset x setting."""
    rows = []
    for method in methods:
        method_presets = {"repapq": presets, "brecq": brecq_presets, "init": ["init"]}.get(method, ["-"])
        for preset in method_presets:
            for label, profile, bits, fl in settings:
                if fl == 6 and method not in ALL_SIX_METHODS:
                    continue
                if (preset in ("fast", "init") or method == "brecq") and label != "W6A6":  # time: W6A6 is where
                    continue  # they differ
                rows.append({"method": method, "preset": preset, "setting": label, "profile": profile,
                             "bits": bits, "first_last_bits": fl})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=ref.DEFAULT_MODELS, help="ARCH:EPOCHS[:wWARMUP] specs")
    ap.add_argument("--calib-count", type=int, default=1024)
    ap.add_argument("--methods", default="minmax,percentile,entropy,mse,mae,init,brecq,repapq")
    ap.add_argument("--presets", default="fast,default", help="repapq presets")
    ap.add_argument("--brecq-presets", default="default")
    ap.add_argument("--settings", default=",".join(f"{s[0]}:{s[1]}" for s in SETTINGS),
                    help="comma-separated LABEL:PROFILE pairs out of the default list")
    ap.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True,
                    help="RepAPQ with one part changed (W6A6, tensorrt profile, default preset)")
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--modelopt-python", help="python of a virtual environment with nvidia-modelopt[onnx]")
    ap.add_argument("--jobs", type=int, default=1,
                    help="builds side by side (each then single-threaded; calibration times grow accordingly)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-identity", action=argparse.BooleanOptionalAction, default=True,
                    help="build's --split-identity (off: the plain fused graph; builds go to a separate folder)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where calibration runs")
    ap.add_argument("--add-bits", type=int, choices=[8, 6], default=8,
                    help="grid of the tensors only an Add reads (build --add-bits)")
    ap.add_argument("--offset-relu", choices=["auto", *OFFSET_RELU_MODES], default="none",
                    help="build --offset-relu for the tensorrt-profile builds (the onnxruntime profile has uint8). "
                         "Default none, so that the commands in "
                         "docs/benchmarks.md repeat; auto (today's build default) is unpadded here")
    ap.add_argument("--equalize", choices=["auto", *EQUALIZE_MODES], default="none",
                    help="build's --equalize; other than none, the rows are named 'METHOD (equalize MODE)' and "
                         "build in their own folder, so --merge adds them beside the plain rows")
    ap.add_argument("--merge", action="store_true",
                    help="replace only the rows run now in an existing <arch>.json, keep the others")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/calibration"))
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite <arch>.md and <arch>.png from an existing <arch>.json, measure nothing")
    args = ap.parse_args()
    if args.report_only:
        for spec in args.models.split(","):
            payload = json.loads((args.out / f"{spec.split(':')[0]}.json").read_text())
            args.calib_count, args.seed, args.jobs = payload["calib_images"], payload["seed"], payload["jobs"]
            report(payload["arch"], payload["epochs"], payload.get("warmup_epochs"), payload["fp32"],
                   payload["rows"], args, payload["hardware"], payload["versions"])
        return
    # the builds' processes inherit this: on x86 they run AVX2 kernels, so the rows repeat on any such CPU
    os.environ.update(ref.isa_caps())
    calib, test = ref.ensure_calib_set(args.calib_count, args.seed), ref.ensure_test_set()
    settings = [s for s in SETTINGS if f"{s[0]}:{s[1]}" in args.settings.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)

    args.offset_relu = resolve_offset_relu(args.offset_relu, "tensorrt")

    def offset_relu(profile: str) -> str:
        return args.offset_relu if profile == "tensorrt" else "none"

    for spec in args.models.split(","):
        arch, epochs, warmup = ref.parse_model_spec(spec)
        model = ref.ensure_model(arch, epochs, warmup) / "model.safetensors"
        # other seeds build elsewhere: runs with different seeds may go side by side
        work = ref.CACHE / "calibration" / (ref.model_name(arch, epochs, warmup)
                                            + (f"-seed{args.seed}" if args.seed else "")
                                            + ("" if args.split_identity else "-nosplit")
                                            + ("" if args.equalize == "none" else f"-eq{args.equalize}")
                                            + ("" if args.offset_relu == "none" else f"-offset{args.offset_relu}"))
        common = {"model": str(model), "calib": str(calib), "calib_count": None, "eval": str(test),
                  "backend": "onnxruntime", "bench_seconds": 0.1, "seed": args.seed, "device": args.device,
                  "threads": 1 if args.jobs > 1 else None, "split_identity": args.split_identity,
                  "add_bits": args.add_bits, "equalize": args.equalize}
        todo = plan(args.methods.split(","), args.presets.split(","), args.brecq_presets.split(","), settings)
        specs = []
        for row in todo:
            out = work / f"{row['method']}-{row['preset']}-{row['profile']}-w{row['bits']}-fl{row['first_last_bits']}"
            specs.append(({**common, "out": str(out), "method": "repapq" if row["method"] == "init" else row["method"],
                           "preset": row["preset"] if row["preset"] != "-" else "default", "profile": row["profile"],
                           "bits": row["bits"], "first_last_bits": row["first_last_bits"],
                           # a named method's row fits every calibration image, as the tables always did;
                           # auto holds out its default share to choose on
                           "holdout": 0.2 if row["method"] == "auto" else 0.0,
                           "offset_relu": offset_relu(row["profile"])}, None))
        if args.ablations:
            for name, change in ABLATIONS.items():
                for label, profile, bits, fl in [s for s in settings if s[0] == "W6A6" and s[1] == "tensorrt"]:
                    out = work / f"ablation-{'_'.join(f'{k}={v}' for k, v in change.items())}-{profile}-w{bits}"
                    todo.append({"method": name, "preset": "default", "setting": label, "profile": profile,
                                 "bits": bits, "first_last_bits": fl})
                    specs.append(({**common, "out": str(out), "method": "repapq-variant", "preset": "default",
                                   "profile": profile, "bits": bits, "first_last_bits": fl, "holdout": 0.0,
                                   "offset_relu": offset_relu(profile)}, change))
        if args.equalize != "none":
            for row in todo:
                row["method"] += f" (equalize {args.equalize})"
        for row in todo:
            if offset_relu(row["profile"]) != "none":
                row["method"] += f" (offset-relu {args.offset_relu})"
        console.print(f"{arch}: {len(specs)} builds, {args.jobs} at a time")
        measured_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        rows = [{**row, **r, "device": args.device, "split_identity": args.split_identity, "add_bits": args.add_bits,
                 "equalize": args.equalize, "offset_relu": offset_relu(row["profile"])}
                for row, r in zip(todo, run_builds(specs, args.jobs), strict=True)]
        fp32 = rows[0]["fp32"]
        if args.peers:
            rows += peer_rows(arch, fp32, next(work.glob("*/model.fp32.onnx")), calib, test, work,
                              args.modelopt_python)
        # which checkpoint a row measured: --merge mixes rows of several runs, and a retrained
        # checkpoint is the same model only if its weights are
        digest = model_digest(model)
        for r in rows:
            r["measured_at"] = measured_at
            r["model_digest"] = digest
        if args.merge and (args.out / f"{arch}.json").exists():
            old = json.loads((args.out / f"{arch}.json").read_text())
            if (old["epochs"], old.get("warmup_epochs")) != (epochs, warmup):
                raise SystemExit(f"--merge: {args.out / f'{arch}.json'} holds rows of a different model "
                                 f"({old['epochs']} epochs); run without --merge to replace it")
            rows = merge_rows(old["rows"], rows)
        report(arch, epochs, warmup, fp32, rows, args)


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with the rows that ``new`` re-measured replaced in place; rows new to the table go last."""
    key = lambda r: (r["method"], r["preset"], r["setting"], r["profile"])  # noqa: E731
    fresh = {key(r): r for r in new}
    merged = [fresh.pop(key(r), r) for r in old]
    return merged + [r for r in new if key(r) in fresh]


def report(arch: str, epochs: int, warmup: float | None, fp32: float, rows: list[dict], args: argparse.Namespace,
           machine: dict | None = None, libraries: dict | None = None) -> None:
    """Print the table and write ``<arch>.json``, ``<arch>.md`` and ``<arch>.png``."""
    trained = f"{epochs} epochs" + ("" if warmup is None else f", {warmup:g}-epoch warm-up")
    table = Table(title=f"{arch} ({trained}): Fashion-MNIST test top-1, 10 000 images, FP32 {fp32:.2f} %")
    cols = ("method", "preset", "setting", "profile", "top-1 %", "drop pp", "± s.e.", "calib s", "peak MiB")
    for col in cols:
        table.add_column(col, justify="right")
    md = [f"FP32: {fp32:.2f} %", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    strict = False
    for r in rows:
        mem = f"{r['peak_memory_mib']:.0f}" if r.get("peak_memory_mib") else "-"
        # W6A6 rows measured before --add-bits existed quantized the Add-only tensors at 6 bits too
        mark = " †" if r.get("bits") == 6 and r.get("add_bits", 6) == 6 else ""
        strict |= bool(mark)
        se = f"{r['drop_se_pp']:.2f}" if r.get("drop_se_pp") is not None else "-"
        cells = (r["method"], r["preset"], r["setting"] + mark, r["profile"], f"{r['top1']:.2f}",
                 f"{fp32 - r['top1']:+.2f}", se, f"{r['calib_seconds']:.1f}", mem)
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    if strict:
        md += ["", "† measured with the tensors that only an Add reads on the 6-bit grid too (`--add-bits 6`)"]
    Console().print(table)
    payload = {"arch": arch, "epochs": epochs, "warmup_epochs": warmup, "calib_images": args.calib_count,
               "eval_images": 10000,
               "seed": args.seed, "jobs": args.jobs, "threads_per_build": 1 if args.jobs > 1 else "all",
               "fp32": fp32, "rows": rows,
               "hardware": machine or {**hardware(), "kernels_capped_at": os.environ.get("ATEN_CPU_CAPABILITY")},
               "versions": libraries or versions()}
    write_json(args.out / f"{arch}.json", payload)
    write_text(args.out / f"{arch}.md", "\n".join(md) + "\n")
    _chart(rows, fp32, arch, args.out / f"{arch}.png")


def _chart(rows: list[dict], fp32: float, arch: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 0.32 * len(rows) / 2 + 2), sharey=False)
    for ax, setting in zip(axes, ("W8A8", "W6A6"), strict=True):
        picked = [r for r in rows if r["setting"] == setting]
        labels = [f"{r['method']} ({r['preset']}, {r['profile']})" if r["preset"] not in ("-",)
                  else f"{r['method']} ({r['profile']})" for r in picked]
        drops = [fp32 - r["top1"] for r in picked]
        ax.barh(labels, drops, color=["#c0392b" if r["method"].startswith(("ORT", "ModelOpt")) else "#2a7ab9"
                                      for r in picked])
        ax.set_xscale("symlog", linthresh=0.1)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel(f"top-1 drop vs FP32 {fp32:.2f} % (pp, symlog)")
        ax.set_title(f"{arch} {setting}")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


if __name__ == "__main__":
    main()
