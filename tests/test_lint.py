"""Q/DQ placement linter: hand-built graphs that each break one rule, and the project's own QDQ exports.

The hand-built graph is clean for both targets (for TensorRT once its float tensors are FP16); each
rule test mutates one thing in it and checks that exactly that rule fires and names the nodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from repapq_deploy.calibrate import calibrate
from repapq_deploy.calibrate.prepare import quantize_model
from repapq_deploy.errors import DeployError
from repapq_deploy.export import export_qdq
from repapq_deploy.export.lint import RULES, TARGETS, Violation, lint_model
from repapq_deploy.quant.scheme import QuantConfig
from repapq_deploy.reparam import fuse_model

S_IN, S_POOL, S_CAT, S_OUT, S_FC = 0.02, 0.01, 0.015, 0.012, 0.005  # per-tensor activation scales
W_SCALE = 0.01


# ------------------------------------------------------------------------------------ graph building


class GraphBuilder:
    """A small QDQ graph, node by node: int8 per-tensor activations, int8 per-channel weights (axis 0)."""

    def __init__(self, float_type: int = TensorProto.FLOAT) -> None:
        self.float_type = float_type
        self.np_float = helper.tensor_dtype_to_np_dtype(float_type)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(0)

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def qdq(self, x: str, name: str, scale: float) -> str:
        s = self.const(f"{name}_scale", np.asarray(scale, self.np_float))
        zp = self.const(f"{name}_zp", np.asarray(0, np.int8))
        return self.node("DequantizeLinear", [self.node("QuantizeLinear", [x, s, zp], f"{name}_q"), s, zp],
                         f"{name}_dq")

    def weight(self, name: str, shape: tuple[int, ...], axis: int = 0) -> str:
        w = self.const(f"{name}_w", self.rng.integers(-127, 128, shape).astype(np.int8))
        s = self.const(f"{name}_wscale", np.full(shape[axis], W_SCALE, self.np_float))
        zp = self.const(f"{name}_wzp", np.zeros(shape[axis], np.int8))
        return self.node("DequantizeLinear", [w, s, zp], f"{name}_wdq", axis=axis)

    def conv(self, name: str, x: str, cin: int, cout: int, k: int = 3) -> str:
        w = self.weight(name, (cout, cin, k, k))
        b = self.const(f"{name}_b", np.zeros(cout, self.np_float))
        return self.node("Conv", [x, w, b], name, pads=[k // 2] * 4)

    def model(self, inputs: list[onnx.ValueInfoProto], out: str, opset: int) -> onnx.ModelProto:
        outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 10])]
        graph = helper.make_graph(self.nodes, "lint_test", inputs, outputs, self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def clean_graph(float_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """stem conv -> relu -> maxpool (tied) -> two conv branches -> concat (one scale) -> conv + DQ shortcut
    -> relu -> global pool -> flatten -> gemm. FP16 graphs cast at the boundary, as a converted export would."""
    b = GraphBuilder(float_type)
    x = "x"
    if float_type != TensorProto.FLOAT:
        x = b.node("Cast", [x], "cast_in", to=float_type)
    t = b.conv("c1", b.qdq(x, "a0", S_IN), 4, 8)
    t = b.qdq(b.node("Relu", [t], "r1"), "a1", S_POOL)
    t = b.qdq(b.node("MaxPool", [t], "mp", kernel_shape=[2, 2], strides=[2, 2]), "a2", S_POOL)
    branches = [b.qdq(b.conv(name, t, 8, 4), f"{name}_a", S_CAT) for name in ("ca", "cb")]
    cat = b.qdq(b.node("Concat", branches, "cat", axis=1), "a3", S_CAT)
    t = b.node("Add", [b.conv("c2", cat, 8, 8), cat], "add")
    t = b.qdq(b.node("Relu", [t], "r2"), "a4", S_OUT)
    t = b.node("Flatten", [b.node("GlobalAveragePool", [t], "gap")], "flat")
    w = b.weight("fc", (10, 8))
    t = b.node("Gemm", [b.qdq(t, "a5", S_FC), w, b.const("fc_b", np.zeros(10, b.np_float))], "fc", transB=1)
    if float_type != TensorProto.FLOAT:
        t = b.node("Cast", [t], "cast_out", to=TensorProto.FLOAT)
    # opset 19: QuantizeLinear/DequantizeLinear with FLOAT16 scales
    model = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])], t,
                    17 if float_type == TensorProto.FLOAT else 19)
    onnx.checker.check_model(model, full_check=True)
    return model


def linear_graph(op: str, weight_shape: tuple[int, int], axis: int, trans_b: int = 0) -> onnx.ModelProto:
    """x[1, 8] -> Q/DQ -> Gemm or MatMul with a per-channel int8 weight quantized on ``axis``."""
    b = GraphBuilder()
    attrs = {"transB": trans_b} if op == "Gemm" else {}
    out = b.node(op, [b.qdq("x", "a0", S_IN), b.weight("fc", weight_shape, axis)], "fc", **attrs)
    model = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])], out, 17)
    onnx.checker.check_model(model, full_check=True)
    return model


# mutations of a built graph


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def set_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    init = next(i for i in model.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(np.asarray(value, numpy_helper.to_array(init).dtype), name))


def set_attr(model: onnx.ModelProto, node_name: str, **attrs) -> None:
    n = node(model, node_name)
    kept = [a for a in n.attribute if a.name not in attrs]
    del n.attribute[:]
    n.attribute.extend(kept + [helper.make_attribute(k, v) for k, v in attrs.items()])


def rewire(model: onnx.ModelProto, node_name: str, index: int, tensor: str) -> None:
    node(model, node_name).input[index] = tensor


def insert_after(model: onnx.ModelProto, after: str, new: onnx.NodeProto) -> None:
    """Insert ``new`` right after node ``after`` (keeps the graph topologically sorted)."""
    nodes = list(model.graph.node)
    nodes.insert(next(i for i, n in enumerate(nodes) if n.name == after) + 1, new)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def add_graph_input(model: onnx.ModelProto, name: str, elem_type: int) -> None:
    model.graph.input.append(helper.make_tensor_value_info(name, elem_type, []))


def fp16_graph() -> onnx.ModelProto:
    """The clean graph as it must look for TensorRT: FP16 everywhere outside Q/DQ."""
    return clean_graph(TensorProto.FLOAT16)


def only(model: onnx.ModelProto, target: str, rule: str, *names: str) -> list[Violation]:
    """Lint ``model``; assert that ``rule`` is the only rule that fires and that it names ``names``."""
    found = lint_model(model, target)
    assert {v.rule for v in found} == {rule}, [str(v) for v in found]
    for name in names:
        assert any(name in v.nodes for v in found), (name, [str(v) for v in found])
    for v in found:
        assert v.message and v.fix and "\n" not in v.message + v.fix
        assert str(v).startswith(f"[{rule}] ") and f"-> fix: {v.fix}" in str(v)
    return found


# ------------------------------------------------------------------------------------ API


def test_registry_and_targets() -> None:
    assert TARGETS == ("tensorrt", "onnxruntime")
    assert set(RULES) == {"zero-point", "scale", "per-channel-activation", "weight-axis", "unquantized-input",
                          "residual-shortcut", "concat-scales", "maxpool-scales", "opset", "fp32-region"}


def test_violation_str() -> None:
    v = Violation("scale", ("a_q", "a_dq"), "a_q has scale 0", "re-calibrate")
    assert str(v) == "[scale] a_q has scale 0 (nodes: a_q, a_dq) -> fix: re-calibrate"
    assert str(Violation("opset", (), "opset 11", "use 17")) == "[opset] opset 11 -> fix: use 17"
    many = str(Violation("fp32-region", tuple(f"n{i}" for i in range(25)), "m", "f"))
    assert "n9, ... (25 in all)" in many and "n10" not in many


def test_clean_graph_passes_onnxruntime() -> None:
    assert lint_model(clean_graph(), "onnxruntime") == []


def test_fp16_clean_graph_passes_tensorrt() -> None:
    model = fp16_graph()
    assert lint_model(model, "tensorrt") == []
    assert lint_model(model, "onnxruntime") == []


def test_accepts_paths_and_leaves_the_model_untouched(tmp_path: Path) -> None:
    model = clean_graph()
    rewire(model, "c2", 0, "cat_out")  # unquantized data input
    node(model, "c2").name = ""  # unnamed nodes get a name in the report, not in the model
    before = model.SerializeToString()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    for source in (model, path, str(path)):
        [v] = lint_model(source, "onnxruntime")
        assert v.rule == "unquantized-input" and v.nodes[0].startswith("Conv_") and "cat" in v.nodes
    assert model.SerializeToString() == before


def test_unknown_target_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="tensorrt, onnxruntime"):
        lint_model(clean_graph(), "openvino")
    with pytest.raises(DeployError, match="not found"):
        lint_model(tmp_path / "missing.onnx", "tensorrt")
    for name, data in (("garbage.onnx", b"\xff\x00 not a protobuf \x13\x37" * 8), ("empty.onnx", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DeployError) as info:
            lint_model(tmp_path / name, "onnxruntime")
        assert name in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------ one rule each


@pytest.mark.parametrize("target", TARGETS)
def test_nonzero_zero_point(target: str) -> None:
    model = fp16_graph()
    set_init(model, "a1_zp", 3)
    only(model, target, "zero-point", "a1_q", "a1_dq")


@pytest.mark.parametrize("target", TARGETS)
def test_zero_point_that_is_not_a_constant(target: str) -> None:
    model = fp16_graph()
    add_graph_input(model, "zp", TensorProto.INT8)
    rewire(model, "a4_q", 2, "zp")
    [v] = only(model, target, "zero-point", "a4_q")
    assert "'zp'" in v.message and "not a constant" in v.message


def test_tensorrt_rejects_uint8_quantization() -> None:
    model = fp16_graph()
    zp = next(i for i in model.graph.initializer if i.name == "a1_zp")
    zp.CopyFrom(numpy_helper.from_array(np.asarray(0, np.uint8), "a1_zp"))
    only(model, "tensorrt", "zero-point", "a1_q", "a1_dq")
    assert lint_model(model, "onnxruntime") == []  # the ORT profile uses uint8 after ReLU


@pytest.mark.parametrize("value", [0.0, -0.01, np.nan, np.inf])
@pytest.mark.parametrize("target", TARGETS)
def test_bad_scale_value(target: str, value: float) -> None:
    model = fp16_graph()
    set_init(model, "a4_scale", value)
    only(model, target, "scale", "a4_q", "a4_dq")


@pytest.mark.parametrize("target", TARGETS)
def test_scale_that_is_not_a_constant(target: str) -> None:
    model = fp16_graph()
    add_graph_input(model, "s", TensorProto.FLOAT16)
    rewire(model, "a4_q", 1, "s")
    only(model, target, "scale", "a4_q")


@pytest.mark.parametrize("target", TARGETS)
def test_per_channel_activation(target: str) -> None:
    model = fp16_graph()
    set_init(model, "a4_scale", np.full(8, S_OUT))
    set_init(model, "a4_zp", np.zeros(8))
    for n in ("a4_q", "a4_dq"):
        set_attr(model, n, axis=1)
    only(model, target, "per-channel-activation", "a4_q", "a4_dq")


@pytest.mark.parametrize("explicit_axis", [True, False], ids=["axis-1", "default-axis"])
@pytest.mark.parametrize("target", TARGETS)
def test_conv_weight_on_the_wrong_axis(target: str, explicit_axis: bool) -> None:
    model = fp16_graph()
    set_init(model, "c1_wscale", np.full(4, W_SCALE))  # c1's weight is [8, 4, 3, 3]: axis 1 has 4 channels
    set_init(model, "c1_wzp", np.zeros(4))
    if explicit_axis:
        set_attr(model, "c1_wdq", axis=1)
    else:
        n = node(model, "c1_wdq")
        n.attribute.remove(next(a for a in n.attribute if a.name == "axis"))  # ONNX's default is axis 1
    [v] = only(model, target, "weight-axis", "c1", "c1_wdq")
    assert "axis 1" in v.message and "axis=0" in v.fix


@pytest.mark.parametrize(("op", "shape", "trans_b", "good_axis"), [
    ("Gemm", (10, 8), 1, 0),  # B is [N, K]
    ("Gemm", (8, 10), 0, 1),  # B is [K, N]
    ("MatMul", (8, 10), 0, 1),
])
def test_gemm_and_matmul_weight_axes(op: str, shape: tuple[int, int], trans_b: int, good_axis: int) -> None:
    assert lint_model(linear_graph(op, shape, good_axis, trans_b), "onnxruntime") == []
    only(linear_graph(op, shape, 1 - good_axis, trans_b), "onnxruntime", "weight-axis", "fc", "fc_wdq")


def test_per_tensor_weight_is_a_violation_for_tensorrt_only() -> None:
    model = fp16_graph()
    set_init(model, "c1_wscale", np.asarray(W_SCALE))
    set_init(model, "c1_wzp", np.asarray(0))
    n = node(model, "c1_wdq")
    n.attribute.remove(next(a for a in n.attribute if a.name == "axis"))
    [v] = only(model, "tensorrt", "weight-axis", "c1", "c1_wdq")
    assert "per tensor" in v.message
    assert lint_model(model, "onnxruntime") == []


@pytest.mark.parametrize("target", TARGETS)
def test_unquantized_conv_data_input(target: str) -> None:
    model = fp16_graph()
    rewire(model, "c2", 0, "cat_out")
    [v] = only(model, target, "unquantized-input", "c2", "cat")
    assert "data input 'cat_out'" in v.message


@pytest.mark.parametrize("target", TARGETS)
def test_unquantized_gemm_weight(target: str) -> None:
    model = fp16_graph()
    model.graph.initializer.append(numpy_helper.from_array(np.ones((10, 8), np.float16), "fc_float_w"))
    rewire(model, "fc", 1, "fc_float_w")
    [v] = only(model, target, "unquantized-input", "fc")
    assert "weight input 'fc_float_w'" in v.message


@pytest.mark.parametrize("via_relu", [False, True], ids=["conv", "conv-relu"])
def test_residual_without_shortcut_qdq(via_relu: bool) -> None:
    model = fp16_graph()
    rewire(model, "add", 1, "cat_out")  # the shortcut skips its Q/DQ
    if via_relu:
        insert_after(model, "c2", helper.make_node("Relu", ["c2_out"], ["c2_relu_out"], name="c2_relu"))
        rewire(model, "add", 0, "c2_relu_out")
    [v] = only(model, "tensorrt", "residual-shortcut", "add", "c2", "cat")
    assert "shortcut" in v.fix
    assert lint_model(model, "onnxruntime") == []  # the rule is about TensorRT's conv-epilogue fusion


def test_residual_with_qdq_on_the_conv_branch_instead_of_the_shortcut() -> None:
    model = fp16_graph()
    b = GraphBuilder(TensorProto.FLOAT16)
    branch = b.qdq("c2_out", "a6", S_CAT)
    for new in reversed(b.nodes):
        insert_after(model, "c2", new)
    model.graph.initializer.extend(b.inits)
    rewire(model, "add", 0, branch)
    rewire(model, "add", 1, "cat_out")
    only(model, "tensorrt", "residual-shortcut", "add", "c2", "a6_dq")
    assert lint_model(model, "onnxruntime") == []


@pytest.mark.parametrize("target", TARGETS)
def test_concat_inputs_with_different_scales(target: str) -> None:
    model = fp16_graph()
    set_init(model, "cb_a_scale", 2 * S_CAT)
    [v] = only(model, target, "concat-scales", "cat", "ca_a_dq", "cb_a_dq")
    assert "different scales" in v.message


@pytest.mark.parametrize("target", TARGETS)
def test_concat_output_requantized_with_another_scale(target: str) -> None:
    model = fp16_graph()
    set_init(model, "a3_scale", 2 * S_CAT)
    only(model, target, "concat-scales", "cat", "a3_q")


@pytest.mark.parametrize("target", TARGETS)
def test_concat_of_quantized_and_unquantized_inputs(target: str) -> None:
    model = fp16_graph()
    rewire(model, "cat", 1, "cb_out")
    [v] = only(model, target, "concat-scales", "cat", "cb")
    assert "'cb_out'" in v.message


@pytest.mark.parametrize("target", TARGETS)
def test_untied_maxpool_scales(target: str) -> None:
    model = fp16_graph()
    set_init(model, "a2_scale", 2 * S_POOL)
    only(model, target, "maxpool-scales", "a1_dq", "mp", "a2_q")


def test_old_opset() -> None:
    model = clean_graph()
    model.opset_import[0].version = 12
    [v] = only(model, "onnxruntime", "opset")
    assert "opset 12" in v.message and "13" in v.message


def test_fp32_region_groups_every_float_compute_op() -> None:
    [v] = only(clean_graph(), "tensorrt", "fp32-region")
    compute = ["c1", "r1", "mp", "ca", "cb", "cat", "c2", "add", "r2", "gap", "fc"]
    assert list(v.nodes) == compute  # no Q/DQ, no Flatten
    assert v.message.startswith(f"{len(compute)} compute op(s)") and "FP16" in v.fix
    assert lint_model(clean_graph(), "onnxruntime") == []  # FP32 is right for ORT's CPU kernels


# ------------------------------------------------------------------------------------ the project's exports


CONFIGS = [("onnxruntime", 8), ("onnxruntime", 6), ("tensorrt", 8), ("tensorrt", 6)]
IDS = [f"{p}-int{b}" for p, b in CONFIGS]


class Neck(nn.Module):
    """A tiny YOLOv6-style neck: two conv branches of one feature map joined by torch.cat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.branch_a = nn.Conv2d(8, 8, 1)
        self.branch_b = nn.Conv2d(8, 8, 3, padding=1)
        self.merge = nn.Conv2d(16, 16, 1)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.stem(x))
        y = torch.cat([self.branch_a(y), self.branch_b(y)], 1)
        y = self.pool(self.merge(y))
        return self.head(torch.flatten(self.gap(y), 1))


