"""Static Q/DQ placement linter for QDQ ONNX graphs, per target backend.

Checks an exported graph against the explicit-quantization rules of DESIGN.md ("TensorRT
explicit-quantization rules") and the ONNX Runtime profile, without building an engine. Each rule
is a small function in ``RULES`` (rule name -> check), in the way ONNX Runtime's quantizer keeps a
registry of op handlers, so a rule can be read, added or tested on its own. Only the main graph is
checked, not ``If`` / ``Loop`` bodies (the exporter emits none).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from repapq_deploy.errors import DeployError
from repapq_deploy.export.onnx import MIN_OPSET

TARGETS = ("tensorrt", "onnxruntime")

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops whose output is a constant when their first input is one: a weight stays a weight behind them.
_PASS_THROUGH_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "Identity", "Clip", "Cast"})
# Ops without arithmetic of their own (they move or re-describe data), so they have no precision to lint.
NON_COMPUTE_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "Cast", "CastLike", "Identity", "Constant",
                             "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Shape", "Size"})
# Tied scales are copies of one calibrated value; the absolute tolerance only absorbs float32 round-off
# of hand-written graphs (np.allclose's default atol, with no relative part).
SCALE_ATOL = 1e-8
MAX_LISTED = 10  # node names written out in one message


@dataclass(frozen=True)
class Violation:
    """One broken placement rule: which rule, the nodes involved, what is wrong and how to fix it."""

    rule: str
    nodes: tuple[str, ...]
    message: str
    fix: str

    def __str__(self) -> str:
        listed = ", ".join(self.nodes[:MAX_LISTED])
        if len(self.nodes) > MAX_LISTED:
            listed += f", ... ({len(self.nodes)} in all)"
        where = f" (nodes: {listed})" if self.nodes else ""
        return f"[{self.rule}] {self.message}{where} -> fix: {self.fix}"


@dataclass
class GraphContext:
    """The main graph indexed for the rules: producers, consumers, constant values and element types."""

    graph: onnx.GraphProto
    opset: int | None
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    elem_types: dict[str, int] = field(default_factory=dict)
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> GraphContext:
        """Index ``model`` (left untouched: shape inference works on a copy, which gets the node names)."""
        copy = _inferred_copy(model)
        graph = copy.graph
        for i, node in enumerate(graph.node):
            if not node.name:  # violations must name something a user can find
                node.name = f"{node.op_type}_{i}"
        opset = next((o.version for o in copy.opset_import if o.domain in ("", "ai.onnx")), None)
        ctx = cls(graph, opset)
        for value in (*graph.input, *graph.output, *graph.value_info):
            if value.type.HasField("tensor_type"):
                ctx.elem_types[value.name] = value.type.tensor_type.elem_type
        for init in graph.initializer:
            ctx.constants[init.name] = numpy_helper.to_array(init)
            ctx.elem_types[init.name] = init.data_type
        for node in graph.node:
            for out in node.output:
                ctx.producer[out] = node
            for inp in node.input:
                ctx.consumers.setdefault(inp, []).append(node)
            if node.op_type == "Constant" and (value := _constant_node_value(node)) is not None:
                ctx.constants[node.output[0]] = value
                ctx.elem_types[node.output[0]] = helper.np_dtype_to_tensor_dtype(value.dtype)
        return ctx

    def nodes_of(self, *ops: str) -> list[onnx.NodeProto]:
        """The nodes of the given op types, in graph order."""
        return [n for n in self.graph.node if n.op_type in ops]

    def producer_op(self, tensor: str) -> str | None:
        """The op type of the node producing ``tensor`` (None for graph inputs and initializers)."""
        node = self.producer.get(tensor)
        return node.op_type if node is not None else None

    def produced_by(self, tensor: str, op: str) -> onnx.NodeProto | None:
        """The node that produces ``tensor`` if it is an ``op``, else None."""
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == op else None

    def constant_behind(self, tensor: str) -> np.ndarray | None:
        """The constant that ``tensor`` is (or that reaches it through Q/DQ/Identity/Clip/Cast), else None."""
        while tensor not in self.constants:
            node = self.producer.get(tensor)
            if node is None or node.op_type not in _PASS_THROUGH_OPS:
                return None
            tensor = node.input[0]
        return self.constants[tensor]

    def is_activation(self, tensor: str) -> bool:
        """True for a tensor computed from the graph inputs (not a weight or other constant)."""
        return self.constant_behind(tensor) is None

    def scale_of(self, qdq: onnx.NodeProto) -> np.ndarray | None:
        """A Q/DQ node's scale if it is a constant (the ``scale`` rule reports the others)."""
        return self.constants.get(qdq.input[1])

    def quantizers_of(self, tensor: str) -> list[onnx.NodeProto]:
        """The QuantizeLinear nodes reading ``tensor``, directly or through a float Clip (INT6 emulation)."""
        out = []
        for node in self.consumers.get(tensor, []):
            if node.op_type == "QuantizeLinear":
                out.append(node)
            elif node.op_type == "Clip":
                out.extend(n for n in self.consumers.get(node.output[0], []) if n.op_type == "QuantizeLinear")
        return out

    def quantized_source(self, dq: onnx.NodeProto) -> str | None:
        """The float tensor that a DQ's QuantizeLinear quantized, through integer or float Clips (INT6)."""
        node = self.producer.get(dq.input[0])
        if node is not None and node.op_type == "Clip":
            node = self.producer.get(node.input[0])
        if node is None or node.op_type != "QuantizeLinear":
            return None
        src = node.input[0]
        clip = self.produced_by(src, "Clip")
        return clip.input[0] if clip is not None else src

    def quantized_conv_behind(self, tensor: str | None, through_relu: bool = True) -> onnx.NodeProto | None:
        """The Conv producing ``tensor`` (directly, or through a Relu) if both its inputs come from DQ."""
        node = self.producer.get(tensor) if tensor else None
        if through_relu and node is not None and node.op_type == "Relu":
            node = self.producer.get(node.input[0])
        if node is None or node.op_type != "Conv" or len(node.input) < 2:
            return None
        quantized = all(self.produced_by(t, "DequantizeLinear") is not None for t in node.input[:2])
        return node if quantized else None


