"""The verify stage: the engine's accuracy against the FP32 and fake-quant models, and its latency."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from repapq_deploy.backends.engine import Engine
from repapq_deploy.data.loader import Dataset
from repapq_deploy.export.onnx import INPUT_NAME, reference_session
from repapq_deploy.latency import measure, report_section, resized
from repapq_deploy.quant.placement import FakeQuantModel
from repapq_deploy.verify.report import accuracy_metrics, predict


def verify_engine(fused: nn.Module, qm: FakeQuantModel, engine: Engine, data: Dataset, bench_sample: torch.Tensor,
                  bench_seconds: float = 3.0) -> dict:
    """Report sections ``accuracy``, ``parity`` (TensorRT against ONNX Runtime's reference execution of
    the same QDQ graph), ``latency_ms`` and ``warnings`` for ``engine`` on ``data``."""
    labels = data.y.numpy() if data.y is not None else None
    with torch.no_grad():
        fp32 = predict(lambda a: fused(torch.from_numpy(a)).numpy(), data.x, "verify: FP32 PyTorch")
        fq = predict(lambda a: qm.module(torch.from_numpy(a)).numpy(), data.x, "verify: fake-quant PyTorch")
    with engine.runner() as runner:
        eng = predict(runner.infer, data.x, f"verify: engine ({engine.backend.name})")
    accuracy = accuracy_metrics(fp32, fq, eng, labels)
    parity = None
    if engine.on_tensorrt:
        reference = reference_session(engine.qdq_onnx)
        ref = predict(lambda a: reference.run(None, {INPUT_NAME: a})[0], data.x, "verify: ORT reference")
        with engine.reference_runner() as runner:
            fp16 = predict(runner.infer, data.x, "verify: TensorRT FP16")
        parity = {"ort_reference_agreement_top1": float((ref.argmax(1) == eng.argmax(1)).mean() * 100),
                  "ort_reference_max_abs_diff": float(np.abs(ref - eng).max()),
                  "fp16_engine_top1": accuracy_metrics(fp32, fp16, fp16, labels)["engine"]["top1"]}
    measured = measure(engine.runner, engine.reference_runner, resized(bench_sample.numpy()),
                       seconds=bench_seconds, description="verify: latency")
    warnings = []
    fraction = engine.info.int8_op_fraction
    if fraction is not None and fraction < 1.0:
        warnings.append(f"only {fraction:.0%} of conv/gemm ops run in integer kernels in the "
                        f"{engine.backend.name} engine")
    return {"accuracy": accuracy, "parity": parity, "latency_ms": report_section(measured, engine.reference_name),
            "warnings": warnings}