def random_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def export(gm: nn.Module, data: torch.Tensor, profile: str, bits: int, path: Path, method: str = "minmax") -> Path:
    """The project's pipeline: quantize for the profile, calibrate, export the QDQ graph."""
    qm = quantize_model(gm, QuantConfig(profile, bits, 8))
    calibrate(qm, data, method)
    export_qdq(qm, data, path)
    return path


def assert_passes_its_profile(path: Path, profile: str) -> None:
    found = lint_model(path, profile)
    if profile == "tensorrt":
        # The TensorRT export is still FP32 outside Q/DQ; the FP16 conversion is separate work, so
        # fp32-region is expected (and is the only rule allowed to fire) until that lands.
        assert [v.rule for v in found] == ["fp32-region"], [str(v) for v in found]
    else:
        assert found == [], [str(v) for v in found]


@pytest.fixture(scope="module")
def fused_neck() -> nn.Module:
    torch.manual_seed(0)
    return fuse_model(Neck().eval(), random_images(8))[0]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_bundled_example_export_passes(tmp_path: Path, fused_example, calib_x, config) -> None:
    profile, bits = config
    assert_passes_its_profile(export(fused_example[0], calib_x, profile, bits, tmp_path / "m.onnx"), profile)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_resnet18_export_passes(tmp_path: Path, fused_resnet18, config) -> None:
    # conftest's resnet18: timm, 10 classes, 1 channel, random BN statistics, fused (BN folded) on 32x32 noise
    profile, bits = config
    path = export(fused_resnet18[0], random_images(16), profile, bits, tmp_path / "m.onnx")
    assert {"Add", "MaxPool"} <= {n.op_type for n in onnx.load(str(path)).graph.node}
    assert_passes_its_profile(path, profile)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_yolo_style_neck_export_passes(tmp_path: Path, fused_neck, config) -> None:
    profile, bits = config
    path = export(fused_neck, random_images(8), profile, bits, tmp_path / "m.onnx")
    assert {"Concat", "MaxPool"} <= {n.op_type for n in onnx.load(str(path)).graph.node}
    assert_passes_its_profile(path, profile)