def _inferred_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # an invalid graph is still worth linting; types then come from the file only
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            return np.asarray(helper.get_attribute_value(attr))
    return None  # sparse or string constants: never a scale or zero point


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _same_scale(a: np.ndarray, b: np.ndarray) -> bool:
    return a.size == b.size and np.allclose(a.ravel(), b.ravel(), rtol=0, atol=SCALE_ATOL)


def _fmt_scale(s: np.ndarray) -> str:
    return f"{s.item():.6g}" if s.size == 1 else f"per-channel[{s.size}]"


def _source(ctx: GraphContext, tensor: str) -> str:
    node = ctx.producer.get(tensor)
    return f"'{tensor}' (from {node.op_type} {node.name})" if node is not None else f"'{tensor}' (graph input)"


# --- rules: (context, target) -> violations -------------------------------------------------------


def _signed_as_uint8(zp: np.ndarray) -> bool:
    """A per-tensor uint8 zero point of 128: a symmetric signed grid stored as uint8 (ONNX Runtime)."""
    return zp.dtype == np.uint8 and zp.size == 1 and int(zp.reshape(-1)[0]) == 128


def check_zero_points(ctx: GraphContext, target: str) -> list[Violation]:
    """Zero points must be all-zero constants (ONNX Runtime also takes a symmetric signed tensor stored as
    uint8 with zero point 128); TensorRT also cannot quantize to uint8."""
    out = []
    for node in ctx.nodes_of(*QDQ_OPS):
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zp = ctx.constants.get(zp_name) if zp_name else None
        if zp_name and zp is None:
            out.append(Violation("zero-point", (node.name,),
                                 f"{node.op_type} {node.name} has zero point '{zp_name}', which is not a constant",
                                 "make the zero point an all-zero initializer"))
        elif zp is not None and np.any(zp != 0) and not (target == "onnxruntime" and _signed_as_uint8(zp)):
            out.append(Violation("zero-point", (node.name,),
                                 f"{node.op_type} {node.name} has non-zero zero point '{zp_name}' "
                                 f"(values {np.unique(zp)[:4].tolist()}); the profile is symmetric",
                                 "use a symmetric quantizer: zero point 0, range centred on 0"))
        elif target == "tensorrt" and _integer_type(ctx, node, zp) == TensorProto.UINT8:
            # TensorRT's UINT8 cannot represent quantized values; a missing zero point means uint8 for Q.
            out.append(Violation("zero-point", (node.name,),
                                 f"{node.op_type} {node.name} quantizes to uint8, which TensorRT does not support",
                                 "use an int8 zero point (0) and a signed scale range"))
    return out


