"""ONNX export of the FP32 and fake-quant models, graph clean-up, and the ORT-vs-PyTorch check.

The fake-quant modules emit their own Q/DQ nodes during ``torch.onnx.export`` (TorchScript-based
exporter, which honours ``autograd.Function.symbolic``), so the QDQ graph is the calibrated model
itself. A clean-up pass with onnx-graphsurgeon then turns constants into initializers and merges
``Relu -> Clip`` (INT6 emulation) into one ``Clip``, as DESIGN.md asks.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import torch
import torch.nn as nn

from repapq_deploy.artifacts import atomic_path
from repapq_deploy.environment import ort_threads
from repapq_deploy.errors import ConfigError
from repapq_deploy.quant.placement import FakeQuantModel

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR


def _export(module: nn.Module, sample: torch.Tensor, path: Path, opset: int) -> None:
    if opset < MIN_OPSET:
        raise ConfigError(f"`opset` {opset}: per-channel Q/DQ needs opset {MIN_OPSET} or newer")
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, (sample[:1],), str(tmp), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True)
        model = _clean(onnx.load(str(tmp)))
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))


def _values(values) -> np.ndarray:
    return np.asarray(values.load() if hasattr(values, "load") else values)


def _constant_value(t: gs.Tensor) -> np.ndarray | None:
    if isinstance(t, gs.Constant):
        return _values(t.values)
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        return _values(t.inputs[0].attrs["value"].values)
    return None


def _clean(model: onnx.ModelProto) -> onnx.ModelProto:
    # an offset grid (its Sub before a Q) read by a padded conv needs the static C, H, W of its border map
    offsets = any(n.op_type == "Sub" for n in model.graph.node)
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model) if offsets else model)
    for node in [n for n in graph.nodes if n.op == "Identity" and isinstance(n.inputs[0], gs.Constant)]:
        # the exporter de-duplicates equal initializers through Identity nodes
        out = node.outputs[0]
        for consumer in list(out.outputs):
            consumer.inputs[consumer.inputs.index(out)] = node.inputs[0]
        node.outputs.clear()
    for node in [n for n in graph.nodes if n.op == "Constant"]:
        out = node.outputs[0]
        const = gs.Constant(out.name, _values(node.attrs["value"].values))
        for consumer in list(out.outputs):
            consumer.inputs[consumer.inputs.index(out)] = const
        node.outputs.clear()
    # after the two loops above, so every constant input is a plain initializer
    for node in [n for n in graph.nodes if n.op == "Clip"]:
        src = node.inputs[0]
        lo = _constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if lo is None or len(src.inputs) != 1 or src.inputs[0].op != "Relu" or len(src.outputs) != 1:
            continue
        # Relu then Clip(lo <= 0, hi) == Clip(0, hi): one op, which TensorRT fuses into the conv.
        relu = src.inputs[0]
        node.inputs[0] = relu.inputs[0]
        node.inputs[1] = gs.Constant(f"{node.name}_min", np.asarray(np.maximum(lo, 0), np.float32))
        relu.outputs.clear()
    _fold_quantized_pads(graph)
    _drop_clips_the_grid_implies(graph)
    _fold_activation_offsets(graph)
    _absorb_offset_relus(graph)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    return out


def _same_quantizer(a: gs.Node, b: gs.Node) -> bool:
    """Two Q/DQ nodes with equal constant scale and zero point."""
    for x, y in zip(a.inputs[1:3], b.inputs[1:3], strict=False):
        vx, vy = _constant_value(x), _constant_value(y)
        if vx is None or vy is None or vx.dtype != vy.dtype or not np.array_equal(vx, vy):
            return False
    return len(a.inputs) == len(b.inputs)


def _fold_quantized_pads(graph: gs.Graph) -> None:
    """``DQ -> Pad(0) -> [Clip] -> Q -> [Clip] -> DQ -> Conv`` with one scale on both sides becomes
    ``DQ -> Conv(pads)``: exact (a zero pad is 0 on any symmetric grid, and the values are already on
    that grid), and the conv keeps its padding inside the integer kernel instead of a float Pad between
    a DQ and a Q (EfficientNet-Lite's TF-"same" padding)."""
    pads = [n for n in graph.nodes if n.op == "Pad"]
    if any(_constant_value(n.inputs[1]) is None for n in pads):
        # the exporter computes F.pad's amounts with a small shape subgraph; fold it (never Q/DQ,
        # which must stay as they are)
        graph.fold_constants(should_exclude_node=lambda n: n.op in ("QuantizeLinear", "DequantizeLinear"))
        graph.cleanup()
        pads = [n for n in graph.nodes if n.op == "Pad"]
    for pad in pads:
        src = pad.inputs[0]
        if len(src.inputs) != 1 or src.inputs[0].op != "DequantizeLinear":
            continue
        if pad.attrs.get("mode", "constant") not in ("constant", b"constant") or len(pad.inputs) > 3:
            continue
        value = _constant_value(pad.inputs[2]) if len(pad.inputs) > 2 and pad.inputs[2].name else np.zeros(1)
        amounts = _constant_value(pad.inputs[1])
        if value is None or np.any(value != 0) or amounts is None or amounts.size != 8:
            continue
        amounts = amounts.astype(np.int64).tolist()
        if any(amounts[i] for i in (0, 1, 4, 5)) or min(amounts) < 0:  # batch/channel, or cropping
            continue
        chain, t = [], pad.outputs[0]
        while len(t.outputs) == 1 and t.outputs[0].op in ("Clip", "QuantizeLinear", "DequantizeLinear"):
            chain.append(t.outputs[0])
            t = chain[-1].outputs[0]
        ops = [n.op for n in chain]
        if ops.count("QuantizeLinear") != 1 or ops.count("DequantizeLinear") != 1 or ops[-1] != "DequantizeLinear":
            continue
        q = chain[ops.index("QuantizeLinear")]
        if not _same_quantizer(q, src.inputs[0]) or not t.outputs:
            continue
        convs = list(t.outputs)
        if any(c.op != "Conv" or c.inputs[0] is not t or c.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET")
               for c in convs):
            continue
        for conv in convs:
            old = list(conv.attrs.get("pads", [0, 0, 0, 0]))
            conv.attrs["pads"] = [old[0] + amounts[2], old[1] + amounts[3], old[2] + amounts[6], old[3] + amounts[7]]
            conv.inputs[0] = src
        pad.outputs.clear()
        for node in chain:
            node.outputs.clear()


def _drop_clips_the_grid_implies(graph: gs.Graph) -> None:
    """``Clip(0, hi) -> Q(s, uint8 zp 0) -> Clip(0, n) -> DQ`` with ``n * s <= hi`` becomes
    ``Q -> Clip(0, n) -> DQ``: exact (below 0 and above ``hi`` both saturate to the same integers), and
    without the float Clip ONNX Runtime fuses the conv before it into QLinearConv (a ReLU6 before a
    6-bit activation grid, whose int8 Q range alone is wider than 6, kept Conv + Clip in float)."""
    for clip in [n for n in graph.nodes if n.op == "Clip" and n.outputs]:  # (some left by the pad fold)
        out = clip.outputs[0]
        if len(clip.inputs) != 3 or len(out.outputs) != 1 or out.outputs[0].op != "QuantizeLinear":
            continue
        q = out.outputs[0]
        lo, hi = _constant_value(clip.inputs[1]), _constant_value(clip.inputs[2])
        scale, zp = (_constant_value(t) for t in q.inputs[1:3]) if len(q.inputs) == 3 else (None, None)
        if lo is None or hi is None or scale is None or zp is None or zp.dtype != np.uint8 or np.any(zp != 0):
            continue
        if float(lo) != 0.0 or scale.size != 1 or len(q.outputs[0].outputs) != 1:
            continue
        int_clip = q.outputs[0].outputs[0]
        if int_clip.op != "Clip" or len(int_clip.inputs) != 3:
            continue
        n_lo, n_hi = _constant_value(int_clip.inputs[1]), _constant_value(int_clip.inputs[2])
        if n_lo is None or n_hi is None or int(n_lo) != 0:
            continue
        if np.float32(int(n_hi)) * np.float32(scale.reshape(-1)[0]) > np.float32(hi):
            continue
        q.inputs[0] = clip.inputs[0]
        clip.outputs.clear()


def _dequantized_weight(t: gs.Tensor) -> np.ndarray | None:
    """The float weight behind ``DQ(int8 initializer, per-channel scale, axis 0)``, else None."""
    if len(t.inputs) != 1 or t.inputs[0].op != "DequantizeLinear":
        return None
    dq = t.inputs[0]
    w, scale = _constant_value(dq.inputs[0]), _constant_value(dq.inputs[1])
    zp = _constant_value(dq.inputs[2]) if len(dq.inputs) > 2 else np.zeros(1)
    if w is None or scale is None or zp is None or np.any(zp != 0) or dq.attrs.get("axis", 1) != 0:
        return None
    return w.astype(np.float64) * scale.astype(np.float64).reshape((-1,) + (1,) * (w.ndim - 1))


def _offset_terms(layer: gs.Node, t: gs.Tensor, shift: float) -> tuple[np.ndarray, np.ndarray | None] | None:
    """What ``layer`` reading ``t - shift`` instead of ``t`` must add back: a per-channel bias term and,
    for a conv with zero padding, the border map on top of it (``[1, C, H, W]``, zero inside); None
    where the layer cannot take it (not a plain Conv/Gemm on an int8 weight, or shapes unknown)."""
    w = _dequantized_weight(layer.inputs[1]) if len(layer.inputs) > 1 else None
    if w is None or layer.inputs[0] is not t or (len(layer.inputs) > 2 and _constant_value(layer.inputs[2]) is None):
        return None  # (a DQ'd int32 bias is ONNX Runtime's; its profile never offsets)
    if layer.op == "Gemm":
        a = layer.attrs
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or w.ndim != 2:
            return None
        return shift * (w.sum(axis=1) if a.get("transB", 0) else w.sum(axis=0)), None
    if layer.op != "Conv" or w.ndim != 4 or layer.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return None
    interior = shift * w.sum(axis=(1, 2, 3))
    pads = list(layer.attrs.get("pads", [0, 0, 0, 0]))
    if not any(pads):
        return interior, None
    shape = t.shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        return None
    # the padded positions read -shift instead of 0: convolve just them (exactly 0 where a window
    # lies inside the image)
    padded_at = torch.nn.functional.pad(torch.zeros((1, *shape[1:]), dtype=torch.float64),
                                        (pads[1], pads[3], pads[0], pads[2]), value=shift)
    border = torch.nn.functional.conv2d(padded_at, torch.from_numpy(w),
                                        stride=tuple(layer.attrs.get("strides", [1, 1])),
                                        dilation=tuple(layer.attrs.get("dilations", [1, 1])),
                                        groups=layer.attrs.get("group", 1)).numpy()
    return interior, -border


# the name suffix of `offset_relu` all's border-map Add, by which an engine's layer names show it
OFFSET_BORDER_SUFFIX = "_offset_border"


def _fold_activation_offsets(graph: gs.Graph) -> None:
    """``Sub(x, c) -> Q -> DQ -> Add(c) -> Conv/Gemm`` (an offset 8-bit grid, IntFormat.offset) becomes
    ``Sub(x, c) -> Q -> DQ -> Conv/Gemm`` with ``c * sum(W)`` added to the bias, plus, for a conv with
    zero padding, a constant border map added to its output (its padded zeros now read as ``-c``).
    Exact up to float32 round-off. Where a conv produces ``x``, :func:`_absorb_offset_relus` then
    removes the Sub too; the map (an elementwise sum with a constant) is meant to fuse into the reading
    conv's epilogue in TensorRT, not verified here."""
    for add in [n for n in graph.nodes if n.op == "Add" and len(n.inputs) == 2]:
        src, c = add.inputs
        shift = _constant_value(c)
        if shift is None or shift.size != 1 or len(src.inputs) != 1 or src.inputs[0].op != "DequantizeLinear":
            continue
        q_in = src.inputs[0].inputs[0]
        q = q_in.inputs[0] if len(q_in.inputs) == 1 else None
        sub = q.inputs[0].inputs[0] if q is not None and q.op == "QuantizeLinear" and q.inputs[0].inputs else None
        if sub is None or sub.op != "Sub" or not np.array_equal(_constant_value(sub.inputs[1]), shift):
            continue
        out = add.outputs[0]
        terms = [_offset_terms(layer, out, float(shift.reshape(-1)[0])) for layer in out.outputs]
        if not terms or any(t is None for t in terms) or out in graph.outputs:
            continue
        for layer, (bias_term, border) in zip(list(out.outputs), terms, strict=True):
            bias = _constant_value(layer.inputs[2]) if len(layer.inputs) > 2 else np.zeros(bias_term.shape)
            new_bias = gs.Constant(f"{layer.name}_offset_bias",
                                   (bias.astype(np.float64) + bias_term).astype(np.float32))
            if len(layer.inputs) > 2:
                layer.inputs[2] = new_bias
            else:
                layer.inputs.append(new_bias)
            layer.inputs[0] = src
            if border is not None:
                y = layer.outputs[0]
                pre = gs.Variable(f"{y.name}_before_border", dtype=y.dtype, shape=y.shape)
                layer.outputs[0] = pre
                graph.layer(op="Add", name=f"{layer.name}{OFFSET_BORDER_SUFFIX}",
                            inputs=[pre, gs.Constant(f"{layer.name}{OFFSET_BORDER_SUFFIX}_map",
                                                     border.astype(np.float32))],
                            outputs=[y])
        add.outputs.clear()


def _biased_layer(t: gs.Tensor) -> gs.Node | None:
    """The Conv/Gemm whose constant bias can take a constant added to ``t``: its producer, or, through
    the sums that make ``t`` (a border map, a residual shortcut), one of theirs; None if there is none
    that only ``t`` reads."""
    node = t.inputs[0] if len(t.inputs) == 1 and len(t.outputs) == 1 else None
    if node is None:
        return None
    if node.op == "Add":
        for x in node.inputs:
            found = _biased_layer(x) if _constant_value(x) is None else None
            if found is not None:
                return found
        return None
    if node.op not in ("Conv", "Gemm") or len(node.inputs) < 3 or node.attrs.get("beta", 1.0) != 1.0:
        return None
    bias = _constant_value(node.inputs[2])
    return node if bias is not None and bias.ndim == 1 else None


def _clip_implied_by_offset_grid(clip: gs.Node, scale: float) -> bool:
    """A ``Clip(lo <= 0, hi)`` (a ReLU6) that the offset int8 grid ``[0, 255 s]`` implies: everything
    at or below 0 reads -128 either way, and ``hi`` itself already reads 127 (``hi > 254.5 s``: at
    254.5 exactly, rounding half to even gives 126), so no value above ``hi`` could read anything else."""
    if clip.op != "Clip" or len(clip.inputs) != 3:
        return False
    lo, hi = _constant_value(clip.inputs[1]), _constant_value(clip.inputs[2])
    return lo is not None and hi is not None and float(lo) <= 0.0 and float(hi) > 254.5 * scale


def _absorb_offset_relus(graph: gs.Graph) -> None:
    """``Conv(b) -> Relu -> Sub(128 s) -> Q(s, int8)`` becomes ``Conv(b - 128 s) -> Q(s, int8)``: the
    int8 Q saturates everything below ``-128 s`` to -128, which is where the ReLU sent every negative
    value, so the ReLU and the Sub are the Q's own saturation (exact up to float32 round-off). TensorRT
    then sees the plain ``Conv -> Q`` of an int8-output convolution, with no pointwise op of the offset
    in between. Sums between the conv and the ReLU (a border map, a residual shortcut) are linear, so
    the shift goes into the bias of a conv that feeds them. Where the Relu or the Sub has another
    reader, or no such conv is found, the Sub stays. A ReLU6's ``Clip`` goes the same way where the
    grid's top lies within its cap (:func:`_clip_implied_by_offset_grid`); otherwise it stays too."""
    for sub in [n for n in graph.nodes if n.op == "Sub" and len(n.outputs[0].outputs) == 1]:
        q = sub.outputs[0].outputs[0]
        shift = _constant_value(sub.inputs[1])
        scale, zp = (_constant_value(t) for t in q.inputs[1:3]) if len(q.inputs) == 3 else (None, None)
        if (q.op != "QuantizeLinear" or shift is None or scale is None or zp is None or shift.size != 1
                or scale.size != 1 or zp.dtype != np.int8 or np.any(zp != 0)):
            continue
        s, c = np.float32(scale.reshape(-1)[0]), np.float32(shift.reshape(-1)[0])
        if s * np.float32(128) != c:
            continue
        relu_out = sub.inputs[0]
        relu = relu_out.inputs[0] if len(relu_out.inputs) == 1 else None
        if (relu is None or len(relu_out.outputs) != 1 or relu_out in graph.outputs
                or not (relu.op == "Relu" or _clip_implied_by_offset_grid(relu, float(s)))):
            continue
        layer = _biased_layer(relu.inputs[0])
        if layer is None:
            continue
        bias = _constant_value(layer.inputs[2])
        layer.inputs[2] = gs.Constant(f"{layer.name}_relu_offset_bias",
                                      (bias.astype(np.float64) - float(c)).astype(np.float32))
        q.inputs[0] = relu.inputs[0]
        relu.outputs.clear()
        sub.outputs.clear()


def export_fp32(model: nn.Module, sample: torch.Tensor, path: str | Path, opset: int = 17) -> None:
    """Export the fused FP32 model (the reference every speed/accuracy figure is compared with)."""
    _export(model.eval(), sample, Path(path), opset)


def export_qdq(qm: FakeQuantModel, sample: torch.Tensor, path: str | Path, opset: int = 17) -> None:
    """Export the calibrated model as a QDQ ONNX graph with int8 weight initializers."""
    qm.module.eval()
    qm.set_mode("quant")
    qm.freeze_for_export()
    _export(qm.module, sample, Path(path), opset)


@dataclass
class ExportCheck:
    """ONNX Runtime (no graph optimizations) vs the PyTorch fake-quant model on the same samples."""

    samples: int
    agreement_top1: float  # percent
    max_abs_diff: float
    max_rel_diff: float

    def to_dict(self) -> dict:
        return asdict(self)


def reference_session(path: str | Path | bytes) -> ort.InferenceSession:
    """ONNX Runtime with every graph optimization off: executes the graph (a file, or a serialized
    model) exactly as written."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = ort_threads()
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so,
                                providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_against_torch(qm: FakeQuantModel, path: str | Path, data: torch.Tensor,
                        batch_size: int = 64) -> ExportCheck:
    """Run ``path`` in ORT's reference mode and the fake-quant model on ``data``; compare logits."""
    session = reference_session(path)
    qm.set_mode("quant")
    onnx_out, torch_out = [], []
    for i in range(0, len(data), batch_size):
        x = data[i:i + batch_size]
        onnx_out.append(session.run(None, {INPUT_NAME: x.numpy()})[0])
        torch_out.append(qm.module(x).numpy())
    a, b = np.concatenate(onnx_out), np.concatenate(torch_out)
    diff = float(np.abs(a - b).max())
    return ExportCheck(len(data), float((a.argmax(1) == b.argmax(1)).mean() * 100), diff,
                       diff / max(float(np.abs(b).max()), 1e-12))


def graph_summary(path: str | Path) -> dict:
    """Op counts and the opset of an ONNX file."""
    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"opset": opset, "nodes": sum(ops.values()), "ops": dict(sorted(ops.items()))}
