"""ONNX Runtime CPU backend: the engine is ORT's optimized graph, saved so it can be inspected."""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

from repapq_deploy.artifacts import atomic_path
from repapq_deploy.backends.base import Backend, EngineInfo, Runner
from repapq_deploy.environment import hardware, ort_threads

# Ops that run convolutions/matmuls in integer arithmetic, and their float counterparts.
INTEGER_OPS = {"QLinearConv", "ConvInteger", "QGemm", "MatMulInteger", "QLinearMatMul",
               "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "NhwcQLinearConv", "QAttention"}
FLOAT_OPS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "NhwcFusedConv",
             "NchwcConv", "ConvTranspose"}


def count_ops(model: onnx.ModelProto) -> tuple[int, int, Counter]:
    """(integer conv/gemm ops, float conv/gemm ops, all op counts) of a graph."""
    ops = Counter(n.op_type for n in model.graph.node)
    return (sum(ops[o] for o in INTEGER_OPS), sum(ops[o] for o in FLOAT_OPS), ops)


class OrtRunner(Runner):
    """An ``InferenceSession`` on the CPU execution provider."""

    def __init__(self, path: Path, optimize: bool = True, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.optimize = optimize
        self.threads = ort_threads() if threads is None else threads
        self.session: ort.InferenceSession | None = None

    def activate_impl(self) -> None:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = self.threads
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if self.optimize
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def deactivate_impl(self) -> None:
        self.session = None

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def u8s8_saturates() -> bool:
    """Whether ONNX Runtime's u8 x s8 kernels can saturate here: x86 without VNNI multiplies with AVX2's
    vpmaddubsw, whose int16 sums of two products overflow (255 * 127 * 2 > 32767), so the engine
    strays from the Q/DQ graph (2.8 pp on the bundled example, AMD EPYC with AVX2 only)."""
    hw = hardware()
    return hw["machine"] in ("x86_64", "AMD64") and not any(f.endswith("vnni") for f in hw["isa"])


def unsigned_weights(model: onnx.ModelProto) -> int:
    """Move every int8 weight that a DequantizeLinear reads to uint8 with its zero point + 128: the same
    dequantized values, but ONNX Runtime then runs u8 x u8 kernels, which widen to int16 before
    multiplying and cannot saturate. Returns how many DequantizeLinear nodes now read uint8 weights."""
    inits = {t.name: t for t in model.graph.initializer}
    moved, detached, converted = 0, set(), set()
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        w = inits[node.input[0]]
        # a weight two DequantizeLinear nodes share is converted once; both get the new zero point
        if w.data_type != TensorProto.INT8 and w.name not in converted:
            continue
        scale = numpy_helper.to_array(inits[node.input[1]])
        zp = (numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2]
              else np.zeros(scale.shape, np.int8))
        if w.name not in converted:
            w.CopyFrom(numpy_helper.from_array(
                (numpy_helper.to_array(w).astype(np.int16) + 128).astype(np.uint8), w.name))
            converted.add(w.name)
        zp_name = f"{node.name or node.output[0]}_zero_point_u8"
        model.graph.initializer.append(numpy_helper.from_array((zp.astype(np.int16) + 128).astype(np.uint8),
                                                               zp_name))
        detached.update(node.input[2:])
        del node.input[2:]
        node.input.append(zp_name)
        moved += 1
    used = {i for n in model.graph.node for i in n.input}
    for t in [t for t in model.graph.initializer if t.name in detached - used]:
        model.graph.initializer.remove(t)
    return moved


class OnnxRuntimeBackend(Backend):
    """Real INT8 kernels on the CPU: ORT fuses DQ -> Conv -> Q into QLinearConv (and QGemm...)."""

    name = "onnxruntime"
    engine_suffix = ".ort.onnx"

    @classmethod
    def available(cls) -> bool:
        return "CPUExecutionProvider" in ort.get_available_providers()

    def build(self, onnx_path: Path, engine_path: Path) -> EngineInfo:
        with atomic_path(engine_path) as tmp, tempfile.TemporaryDirectory() as scratch:
            if u8s8_saturates():  # only then is the graph read and rewritten
                model = onnx.load(str(onnx_path))
                if unsigned_weights(model):
                    onnx_path = Path(scratch) / "model.u8u8.onnx"
                    onnx.save(model, str(onnx_path))
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.intra_op_num_threads = ort_threads()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.optimized_model_filepath = str(tmp)
            ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        return self._info(engine_path)

    def _info(self, engine_path: Path) -> EngineInfo:
        integer, floating, ops = count_ops(onnx.load(str(engine_path)))
        total = integer + floating
        notes = []
        if floating:
            notes.append(f"{floating} of {total} conv/gemm ops run in float: their Q/DQ did not fuse")
        return EngineInfo(self.name, str(engine_path), integer, floating,
                          integer / total if total else 0.0, dict(sorted(ops.items())), notes)

    def runner(self, engine_path: Path) -> Runner:
        return OrtRunner(engine_path, optimize=True)

    def describe(self, engine_path: Path) -> dict:
        return self._info(Path(engine_path)).to_dict()


class OnnxRuntimeReferenceBackend(OnnxRuntimeBackend):
    """ORT with all graph optimizations off: executes a QDQ graph exactly as written (float kernels
    with Q/DQ in between). Used to verify a TensorRT-profile graph where TensorRT is absent."""

    name = "onnxruntime-reference"
    engine_suffix = ".ref.onnx"

    def build(self, onnx_path: Path, engine_path: Path) -> EngineInfo:
        with atomic_path(engine_path) as tmp:
            shutil.copyfile(onnx_path, tmp)
        return self._info(engine_path)

    def _info(self, engine_path: Path) -> EngineInfo:
        # Reference execution runs float kernels only, so no integer-kernel share exists to report;
        # the Q/DQ coverage says what an explicit-quantization backend (TensorRT) would run in INT8.
        model = onnx.load(str(engine_path))
        producers = {o: n.op_type for n in model.graph.node for o in n.output}
        ops = Counter(n.op_type for n in model.graph.node)
        weighted = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
        quantized = sum(all(producers.get(i) == "DequantizeLinear" for i in n.input[:2]) for n in weighted)
        notes = ["reference execution: float kernels between Q/DQ pairs; latency is not INT8 latency"]
        return EngineInfo(self.name, str(engine_path), None, None, None, dict(sorted(ops.items())), notes,
                          qdq_coverage=quantized / len(weighted) if weighted else 0.0)

    def runner(self, engine_path: Path) -> Runner:
        return OrtRunner(engine_path, optimize=False)