def _integer_type(ctx: GraphContext, node: onnx.NodeProto, zp: np.ndarray | None) -> int | None:
    if zp is not None:
        return helper.np_dtype_to_tensor_dtype(zp.dtype)
    if node.op_type == "QuantizeLinear":
        return TensorProto.UINT8  # ONNX's default output type without a zero point
    return ctx.elem_types.get(node.input[0])


def check_scales(ctx: GraphContext, target: str) -> list[Violation]:  # noqa: ARG001
    """Scales must be constants with finite, strictly positive values."""
    out = []
    for node in ctx.nodes_of(*QDQ_OPS):
        scale = ctx.scale_of(node)
        if scale is None:
            out.append(Violation("scale", (node.name,),
                                 f"{node.op_type} {node.name} has scale '{node.input[1]}', which is not a constant",
                                 "store the calibrated scale as an initializer"))
            continue
        values = scale.astype(np.float64).ravel()
        bad = values[~(np.isfinite(values) & (values > 0))]
        if bad.size:
            out.append(Violation("scale", (node.name,),
                                 f"{node.op_type} {node.name} has scale '{node.input[1]}' with values "
                                 f"{bad[:4].tolist()} (must be finite and > 0)",
                                 "re-calibrate this tensor; clamp scales to a small positive minimum"))
    return out


def check_activation_granularity(ctx: GraphContext, target: str) -> list[Violation]:  # noqa: ARG001
    """Activation Q/DQ must be per-tensor (TensorRT supports nothing else; the ORT profile is per-tensor)."""
    out = []
    for node in ctx.nodes_of(*QDQ_OPS):
        scale = ctx.scale_of(node)
        if scale is not None and scale.size > 1 and ctx.is_activation(node.input[0]):
            out.append(Violation("per-channel-activation", (node.name,),
                                 f"{node.op_type} {node.name} quantizes activation '{node.input[0]}' per channel "
                                 f"({scale.size} scales)",
                                 "use one scalar scale for the activation tensor"))
    return out


def _output_channel_axis(node: onnx.NodeProto, rank: int) -> int:
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1  # B is [N, K] when transposed, else [K, N]
    if node.op_type == "MatMul":
        return rank - 1  # B is [..., K, N]
    return 0  # Conv: [C_out, C_in / groups, kH, kW]


