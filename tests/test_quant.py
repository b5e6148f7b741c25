"""Integer formats, fake quantization (bit-exact with ONNX Q/DQ) and quantizer placement per backend profile."""

from __future__ import annotations

import operator
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from conftest import EXAMPLE_SPLITS, example_act_quantizers
from onnx import TensorProto, helper, numpy_helper

from repapq_deploy.calibrate.prepare import quantize_model
from repapq_deploy.errors import DeployError
from repapq_deploy.quant.fakequant import ActQuantizer, QuantConv2d, QuantLinear, fake_quant
from repapq_deploy.quant.placement import FakeQuantModel
from repapq_deploy.quant.scheme import PROFILES, IntFormat, QuantConfig

# ------------------------------------------------------------------------------------ integer formats


@pytest.mark.parametrize(("fmt", "qmin", "qmax"), [
    (IntFormat(8, True, narrow=True), -127, 127),
    (IntFormat(8, True), -128, 127),
    (IntFormat(8, False), 0, 255),
    (IntFormat(6, True), -32, 31),
    (IntFormat(6, False), 0, 63),
    (IntFormat(6, True, narrow=True), -31, 31),
])
def test_int_format_range(fmt: IntFormat, qmin: int, qmax: int) -> None:
    assert (fmt.qmin, fmt.qmax) == (qmin, qmax)
    assert fmt.emulated == (fmt.bits < 8)


def test_profiles_weight_and_activation_formats() -> None:
    for profile in PROFILES.values():
        assert profile.weight_format(8) == IntFormat(8, True, narrow=True)
        assert profile.weight_format(6) == IntFormat(6, True, narrow=True)
        assert profile.activation_format(8, nonnegative=False) == IntFormat(8, True)
    assert PROFILES["onnxruntime"].activation_format(8, nonnegative=True) == IntFormat(8, False)
    assert PROFILES["onnxruntime"].activation_format(6, nonnegative=True) == IntFormat(6, False)
    assert PROFILES["tensorrt"].activation_format(8, nonnegative=True) == IntFormat(8, True)
    # TensorRT has no uint8, but [0, 63] fits int8: a 6-bit post-ReLU tensor keeps all 6 bits
    six = PROFILES["tensorrt"].activation_format(6, nonnegative=True)
    assert six == IntFormat(6, False, int8_storage=True) and (six.qmin, six.qmax) == (0, 63) and six.storage_signed
    assert PROFILES["tensorrt"].activation_format(6, nonnegative=False) == IntFormat(6, True)
    # --offset-relu: [0, 255] stored shifted by -128 in int8, only where asked for and only on TensorRT
    off = PROFILES["tensorrt"].activation_format(8, nonnegative=True, offset=True)
    assert off == IntFormat(8, False, int8_storage=True) and (off.qmin, off.qmax, off.offset) == (0, 255, 128)
    assert off.storage_signed and not off.emulated
    assert PROFILES["tensorrt"].activation_format(8, nonnegative=False, offset=True) == IntFormat(8, True)
    assert PROFILES["onnxruntime"].activation_format(8, nonnegative=True, offset=True) == IntFormat(8, False)
    assert six.offset == 0 and IntFormat(8, False).offset == 0
    with pytest.raises(ValueError):
        IntFormat(8, True, int8_storage=True)  # a signed grid is int8 already


# ------------------------------------------------------------------------------------ fake_quant vs ONNX Runtime


