"""Stage 5, engine: backend resolution, the ONNX Runtime and reference backends, runners and timing.

The QDQ graphs come from a tiny conv net pushed through the real quantize -> calibrate -> export
APIs (well under a second), so these tests do not depend on the bundled example.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper

import repapq_deploy.backends.registry as registry
from repapq_deploy.backends import (
    BACKENDS,
    EngineInfo,
    LatencyStats,
    Runner,
    benchmark_interleaved,
    get_backend,
    resolve_backend,
)
from repapq_deploy.backends.onnxruntime import (
    OnnxRuntimeBackend,
    OnnxRuntimeReferenceBackend,
    OrtRunner,
    count_ops,
)
from repapq_deploy.calibrate import calibrate
from repapq_deploy.calibrate.prepare import quantize_model
from repapq_deploy.errors import DeployError
from repapq_deploy.export import export_fp32, export_qdq
from repapq_deploy.export.onnx import reference_session
from repapq_deploy.quant.placement import FakeQuantModel
from repapq_deploy.quant.scheme import QuantConfig

NUM_CLASSES = 10


class TinyNet(nn.Module):
    """Two convs and a classifier: three weighted layers, like a (very) small fused RepVGG."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@dataclass
class Graphs:
    x: np.ndarray
    fp32: Path
    qdq: dict[str, Path]  # profile -> QDQ ONNX
    qmodels: dict[str, FakeQuantModel]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> Graphs:
    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(32, 1, 16, 16)
    folder = tmp_path_factory.mktemp("graphs")
    export_fp32(model, x, folder / "fp32.onnx")
    qdq, qmodels = {}, {}
    for profile in ("onnxruntime", "tensorrt"):
        qm = quantize_model(model, QuantConfig(profile, 8, 8))
        calibrate(qm, x, "minmax", batch_size=16)
        qdq[profile] = folder / f"{profile}.qdq.onnx"
        export_qdq(qm, x, qdq[profile])
        qmodels[profile] = qm
    return Graphs(x.numpy(), folder / "fp32.onnx", qdq, qmodels)


def _tmp_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --- resolve_backend / get_backend ------------------------------------------------------------------

def test_auto_picks_onnxruntime_here(monkeypatch):
    monkeypatch.setattr(registry, "tensorrt_present", lambda: False)
    assert resolve_backend("auto", None) == ("onnxruntime", "onnxruntime")
    assert resolve_backend("auto", "onnxruntime") == ("onnxruntime", "onnxruntime")
    assert resolve_backend("onnxruntime", None) == ("onnxruntime", "onnxruntime")


@pytest.mark.parametrize("backend", ["auto", "onnxruntime"])
def test_tensorrt_profile_without_tensorrt_uses_reference_execution(backend, monkeypatch):
    monkeypatch.setattr(registry, "tensorrt_present", lambda: False)
    assert resolve_backend(backend, "tensorrt") == ("onnxruntime-reference", "tensorrt")


def test_tensorrt_present_is_false_without_the_package(monkeypatch):
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    assert registry.tensorrt_present() is False


def test_backend_tensorrt_without_tensorrt_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(registry, "tensorrt_present", lambda: False)
    with pytest.raises(DeployError) as exc:
        resolve_backend("tensorrt", None)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith("backend tensorrt:")
    assert "backend onnxruntime" in message  # says what to do instead


def test_auto_picks_tensorrt_when_present(monkeypatch):
    monkeypatch.setattr(registry, "tensorrt_present", lambda: True)
    assert resolve_backend("auto", None) == ("tensorrt", "tensorrt")
    assert resolve_backend("tensorrt", "tensorrt") == ("tensorrt", "tensorrt")
    assert resolve_backend("auto", "onnxruntime") == ("onnxruntime", "onnxruntime")
    with pytest.raises(DeployError, match="cannot run on TensorRT") as exc:
        resolve_backend("tensorrt", "onnxruntime")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("name", ["openvino", "", "TensorRT"])
def test_unknown_backend_is_rejected(name):
    with pytest.raises(DeployError, match=f"backend {name}:"):
        resolve_backend(name, None)
    with pytest.raises(DeployError, match=f"backend {name}: no such backend"):
        get_backend(name)