def check_weight_axes(ctx: GraphContext, target: str) -> list[Violation]:
    """Weights per-channel on the output-channel axis; TensorRT also rejects per-tensor weights."""
    out = []
    for node in ctx.nodes_of("Conv", "Gemm", "MatMul"):
        dq = ctx.produced_by(node.input[1], "DequantizeLinear") if len(node.input) > 1 else None
        # no DQ: unquantized-input reports it; a DQ of an activation (MatMul of two tensors) has no weight axis
        weight = ctx.constant_behind(dq.input[0]) if dq is not None else None
        scale = ctx.scale_of(dq) if dq is not None else None
        if weight is None or scale is None or weight.ndim == 0:
            continue
        expected = _output_channel_axis(node, weight.ndim)
        if scale.size > 1:
            axis = _attr(dq, "axis", 1) % weight.ndim  # ONNX's default axis is 1
            if axis != expected:
                out.append(Violation("weight-axis", (node.name, dq.name),
                                     f"{node.op_type} {node.name}'s weight is quantized by {dq.name} per channel on "
                                     f"axis {axis}, not on the output-channel axis {expected}",
                                     f"quantize the weight per channel with axis={expected}"))
        elif target == "tensorrt" and weight.shape[expected] > 1:
            out.append(Violation("weight-axis", (node.name, dq.name),
                                 f"{node.op_type} {node.name}'s weight is quantized per tensor by {dq.name}; "
                                 "TensorRT expects per-channel weight scales",
                                 f"quantize the weight per channel with axis={expected}"))
    return out


def check_quantized_inputs(ctx: GraphContext, target: str) -> list[Violation]:  # noqa: ARG001
    """Every conv/gemm/matmul reads its data and weight through DequantizeLinear."""
    out = []
    for node in ctx.nodes_of(*WEIGHTED_OPS):
        roles = zip(("data", "weight"), node.input[:2], strict=False)
        missing = [(role, t) for role, t in roles if t and ctx.producer_op(t) != "DequantizeLinear"]
        if not missing:
            continue
        producers = tuple(ctx.producer[t].name for _, t in missing if t in ctx.producer)
        what = "; ".join(f"{role} input {_source(ctx, t)}" for role, t in missing)
        out.append(Violation("unquantized-input", (node.name, *producers),
                             f"{node.op_type} {node.name} reads an unquantized {what}",
                             "put a QuantizeLinear/DequantizeLinear pair on that input "
                             "(weights: int8 initializer + per-channel DequantizeLinear)"))
    return out


def check_residual_shortcuts(ctx: GraphContext, target: str) -> list[Violation]:
    """TensorRT: an Add after a quantized conv fuses into its epilogue only if the other input is a DQ."""
    if target != "tensorrt":
        return []  # ORT's profile quantizes both add inputs for QLinearAdd; nothing to fuse here
    out = []
    for add in ctx.nodes_of("Add"):
        inputs = list(add.input[:2])
        if len(inputs) < 2 or not all(ctx.is_activation(t) for t in inputs):
            continue  # an Add of a constant is a bias, not a residual
        dqs = [ctx.produced_by(t, "DequantizeLinear") for t in inputs]
        # TensorRT fuses conv -> Add <- DQ(shortcut) (a Relu between conv and Add breaks that pattern)
        if any(ctx.quantized_conv_behind(inputs[i], through_relu=False) is not None and dqs[1 - i] is not None
               for i in (0, 1)):
            continue
        convs = [ctx.quantized_conv_behind(t) for t in inputs]
        behind_qdq = [ctx.quantized_conv_behind(ctx.quantized_source(dq)) if dq is not None else None for dq in dqs]
        if any(c is not None for c in convs) and all(dq is None for dq in dqs):
            i = 0 if convs[0] is not None else 1
            out.append(_unquantized_shortcut(ctx, add, convs[i], inputs[1 - i]))
        elif any(c is not None for c in behind_qdq):
            i = 0 if behind_qdq[0] is not None else 1
            out.append(_quantized_conv_branch(ctx, add, behind_qdq[i], dqs[i], inputs[1 - i]))
    return out


def _unquantized_shortcut(ctx: GraphContext, add: onnx.NodeProto, conv: onnx.NodeProto, shortcut: str) -> Violation:
    other = ctx.producer.get(shortcut)
    return Violation("residual-shortcut", (add.name, conv.name) + ((other.name,) if other is not None else ()),
                     f"Add {add.name} adds quantized conv {conv.name}'s output to shortcut {_source(ctx, shortcut)}, "
                     f"which has no DequantizeLinear, so TensorRT cannot fuse the add into {conv.name}'s epilogue",
                     "put a QuantizeLinear/DequantizeLinear pair on the shortcut input of the Add")