def _qdq_model(signed: bool, scale: np.ndarray, clip: tuple | None, axis: int | None = None, rank: int = 1,
               integer_clip: bool = False) -> onnx.ModelProto:
    """x -> [Clip] -> QuantizeLinear -> [Clip] -> DequantizeLinear, zero point 0 of int8 / uint8.

    ``clip`` = (lo, hi): a float Clip before Q, or with ``integer_clip`` a Clip of the integer tensor.
    """
    zp_dtype = np.int8 if signed else np.uint8
    inits = [numpy_helper.from_array(scale.astype(np.float32), "scale"),
             numpy_helper.from_array(np.zeros(scale.shape, zp_dtype), "zp")]
    kw = {} if axis is None else {"axis": axis}
    nodes, src = [], "x"
    if clip is not None:
        dtype = zp_dtype if integer_clip else np.float32
        inits += [numpy_helper.from_array(np.array(clip[0], dtype), "lo"),
                  numpy_helper.from_array(np.array(clip[1], dtype), "hi")]
    if clip is not None and not integer_clip:
        nodes.append(helper.make_node("Clip", ["x", "lo", "hi"], ["clipped"]))
        src = "clipped"
    nodes.append(helper.make_node("QuantizeLinear", [src, "scale", "zp"], ["q"], **kw))
    q = "q"
    if clip is not None and integer_clip:
        nodes.append(helper.make_node("Clip", ["q", "lo", "hi"], ["q_clipped"]))
        q = "q_clipped"
    nodes.append(helper.make_node("DequantizeLinear", [q, "scale", "zp"], ["y"], **kw))
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None] * rank)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * rank)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _values(scale: float, fmt: IntFormat) -> np.ndarray:
    rng = np.random.default_rng(0)
    random = rng.standard_normal(4000).astype(np.float32) * scale * fmt.qmax / 2
    grid = np.arange(fmt.qmin - 3, fmt.qmax + 4, dtype=np.float32)
    ties = (grid + 0.5) * np.float32(scale)  # x / s lands on (or next to) .5 for every level
    extremes = np.array([1e9, -1e9, fmt.qmax * 10 * scale, fmt.qmin * 10 * scale - 1, 0.0, -0.0], np.float32)
    return np.concatenate([random, ties, grid * np.float32(scale), extremes]).astype(np.float32)


@pytest.mark.parametrize("scale", [0.25, 0.0371])  # 0.25: x / s is exact, so the .5 ties are exact ties
@pytest.mark.parametrize(("fmt", "clip"), [
    (IntFormat(8, True), None), (IntFormat(8, False), None),
    # 6-bit grids are emulated on 8-bit storage, as the exporter writes them: TensorRT profile with a float
    # Clip to [qmin * s, qmax * s] before Q, ONNX Runtime profile with a Clip of the integers between Q and DQ
    (IntFormat(6, True), "float"), (IntFormat(6, False), "float"),
    (IntFormat(6, True), "integer"), (IntFormat(6, False), "integer"),
    (IntFormat(6, False, int8_storage=True), "float"),  # TensorRT's post-ReLU 6-bit: [0, 63] stored as int8
], ids=["int8", "uint8", "int6-float-clip", "uint6-float-clip", "int6-integer-clip", "uint6-integer-clip",
        "uint6-in-int8-float-clip"])
def test_fake_quant_bit_exact_with_onnxruntime(fmt: IntFormat, clip: str | None, scale: float, ort_session) -> None:
    x = _values(scale, fmt)
    s = np.float32(scale)
    if clip == "float":
        model = _qdq_model(fmt.storage_signed, np.array(s), (float(s * fmt.qmin), float(s * fmt.qmax)))
    elif clip == "integer":
        model = _qdq_model(fmt.signed, np.array(s), (fmt.qmin, fmt.qmax), integer_clip=True)
    else:
        model = _qdq_model(fmt.signed, np.array(s), None)
    expected = ort_session(model).run(None, {"x": x})[0]
    got = fake_quant(torch.from_numpy(x), torch.tensor(s), fmt).numpy()
    np.testing.assert_array_equal(got, expected)
    # and the grid really is fmt's: saturation at both ends
    assert got.max() == np.float32(fmt.qmax) * s and got.min() == np.float32(fmt.qmin) * s


