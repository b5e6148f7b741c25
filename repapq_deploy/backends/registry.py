"""Backends by name, and the ``--backend auto`` / ``profile`` resolution."""

from __future__ import annotations

import importlib.util

from repapq_deploy.backends.base import Backend
from repapq_deploy.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeReferenceBackend
from repapq_deploy.backends.tensorrt import TensorRTBackend
from repapq_deploy.errors import BackendUnavailableError, ConfigError

BACKENDS: dict[str, type[Backend]] = {
    OnnxRuntimeBackend.name: OnnxRuntimeBackend,
    OnnxRuntimeReferenceBackend.name: OnnxRuntimeReferenceBackend,
    TensorRTBackend.name: TensorRTBackend,
}


def tensorrt_present() -> bool:
    """TensorRT importable and a CUDA GPU visible (checked without importing TensorRT)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return torch.cuda.is_available()


def get_backend(name: str) -> Backend:
    """Instantiate a registered backend by name."""
    if name not in BACKENDS:
        raise ConfigError(f"`backend` {name}: no such backend; available: {', '.join(BACKENDS)}")
    return BACKENDS[name]()


def resolve_backend(backend: str, profile: str | None) -> tuple[str, str]:
    """Turn ``backend``/``profile`` into (engine backend name, quantization profile).

    ``auto`` picks TensorRT when it is importable and a GPU is present, else ONNX Runtime. The
    profile defaults to the backend's. A TensorRT-profile graph without TensorRT is verified by
    ONNX Runtime's reference execution instead of failing.
    """
    if backend not in ("auto", "onnxruntime", "tensorrt"):
        raise ConfigError(f"`backend` {backend}: choose auto, onnxruntime or tensorrt")
    if backend == "auto":
        # an explicit ORT profile means the user wants the ORT engine, wherever TensorRT exists
        backend = "tensorrt" if tensorrt_present() and profile != "onnxruntime" else "onnxruntime"
    profile = profile or backend
    if backend == "tensorrt":
        if not tensorrt_present():
            raise BackendUnavailableError("`backend` tensorrt: TensorRT or a CUDA GPU is not available here; install "
                              "repapq-deploy[gpu] on a GPU host, or use `backend` onnxruntime")
        if profile != "tensorrt":
            raise ConfigError(f"`profile` {profile} cannot run on TensorRT (uint8 activations); "
                              "use `profile` tensorrt")
        return "tensorrt", profile
    if profile == "tensorrt":
        return OnnxRuntimeReferenceBackend.name, profile
    return OnnxRuntimeBackend.name, profile