def _quantized_conv_branch(ctx: GraphContext, add: onnx.NodeProto, conv: onnx.NodeProto, dq: onnx.NodeProto,
                           other: str) -> Violation:
    # Q/DQ on the conv branch (typically placed on the wrong operand of `x + branch(x)`): the conv's output
    # leaves through a QuantizeLinear, so the add cannot run in its epilogue.
    shortcut = "is quantized too" if ctx.produced_by(other, "DequantizeLinear") else "has none"
    nodes = (add.name, conv.name, dq.name) + ((ctx.producer[other].name,) if other in ctx.producer else ())
    return Violation("residual-shortcut", nodes,
                     f"Add {add.name} reads conv {conv.name}'s output through Q/DQ ({dq.name}) and its shortcut "
                     f"{_source(ctx, other)} {shortcut}, so TensorRT cannot fuse the add into {conv.name}'s epilogue",
                     f"quantize only the shortcut input of the Add, not {conv.name}'s output")


def check_concat_scales(ctx: GraphContext, target: str) -> list[Violation]:  # noqa: ARG001
    """All inputs of a Concat and its re-quantized output share one scale."""
    out = []
    for cat in ctx.nodes_of("Concat"):
        inputs = [t for t in cat.input if t and ctx.is_activation(t)]
        dqs = [ctx.produced_by(t, "DequantizeLinear") for t in inputs]
        if all(dq is None for dq in dqs):
            continue
        unquantized = [t for t, dq in zip(inputs, dqs, strict=True) if dq is None]
        if unquantized:
            nodes = (cat.name, *(ctx.producer[t].name for t in unquantized if t in ctx.producer))
            out.append(Violation("concat-scales", nodes,
                                 f"Concat {cat.name} mixes quantized and unquantized inputs: "
                                 f"{', '.join(_source(ctx, t) for t in unquantized)} have no DequantizeLinear",
                                 "quantize every input of the Concat with the same scale"))
            continue
        scales = [ctx.scale_of(dq) for dq in dqs]
        if any(s is None for s in scales):
            continue
        if not all(_same_scale(scales[0], s) for s in scales[1:]):
            listed = ", ".join(f"{dq.name}={_fmt_scale(s)}" for dq, s in zip(dqs, scales, strict=True))
            out.append(Violation("concat-scales", (cat.name, *(dq.name for dq in dqs)),
                                 f"Concat {cat.name}'s inputs are dequantized with different scales ({listed})",
                                 "share one quantizer (one scale) across all inputs of the Concat"))
            continue
        for q in ctx.quantizers_of(cat.output[0]):
            s = ctx.scale_of(q)
            if s is not None and not _same_scale(scales[0], s):
                out.append(Violation("concat-scales", (cat.name, q.name),
                                     f"Concat {cat.name}'s output is re-quantized by {q.name} with scale "
                                     f"{_fmt_scale(s)}, its inputs with {_fmt_scale(scales[0])}",
                                     "quantize the Concat output with its inputs' scale"))
    return out


def check_maxpool_scales(ctx: GraphContext, target: str) -> list[Violation]:  # noqa: ARG001
    """MaxPool commutes with Q/DQ: the scale after it must equal the scale before it."""
    out = []
    for pool in ctx.nodes_of("MaxPool"):
        dq = ctx.produced_by(pool.input[0], "DequantizeLinear")
        before = ctx.scale_of(dq) if dq is not None else None
        if before is None:
            continue
        for q in ctx.quantizers_of(pool.output[0]):
            after = ctx.scale_of(q)
            if after is not None and not _same_scale(before, after):
                out.append(Violation("maxpool-scales", (dq.name, pool.name, q.name),
                                     f"MaxPool {pool.name} reads {dq.name} (scale {_fmt_scale(before)}) but its "
                                     f"output is quantized by {q.name} with scale {_fmt_scale(after)}",
                                     "tie the scales across the MaxPool: re-use the input's scale after it"))
    return out


