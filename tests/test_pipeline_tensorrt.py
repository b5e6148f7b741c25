"""Interface test of the pipeline's TensorRT path: the TensorRT backend is replaced by a stand-in that
"builds" by copying the ONNX and runs it with ONNX Runtime. It checks the wiring (which graph each
stage hands over, the FP16 reference engine, parity and the report), not TensorRT itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from repapq_deploy.backends import registry
from repapq_deploy.backends import tensorrt as trt_backend
from repapq_deploy.backends.onnxruntime import OnnxRuntimeReferenceBackend, OrtRunner
from repapq_deploy.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fashion_mnist"


class StandInTensorRT(OnnxRuntimeReferenceBackend):
    name = "tensorrt"
    engine_suffix = ".plan"
    built: list[tuple[str, bool]] = []

    def __init__(self, options=None) -> None:
        self.options = options or trt_backend.TrtBuildOptions()

    def build(self, onnx_path, engine_path):
        StandInTensorRT.built.append((Path(onnx_path).name, self.options.fp16_reference))
        shutil.copyfile(onnx_path, engine_path)
        Path(str(engine_path) + ".json").write_text(json.dumps({"options": str(self.options)}))
        info = self._info(Path(engine_path))
        info.backend = self.name
        return info

    def runner(self, engine_path):
        return OrtRunner(engine_path, optimize=False)


@pytest.fixture
def fake_trt(monkeypatch):
    StandInTensorRT.built = []
    monkeypatch.setattr(registry, "tensorrt_present", lambda: True)
    monkeypatch.setattr(trt_backend, "TensorRTBackend", StandInTensorRT)
    monkeypatch.setitem(registry.BACKENDS, "tensorrt", StandInTensorRT)


def test_tensorrt_build_wiring(fake_trt, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "build", str(EXAMPLE / "model.safetensors"), "--calib", str(EXAMPLE / "calib.npz"), "--eval",
        str(EXAMPLE / "eval.npz"), "--eval-count", "64", "--bench-seconds", "0.1", "--backend", "auto",
        "--trt-batch", "1,4,32", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # auto picked TensorRT with its profile; the INT8 engine comes from the FP16 QDQ graph and the
    # float reference engine from the FP16 version of the FP32 model
    assert report["config"]["engine_backend"] == "tensorrt" and report["config"]["profile"] == "tensorrt"
    assert StandInTensorRT.built == [("model.qdq.fp16.onnx", False), ("model.fp16.onnx", True)]
    for name in ("model.plan", "model.plan.json", "model.fp16.plan", "model.fp16.plan.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["stages"]["engine"]["outputs"]) == {"model.plan", "model.plan.json", "model.fp16.plan",
                                                            "model.fp16.plan.json"}
    assert manifest["stages"]["engine"]["options"]["tensorrt"]["trt_batch"] == [1, 4, 32]
    assert report["export"]["lint"] == {"graph": "model.qdq.fp16.onnx", "target": "tensorrt", "violations": []}
    assert report["latency_ms"]["reference"] == "tensorrt-fp16"
    parity = report["parity"]
    assert parity["ort_reference_agreement_top1"] >= 95.0
    assert parity["fp16_engine_top1"] > 80.0
