"""INT8 speed-up in ONNX Runtime: repapq-deploy's engine vs ORT's own ``quantize_static``.

    python benchmarks/ort_speedup.py [--model repvgg_a0:15] [--size 224] [--seconds 20] [--out benchmarks/results]

Builds the ``onnxruntime``-profile engine of a benchmark reference model (``_reference.ensure_model``:
timm ``repvgg_a0`` trained on Fashion-MNIST, 1 input channel, 10 classes) at 224x224 with
``repapq-deploy build``, builds it a second time with ``--no-split-identity`` (the identity taps'
depthwise convs and adds cost time), quantizes the *same* fused FP32 ONNX with
``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights, uint8 activations,
MinMax) on the same calibration tensors, and times FP32, ours and ORT's interleaved in one run at
batch 1 and 32 (medians), so the speed-up ratios are comparable on a noisy machine. The trained
weights matter: which convs get split is measured on them (docs/method.md, "Identity-tap split"); a randomly
initialised RepVGG gets far fewer splits. The calibration images are Fashion-MNIST training images
upsampled to the input size. Prints a table and writes ``ort_speedup.json``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import _reference as ref
import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from rich.console import Console
from rich.table import Table

from repapq_deploy.artifacts import write_json
from repapq_deploy.backends import benchmark_interleaved
from repapq_deploy.backends.onnxruntime import OrtRunner, count_ops
from repapq_deploy.environment import hardware, versions
from repapq_deploy.options import BuildOptions
from repapq_deploy.pipeline import Build


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray, name: str) -> None:
        self.items = iter([{name: x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.items, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="repvgg_a0:15", help="a reference model, ARCH:EPOCHS[:wWARMUP]")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--calib-count", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0, help="time budget per batch size")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    console = Console(stderr=True)
    work = Path(tempfile.mkdtemp(prefix="ort_speedup_"))
    arch, epochs, warmup = ref.parse_model_spec(args.model)
    model = ref.ensure_model(arch, epochs, warmup) / "model.safetensors"
    images = torch.from_numpy(np.load(ref.ensure_calib_set(1024, 0))["x"][:args.calib_count])
    calib = F.interpolate(images, size=(args.size, args.size), mode="bilinear", align_corners=False).numpy()
    channels = calib.shape[1]
    np.savez(work / "calib.npz", x=calib)

    engines, splits = {}, {}
    for name, split in (("repapq-deploy", True), ("repapq-deploy, no identity split", False)):
        folder = work / ("build" if split else "build_nosplit")
        build = Build(BuildOptions.from_flat(model=str(model), calib=str(work / "calib.npz"),
                                   calib_count=args.calib_count, method="minmax", backend="onnxruntime",
                                   out=str(folder), input_size=(channels, args.size, args.size),
                                   split_identity=split))
        build.run("engine")
        engines[name] = folder / build.engine_file
        splits[name] = len(torch.load(folder / "qstate.pt", weights_only=True)["config"]["split_layers"] or ())
    fp32_path = work / "build" / "model.fp32.onnx"

    ort_qdq = work / "ort_quantize_static.onnx"
    quantize_static(str(fp32_path), str(ort_qdq), _Reader(calib, "input"), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(work / "ort_quantize_static.opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(ort_qdq), so, providers=["CPUExecutionProvider"])
    import onnx

    fractions = {}
    for name, path in (*engines.items(), ("ort quantize_static", work / "ort_quantize_static.opt.onnx")):
        integer, floating, _ = count_ops(onnx.load(str(path)))
        fractions[name] = integer / (integer + floating)

    results: dict = {"model": args.model, "input_size": [channels, args.size, args.size],
                     "identity_splits": splits, "int8_op_fraction": fractions,
                     "batches": {}, "hardware": hardware(), "versions": versions()}
    for bs in (1, 32):
        x = np.ascontiguousarray(np.resize(calib, (bs, channels, args.size, args.size)))
        runners = {"fp32": OrtRunner(fp32_path), **{k: OrtRunner(v) for k, v in engines.items()},
                   "ort quantize_static": OrtRunner(ort_qdq)}
        stats = benchmark_interleaved(runners, x, warmup=3, seconds=args.seconds, description="ort_speedup")
        for r in runners.values():
            r.deactivate()
        fp32 = stats["fp32"].p50_ms
        results["batches"][f"bs{bs}"] = {k: {**s.to_dict(), "speedup": fp32 / s.p50_ms} for k, s in stats.items()}

    table = Table(title=f"{arch} {args.size}x{args.size} (trained; identity splits {splits}), "
                        f"ONNX Runtime CPU ({hardware()['cpu']}, {hardware()['cores']} cores)")
    for col in ("batch", "model", "p50 ms", "p90 ms", "speed-up vs FP32", "int8 op fraction"):
        table.add_column(col, justify="right")
    for bs, rows in results["batches"].items():
        for name, s in rows.items():
            table.add_row(bs[2:], name, f"{s['p50_ms']:.2f}", f"{s['p90_ms']:.2f}", f"{s['speedup']:.2f}x",
                          f"{fractions[name]:.2f}" if name in fractions else "-")
    Console().print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "ort_speedup.json"
    write_json(out, results)
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
