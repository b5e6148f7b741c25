"""``repapq-deploy bench``: latency percentiles and throughput of an engine or ONNX file.

The speed-up against ``reference`` is the one every report uses (``repapq_deploy.latency``).

Measurements are made for a noisy shared machine: warm-up, many iterations, medians, and
optionally a reference model (the FP32 ONNX) timed interleaved with the engine, so their ratio is
measured in one run and holds across machines of the same kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from repapq_deploy.backends import get_backend
from repapq_deploy.backends.onnxruntime import OnnxRuntimeReferenceBackend, OrtRunner
from repapq_deploy.environment import hardware, versions
from repapq_deploy.errors import DeployError
from repapq_deploy.latency import measure


@dataclass
class BenchSettings:
    """How to measure."""

    batches: tuple[int, ...] = (1, 32)
    warmup: int = 10
    iterations: int | None = None
    seconds: float = 5.0
    seed: int = 0


def backend_for(path: Path, backend: str) -> str:
    """``auto``: the backend that produced this file, from its name."""
    if backend != "auto":
        return backend
    if path.suffix == ".plan":
        return "tensorrt"
    if path.name.endswith(OnnxRuntimeReferenceBackend.engine_suffix):
        return OnnxRuntimeReferenceBackend.name
    return "onnxruntime"


def input_shape(path: Path) -> tuple[int | None, tuple[int, ...]]:
    """(static batch or None if dynamic, C,H,W...) of an ONNX model's first input."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others on foreign files
        raise DeployError(f"{path}: not a readable ONNX model ({type(exc).__name__}); pass an .onnx engine") from exc
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if not inputs:
        raise DeployError(f"{path}: the model has no input")
    dims = inputs[0].type.tensor_type.shape.dim
    sizes = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if any(s is None for s in sizes[1:]):
        raise DeployError(f"{path}: input '{inputs[0].name}' has dynamic non-batch dimensions {sizes}; "
                          "export with a fixed input size")
    return sizes[0], tuple(sizes[1:])


def run_bench(path: str | Path, *, backend: str = "auto", reference: str | Path | None = None,
              settings: BenchSettings | None = None) -> dict:
    """Benchmark ``path`` (and ``reference`` interleaved with it) at each batch size."""
    settings = settings or BenchSettings()
    path = Path(path)
    if not path.is_file():
        raise DeployError(f"{path}: not found; pass an engine (.ort.onnx, .ref.onnx) or an ONNX file")
    name = backend_for(path, backend)
    engine_backend = get_backend(name)
    static, shape = input_shape(path)
    ref_path = Path(reference) if reference else None
    if ref_path is not None and not ref_path.is_file():
        raise DeployError(f"`reference` {ref_path}: not found")
    for bs in settings.batches:
        if static is not None and bs != static:
            raise DeployError(f"`batch` {bs}: {path} has a fixed batch size of {static}")
    rng = np.random.default_rng(settings.seed)
    result: dict = {"model": str(path), "backend": name, "reference": str(ref_path) if ref_path else None,
                    "input_shape": list(shape), "settings": settings.__dict__ | {"batches": list(settings.batches)},
                    "hardware": hardware(), "versions": versions(), "batches": {}}
    measured = measure(lambda: engine_backend.runner(path), (lambda: OrtRunner(ref_path)) if ref_path else None,
                       lambda bs: rng.standard_normal((bs, *shape)).astype(np.float32), settings.batches,
                       warmup=settings.warmup, iterations=settings.iterations, seconds=settings.seconds,
                       description=f"bench {path.name}")
    for bs, entry in measured.items():
        result["batches"][str(bs)] = {k: v if k == "speedup" else v.to_dict() for k, v in entry.items()}
    return result
