"""The engine stage: a built engine file, the backend that runs it, and the float reference timed beside it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from repapq_deploy.backends.base import Backend, EngineInfo, Runner
from repapq_deploy.backends.onnxruntime import OrtRunner
from repapq_deploy.export.graphs import FP16_ONNX, FP32_ONNX, QDQ_FP16_ONNX, QDQ_ONNX

FP16_PLAN = "model.fp16.plan"


@dataclass
class Engine:
    """A built engine: its file, what it runs in integer kernels, and its float reference (the FP32
    ONNX in ONNX Runtime, or on TensorRT an FP16 engine of the FP32 model)."""

    backend: Backend
    path: Path
    info: EngineInfo
    reference: Path
    qdq_onnx: Path
    graphs: dict | None = None  # the export report of the graphs it was built from, when known
    warnings: list[str] = field(default_factory=list)
    scratch: object = field(default=None, repr=False)  # a temporary folder holding the files, if any

    @property
    def on_tensorrt(self) -> bool:
        return self.backend.name == "tensorrt"

    @property
    def reference_name(self) -> str:
        """What the speed-ups are measured against."""
        return "tensorrt-fp16" if self.on_tensorrt else "onnxruntime-fp32"

    def runner(self) -> Runner:
        """A fresh runner of the engine (a context manager)."""
        return self.backend.runner(self.path)

    def reference_runner(self) -> Runner:
        """A fresh runner of the float reference."""
        return self.backend.runner(self.reference) if self.on_tensorrt else OrtRunner(self.reference)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The engine's outputs for one batch (opens and closes a runner; keep one open for many batches)."""
        with self.runner() as r:
            return r.infer(np.ascontiguousarray(x, dtype=np.float32))


def engine_file(backend: Backend) -> str:
    return "model" + backend.engine_suffix


def engine_source(backend: Backend) -> str:
    """The exported graph ``backend`` builds from: TensorRT the FP16 QDQ graph, ONNX Runtime (also its
    reference execution) the FP32 one."""
    return QDQ_FP16_ONNX if backend.name == "tensorrt" else QDQ_ONNX


def engine_outputs(backend: Backend) -> list[str]:
    """The files :func:`build_engine` writes."""
    name = engine_file(backend)
    return [name, name + ".json", FP16_PLAN, FP16_PLAN + ".json"] if backend.name == "tensorrt" else [name]


def open_engine(out: Path, backend: Backend, info: EngineInfo) -> Engine:
    """The engine a previous :func:`build_engine` left in ``out``."""
    reference = out / (FP16_PLAN if backend.name == "tensorrt" else FP32_ONNX)
    return Engine(backend, out / engine_file(backend), info, reference, out / QDQ_ONNX)


def build_engine(out: Path, backend: Backend) -> Engine:
    """Build the engine of ``backend`` from the exported graphs in ``out`` (and, on TensorRT, the FP16
    reference engine of the FP32 model on the same GPU)."""
    info = backend.build(out / engine_source(backend), out / engine_file(backend))
    info.path = engine_file(backend)
    if backend.name == "tensorrt":
        reference_backend = type(backend)(replace(backend.options, fp16_reference=True))
        reference_backend.build(out / FP16_ONNX, out / FP16_PLAN)
    return open_engine(out, backend, info)
