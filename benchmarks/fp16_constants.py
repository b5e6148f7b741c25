"""What float16 constants cost a QDQ build: its graph run with every float constant rounded to float16.

    python benchmarks/fp16_constants.py BUILD_DIR [BUILD_DIR ...] [--out benchmarks/results/fp16_constants/NAME.json]

TensorRT builds ``model.qdq.fp16.onnx`` (``export.fp16``), in which every float constant is a float16
value: Q/DQ scales, biases, and ``--offset-relu``'s shifts and border maps. The benchmark's
TensorRT-scheme accuracy is ONNX Runtime's reference execution of the float32 ``model.qdq.onnx``.
This script runs that float32 graph (ONNX Runtime, no graph optimizations) as it is and with its float
constants rounded to float16 (saturating at +-65504, as the conversion does), activations left in
float32, on the Fashion-MNIST test set, and compares both with the FP32 model (``model.fp32.onnx``):
images flipped against FP32, the drop, the mean max-abs logit error, and the images the rounding alone
flips. It isolates the constants: the float16 activations between layers of the real graph are not
emulated (TensorRT's int8 convs accumulate in int32 and their epilogues are its own), so this is not
an engine measurement. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import torch
from _reference import ensure_test_set, logit_error, write_results
from onnx import numpy_helper
from rich.console import Console
from rich.table import Table

from repapq_deploy.export.fp16 import fp16_initializer
from repapq_deploy.export.onnx import INPUT_NAME, reference_session
from repapq_deploy.verify.report import paired_drop, predict


def rounded_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` whose float32 initializers hold the float16 values the FP16 conversion
    gives them (``export.fp16.fp16_initializer``), kept as float32; also how many it changed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    changed = 0
    for init in out.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        value = numpy_helper.to_array(init)
        rounded = numpy_helper.to_array(fp16_initializer(init)).astype(np.float32)
        if not np.array_equal(rounded, value):
            changed += 1
            init.CopyFrom(numpy_helper.from_array(rounded, init.name))
    return out, changed


def run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    """Logits of ``model`` run by ONNX Runtime's reference mode on ``x``, with a progress bar."""
    session = reference_session(model.SerializeToString() if isinstance(model, onnx.ModelProto) else model)
    return predict(lambda a: session.run(None, {INPUT_NAME: a})[0], torch.from_numpy(x), "ORT reference", 500)


def measure(build: Path, x: np.ndarray, y: np.ndarray) -> dict:
    ref = run(build / "model.fp32.onnx", x)
    qdq = onnx.load(str(build / "model.qdq.onnx"))
    exact = run(qdq, x)
    rounded_model, changed = rounded_constants(qdq)
    rounded = run(rounded_model, x)
    row = {"build": str(build).replace(str(Path.home()), "~"), "constants_rounded": changed}
    for name, out in (("float32", exact), ("float16_constants", rounded)):
        row[name] = {"flips": int((out.argmax(1) != ref.argmax(1)).sum()),
                     "mean_max_abs_logit_error": logit_error(out, ref), **paired_drop(ref, out, y)}
    row["flips_between"] = int((exact.argmax(1) != rounded.argmax(1)).sum())
    row["logit_error_between"] = logit_error(rounded, exact)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()
    test = np.load(ensure_test_set())
    x, y = test["x"], test["y"]
    rows = [measure(b, x, y) for b in args.builds]
    table = Table(title="QDQ graph with float32 vs float16 constants (test set, against FP32)")
    for col in ("build", "constants", "flips fp32 / fp16", "drop pp fp32 / fp16", "logit err fp32 / fp16",
                "flips between"):
        table.add_column(col)
    for r in rows:
        a, b = r["float32"], r["float16_constants"]
        table.add_row(Path(r["build"]).parent.name + "/" + Path(r["build"]).name, str(r["constants_rounded"]),
                      f"{a['flips']} / {b['flips']}", f"{a['drop_pp']:+.2f} / {b['drop_pp']:+.2f}",
                      f"{a['mean_max_abs_logit_error']:.4f} / {b['mean_max_abs_logit_error']:.4f}",
                      str(r["flips_between"]))
    Console().print(table)
    if args.out:
        write_results(args.out, args, {"rows": rows})


if __name__ == "__main__":
    main()