@pytest.mark.parametrize("scale", [0.25, 0.0371])
def test_offset_fake_quant_bit_exact_with_onnxruntime(scale: float, ort_session) -> None:
    """The offset grid as exported: Sub(x, 128 s) -> Q(int8) -> DQ -> Add(128 s)."""
    fmt = IntFormat(8, False, int8_storage=True)
    s = np.float32(scale)
    shift = numpy_helper.from_array(np.array(s * 128, np.float32), "shift")
    nodes = [helper.make_node("Sub", ["x", "shift"], ["xs"]),
             helper.make_node("QuantizeLinear", ["xs", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"]),
             helper.make_node("Add", ["dq", "shift"], ["y"])]
    graph = helper.make_graph(nodes, "offset", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
                              [shift, numpy_helper.from_array(np.array(s), "s"),
                               numpy_helper.from_array(np.array(0, np.int8), "zp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = _values(scale, IntFormat(8, False))
    expected = ort_session(model).run(None, {"x": x})[0]
    got = fake_quant(torch.from_numpy(x), torch.tensor(s), fmt).numpy()
    np.testing.assert_array_equal(got, expected)
    assert got.min() == 0 and got.max() == np.float32(255) * s  # all 256 levels, zero exactly representable
    assert np.unique(got).size == 256


def test_fake_quant_rounds_half_to_even_and_saturates() -> None:
    s = torch.tensor(0.5)
    x = torch.tensor([0.25, 0.75, 1.25, -0.25, -0.75, -1.25, 63.75, 1e6, -1e6])  # x / s: .5, 1.5, 2.5, ...
    assert fake_quant(x, s, IntFormat(8, True)).tolist() == [0.0, 1.0, 1.0, -0.0, -1.0, -1.0, 63.5, 63.5, -64.0]
    assert fake_quant(x, s, IntFormat(8, False)).tolist() == [0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 64.0, 127.5, 0.0]
    assert fake_quant(x, s, IntFormat(6, True)).tolist() == [0.0, 1.0, 1.0, -0.0, -1.0, -1.0, 15.5, 15.5, -16.0]


def test_fake_quant_per_channel_bit_exact_with_onnxruntime(ort_session) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    w[2] *= 40  # some channels saturate
    scale = (np.abs(w[:, :1]).reshape(6, -1).max(1) / 127).astype(np.float32)
    expected = ort_session(_qdq_model(True, scale, None, axis=0, rank=4)).run(None, {"x": w})[0]
    got = fake_quant(torch.from_numpy(w), torch.from_numpy(scale).view(-1, 1, 1, 1), IntFormat(8, True)).numpy()
    np.testing.assert_array_equal(got, expected)


def test_fake_quant_straight_through_gradient() -> None:
    x = torch.tensor([0.3, 1.7, 1000.0, -1000.0], requires_grad=True)
    fake_quant(x, torch.tensor(1.0), IntFormat(8, True)).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]  # identity inside the grid, zero where clamped


# ------------------------------------------------------------------------------------ QuantConfig


@pytest.mark.parametrize(("kwargs", "option"), [
    ({"bits": 4}, "bits 4"),
    ({"first_last_bits": 4}, "first_last_bits 4"),
    ({"add_bits": 7}, "add_bits 7"),
    ({"profile": "tflite"}, "profile tflite"),
    ({"offset_relu": "some"}, "offset_relu some"),
    ({"profile": "onnxruntime", "offset_relu": "all"}, "offset_relu all"),  # uint8 there already
])
def test_quant_config_rejects(kwargs: dict, option: str) -> None:
    with pytest.raises(DeployError) as info:
        QuantConfig(**kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(option)


# ------------------------------------------------------------------------------------ placement


def _act_calls(qm: FakeQuantModel) -> list[fx.Node]:
    return [n for n in qm.module.graph.nodes if n.op == "call_module" and n.target in qm.act_quantizers]


def _input_quantizer_of(qm: FakeQuantModel, layer: str) -> ActQuantizer:
    node = next(n for n in qm.module.graph.nodes if n.op == "call_module" and n.target == layer)
    src = node.args[0]
    assert src.op == "call_module" and src.target in qm.act_quantizers, f"{layer}'s input is not quantized"
    return qm.act_quantizers[src.target]


@pytest.fixture(scope="module")
def example_qms(fused_example) -> dict[tuple[str, int], FakeQuantModel]:
    gm, _ = fused_example
    return {(p, b): quantize_model(gm, QuantConfig(p, b, 8)) for p in ("onnxruntime", "tensorrt") for b in (8, 6)}


def test_fused_model_is_left_untouched(fused_example, example_qms) -> None:
    gm, _ = fused_example
    assert not any(isinstance(m, (ActQuantizer, QuantConv2d, QuantLinear)) for m in gm.modules())
    assert all(qm.module is not gm for qm in example_qms.values())


def test_every_weight_layer_and_its_input_are_quantized(fused_example, example_qms) -> None:
    gm, _ = fused_example
    layers = [n for n, m in gm.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for qm in example_qms.values():
        split = sorted(n for n in qm.weight_layers if n.endswith("_identity"))
        assert len(split) == EXAMPLE_SPLITS and {n.removesuffix("_identity") for n in split} <= set(layers)
        assert sorted(qm.weight_layers) == sorted(layers + split)
        for name in qm.weight_layers:
            assert isinstance(qm.module.get_submodule(name), (QuantConv2d, QuantLinear))
            _input_quantizer_of(qm, name)
        # 10 weight-layer inputs + the avg pool + the add inputs of the splits
        assert len(_act_calls(qm)) == len(qm.act_quantizers) == example_act_quantizers(qm.config.profile)


def test_disabled_quantizers_are_the_identity(fused_example, example_qms, calib_x) -> None:
    gm, _ = fused_example
    qm = example_qms[("onnxruntime", 8)]
    qm.set_mode("off")
    with torch.no_grad():
        out, ref = qm.module(calib_x[:4]), gm(calib_x[:4])
    # equal up to the float rounding of the split identity taps (conv' + d * x instead of conv)
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_onnxruntime_profile_signedness(example_qms) -> None:
    qm = example_qms[("onnxruntime", 8)]
    for call in _act_calls(qm):
        q = qm.act_quantizers[call.target]
        if call.args[0].op == "placeholder":  # the network input: normalized, has negative values
            assert q.fmt == IntFormat(8, True) and not q.nonnegative
        elif any(u.target is operator.add for u in call.users):  # a split's add: conv outputs before the ReLU
            assert q.fmt == IntFormat(8, True) and not q.nonnegative
        else:  # every other quantized tensor of a RepVGG is a ReLU output (or a pool of one)
            assert q.fmt == IntFormat(8, False) and q.nonnegative, call.args[0].name
    relu_fed = [c for c in _act_calls(qm)
                if c.args[0].op == "call_module" and isinstance(qm.module.get_submodule(c.args[0].target), nn.ReLU)]
    assert len(relu_fed) == 8  # stem + 7 of the 8 stage blocks; the last one's ReLU goes through the head
    assert all(q.integer_clip for q in qm.act_quantizers.values())  # INT6 clips on the integer tensor
    # ORT wants int32 biases: each weight layer knows the quantizer that feeds it
    for name, layer in qm.weight_layers.items():
        assert layer.input_quantizer is _input_quantizer_of(qm, name)


def test_tensorrt_profile_is_all_signed(example_qms) -> None:
    qm = example_qms[("tensorrt", 8)]
    assert {q.fmt for q in qm.act_quantizers.values()} == {IntFormat(8, True)}
    # at 6 bits the post-ReLU tensors use [0, 63], still stored (and exported) as int8
    six = example_qms[("tensorrt", 6)]
    formats = Counter(q.fmt for q in six.act_quantizers.values() if q.fmt.bits == 6)
    # the split shortcuts (signed, read only by the add) stay on the int8 grid
    assert formats == {IntFormat(6, False, int8_storage=True): 9}
    assert Counter(q.fmt for q in six.act_quantizers.values() if q.fmt.bits == 8)[IntFormat(8, True)] \
        == EXAMPLE_SPLITS + 2  # + the network input and the classifier's input
    assert all(q.fmt.storage_signed for q in six.act_quantizers.values())
    assert all(layer.input_quantizer is None for layer in qm.weight_layers.values())  # float biases
    assert not any(q.integer_clip for q in qm.act_quantizers.values())  # INT6 clips in float, before Q


@pytest.mark.parametrize("profile", ["onnxruntime", "tensorrt"])
def test_six_bit_with_eight_bit_first_and_last(fused_example, example_qms, profile: str) -> None:
    qm = example_qms[(profile, 6)]
    first, last = "stem.reparam_conv", "head.fc"
    assert list(qm.weight_layers)[0] == first and list(qm.weight_layers)[-1] == last
    for name, layer in qm.weight_layers.items():
        bits = 8 if name in (first, last) else 6
        assert layer.weight_quantizer.fmt == IntFormat(bits, True, narrow=True), name
        assert _input_quantizer_of(qm, name).fmt.bits == bits, name
    # tensors only an Add reads (the split shortcuts; on ONNX Runtime also the main conv outputs)
    # keep the int8 grid by default ...
    add_only = [n for n in _act_calls(qm) if all(_is_add(u) for u in n.users)]
    assert len(add_only) == EXAMPLE_SPLITS * (2 if profile == "onnxruntime" else 1)
    assert all(qm.act_quantizers[n.target].fmt.bits == 8 for n in add_only)
    bits = sorted(q.fmt.bits for q in qm.act_quantizers.values())
    n = example_act_quantizers(profile)
    assert bits == [6] * (n - 2 - len(add_only)) + [8] * (2 + len(add_only))
    # ... and go to 6 bits with add_bits=6, every weighted layer's input unchanged
    strict = quantize_model(fused_example[0], QuantConfig(profile, 6, 8, add_bits=6))
    assert sorted(q.fmt.bits for q in strict.act_quantizers.values()) == [6] * (n - 2) + [8] * 2
    for name in strict.weight_layers:
        assert _input_quantizer_of(strict, name).fmt.bits == (8 if name in (first, last) else 6), name


@pytest.fixture(scope="module")
def resnet_qms(fused_resnet18) -> dict[str, FakeQuantModel]:
    gm, _ = fused_resnet18
    return {p: quantize_model(gm, QuantConfig(p)) for p in ("onnxruntime", "tensorrt")}


def _adds(qm: FakeQuantModel) -> list[fx.Node]:
    return [n for n in qm.module.graph.nodes if _is_add(n)]


def _is_add(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)


def _is_act_quant(qm: FakeQuantModel, arg) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "call_module" and arg.target in qm.act_quantizers


def test_tensorrt_quantizes_only_the_residual_shortcut(resnet_qms) -> None:
    qm = resnet_qms["tensorrt"]
    adds = _adds(qm)
    assert len(adds) == 8
    for add in adds:
        main, shortcut = add.args
        assert _is_act_quant(qm, shortcut), f"{add.name}: shortcut not quantized"
        # the residual branch stays in float so TensorRT fuses the add into the conv's epilogue
        assert main.op == "call_module" and isinstance(qm.module.get_submodule(main.target), QuantConv2d)


def test_onnxruntime_quantizes_both_add_inputs(resnet_qms) -> None:
    qm = resnet_qms["onnxruntime"]
    adds = _adds(qm)
    assert len(adds) == 8
    for add in adds:
        assert all(_is_act_quant(qm, a) for a in add.args), add.name
        assert qm.act_quantizers[add.args[0].target] is not qm.act_quantizers[add.args[1].target]


@pytest.mark.parametrize("profile", ["onnxruntime", "tensorrt"])
def test_maxpool_output_reuses_its_input_quantizer(resnet_qms, profile: str) -> None:
    qm = resnet_qms[profile]
    pool = next(n for n in qm.module.graph.nodes if n.op == "call_module" and n.target == "maxpool")
    assert _is_act_quant(qm, pool.args[0])
    outs = [u for u in pool.users if _is_act_quant(qm, u)]
    assert len(outs) == 1
    assert qm.act_quantizers[outs[0].target] is qm.act_quantizers[pool.args[0].target]


def test_maxpool_input_and_output_are_quantized(resnet_qms) -> None:
    for qm in resnet_qms.values():
        pool = next(n for n in qm.module.graph.nodes if n.op == "call_module" and n.target == "maxpool")
        assert _is_act_quant(qm, pool.args[0])
        assert [u for u in pool.users if _is_act_quant(qm, u)]


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(1, 3, 1)
        self.relu = nn.ReLU()
        self.c = nn.Conv2d(5, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([self.relu(self.a(x)), self.relu(self.b(x))], 1))


def test_concat_inputs_and_output_share_one_quantizer() -> None:
    qm = quantize_model(fx.symbolic_trace(_Concat().eval()), QuantConfig("onnxruntime"))
    cat = next(n for n in qm.module.graph.nodes if n.op == "call_function" and n.target is torch.cat)
    inputs = cat.args[0]
    assert len(inputs) == 2 and all(_is_act_quant(qm, t) for t in inputs)
    c = next(n for n in qm.module.graph.nodes if n.op == "call_module" and n.target == "c")
    shared = {inputs[0].target, inputs[1].target, c.args[0].target}
    assert len(shared) == 1  # one scale for the inputs and the output, as a concat needs
    q = qm.act_quantizers[shared.pop()]
    assert q.fmt == IntFormat(8, False)  # both inputs are ReLU outputs


def test_model_without_weight_layers_is_refused() -> None:
    with pytest.raises(DeployError) as info:
        quantize_model(fx.symbolic_trace(nn.Sequential(nn.ReLU())), QuantConfig())
    assert "Conv2d or Linear" in str(info.value)


def test_scales_roundtrip_and_mismatch(example_qms) -> None:
    qm = example_qms[("tensorrt", 8)]
    scales = qm.scales()
    assert len(scales) == len(qm.act_quantizers) + len(qm.weight_layers)
    doubled = {k: v * 2 for k, v in scales.items()}
    qm.load_scales(doubled)
    assert all(torch.equal(qm.scales()[k], doubled[k]) for k in scales)
    qm.load_scales(scales)
    with pytest.raises(DeployError) as info:
        qm.load_scales({k: v for k, v in scales.items() if k != "act_quant_0.act"})
    message = str(info.value)
    assert "\n" not in message and "act_quant_0.act" in message and "force" in message


# ------------------------------------------------------------------------------ identity split decision


def _one_conv(dominant: float) -> fx.GraphModule:
    torch.manual_seed(0)
    net = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 4))
    with torch.no_grad():
        net[1].weight[torch.arange(8), torch.arange(8), 1, 1] += dominant
    return fx.symbolic_trace(net)


@pytest.mark.parametrize("profile", ["onnxruntime", "tensorrt"])
def test_split_decision_follows_the_measured_layer_error(profile: str) -> None:
    from repapq_deploy.quant.identity_split import (
        MIN_ERROR_RATIO,
        choose_identity_splits,
        decide_identity_split,
        layer_split_errors,
    )

    x = torch.randn(64, 8, 8, 8)
    for dominant, expect in ((0.0, ()), (10.0, ("1",))):
        errors = layer_split_errors(_one_conv(dominant), x, QuantConfig(profile, 6, 8))
        assert set(errors) == {"1"}  # the only conv that can carry an identity (the Linear cannot)
        plain, split = errors["1"]
        # random weights: the split only adds the shortcut's (and on ORT the main output's) rounding;
        # a dominant centre diagonal: taking it off the weight grid pays many times over
        assert (split * MIN_ERROR_RATIO <= plain) is bool(expect)
        assert choose_identity_splits(errors) == expect
        decided, same = decide_identity_split(_one_conv(dominant), x, QuantConfig(profile, 6, 8))
        assert decided.split_layers == expect and same == errors
    off = QuantConfig(profile, 6, 8, split_identity=False)
    assert decide_identity_split(_one_conv(10.0), x, off) == (off, {})  # nothing measured, nothing split


def test_example_splits_every_identity_block_on_both_profiles(fused_example, calib_x) -> None:
    from repapq_deploy.quant.identity_split import choose_identity_splits, layer_split_errors

    gm, _ = fused_example
    for profile in ("onnxruntime", "tensorrt"):
        for bits in (8, 6):
            errors = layer_split_errors(gm, calib_x, QuantConfig(profile, bits, 8))
            # measured 7-230x lower output error with the split on this model
            assert len(choose_identity_splits(errors)) == EXAMPLE_SPLITS, (profile, bits, errors)


def test_quantize_model_splits_exactly_the_chosen_layers(fused_example, calib_x) -> None:
    gm, _ = fused_example
    names = [n for n, m in gm.named_modules() if isinstance(m, nn.Conv2d) and m.stride == (1, 1)
             and m.in_channels == m.out_channels and m.kernel_size == (3, 3)]
    assert len(names) == EXAMPLE_SPLITS
    qm = quantize_model(gm, QuantConfig("tensorrt", 8, 8, split_layers=tuple(names[:1])))
    assert [n for n in qm.weight_layers if n.endswith("_identity")] == [f"{names[0]}_identity"]
    with torch.no_grad():
        qm.set_mode("off")
        assert torch.allclose(qm.module(calib_x[:8]), gm(calib_x[:8]), rtol=0, atol=1e-5)
    assert QuantConfig("tensorrt", split_layers=["a"]).split_layers == ("a",)  # as read back from qstate.pt
    with pytest.raises(DeployError, match="cannot split the identity taps of"):
        quantize_model(gm, QuantConfig("tensorrt", 8, 8, split_layers=("stem.conv",)))


@pytest.mark.parametrize("mode", ["none", "unpadded", "all"])
@pytest.mark.parametrize("bits", [8, 6])
def test_offset_relu_picks_the_tensors_whose_readers_take_the_constant_back(offset_net, mode: str, bits: int) -> None:
    from conftest import OffsetNet

    net, _ = offset_net
    qm = quantize_model(net, QuantConfig("tensorrt", bits, 8, offset_relu=mode))
    quantizers = list(qm.act_quantizers.values())
    assert len(quantizers) == 6
    offset = [i for i, q in enumerate(quantizers) if q.fmt.offset]
    # at 6 bits only the classifier's input (8 bits, first/last convention) is an 8-bit post-ReLU tensor
    assert offset == (OffsetNet.OFFSET[mode] if bits == 8 else [5] if mode != "none" else [])
    for i in offset:
        assert quantizers[i].fmt == IntFormat(8, False, int8_storage=True) and quantizers[i].nonnegative
    assert not quantizers[0].nonnegative  # the image
    # the MaxPool's input: its reader cannot take a constant back, so it keeps TensorRT's usual grid
    assert quantizers[4].fmt == (IntFormat(8, True) if bits == 8 else IntFormat(6, False, int8_storage=True))
