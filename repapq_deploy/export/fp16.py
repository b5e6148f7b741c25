"""FP16 pass for QDQ (and plain) ONNX graphs: the float parts of the graph become float16.

TensorRT 10/11 builds *strongly typed* networks from QDQ ONNX: the tensor types written in the graph
are the precisions the engine runs in (DESIGN.md, "TensorRT explicit-quantization rules"). A QDQ
graph whose un-quantized regions (bias adds, pooling, the classifier epilogue, the Q/DQ scales
themselves) are float32 therefore runs them in FP32. :func:`convert_to_fp16` rewrites the graph so
that every float32 tensor is float16, leaving the integer tensors (int8 weights, zero points, int32
biases, int64 shapes) as they are.

Plain ``onnx`` protobuf editing is used rather than onnx-graphsurgeon because the pass is about the
element types of initializers, attributes and value_infos, which graphsurgeon abstracts away.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference, version_converter

from repapq_deploy.errors import DeployError

FP16_OPSET = 19  # first opset whose QuantizeLinear/DequantizeLinear accept float16 inputs and scales
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
SCALE_ROUNDING_WARN = 0.01  # warn when float16 moves a Q/DQ scale by more than this (relative): subnormals
OPSET_UPGRADE_KEY = "repapq_deploy.fp16.opset_upgraded_from"  # metadata_props record of the upgrade

FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
# Inputs the ONNX spec types as tensor(float) whatever the op's data type, so they must stay float32.
FLOAT32_SLOTS = frozenset({("Resize", 2)})  # Resize `scales`, opsets 11 to 21
# Ops that only move a tensor between precisions or create one; fp16_report does not count them.
_NON_COMPUTE = frozenset({"Cast", "CastLike", "Constant"})


def convert_to_fp16(model: onnx.ModelProto, *, keep_io_types: bool = True) -> onnx.ModelProto:
    """Return a copy whose float32 initializers, Constant nodes, value_infos and op attributes are float16.

    Q/DQ scales become float16 too, so DequantizeLinear outputs float16 (opset >= 19 is required for
    float16 QuantizeLinear/DequantizeLinear; the pass upgrades the default-domain opset to 19 when it
    is lower, using ``onnx.version_converter``, records the old version in ``metadata_props`` under
    :data:`OPSET_UPGRADE_KEY`, and raises :class:`DeployError` if the upgrade fails).
    int8/uint8/int32 tensors (quantized weights, zero points, int32 biases) are untouched, as are
    int64 shape tensors and float64 tensors. ``Cast(to=FLOAT)`` nodes are retargeted to FLOAT16;
    float scalar attributes (Gemm alpha/beta, epsilon, ...) stay as they are (attributes carry no
    tensor type). Finite constants beyond the float16 range saturate to +-65504. Inputs the spec
    fixes to float32 (Resize ``scales``) stay float32: a constant keeps its float32 value, a
    computed tensor gets a Cast back to float32.

    With ``keep_io_types``, graph inputs/outputs stay float32 and Cast nodes convert at the boundary;
    otherwise they become float16 too. A Cast(to=FLOAT) that only feeds a graph output is such a
    boundary Cast already and stays, so converting a converted model again changes nothing.

    Checked where the values are constants (:class:`DeployError` names the node):

    - A DequantizeLinear of an int32 bias with a float16 scale outputs ``int32 * scale`` in float16,
      which overflows to inf for a large bias: every dequantized bias must satisfy |b| < 65504.
    - A Q/DQ scale that underflows to 0 or overflows in float16 raises (scales must stay positive
      and finite). One that float16 rounds by more than 1% (a subnormal, below about 3e-6, as
      int32-bias scales ``s_x * s_w`` can be) is reported with a warning.

    Rounding the Q/DQ scales to float16 moves the quantization grid by up to 2**-11 relative, so
    values near a rounding boundary can land on the neighbouring integer code: the result is close
    to the float32 graph, not bit-exact with it.

    The result has passed strict shape inference (returned with its inferred value_infos) and
    ``onnx.checker.check_model``. Ops that create float32 tensors from a ``dtype`` attribute
    (RandomNormal, EyeLike, ...) are not retargeted: such graphs fail strict inference and raise.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out = _upgrade_opset(out)
    # Element types of every intermediate tensor, to find the float32 tensors feeding FLOAT32_SLOTS.
    out = shape_inference.infer_shapes(out)
    graph = out.graph
    _check_constants(graph)
    types = dict(_elem_types(graph))
    names = _NameGen(_all_names(graph))

    inits = {i.name for i in graph.initializer}
    consumers = Counter(name for node in _nodes(graph) for name in node.input)
    outputs = {vo.name for vo in graph.output}
    consumers.update(outputs)
    slot_users = Counter(node.input[i] for node in _nodes(graph) for i in _float32_slots(node))
    constants = _constants(graph)
    # Constants read only by float32-only slots keep their float32 value; every other float32 tensor
    # becomes float16, so a float32-only slot fed by it needs a Cast back.
    pinned = {name for name, n in slot_users.items() if name in constants and n == consumers[name]}
    if keep_io_types:  # a Cast(to=FLOAT) that only produces a graph output is already the boundary cast
        pinned.update(n.output[0] for n in graph.node if n.op_type == "Cast" and n.output[0] in outputs
                      and consumers[n.output[0]] == 1)
    _convert_graph(graph, types, pinned, names, subgraph=False)

    if keep_io_types:
        _cast_io(graph, types, pinned, names)
    else:
        for vi in [*graph.input, *graph.output]:
            _retype(vi, types.get(vi.name))
    for vi in graph.input:  # old-IR models list initializers as inputs too; the types must agree
        if vi.name in inits and vi.name not in pinned:
            _retype(vi, types.get(vi.name))

    out.ir_version = max(out.ir_version, helper.find_min_ir_version_for(out.opset_import, ignore_unknown=True))
    try:
        out = shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
        onnx.checker.check_model(out)
    except (shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise DeployError(f"the float16 graph is not valid ONNX ({str(exc).splitlines()[0][:300]}): "
                          "it may use an op this pass does not retarget (keep such a graph in float32)") from exc
    return out


def fp16_report(model: onnx.ModelProto) -> dict:
    """Counts of float32 vs float16 tensors among compute-op inputs/outputs (for tests and reports).

    Compute ops are all nodes but Cast/CastLike (the precision boundary) and Constant, Q/DQ nodes
    included (their scales and float inputs/outputs are precisions too); each tensor is counted once,
    subgraphs included. Tensors read only by inputs the spec fixes to float32 (Resize ``scales``) are
    counted in ``float32_required``, not in ``float32``. Keys: ``opset`` (default domain),
    ``float16``, ``float32``, ``float32_tensors`` (sorted names), ``float32_required``,
    ``opset_upgraded_from`` (None unless :func:`convert_to_fp16` upgraded the opset).
    """
    inferred = shape_inference.infer_shapes(model)
    types = dict(_elem_types(inferred.graph))
    required, used = set(), set()
    for node in _nodes(inferred.graph):
        if node.op_type in _NON_COMPUTE:
            continue
        fixed = _float32_slots(node)
        required.update(node.input[i] for i in fixed)
        used.update(name for i, name in enumerate(node.input) if name and i not in fixed)
        used.update(name for name in node.output if name)
    float32 = sorted(name for name in used if types.get(name) == FLOAT)
    meta = {p.key: p.value for p in model.metadata_props}
    return {
        "opset": _default_opset(model),
        "float16": sum(types.get(name) == FLOAT16 for name in used),
        "float32": len(float32),
        "float32_tensors": float32,
        "float32_required": sum(types.get(name) == FLOAT for name in required - used),
        "opset_upgraded_from": int(meta[OPSET_UPGRADE_KEY]) if OPSET_UPGRADE_KEY in meta else None,
    }


def _default_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _upgrade_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    opset = _default_opset(model)
    if opset is None or opset >= FP16_OPSET:
        return model
    try:
        upgraded = version_converter.convert_version(model, FP16_OPSET)
    except Exception as exc:  # the converter raises RuntimeError or its own C++ errors, op by op
        raise DeployError(f"cannot upgrade the ONNX graph from opset {opset} to {FP16_OPSET}, which float16 "
                          f"QuantizeLinear/DequantizeLinear need ({str(exc).splitlines()[0][:200]}); "
                          f"export it with `opset` {FP16_OPSET}") from exc
    helper.set_model_props(upgraded, {**{p.key: p.value for p in upgraded.metadata_props},
                                      OPSET_UPGRADE_KEY: str(opset)})
    return upgraded


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        yield from attr.graphs


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and, recursively, its subgraphs (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _graphs(sub)


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs."""
    for g in _graphs(graph):
        yield from g.node


def _elem_types(graph: onnx.GraphProto) -> Iterator[tuple[str, int]]:
    """(name, element type) of every typed tensor in ``graph`` and its subgraphs."""
    for g in _graphs(graph):
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.type.HasField("tensor_type"):
                yield vi.name, vi.type.tensor_type.elem_type
        for init in g.initializer:
            yield init.name, init.data_type


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node values (``value`` attribute) of ``graph`` and its subgraphs, by name."""
    values = {i.name: i for g in _graphs(graph) for i in g.initializer}
    values.update({n.output[0]: a.t for n in _nodes(graph) if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    return values


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for g in _graphs(graph):
        names.update(vi.name for vi in [*g.input, *g.output, *g.value_info])
        names.update(i.name for i in g.initializer)
    for node in _nodes(graph):
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


class _NameGen:
    """Fresh tensor/node names that collide with nothing in the model."""

    def __init__(self, taken: set[str]) -> None:
        self.taken = taken

    def __call__(self, base: str) -> str:
        name, i = base, 0
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name


def _float32_slots(node: onnx.NodeProto) -> list[int]:
    return [i for i, name in enumerate(node.input) if name and (node.op_type, i) in FLOAT32_SLOTS]


def fp16_initializer(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """``tensor`` (float32) as the float16 initializer :func:`convert_to_fp16` writes for it."""
    # Finite values beyond the float16 range saturate rather than become inf: a -1e9 mask or a FLT_MAX
    # Clip bound keeps its meaning, and inf - inf cannot turn into NaN downstream.
    value = numpy_helper.to_array(tensor)
    value = np.where(np.isfinite(value), np.clip(value, -FP16_MAX, FP16_MAX), value).astype(np.float16)
    return numpy_helper.from_array(value, tensor.name)


def _retype(vi: onnx.ValueInfoProto, elem_type: int | None) -> None:
    if elem_type == FLOAT and vi.type.HasField("tensor_type"):
        vi.type.tensor_type.elem_type = FLOAT16


def _convert_node_attrs(node: onnx.NodeProto) -> None:
    """Float32 tensors and target types held in attributes become float16."""
    if node.op_type == "Constant":
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type == FLOAT:
                attr.t.CopyFrom(fp16_initializer(attr.t))
            elif attr.name in ("value_float", "value_floats"):
                # no float16 counterpart of these scalar/list attributes: store a float16 tensor instead
                value = np.asarray(attr.f if attr.name == "value_float" else list(attr.floats), np.float32)
                node.attribute.remove(attr)
                node.attribute.append(helper.make_attribute("value", fp16_initializer(numpy_helper.from_array(value))))
                break  # a Constant has exactly one value attribute
    elif node.op_type == "ConstantOfShape":
        value = next((a for a in node.attribute if a.name == "value"), None)
        if value is None:  # the default fill is a float32 zero
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))
        elif value.t.data_type == FLOAT:
            value.t.CopyFrom(fp16_initializer(value.t))
    elif node.op_type == "Cast":
        for attr in node.attribute:
            if attr.name == "to" and attr.i == FLOAT:
                attr.i = FLOAT16


def _convert_graph(graph: onnx.GraphProto, types: dict[str, int], pinned: set[str], names: _NameGen,
                   subgraph: bool) -> None:
    """Retype ``graph`` (and, recursively, its subgraphs) in place; main-graph inputs/outputs excepted."""
    for init in graph.initializer:
        if init.data_type == FLOAT and init.name not in pinned:
            init.CopyFrom(fp16_initializer(init))
    for vi in graph.value_info:
        if vi.name not in pinned:
            _retype(vi, types.get(vi.name))
    if subgraph:  # a body's inputs/outputs are internal tensors of the outer graph
        for vi in [*graph.input, *graph.output]:
            _retype(vi, types.get(vi.name))

    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if not (node.op_type in ("Constant", "Cast") and node.output[0] in pinned):
            _convert_node_attrs(node)
        for sub in _subgraphs(node):
            _convert_graph(sub, types, pinned, names, subgraph=True)
        for i in _float32_slots(node):
            src = node.input[i]
            if types.get(src) == FLOAT and src not in pinned:
                cast_out = names(f"{src}_fp32")
                new_nodes.append(helper.make_node("Cast", [src], [cast_out], names(f"{node.name or src}_to_fp32"),
                                                  to=FLOAT))
                node.input[i] = cast_out
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)


def _rename_inputs(graph: onnx.GraphProto, old: str, new: str, casts_too: bool = True) -> bool:
    """Point the readers of ``old`` (subgraphs included: ONNX forbids them to shadow outer names) at ``new``;
    with ``casts_too`` False, Cast nodes keep reading ``old``. Returns whether any reader was changed."""
    changed = False
    for node in _nodes(graph):
        if casts_too or node.op_type != "Cast":
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
                    changed = True
    return changed


def _cast_io(graph: onnx.GraphProto, types: dict[str, int], pinned: set[str], names: _NameGen) -> None:
    """Keep float32 graph inputs/outputs float32, with float16 Casts at the boundary."""
    inits = {i.name for i in graph.initializer}
    input_names = {vi.name for vi in graph.input}
    head, tail = [], []
    for vi in graph.input:
        if types.get(vi.name) != FLOAT or vi.name in inits:
            continue
        fp16 = names(f"{vi.name}_fp16")
        # A Cast reads any type, so it can keep reading the float32 input (an earlier boundary Cast does).
        if _rename_inputs(graph, vi.name, fp16, casts_too=False):
            head.append(helper.make_node("Cast", [vi.name], [fp16], names(f"{vi.name}_to_fp16"), to=FLOAT16))
    for vo in graph.output:
        # a pass-through input or a pinned boundary Cast's output is float32 already
        if types.get(vo.name) != FLOAT or vo.name in input_names or vo.name in pinned:
            continue
        fp16 = names(f"{vo.name}_fp16")
        _rename_inputs(graph, vo.name, fp16)
        for node in graph.node:
            for i, name in enumerate(node.output):
                if name == vo.name:
                    node.output[i] = fp16
        for item in [*graph.initializer, *graph.value_info]:
            if item.name == vo.name:
                item.name = fp16
        tail.append(helper.make_node("Cast", [fp16], [vo.name], names(f"{vo.name}_to_fp32"), to=FLOAT))
    nodes = [*head, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)


def _check_constants(graph: onnx.GraphProto) -> None:
    """Before conversion: Q/DQ scales must survive float16, and dequantized int32 biases stay below 65504."""
    values = _constants(graph)
    coarse = []
    for node in _nodes(graph):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 2:
            continue
        scale_t = values.get(node.input[1])
        if scale_t is None or scale_t.data_type != FLOAT:
            continue
        label = node.name or node.output[0]
        scale = numpy_helper.to_array(scale_t).astype(np.float64)
        with np.errstate(over="ignore"):
            scale16 = scale.astype(np.float16).astype(np.float64)
        if not np.all((scale16 > 0) & np.isfinite(scale16)):
            raise DeployError(f"{node.op_type} {label!r}: scale {node.input[1]!r} (min {scale.min():.3g}, max "
                              f"{scale.max():.3g}) underflows to 0 or overflows in float16; recalibrate or keep "
                              "this model in float32")
        if np.any(np.abs(scale16 - scale) > SCALE_ROUNDING_WARN * scale):
            coarse.append(label)
        x = values.get(node.input[0])
        if node.op_type == "DequantizeLinear" and x is not None and x.data_type == TensorProto.INT32:
            q = numpy_helper.to_array(x).astype(np.float64)
            if len(node.input) > 2 and node.input[2] in values:
                q = q - _along_axis(numpy_helper.to_array(values[node.input[2]]), node, q.ndim)
            worst = float(np.abs(q * _along_axis(scale16, node, q.ndim)).max(initial=0.0))
            if worst >= FP16_MAX:
                raise DeployError(f"DequantizeLinear {label!r}: the int32 bias {node.input[0]!r} dequantizes to "
                                  f"|b| = {worst:g} with a float16 scale, beyond the float16 range (< {FP16_MAX:g}); "
                                  "keep this model in float32 or export the bias as float")
    if coarse:
        warnings.warn(f"float16 rounds {len(coarse)} Q/DQ scale(s) by more than {SCALE_ROUNDING_WARN:.0%} "
                      f"(subnormal float16), e.g. in {coarse[:3]}", stacklevel=3)


def _along_axis(param: np.ndarray, node: onnx.NodeProto, ndim: int) -> np.ndarray:
    """A per-channel Q/DQ parameter, as float64, shaped to broadcast along the node's ``axis`` (default 1)."""
    param = param.astype(np.float64)
    if param.ndim == 0 or ndim <= 1:
        return param
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % ndim
    shape = [1] * ndim
    shape[axis] = -1
    return param.reshape(shape)
