"""Stage 4, export: FP32 and QDQ ONNX graphs, their structure per backend profile, and the ORT-vs-PyTorch check."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import EXAMPLE_LAYERS, EXAMPLE_SPLITS, example_act_quantizers
from onnx import numpy_helper

from repapq_deploy.calibrate import calibrate
from repapq_deploy.calibrate.prepare import quantize_model
from repapq_deploy.errors import DeployError
from repapq_deploy.export import check_against_torch, export_fp32, export_qdq, graph_summary
from repapq_deploy.export.onnx import INPUT_NAME, MIN_OPSET, OUTPUT_NAME
from repapq_deploy.quant.placement import FakeQuantModel
from repapq_deploy.quant.scheme import QuantConfig

CONFIGS = [("onnxruntime", 8), ("onnxruntime", 6), ("tensorrt", 8), ("tensorrt", 6)]
IDS = [f"{p}-int{b}" for p, b in CONFIGS]


class Graph:
    """An exported ONNX file, indexed for the checks below."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.model = onnx.load(str(path))
        self.inits = {i.name: numpy_helper.to_array(i) for i in self.model.graph.initializer}
        self.producer = {out: n for n in self.model.graph.node for out in n.output}
        self.nodes = list(self.model.graph.node)

    def of(self, op: str) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if n.op_type == op]

    def init(self, name: str) -> np.ndarray:
        assert name in self.inits, f"{name} is not an initializer"
        return self.inits[name]

    def weight_dqs(self) -> list[onnx.NodeProto]:
        return [n for n in self.of("DequantizeLinear") if n.input[0] in self.inits
                and self.inits[n.input[0]].dtype == np.int8]

    def bias_dqs(self) -> list[onnx.NodeProto]:
        return [n for n in self.of("DequantizeLinear") if n.input[0] in self.inits
                and self.inits[n.input[0]].dtype == np.int32]

    def producer_op(self, tensor: str) -> str | None:
        node = self.producer.get(tensor)
        return node.op_type if node is not None else None


def _axis(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "axis"), None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, fused_example, calib_x) -> dict[tuple[str, int], tuple[FakeQuantModel, Graph]]:
    gm, _ = fused_example
    out = {}
    root = tmp_path_factory.mktemp("export")
    for profile, bits in CONFIGS:
        qm = quantize_model(gm, QuantConfig(profile, bits, 8))
        calibrate(qm, calib_x[:32], "percentile")
        path = root / f"{profile}-int{bits}.onnx"
        export_qdq(qm, calib_x, path)
        out[(profile, bits)] = (qm, Graph(path))
    for profile in ("tensorrt", "onnxruntime"):  # W6A6 with the add-only tensors on the 6-bit grid too
        qm = quantize_model(gm, QuantConfig(profile, 6, 8, add_bits=6))
        calibrate(qm, calib_x[:32], "percentile")
        path = root / f"{profile}-int6-add6.onnx"
        export_qdq(qm, calib_x, path)
        out[(profile, "6-add6")] = (qm, Graph(path))
    return out


# ------------------------------------------------------------------------------------ FP32