def test_get_backend_returns_registered_instances():
    assert isinstance(get_backend("onnxruntime"), OnnxRuntimeBackend)
    ref = get_backend("onnxruntime-reference")
    assert isinstance(ref, OnnxRuntimeReferenceBackend)
    assert {cls.engine_suffix for cls in BACKENDS.values()} == {".ort.onnx", ".ref.onnx", ".plan"}
    assert OnnxRuntimeBackend.available() and OnnxRuntimeReferenceBackend.available()


# --- OnnxRuntimeBackend --------------------------------------------------------------------------------

def test_ort_backend_fuses_ort_profile_graph_into_integer_kernels(graphs, tmp_path):
    engine = tmp_path / "model.ort.onnx"
    info = OnnxRuntimeBackend().build(graphs.qdq["onnxruntime"], engine)
    assert isinstance(info, EngineInfo)
    assert engine.is_file()
    assert _tmp_leftovers(tmp_path) == []
    assert info.backend == "onnxruntime"
    assert info.path == str(engine)
    assert (info.integer_ops, info.float_ops, info.int8_op_fraction) == (3, 0, 1.0)
    assert info.op_counts["QLinearConv"] == 2
    assert info.op_counts["QGemm"] == 1
    assert not {"Conv", "Gemm", "FusedConv"} & set(info.op_counts)
    assert info.notes == []
    # the engine file really is the optimized graph the counts describe
    integer, floating, ops = count_ops(onnx.load(str(engine)))
    assert (integer, floating) == (3, 0)
    assert dict(ops) == info.op_counts
    assert OnnxRuntimeBackend().describe(engine) == info.to_dict()


class Relu6Net(nn.Module):
    """Convs followed by ReLU6 (MobileNet/EfficientNet-Lite style), inputs large enough to saturate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _ort_fraction(qm: FakeQuantModel, x: torch.Tensor, folder: Path) -> EngineInfo:
    export_qdq(qm, x, folder / "model.qdq.onnx")
    return OnnxRuntimeBackend().build(folder / "model.qdq.onnx", folder / "model.ort.onnx")


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "repapq"])
def test_relu6_ranges_stay_within_six_so_onnxruntime_fuses_every_conv(method, tmp_path, monkeypatch):
    from repapq_deploy.calibrate import reconstruct as R

    monkeypatch.setitem(R.PRESETS, "tiny", {"iters": 30})
    torch.manual_seed(0)
    model = Relu6Net().eval()
    x = 10 * torch.randn(32, 1, 8, 8)
    qm = quantize_model(model, QuantConfig("onnxruntime", 8, 8))
    capped = [q for q in qm.act_quantizers.values() if q.upper == 6.0]
    assert len(capped) == 3  # the inputs of conv2, of the mean and of the classifier
    calibrate(qm, x, method, batch_size=16, preset="tiny")
    for q in capped:
        assert np.float32(q.scale.item()) * np.float32(q.fmt.qmax) <= 6.0
    info = _ort_fraction(qm, x, tmp_path)
    assert info.int8_op_fraction == 1.0, info.op_counts


def test_relu6_range_past_six_leaves_convs_in_float(tmp_path):
    # Why the cap exists: ONNX Runtime drops ReLU6's Clip only when the following Q's range lies within
    # [0, 6]; otherwise Conv+Clip become a float FusedConv.
    torch.manual_seed(0)
    x = 10 * torch.randn(32, 1, 8, 8)
    qm = quantize_model(Relu6Net().eval(), QuantConfig("onnxruntime", 8, 8))
    calibrate(qm, x, "minmax", batch_size=16)
    with torch.no_grad():
        for q in qm.act_quantizers.values():
            if q.upper is not None:
                q.scale.fill_(6.5 / q.fmt.qmax)
    info = _ort_fraction(qm, x, tmp_path)
    assert info.int8_op_fraction < 1.0
    assert "FusedConv" in info.op_counts


class BottleneckNet(nn.Module):
    """MobileNetV2/EfficientNet-style linear bottleneck: a conv from a ReLU6 tensor to a signed one
    (no activation), a residual add, and a conv from the signed sum back to ReLU6."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 16, 1)
        self.project = nn.Conv2d(16, 8, 1)
        self.head = nn.Conv2d(8, 16, 1)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # signed
        x = x + self.project(self.act(self.expand(x)))
        x = self.act(self.head(x))
        return self.fc(x.mean((2, 3)))