def check_opset(ctx: GraphContext, target: str) -> list[Violation]:  # noqa: ARG001
    """Per-channel QuantizeLinear/DequantizeLinear needs default-domain opset 13 or newer."""
    if ctx.opset is not None and ctx.opset >= MIN_OPSET:
        return []
    found = "declares no default-domain opset" if ctx.opset is None else f"uses opset {ctx.opset}"
    return [Violation("opset", (), f"the model {found}; per-channel Q/DQ needs opset {MIN_OPSET} or newer",
                      f"re-export with opset {MIN_OPSET} or newer (e.g. 17)")]


def check_fp32_regions(ctx: GraphContext, target: str) -> list[Violation]:
    """TensorRT: compute ops on FLOAT tensors run in FP32 (strongly typed: the graph's types are the precisions)."""
    if target != "tensorrt":
        return []  # ORT's CPU kernels have no FP16 fast path; FP32 is the right type there
    names = tuple(node.name for node in ctx.graph.node
                  if node.op_type not in NON_COMPUTE_OPS and _touches_fp32(ctx, (*node.input, *node.output)))
    if not names:
        return []
    listed = ", ".join(names[:MAX_LISTED]) + (", ..." if len(names) > MAX_LISTED else "")
    return [Violation("fp32-region", names,
                      f"{len(names)} compute op(s) read or write FLOAT (FP32) tensors outside Q/DQ ({listed}); "
                      "TensorRT runs them in FP32",
                      "convert the unquantized regions to FP16 (FLOAT16 tensors and Q/DQ scales, "
                      "Casts only at the graph boundary)")]


def _touches_fp32(ctx: GraphContext, tensors: Iterable[str]) -> bool:
    return any(t and ctx.elem_types.get(t) == TensorProto.FLOAT for t in tensors)


RULES: dict[str, Callable[[GraphContext, str], list[Violation]]] = {
    "opset": check_opset,
    "zero-point": check_zero_points,
    "scale": check_scales,
    "per-channel-activation": check_activation_granularity,
    "weight-axis": check_weight_axes,
    "unquantized-input": check_quantized_inputs,
    "residual-shortcut": check_residual_shortcuts,
    "concat-scales": check_concat_scales,
    "maxpool-scales": check_maxpool_scales,
    "fp32-region": check_fp32_regions,
}


def _load(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise DeployError(f"{path}: ONNX file not found; pass the path to an exported .onnx file")
    try:
        loaded = onnx.load(str(path))
    except Exception as exc:  # protobuf decode errors, missing external data, ...
        raise DeployError(f"{path}: cannot be read as an ONNX model ({type(exc).__name__}); "
                          "re-export it with `repapq-deploy export`") from exc
    if not loaded.HasField("graph"):  # protobuf parses some garbage (e.g. an empty file) as an empty model
        raise DeployError(f"{path}: holds no ONNX graph; re-export it with `repapq-deploy export`")
    return loaded


def lint_model(model: onnx.ModelProto | str | Path, target: str) -> list[Violation]:
    """Check ``model``'s Q/DQ placement against ``target``'s rules; returns the violations (empty: clean).

    ``model`` is a ModelProto (not modified) or the path of an ``.onnx`` file; ``target`` is one of
    ``TARGETS``. Raises :class:`DeployError` for an unreadable file or an unknown target.
    """
    if target not in TARGETS:
        raise DeployError(f"lint target {target!r}: unknown; choose one of {', '.join(TARGETS)}")
    ctx = GraphContext.from_model(_load(model))
    return [v for check in RULES.values() for v in check(ctx, target)]
