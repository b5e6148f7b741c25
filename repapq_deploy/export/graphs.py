"""The export stage: every graph a build writes, checked and linted.

``model.fp32.onnx`` (the float reference) and ``model.qdq.onnx`` (the calibrated model itself); under
the TensorRT profile also ``model.qdq.fp16.onnx`` (FP16 outside the Q/DQ pairs: TensorRT builds
strongly typed networks, where the graph's types are the precisions) and ``model.fp16.onnx`` (the
float reference engine's source). The graph an engine is built from is linted for its profile.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
import torch.nn as nn

from repapq_deploy.artifacts import atomic_path
from repapq_deploy.export.fp16 import convert_to_fp16, fp16_report
from repapq_deploy.export.lint import lint_model
from repapq_deploy.export.onnx import check_against_torch, export_fp32, export_qdq, graph_summary
from repapq_deploy.progress import log
from repapq_deploy.quant.placement import FakeQuantModel

FP32_ONNX, QDQ_ONNX = "model.fp32.onnx", "model.qdq.onnx"
QDQ_FP16_ONNX, FP16_ONNX = "model.qdq.fp16.onnx", "model.fp16.onnx"


def export_outputs(profile: str) -> list[str]:
    """The files :func:`export_graphs` writes for ``profile``."""
    return [FP32_ONNX, QDQ_ONNX] + ([QDQ_FP16_ONNX, FP16_ONNX] if profile == "tensorrt" else [])


def linted_graph(profile: str) -> str:
    """The graph a TensorRT or ONNX Runtime engine of ``profile`` is built from, which export lints."""
    return QDQ_FP16_ONNX if profile == "tensorrt" else QDQ_ONNX


def export_graphs(qm: FakeQuantModel, fused: nn.Module, sample: torch.Tensor, out: Path, opset: int = 17
                  ) -> tuple[dict, list[str]]:
    """Write every graph of ``qm``'s profile into ``out``; returns the report section and warnings."""
    profile = qm.config.profile
    warnings: list[str] = []
    export_fp32(fused, sample, out / FP32_ONNX, opset)
    export_qdq(qm, sample, out / QDQ_ONNX, opset)
    check = check_against_torch(qm, out / QDQ_ONNX, sample)
    if check.agreement_top1 < 100.0:
        # the offset grids' compensating biases are large and cancel, so float32 round-off grows
        offset = qm.config.offset_relu
        why = (f" (expected within a few samples with offset_relu {offset}: its compensating biases change "
               "float32 round-off; docs/method.md)" if offset != "none" else "")
        warnings.append(f"ONNX Runtime reference and PyTorch fake-quant agree on only "
                        f"{check.agreement_top1:.2f} % of calibration samples{why}")
    log(f"  ORT reference vs PyTorch fake-quant: agreement {check.agreement_top1:.2f} %, "
        f"max abs diff {check.max_abs_diff:.3g}")
    result = {"check": check.to_dict(), "fp32_graph": graph_summary(out / FP32_ONNX),
              "qdq_graph": graph_summary(out / QDQ_ONNX)}
    if profile == "tensorrt":
        for src, dst in ((QDQ_ONNX, QDQ_FP16_ONNX), (FP32_ONNX, FP16_ONNX)):
            converted = convert_to_fp16(onnx.load(str(out / src)))
            with atomic_path(out / dst) as tmp:
                onnx.save(converted, str(tmp))
        result["fp16"] = fp16_report(onnx.load(str(out / QDQ_FP16_ONNX)))
    linted = linted_graph(profile)
    violations = lint_model(out / linted, profile)
    warnings += [f"lint ({linted}): {v}" for v in violations]
    log(f"  lint {linted} for {profile}: {len(violations)} violation(s)")
    result["lint"] = {"graph": linted, "target": profile, "violations": [str(v) for v in violations]}
    result["warnings"] = warnings
    return result, warnings