def test_export_fp32_matches_pytorch(tmp_path: Path, example_model, fused_example, calib_x, ort_session) -> None:
    gm, _ = fused_example
    path = tmp_path / "fp32.onnx"
    export_fp32(gm, calib_x, path)
    onnx.checker.check_model(onnx.load(str(path)))
    ops = graph_summary(path)["ops"]
    assert ops.get("Conv") == 9 and "BatchNormalization" not in ops
    assert not {"QuantizeLinear", "DequantizeLinear"} & ops.keys()
    session = ort_session(path)
    x = calib_x[:7]
    out = session.run(None, {INPUT_NAME: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, gm(x).numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(out, example_model(x).numpy(), atol=1e-4, rtol=0)


def test_old_opset_is_refused(tmp_path: Path, fused_example, calib_x) -> None:
    with pytest.raises(DeployError) as info:
        export_fp32(fused_example[0], calib_x, tmp_path / "old.onnx", opset=12)
    message = str(info.value)
    assert "\n" not in message and message.startswith("opset 12") and str(MIN_OPSET) in message
    assert not (tmp_path / "old.onnx").exists()


# ------------------------------------------------------------------------------------ QDQ


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_qdq_graph_is_valid_with_dynamic_batch(exported, config, ort_session, eval_xy) -> None:
    qm, g = exported[config]
    onnx.checker.check_model(g.model, full_check=True)
    assert graph_summary(g.path)["opset"] >= MIN_OPSET
    [inp], [out] = g.model.graph.input, g.model.graph.output
    assert (inp.name, out.name) == (INPUT_NAME, OUTPUT_NAME)
    assert inp.type.tensor_type.shape.dim[0].dim_param  # symbolic batch dimension
    session = ort_session(g.path)
    x = eval_xy[0][:7].numpy()
    for n in (1, 7):
        y = session.run(None, {INPUT_NAME: x[:n]})[0]
        assert y.shape == (n, 10) and np.isfinite(y).all()
        with torch.no_grad():
            ref = qm.module(torch.from_numpy(x[:n])).numpy()
        assert (y.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_zero_points_and_scales_are_initializers(exported, config) -> None:
    qm, g = exported[config]
    qdq = g.of("QuantizeLinear") + g.of("DequantizeLinear")
    assert qdq
    for node in qdq:
        assert len(node.input) == 3, f"{node.name}: no explicit zero point"
        zp = g.init(node.input[2])
        assert zp.dtype in (np.int8, np.uint8, np.int32), node.name
        # all zero, except ONNX Runtime's signed activations, stored as uint8 with zero point 128
        offset = qm.config.profile == "onnxruntime" and zp.dtype == np.uint8 and zp.shape == ()
        assert (zp == 0).all() or (offset and zp == 128), node.name
        scale = g.init(node.input[1])
        assert scale.dtype == np.float32 and (scale > 0).all() and np.isfinite(scale).all(), node.name
        assert scale.shape == zp.shape
    # the activation scales are the calibrated ones
    act_scales = {np.float32(q.scale.item()) for q in qm.act_quantizers.values()}
    assert {g.init(n.input[1]).item() for n in g.of("QuantizeLinear")} == act_scales
    assert len(g.of("QuantizeLinear")) == len(qm.act_quantizers) == example_act_quantizers(qm.config.profile)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_weights_are_per_channel_int8_initializers(exported, config) -> None:
    qm, g = exported[config]
    dqs = g.weight_dqs()
    assert len(dqs) == len(qm.weight_layers) == EXAMPLE_LAYERS + EXAMPLE_SPLITS
    seen = set()
    for dq in dqs:
        w = g.init(dq.input[0])
        assert _axis(dq) == 0, dq.name
        assert g.init(dq.input[1]).shape == (w.shape[0],) == g.init(dq.input[2]).shape
        # which layer is it? the integer weights are the ones the fake-quant model froze
        names = [n for n, layer in qm.weight_layers.items()
                 if tuple(layer.weight_int8.shape) == w.shape and np.array_equal(layer.weight_int8.numpy(), w)]
        assert len(names) == 1, dq.name
        seen.add(names[0])
        fmt = qm.weight_layers[names[0]].weight_quantizer.fmt
        bound = 127 if fmt.bits == 8 else 31
        assert fmt.bits == (8 if names[0] in ("stem.reparam_conv", "head.fc") else config[1])
        assert np.abs(w).max() <= bound
        # min-max weight ranges: every channel's largest weight lands on the grid's end
        assert (np.abs(w.reshape(w.shape[0], -1)).max(1) == bound).all(), names[0]
        np.testing.assert_allclose(g.init(dq.input[1]), qm.weight_layers[names[0]].weight_quantizer.scale.numpy())
    assert seen == set(qm.weight_layers)
    # biases: int32 on the s_x * s_w grid for ONNX Runtime's QLinearConv / QGemm, float for TensorRT
    profile = config[0]
    if profile == "onnxruntime":
        assert len(g.bias_dqs()) == 10 and all(_axis(n) == 0 for n in g.bias_dqs())
    else:
        assert g.bias_dqs() == []
    assert len(g.of("DequantizeLinear")) == (example_act_quantizers(qm.config.profile) + EXAMPLE_LAYERS
                                             + EXAMPLE_SPLITS + len(g.bias_dqs()))


@pytest.mark.parametrize("bits", [8, 6])
def test_onnxruntime_uses_uint8_after_relu(exported, bits: int) -> None:
    _, g = exported[("onnxruntime", bits)]
    qs = g.of("QuantizeLinear")
    # every activation is uint8 (one type in and out of each QLinearConv); signed ones with zero point
    # 128: the input and both inputs of each split's add (the conv before the ReLU, the shortcut)
    by_zp = Counter((g.init(q.input[2]).dtype, int(g.init(q.input[2]))) for q in qs)
    assert by_zp == {(np.dtype(np.uint8), 0): 10, (np.dtype(np.uint8), 128): 1 + 2 * EXAMPLE_SPLITS}
    for q in qs:
        zp = int(g.init(q.input[2]))
        if q.input[0] == INPUT_NAME:
            assert zp == 128  # the normalized image is signed
        elif g.producer_op(q.input[0]) == "Relu":
            assert zp == 0


@pytest.mark.parametrize("bits", [8, 6])
def test_tensorrt_uses_no_uint8(exported, bits: int) -> None:
    _, g = exported[("tensorrt", bits)]
    for node in g.of("QuantizeLinear") + g.of("DequantizeLinear"):
        assert g.init(node.input[2]).dtype == np.int8, node.name


@pytest.mark.parametrize(("key", "six_bit_shortcuts"), [(6, 0), ("6-add6", EXAMPLE_SPLITS)])
def test_tensorrt_int6_is_emulated_with_a_float_clip(exported, key, six_bit_shortcuts: int) -> None:
    qm, g = exported[("tensorrt", key)]
    clips = g.of("Clip")
    emulated = [q for q in qm.act_quantizers.values() if q.fmt.emulated]
    # the split shortcuts are 6-bit only with add_bits=6 (by default only the add reads them: int8)
    assert len(clips) == len(emulated) == 9 + six_bit_shortcuts
    assert not [c for c in clips if g.producer_op(c.input[0]) == "Relu"], "Relu -> Clip not merged"
    assert g.of("Relu") == []  # every 6-bit ReLU output of the example: merged into its Clip
    unsigned = 0
    for clip in clips:
        [q] = [n for n in g.nodes if clip.output[0] in n.input]
        assert q.op_type == "QuantizeLinear"  # Clip before Q: TensorRT fuses it into the conv
        s = g.init(q.input[1]).item()
        lo, hi = g.init(clip.input[1]), g.init(clip.input[2])
        assert lo.dtype == hi.dtype == np.float32
        if lo.item() == 0.0:  # Relu then Clip(0, qmax * s)
            # a non-negative 6-bit tensor gets the unsigned grid [0, 63] inside int8 storage (DESIGN.md)
            assert hi.item() == pytest.approx(63 * s, rel=1e-6)
            unsigned += 1
        else:  # a split's shortcut (signed): [-32, 31]
            assert g.producer_op(clip.input[0]) == "Conv"
            assert (lo.item(), hi.item()) == (pytest.approx(-32 * s, rel=1e-6), pytest.approx(31 * s, rel=1e-6))
        assert g.init(q.input[2]).dtype == np.int8  # TensorRT quantizes to int8 only
    assert unsigned == 9


@pytest.mark.parametrize(("key", "six_bit_add_inputs"), [(6, 0), ("6-add6", 2 * EXAMPLE_SPLITS)])
def test_onnxruntime_int6_is_emulated_with_an_integer_clip(exported, key, six_bit_add_inputs: int) -> None:
    qm, g = exported[("onnxruntime", key)]
    clips = g.of("Clip")
    assert len(clips) == sum(q.fmt.emulated for q in qm.act_quantizers.values()) == 9 + six_bit_add_inputs
    for clip in clips:
        # Q -> Clip(uint8 0, 63) -> DQ: ONNX Runtime still fuses DQ-Conv-Q into QLinearConv around it
        assert g.producer_op(clip.input[0]) == "QuantizeLinear"
        [dq] = [n for n in g.nodes if clip.output[0] in n.input]
        assert dq.op_type == "DequantizeLinear"
        lo, hi = g.init(clip.input[1]), g.init(clip.input[2])
        assert lo.dtype == hi.dtype == np.uint8
    # post-ReLU tensors [0, 63]; the split adds' signed inputs [-32, 31] around zero point 128
    ranges = Counter((g.init(c.input[1]).item(), g.init(c.input[2]).item()) for c in clips)
    assert ranges == {(0, 63): 9, **({(96, 159): six_bit_add_inputs} if six_bit_add_inputs else {})}
    assert len(g.of("Relu")) == 9  # float ReLUs stay: ORT fuses them into QLinearConv


@pytest.mark.parametrize("profile", ["onnxruntime", "tensorrt"])
def test_int8_has_no_clip(exported, profile: str) -> None:
    _, g = exported[(profile, 8)]
    assert g.of("Clip") == [] and len(g.of("Relu")) == 9


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_onnxruntime_agrees_with_pytorch(exported, config, calib_x) -> None:
    qm, g = exported[config]
    check = check_against_torch(qm, g.path, calib_x)
    assert check.samples == len(calib_x) == 64
    assert check.agreement_top1 == 100.0
    assert check.max_rel_diff < 0.05  # at most a few rounding flips of one quantization step
    assert check.to_dict()["agreement_top1"] == 100.0


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_graph_summary_counts_ops(exported, config) -> None:
    qm, g = exported[config]
    summary = graph_summary(g.path)
    counts = Counter(n.op_type for n in g.nodes)
    assert summary["ops"] == dict(counts) and summary["nodes"] == len(g.nodes)
    assert summary["opset"] == 17
    assert summary["ops"]["Conv"] == 9 + EXAMPLE_SPLITS and summary["ops"]["Gemm"] == 1
    assert summary["ops"]["QuantizeLinear"] == len(qm.act_quantizers)
    assert list(summary["ops"]) == sorted(summary["ops"])


def test_graph_summary_of_a_handmade_graph(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Abs", ["b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]), str(path))
    assert graph_summary(path) == {"opset": 15, "nodes": 3, "ops": {"Abs": 1, "Relu": 2}}


# ------------------------------------------------------------------------------------ --offset-relu


@pytest.fixture(scope="module")
def offset_exports(tmp_path_factory, offset_net) -> dict[str, tuple[FakeQuantModel, Graph]]:
    net, x = offset_net
    out, root = {}, tmp_path_factory.mktemp("offset")
    for mode in ("none", "unpadded", "all"):
        qm = quantize_model(net, QuantConfig("tensorrt", 8, 8, offset_relu=mode))
        calibrate(qm, x, "minmax")
        export_qdq(qm, x, root / f"{mode}.onnx")
        out[mode] = (qm, Graph(root / f"{mode}.onnx"))
    return out


@pytest.mark.parametrize("mode", ["none", "unpadded", "all"])
def test_offset_relu_export_matches_pytorch(offset_exports, offset_net, mode: str) -> None:
    qm, g = offset_exports[mode]
    check = check_against_torch(qm, g.path, offset_net[1])
    assert check.agreement_top1 == 100.0
    assert check.max_rel_diff < 0.05  # the folded bias sums in another order: at most a rounding flip or two


@pytest.mark.parametrize("mode", ["unpadded", "all"])
def test_offset_relu_graph_shape(offset_exports, mode: str) -> None:
    from conftest import OffsetNet

    qm, g = offset_exports[mode]
    offsets = [q for q in qm.act_quantizers.values() if q.fmt.offset]
    assert len(offsets) == len(OffsetNet.OFFSET[mode])
    # a conv's ReLU output is stored by the int8 Q alone (the shift is in the conv's bias, the ReLU is the
    # Q's saturation at -128): only the classifier's input, a pooled tensor, keeps a Sub(x, 128 s)
    subs = g.of("Sub")
    assert len(subs) == 1 and g.producer_op(subs[0].input[0]) == "Flatten"
    q = next(n for n in g.of("QuantizeLinear") if n.input[0] == subs[0].output[0])
    assert g.init(q.input[2]).dtype == np.int8 and g.init(q.input[2]) == 0
    assert g.init(subs[0].input[1]) == np.float32(g.init(q.input[1]) * 128)
    assert len(g.of("Relu")) == len(g.of("Conv")) - (len(offsets) - 1)  # OffsetNet: a ReLU after every conv
    absorbed = [n for n in g.of("QuantizeLinear") if g.producer_op(n.input[0]) in ("Conv", "Add")]
    assert len(absorbed) == len(offsets) - 1
    # every weighted layer reads a DequantizeLinear directly (the Add of the shift is folded away) ...
    for layer in g.of("Conv") + g.of("Gemm"):
        assert g.producer_op(layer.input[0]) == "DequantizeLinear", layer.name
    # ... and only the padded depthwise conv needs a border map, zero away from the border
    adds = g.of("Add")
    assert len(adds) == (1 if mode == "all" else 0)
    if adds:
        border = g.init(adds[0].input[1])
        assert border.shape == (1, 16, 8, 8) and g.producer_op(adds[0].input[0]) == "Conv"
        assert np.all(border[:, :, 1:, 1:] == 0) and np.any(border[:, :, 0] != 0)  # stride 2: top/left pad only


def _offset_chain(second_reader: bool, cap: float | None = None, s: float = 0.02) -> onnx.ModelProto:
    """Conv -> Relu (or Clip(0, cap)) -> Sub(128 s) -> Q(s, int8) -> DQ, optionally with the activation's
    output read elsewhere too."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    s = np.float32(s)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.5, 4).astype(np.float32), "b"),
             numpy_helper.from_array(np.array(128 * s, np.float32), "shift"),
             numpy_helper.from_array(np.array(s, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "zp"),
             numpy_helper.from_array(np.array(0, np.float32), "lo"),
             numpy_helper.from_array(np.array(cap or 0, np.float32), "hi")]
    act = (helper.make_node("Relu", ["z"], ["r"]) if cap is None
           else helper.make_node("Clip", ["z", "lo", "hi"], ["r"]))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["z"], pads=[1, 1, 1, 1]),
             act, helper.make_node("Sub", ["r", "shift"], ["rs"]),
             helper.make_node("QuantizeLinear", ["rs", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])]
    outputs = [helper.make_tensor_value_info("q", TensorProto.INT8, None),
               helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if second_reader:
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("second_reader", "cap", "s", "absorbed"), [
    (False, None, 0.02, True),
    (True, None, 0.02, False),  # the ReLU's output is needed as it is
    (False, 6.0, 6 / 255, True),  # a ReLU6 whose cap the grid's top (255 s) lies within
    (False, 1.0, 0.02, False),  # a ReLU6 that clips inside the grid: its Clip must stay
])
def test_offset_relu_is_absorbed_into_the_conv_bias_only_where_exact(ort_session, second_reader, cap, s,
                                                                    absorbed) -> None:
    import onnx_graphsurgeon as gs

    from repapq_deploy.export.onnx import _absorb_offset_relus

    model = _offset_chain(second_reader, cap, s)
    graph = gs.import_onnx(model)
    _absorb_offset_relus(graph)
    after = gs.export_onnx(graph.cleanup().toposort())
    ops = Counter(n.op_type for n in after.graph.node)
    x = np.random.default_rng(1).normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    q0 = ort_session(model).run(["q"], {"x": x})[0]
    q1 = ort_session(after).run(["q"], {"x": x})[0]
    if not absorbed:
        assert ops == Counter(n.op_type for n in model.graph.node)
    else:  # Conv(b - 128 s) -> Q: the ReLU is the Q's saturation at -128 (and a ReLU6's cap at 127)
        assert ops == Counter({"Conv": 1, "QuantizeLinear": 1, "DequantizeLinear": 1})
        assert (q0 == -128).any() and (q0 > -128).any()
        assert cap is None or (q0 == 127).any()  # the cap was reached: the saturation stood in for it
    assert (np.abs(q0.astype(int) - q1.astype(int)) <= 1).all() and (q0 == q1).mean() > 0.99


@pytest.mark.parametrize("mode", ["none", "unpadded", "all"])
def test_offset_relu_graph_is_lint_clean_for_tensorrt(offset_exports, mode: str) -> None:
    from repapq_deploy.export.fp16 import convert_to_fp16
    from repapq_deploy.export.lint import lint_model

    _, g = offset_exports[mode]
    assert [v.rule for v in lint_model(g.model, "tensorrt")] == ["fp32-region"]  # the float32 graph
    assert lint_model(convert_to_fp16(g.model), "tensorrt") == []