def test_convs_between_signed_and_unsigned_tensors_fuse_on_onnxruntime(tmp_path):
    # QLinearConv takes one type in and out: signed activations are uint8 with zero point 128
    from repapq_deploy.export import check_against_torch

    torch.manual_seed(0)
    x = torch.randn(32, 1, 8, 8)
    qm = quantize_model(BottleneckNet().eval(), QuantConfig("onnxruntime", 8, 8))
    calibrate(qm, x, "minmax", batch_size=16)
    assert any(q.fmt.signed and q.zero_point == 128 for q in qm.act_quantizers.values())
    info = _ort_fraction(qm, x, tmp_path)
    assert info.int8_op_fraction == 1.0, info.op_counts
    assert check_against_torch(qm, tmp_path / "model.qdq.onnx", x).agreement_top1 == 100.0


class PadNet(nn.Module):
    """EfficientNet-Lite style: explicit TF-"same" zero padding before every k>1 conv, ReLU6."""

    def __init__(self) -> None:
        super().__init__()
        self.pad0, self.stem = nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(1, 8, 3, stride=2)
        self.expand = nn.Conv2d(8, 16, 1)
        self.pad1, self.dw1 = nn.ZeroPad2d(1), nn.Conv2d(16, 16, 3, groups=16)
        self.dw2 = nn.Conv2d(16, 16, 3, stride=2, groups=16)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(self.pad0(x)))
        x = self.act(self.expand(x))
        x = self.act(self.dw1(self.pad1(x)))
        x = self.act(self.dw2(torch.nn.functional.pad(x, (0, 1, 0, 1))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("form", ["modules", "torch.export"])
@pytest.mark.parametrize("profile", ["onnxruntime", "tensorrt"])
def test_zero_padding_shares_its_input_scale_and_every_conv_fuses(form, profile, bits, tmp_path):
    from repapq_deploy.export import check_against_torch
    from repapq_deploy.load import lift_exported

    torch.manual_seed(0)
    x = torch.randn(32, 1, 16, 16)
    model = PadNet().eval()
    if form == "torch.export":
        model = lift_exported(torch.export.export(model, (x[:2],)).module())
    qm = quantize_model(model, QuantConfig(profile, bits, 8))
    pads = [n for n in qm.module.graph.nodes if "pad" in str(n.target)]
    assert len(pads) == 3
    for pad in pads:
        (after,) = pad.users  # the pad's output quantizer is its input's (one scale, as for MaxPool)
        assert after.target == pad.args[0].target
    calibrate(qm, x, "minmax", batch_size=16)
    if profile == "onnxruntime":
        info = _ort_fraction(qm, x, tmp_path)
        # at 6 bits too: the ReLU6's float Clip is implied by the 6-bit grid (63 s <= 6) and dropped
        assert info.int8_op_fraction == 1.0, info.op_counts
    else:
        export_qdq(qm, x, tmp_path / "model.qdq.onnx")
    # the zero pads went into the convs' own padding (exact: the values are already on the grid)
    graph = onnx.load(str(tmp_path / "model.qdq.onnx")).graph
    assert not [n for n in graph.node if n.op_type == "Pad"]
    assert sorted(tuple(a.ints) for n in graph.node if n.op_type == "Conv" for a in n.attribute
                  if a.name == "pads") == [(0, 0, 0, 0), (0, 0, 1, 1), (0, 0, 1, 1), (1, 1, 1, 1)]
    check = check_against_torch(qm, tmp_path / "model.qdq.onnx", x)
    assert check.agreement_top1 == 100.0 and check.max_rel_diff < 1e-5


def test_ort_backend_engine_matches_the_quantized_graph(graphs, tmp_path):
    engine = tmp_path / "model.ort.onnx"
    OnnxRuntimeBackend().build(graphs.qdq["onnxruntime"], engine)
    with OnnxRuntimeBackend().runner(engine) as runner:
        got = runner.infer(graphs.x)
    want = reference_session(graphs.qdq["onnxruntime"]).run(None, {"input": graphs.x})[0]
    assert got.shape == (len(graphs.x), NUM_CLASSES)
    assert got.dtype == np.float32
    # integer kernels requantize like the Q/DQ graph: at most a rounding step apart
    assert np.abs(got - want).max() <= 0.01 * np.abs(want).max()
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9


def test_ort_backend_reports_unfused_convs_of_a_tensorrt_profile_graph(graphs, tmp_path):
    # TensorRT-profile graphs keep float biases, which ORT cannot fuse: the reason for the reference backend.
    info = OnnxRuntimeBackend().build(graphs.qdq["tensorrt"], tmp_path / "trt.ort.onnx")
    assert info.float_ops > 0
    assert info.int8_op_fraction == pytest.approx(info.integer_ops / (info.integer_ops + info.float_ops))
    assert info.int8_op_fraction < 1.0
    assert any("did not fuse" in n for n in info.notes)


def test_ort_backend_build_overwrites_atomically(graphs, tmp_path):
    engine = tmp_path / "model.ort.onnx"
    engine.write_text("stale")
    OnnxRuntimeBackend().build(graphs.qdq["onnxruntime"], engine)
    onnx.checker.check_model(onnx.load(str(engine)))
    assert _tmp_leftovers(tmp_path) == []


def test_ort_backend_failed_build_leaves_nothing(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx file")
    engine = tmp_path / "model.ort.onnx"
    with pytest.raises(Exception):  # noqa: B017  (ORT's own error type)
        OnnxRuntimeBackend().build(bad, engine)
    assert not engine.exists()
    assert _tmp_leftovers(tmp_path) == []


# --- reference backend ---------------------------------------------------------------------------------

def test_reference_backend_copies_graph_and_counts_quantized_layers(graphs, tmp_path):
    src = graphs.qdq["tensorrt"]
    engine = tmp_path / "model.ref.onnx"
    info = OnnxRuntimeReferenceBackend().build(src, engine)
    assert engine.read_bytes() == src.read_bytes()  # executed exactly as written
    assert _tmp_leftovers(tmp_path) == []
    assert info.backend == "onnxruntime-reference"
    assert (info.integer_ops, info.float_ops, info.int8_op_fraction, info.qdq_coverage) == (None, None, None, 1.0)
    assert info.op_counts["Conv"] == 2 and info.op_counts["Gemm"] == 1
    assert any("not INT8 latency" in n for n in info.notes)


def test_reference_backend_counts_fp32_graph_as_float(graphs, tmp_path):
    info = OnnxRuntimeReferenceBackend().build(graphs.fp32, tmp_path / "fp32.ref.onnx")
    assert (info.int8_op_fraction, info.qdq_coverage) == (None, 0.0)


def _value(name: str, shape: list[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _hand_built_qdq(path: Path) -> None:
    """conv_q: both inputs dequantized; conv_f: float input; gemm_q: both dequantized; matmul_h: one."""
    init = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
            helper.make_tensor("zp", TensorProto.INT8, [], [0]),
            helper.make_tensor("w_q", TensorProto.INT8, [4, 1, 3, 3], [1] * 36),
            helper.make_tensor("w_f", TensorProto.FLOAT, [4, 4, 1, 1], [0.5] * 16),
            helper.make_tensor("g_q", TensorProto.INT8, [4, 4], [1] * 16)]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "s", "zp"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "s", "zp"], ["w_dq"]),
        helper.make_node("Conv", ["x_dq", "w_dq"], ["c1"], name="conv_q"),
        helper.make_node("Conv", ["c1", "w_f"], ["c2"], name="conv_f"),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("QuantizeLinear", ["f", "s", "zp"], ["f_q"]),
        helper.make_node("DequantizeLinear", ["f_q", "s", "zp"], ["f_dq"]),
        helper.make_node("DequantizeLinear", ["g_q", "s", "zp"], ["g_dq"]),
        helper.make_node("Gemm", ["f_dq", "g_dq"], ["y"], name="gemm_q"),
        helper.make_node("MatMul", ["f", "g_dq"], ["z"], name="matmul_h"),
    ]
    graph = helper.make_graph(nodes, "hand", [_value("x", [1, 1, 8, 8])],
                              [_value("y", [1, 4]), _value("z", [1, 4])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_reference_backend_counts_only_layers_with_dequantized_inputs(tmp_path):
    path = tmp_path / "hand.onnx"
    _hand_built_qdq(path)
    info = OnnxRuntimeReferenceBackend().describe(path)
    assert info["qdq_coverage"] == 0.5  # conv_q, gemm_q of conv_q, gemm_q, conv_f, matmul_h
    assert info["int8_op_fraction"] is None
    assert info["op_counts"]["DequantizeLinear"] == 4
    # and it runs, unoptimized
    with OnnxRuntimeReferenceBackend().runner(path) as r:
        assert r.infer(np.ones((1, 1, 8, 8), np.float32)).shape == (1, 4)


def test_reference_runner_runs_without_graph_optimizations(graphs, tmp_path):
    engine = tmp_path / "model.ref.onnx"
    backend = OnnxRuntimeReferenceBackend()
    backend.build(graphs.qdq["tensorrt"], engine)
    runner = backend.runner(engine)
    assert isinstance(runner, OrtRunner) and runner.optimize is False
    with runner:
        level = runner.session.get_session_options().graph_optimization_level
        assert level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        got = runner.infer(graphs.x)
    # identical to the export check's reference session, and to the PyTorch fake-quant model
    want = reference_session(graphs.qdq["tensorrt"]).run(None, {"input": graphs.x})[0]
    np.testing.assert_array_equal(got, want)
    with torch.no_grad():
        fq = graphs.qmodels["tensorrt"].module(torch.from_numpy(graphs.x)).numpy()
    np.testing.assert_allclose(got, fq, atol=1e-4 * np.abs(fq).max() + 1e-6)


def test_ort_runner_optimizes(graphs):
    with OnnxRuntimeBackend().runner(graphs.fp32) as runner:
        level = runner.session.get_session_options().graph_optimization_level
    assert level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


# --- count_ops -------------------------------------------------------------------------------------------

def test_count_ops_on_hand_built_graph():
    nodes = [helper.make_node(op, ["a"], ["b"], name=f"n{i}", domain=domain) for i, (op, domain) in enumerate([
        ("QLinearConv", ""), ("QLinearConv", ""), ("ConvInteger", ""), ("QGemm", "com.microsoft"),
        ("MatMulInteger", ""), ("Conv", ""), ("FusedConv", "com.microsoft"), ("Gemm", ""),
        ("Relu", ""), ("QuantizeLinear", ""),
    ])]
    model = helper.make_model(helper.make_graph(nodes, "g", [], []))
    integer, floating, ops = count_ops(model)
    assert (integer, floating) == (5, 3)
    assert ops == Counter({"QLinearConv": 2, "ConvInteger": 1, "QGemm": 1, "MatMulInteger": 1, "Conv": 1,
                           "FusedConv": 1, "Gemm": 1, "Relu": 1, "QuantizeLinear": 1})


def test_count_ops_without_conv_or_gemm(tmp_path):
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                                [_value("x", [1, 4])], [_value("y", [1, 4])]))
    assert count_ops(model) == (0, 0, Counter({"Relu": 1}))
    onnx.save(model, str(tmp_path / "relu.onnx"))
    # no conv/gemm at all: fraction 0, not a ZeroDivisionError
    assert OnnxRuntimeBackend().describe(tmp_path / "relu.onnx")["int8_op_fraction"] == 0.0
    assert OnnxRuntimeReferenceBackend().describe(tmp_path / "relu.onnx")["qdq_coverage"] == 0.0


# --- runners ---------------------------------------------------------------------------------------------

def test_ort_runner_activate_infer_deactivate(graphs):
    runner = OrtRunner(graphs.fp32)
    assert not runner.is_active and runner.session is None
    runner.activate()
    session = runner.session
    assert runner.is_active and session is not None
    runner.activate()  # idempotent: no second session
    assert runner.session is session
    out = runner.infer(graphs.x[:4])
    assert out.shape == (4, NUM_CLASSES) and out.dtype == np.float32
    # float64 and non-contiguous input are converted, not rejected
    strided = np.repeat(graphs.x[:4].astype(np.float64), 2, axis=3)[..., ::2]
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(runner.infer(strided), out)
    runner.deactivate()
    assert not runner.is_active and runner.session is None
    runner.deactivate()  # idempotent
    assert not runner.is_active


def test_runner_context_manager(graphs):
    runner = OnnxRuntimeBackend().runner(graphs.fp32)
    with runner as r:
        assert r is runner and r.is_active
        assert r.infer(graphs.x[:2]).shape == (2, NUM_CLASSES)
    assert not runner.is_active and runner.session is None
    with pytest.raises(RuntimeError, match="boom"), runner:
        assert runner.is_active
        raise RuntimeError("boom")
    assert not runner.is_active  # released even when the block raises


class RecordingRunner(Runner):
    """A fake runner that records every call (shared log) and sleeps a little per inference."""

    def __init__(self, name: str, log: list[str], delay: float = 0.0) -> None:
        super().__init__()
        self.name, self.log, self.delay = name, log, delay
        self.activations = self.deactivations = 0

    def activate_impl(self) -> None:
        self.activations += 1

    def deactivate_impl(self) -> None:
        self.deactivations += 1

    def infer(self, x: np.ndarray) -> np.ndarray:
        assert self.is_active, "infer() before activate()"
        self.log.append(self.name)
        if self.delay:
            time.sleep(self.delay)
        return np.zeros((len(x), NUM_CLASSES), np.float32)


def test_runner_base_calls_hooks_once():
    r = RecordingRunner("a", [])
    r.deactivate()
    assert r.deactivations == 0  # never activated: nothing to release
    with r:
        r.activate()
    assert (r.activations, r.deactivations) == (1, 1)


# --- timing ----------------------------------------------------------------------------------------------

def test_latency_stats_from_times():
    s = LatencyStats.from_times(8, [0.001, 0.002, 0.003, 0.004])
    assert (s.batch, s.iterations) == (8, 4)
    assert s.p50_ms == pytest.approx(2.5)
    assert s.mean_ms == pytest.approx(2.5)
    assert s.p50_ms <= s.p90_ms <= s.p99_ms <= 4.0
    assert s.throughput == pytest.approx(8 / 0.0025)
    assert set(s.to_dict()) == {"batch", "iterations", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput"}


def test_benchmark_interleaved_alternates_runners():
    log: list[str] = []
    runners = {"a": RecordingRunner("a", log), "b": RecordingRunner("b", log)}
    x = np.zeros((3, 1, 4, 4), np.float32)
    stats = benchmark_interleaved(runners, x, warmup=2, iterations=3)
    assert log == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-up each, then alternate every iteration
    assert set(stats) == {"a", "b"}
    assert all(s.iterations == 3 and s.batch == 3 for s in stats.values())


@pytest.mark.parametrize(("seconds", "expected"), [(0.0, 10), (1e6, 500)])
def test_benchmark_interleaved_iteration_count_is_bounded(seconds, expected):
    log: list[str] = []
    stats = benchmark_interleaved({"a": RecordingRunner("a", log)}, np.zeros((1, 1, 2, 2), np.float32),
                                  warmup=0, seconds=seconds)
    assert stats["a"].iterations == expected
    assert len(log) == 1 + expected  # one probe round sizes the run


def test_benchmark_interleaved_real_runners(graphs, tmp_path):
    engine = tmp_path / "model.ort.onnx"
    OnnxRuntimeBackend().build(graphs.qdq["onnxruntime"], engine)
    runners = {"fp32": OrtRunner(graphs.fp32), "engine": OnnxRuntimeBackend().runner(engine)}
    x = graphs.x[:4]
    try:
        stats = benchmark_interleaved(runners, x, warmup=1, iterations=5)
    finally:
        for r in runners.values():
            r.deactivate()
    assert set(stats) == {"fp32", "engine"}
    for s in stats.values():
        assert isinstance(s, LatencyStats)
        assert (s.batch, s.iterations) == (4, 5)
        assert 0 < s.p50_ms <= s.p90_ms <= s.p99_ms
        assert s.mean_ms > 0
        assert s.throughput > 0
        assert s.throughput == pytest.approx(4 / (s.p50_ms / 1e3))


def test_benchmark_measures_the_runner_not_the_loop():
    log: list[str] = []
    runners = {"slow": RecordingRunner("slow", log, delay=0.004), "fast": RecordingRunner("fast", log)}
    stats = benchmark_interleaved(runners, np.zeros((2, 1, 2, 2), np.float32), warmup=0, iterations=5)
    assert stats["slow"].p50_ms >= 4.0
    assert stats["fast"].p50_ms < stats["slow"].p50_ms


def test_unsigned_weights_keep_the_graph_and_the_engine_exact(graphs, tmp_path):
    # int8 weights as uint8 + 128 (what the backend does on x86 without VNNI): same dequantized values,
    # so the reference execution is unchanged and the u8 x u8 engine still matches it
    from repapq_deploy.backends.onnxruntime import unsigned_weights

    model = onnx.load(str(graphs.qdq["onnxruntime"]))
    assert unsigned_weights(model) > 0
    assert not [t for t in model.graph.initializer if t.data_type == TensorProto.INT8]
    path = tmp_path / "u8.onnx"
    onnx.save(model, str(path))
    want = reference_session(graphs.qdq["onnxruntime"]).run(None, {"input": graphs.x})[0]
    got = reference_session(path).run(None, {"input": graphs.x})[0]
    assert np.array_equal(got, want)
    with OrtRunner(path, optimize=True) as runner:
        engine = runner.infer(graphs.x)
    assert np.abs(engine - want).max() <= 0.01 * np.abs(want).max()