# Placement bugs the linter finds in the project's exports (package code, fixed separately).


class NestedConcat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.a, self.b, self.c = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(24, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.cat([torch.cat([self.a(x), self.b(x)], 1), self.c(x)], 1)
        return self.head(self.out(y).mean((2, 3)))


class PoolConcat(nn.Module):
    """A YOLO SPP-style block: a feature map concatenated with its 5x5 stride-1 max-pooled copy."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.out = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        return self.head(self.out(torch.cat([x, self.pool(x)], 1)).mean((2, 3)))


class ShortcutFirst(nn.Module):
    """Residual blocks written ``x + branch(x)`` (torchvision's MobileNetV2 order)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = x + self.conv2(torch.relu(self.conv1(x)))
        return self.head(y.mean((2, 3)))


def export_small(model_cls: type[nn.Module], profile: str, method: str, path: Path) -> Path:
    torch.manual_seed(0)
    data = random_images(8, size=16)
    return export(fuse_model(model_cls().eval(), data)[0], data, profile, 8, path, method)


# Regression tests: each of these placements once broke a TensorRT/ORT rule (concat-scales,
# maxpool-scales, residual-shortcut).
@pytest.mark.parametrize("profile", ["onnxruntime", "tensorrt"])
def test_nested_concat_export_passes(tmp_path: Path, profile: str) -> None:
    assert_passes_its_profile(export_small(NestedConcat, profile, "percentile", tmp_path / "m.onnx"), profile)


@pytest.mark.parametrize("profile", ["onnxruntime", "tensorrt"])
def test_pool_concat_export_passes(tmp_path: Path, profile: str) -> None:
    assert_passes_its_profile(export_small(PoolConcat, profile, "percentile", tmp_path / "m.onnx"), profile)


def test_shortcut_first_residual_export_passes(tmp_path: Path) -> None:
    assert_passes_its_profile(export_small(ShortcutFirst, "tensorrt", "percentile", tmp_path / "m.onnx"), "tensorrt")


def test_lint_command_exit_codes(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from repapq_deploy.cli import main
    from repapq_deploy.export import convert_to_fp16

    path = export_small(NestedConcat, "tensorrt", "percentile", tmp_path / "m.onnx")
    runner = CliRunner()
    result = runner.invoke(main, ["lint", str(path), "--target", "tensorrt"])
    assert result.exit_code == 1 and "[fp32-region]" in result.output
    fp16 = tmp_path / "m.fp16.onnx"
    onnx.save(convert_to_fp16(onnx.load(str(path))), str(fp16))
    result = runner.invoke(main, ["lint", str(fp16), "--target", "tensorrt", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []
    assert runner.invoke(main, ["lint", str(tmp_path / "missing.onnx"), "--target", "tensorrt"]).exit_code == 1


def test_signed_tensor_stored_as_uint8_with_zero_point_128() -> None:
    model = fp16_graph()
    zp = next(i for i in model.graph.initializer if i.name == "a1_zp")
    zp.CopyFrom(numpy_helper.from_array(np.asarray(128, np.uint8), "a1_zp"))
    assert lint_model(model, "onnxruntime") == []  # the ORT profile's signed activations
    only(model, "tensorrt", "zero-point", "a1_q", "a1_dq")
    zp.CopyFrom(numpy_helper.from_array(np.asarray(100, np.uint8), "a1_zp"))
    only(model, "onnxruntime", "zero-point", "a1_q", "a1_dq")  # any other offset is asymmetric
