"""Where quantizers go: a registry from op kind to a placement rule, per backend profile.

The fused model is traced with ``torch.fx``; convs and linears become ``QuantConv2d`` /
``QuantLinear`` and ``ActQuantizer`` nodes are inserted on the tensors that the rules select.
A tensor read by several quantized consumers gets one quantizer (one Q/DQ pair in ONNX, one
scale). The exported ONNX graph is this graph, so the TensorRT/ORT placement rules of DESIGN.md
are implemented here once.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from repapq_deploy.errors import DeployError
from repapq_deploy.quant.fakequant import ActQuantizer, QuantConv2d, QuantLinear
from repapq_deploy.quant.scheme import Profile, QuantConfig

_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCS = {F.relu, torch.relu, F.relu6}
# Ops whose output is non-negative whenever their (first) input is.
_MONOTONE_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                     nn.Flatten, nn.Identity, nn.Dropout, ActQuantizer)
_MONOTONE_FUNCS = {torch.flatten, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                   F.adaptive_max_pool2d, torch.mean}
_MONOTONE_METHODS = {"flatten", "mean", "view", "reshape", "contiguous"}


def _is_zero_pad(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Constant zero padding (TF-style "same" padding as in EfficientNet-Lite, nn.ZeroPad2d, F.pad)."""
    if node.op == "call_module":
        mod = modules[node.target]
        return isinstance(mod, nn.ConstantPad2d) and mod.value == 0
    if node.op != "call_function":
        return False
    args = list(node.args) + [None] * 4
    if node.target is torch.ops.aten.constant_pad_nd.default:
        return not args[2] and not node.kwargs.get("value")
    if node.target in (F.pad, torch.ops.aten.pad.default):
        mode = node.kwargs.get("mode", args[2] or "constant")
        return mode == "constant" and not node.kwargs.get("value", args[3])
    return False


def op_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """Classify an FX node into the kinds the placement registry knows."""
    if _is_zero_pad(node, modules):
        return "pad"
    if node.op == "call_module":
        mod = modules[node.target]
        if isinstance(mod, nn.Conv2d):
            return "conv"
        if isinstance(mod, nn.Linear):
            return "linear"
        if isinstance(mod, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
            return "maxpool"
        if isinstance(mod, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            return "avgpool"
        if isinstance(mod, _RELU_MODULES):
            return "relu"
    elif node.op == "call_function":
        if node.target in (operator.add, operator.iadd, torch.add):
            return "add"
        if node.target is torch.cat:
            return "cat"
        if node.target in (F.max_pool2d, F.adaptive_max_pool2d):
            return "maxpool"
        if node.target in (F.avg_pool2d, F.adaptive_avg_pool2d):
            return "avgpool"
        if node.target in _RELU_FUNCS:
            return "relu"
    elif node.op == "call_method" and node.target == "mean":
        return "avgpool"
    return None


def _keeps_sign(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True for ops whose output is non-negative whenever their first input is."""
    return (_is_zero_pad(node, modules)
            or (node.op == "call_module" and isinstance(modules[node.target], _MONOTONE_MODULES))
            or (node.op == "call_function" and node.target in _MONOTONE_FUNCS)
            or (node.op == "call_method" and node.target in _MONOTONE_METHODS))


def _relu_source(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The ReLU (or ReLU6) whose output ``node`` is, through ops that keep sign and bound (pools,
    reshapes, zero padding, quantizers); None when there is none."""
    while op_kind(node, modules) != "relu":
        if not (_keeps_sign(node, modules) and node.args and isinstance(node.args[0], fx.Node)):
            return None
        node = node.args[0]
    return node


def is_nonnegative(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True when the tensor is provably >= 0 (a ReLU output, possibly through pools/reshapes)."""
    return _relu_source(node, modules) is not None


def upper_bound(node: fx.Node, modules: dict[str, nn.Module]) -> float | None:
    """6 for a ReLU6 output (possibly through pools/reshapes), else None: the quantizer's range must
    not exceed it, or ONNX Runtime keeps the Clip and cannot fuse the conv into an integer kernel."""
    relu = _relu_source(node, modules)
    relu6 = relu is not None and ((relu.op == "call_module" and isinstance(modules[relu.target], nn.ReLU6))
                                  or (relu.op == "call_function" and relu.target is F.relu6))
    return 6.0 if relu6 else None


# --- placement rules: (node, profile, modules) -> positions of node.args to quantize -----------------

def _first_input(node: fx.Node, profile: Profile, modules: dict[str, nn.Module]) -> list[int]:  # noqa: ARG001
    return [0]


def _add_inputs(node: fx.Node, profile: Profile, modules: dict[str, nn.Module]) -> list[int]:
    args = [i for i, a in enumerate(node.args[:2]) if isinstance(a, fx.Node)]
    if len(args) < 2:
        return []
    if profile.add_quantizes_both_inputs:
        return args
    # TensorRT: Q/DQ on the shortcut only, so the add fuses into the other branch's conv epilogue.
    # The shortcut is the operand that is not a conv output, whichever side of the + it is on.
    from_conv = [op_kind(node.args[i], modules) == "conv" for i in args]
    if from_conv.count(True) == 1:
        return [args[from_conv.index(False)]]
    return [args[-1]]


def _cat_inputs(node: fx.Node, profile: Profile, modules: dict[str, nn.Module]) -> list[int]:  # noqa: ARG001
    return [0]  # args[0] is the list of tensors; handled as one shared quantizer


PLACEMENT: dict[str, Callable[[fx.Node, Profile, dict[str, nn.Module]], list[int]]] = {
    "conv": _first_input,
    "linear": _first_input,
    "avgpool": _first_input,
    "maxpool": _first_input,
    "pad": _first_input,
    "add": _add_inputs,
    "cat": _cat_inputs,
}


@dataclass
class FakeQuantModel:
    """The fake-quant model and what the calibration and export stages need to know about it."""

    module: fx.GraphModule
    config: QuantConfig
    act_quantizers: dict[str, ActQuantizer] = field(default_factory=dict)
    weight_layers: dict[str, nn.Module] = field(default_factory=dict)

    def set_mode(self, mode: str) -> None:
        """Put every activation quantizer in ``observe``, ``quant`` or ``off`` and weights on/off."""
        for q in self.act_quantizers.values():
            q.mode = mode
        for layer in self.weight_layers.values():
            layer.weight_quantizer.enabled = mode == "quant" and not layer.weight_quantizer.floating

    def fold_affine(self) -> None:
        """Fold every QPRep affine layer into its weight scales and bias (exact; see fold_affine)."""
        for layer in self.weight_layers.values():
            layer.fold_affine()

    def freeze_for_export(self) -> None:
        """Fold affine layers and fix the integer weights from the current scales (right before export)."""
        self.fold_affine()
        for layer in self.weight_layers.values():
            layer.freeze_integer_weight()

    def layer_tensors(self) -> dict[str, torch.Tensor]:
        """Weights and biases of the quantized layers (calibration may change them, e.g. QPRep's fold)."""
        out = {}
        for name, layer in self.weight_layers.items():
            out[f"{name}.weight"] = layer.weight.detach().clone()
            if layer.bias is not None:
                out[f"{name}.bias"] = layer.bias.detach().clone()
        return out

    def load_layer_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`layer_tensors`."""
        with torch.no_grad():
            for name, layer in self.weight_layers.items():
                layer.weight.copy_(tensors[f"{name}.weight"])
                if f"{name}.bias" in tensors:
                    if layer.bias is None:
                        layer.bias = torch.nn.Parameter(tensors[f"{name}.bias"].clone())
                    else:
                        layer.bias.copy_(tensors[f"{name}.bias"])

    def scales(self) -> dict[str, torch.Tensor]:
        """All scales by quantizer name (the heart of ``qstate.pt``)."""
        out = {f"{n}.act": q.scale.detach().clone() for n, q in self.act_quantizers.items()}
        out.update({f"{n}.weight": m.weight_quantizer.scale.detach().clone()
                    for n, m in self.weight_layers.items()})
        return out

    def load_scales(self, scales: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`scales`; raises on a state from a different model or config."""
        expected = set(self.scales())
        if set(scales) != expected:
            missing, extra = sorted(expected - set(scales)), sorted(set(scales) - expected)
            raise DeployError(f"quantization state does not match the model (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}); re-run calibrate with `force`")
        with torch.no_grad():
            for n, q in self.act_quantizers.items():
                q.scale.copy_(scales[f"{n}.act"])
            for n, m in self.weight_layers.items():
                m.weight_quantizer.scale.copy_(scales[f"{n}.weight"])


def traced(model: nn.Module) -> fx.GraphModule:
    """``model`` as a torch.fx graph (itself when it is one already)."""
    try:
        return model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    except Exception as exc:  # tracing errors come from arbitrary user code
        raise DeployError(f"cannot trace the fused model with torch.fx ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160]}); models with data-dependent control flow "
                          "are not supported") from exc


def place_quantizers(fused: nn.Module, config: QuantConfig) -> FakeQuantModel:
    """Trace ``fused`` (a copy; the model stays as it is) and insert weight and activation quantizers
    per ``config``'s profile. Graph rewrites run before this (``calibrate.prepare``)."""
    gm = copy.deepcopy(traced(fused))  # the fused model stays as it is
    modules = dict(gm.named_modules())
    graph = gm.graph
    profile = config.scheme
    nodes = list(graph.nodes)
    weighted = [n for n in nodes if op_kind(n, modules) in ("conv", "linear")]
    if not weighted:
        raise DeployError("the model has no Conv2d or Linear layer to quantize")
    # Literature convention: the first conv and the classifier keep first_last_bits.
    edge = {weighted[0].name, weighted[-1].name}
    qm = FakeQuantModel(gm, config)

    for node in weighted:
        mod = modules[node.target]
        bits = config.first_last_bits if node.name in edge else config.bits
        cls = QuantConv2d if isinstance(mod, nn.Conv2d) else QuantLinear
        qlayer = cls.from_float(mod, profile.weight_format(bits))
        _set_submodule(gm, node.target, qlayer)
        qm.weight_layers[node.target] = qlayer
    modules = dict(gm.named_modules())

    quantized_of: dict[str, fx.Node] = {}

    def new_quantizer(bits: int, nonneg: bool, upper: float | None = None) -> str:
        name = f"act_quant_{len(qm.act_quantizers)}"
        fmt = profile.activation_format(bits, nonneg)
        aq = ActQuantizer(fmt, nonneg, profile.integer_clip, upper,
                          zero_point=128 if fmt.signed and profile.signed_as_uint8 else 0)
        gm.add_submodule(name, aq)
        qm.act_quantizers[name] = modules[name] = aq
        return name

    def quantized(src: fx.Node, bits: int) -> fx.Node:
        if src.name in quantized_of:
            return quantized_of[src.name]
        if op_kind(src, modules) in ("maxpool", "pad") and isinstance(src.args[0], fx.Node):
            # MaxPool and zero padding commute with Q/DQ (zero points are 0): the output reuses the
            # input's scale (tied). Without this a ReLU6 -> Pad -> conv chain leaves the conv
            # before the Pad in float on ONNX Runtime (its Clip is not followed by a Q). The input
            # may already read a quantizer (the op's own input rule ran first).
            inp = src.args[0]
            already = inp.op == "call_module" and isinstance(modules.get(inp.target), ActQuantizer)
            target = inp.target if already else quantized(inp, bits).target
        else:
            target = new_quantizer(bits, is_nonnegative(src, modules), upper_bound(src, modules))
        with graph.inserting_after(src):
            qn = graph.call_module(target, (src,))
        quantized_of[src.name] = qn
        return qn

    def existing_quantizer(t: fx.Node) -> str | None:
        if t.op == "call_module" and isinstance(modules.get(t.target), ActQuantizer):
            return t.target
        if t.name in quantized_of:
            return quantized_of[t.name].target
        if op_kind(t, modules) in ("maxpool", "pad") and isinstance(t.args[0], fx.Node):
            return existing_quantizer(t.args[0])
        return None

    def feeds_weighted(t: fx.Node) -> bool:
        return any(op_kind(u, modules) in ("conv", "linear")
                   or (op_kind(u, modules) in ("maxpool", "pad") and feeds_weighted(u)) for u in t.users)

    for node in nodes:
        kind = op_kind(node, modules)
        rule = PLACEMENT.get(kind)
        if rule is None:
            continue
        bits = config.first_last_bits if node.name in edge else config.bits
        if kind == "cat":
            tensors = node.args[0]
            nonneg = all(is_nonnegative(t, modules) for t in tensors)
            # One scale for all inputs and the output. An input that already carries a scale (a
            # nested concat, or a MaxPool tied to its input) lends it, so those ties hold too.
            lent = [q for q in (existing_quantizer(t) for t in tensors)
                    if q is not None and (modules[q].fmt.signed or nonneg)]
            shared = lent[0] if lent else new_quantizer(bits, nonneg)
            qs = []
            for t in tensors:
                with graph.inserting_after(t):
                    qs.append(graph.call_module(shared, (t,)))
            node.update_arg(0, type(tensors)(qs))
            with graph.inserting_after(node):
                quantized_of[node.name] = graph.call_module(shared, (node,))
            continue
        for pos in rule(node, profile, modules):
            src = node.args[pos]
            if isinstance(src, fx.Node):
                # A tensor that no weighted layer reads is quantized only because the engine's
                # integer Add needs it (ONNX Runtime's QLinearAdd; TensorRT's fused shortcut): W6A6
                # means 6-bit inputs to the weighted layers, and such a tensor keeps add_bits.
                add_only = kind == "add" and not feeds_weighted(src)
                qn = quantized(src, max(bits, config.add_bits) if add_only else bits)
                node.update_arg(pos, qn)
                if kind in ("conv", "linear") and profile.int32_bias:
                    qm.weight_layers[node.target].attach_input_quantizer(modules[qn.target])
    graph.eliminate_dead_code()
    if config.offset_relu != "none":
        _offset_relu_grids(qm, modules, padded=config.offset_relu == "all")
    for name in config.fallback:
        if name not in qm.act_quantizers:
            raise DeployError(f"fallback quantizer {name}: not in this model; re-run calibrate with `force`")
        raise_precision(qm, name)
    graph.lint()
    gm.recompile()
    return qm


def readers(qm: FakeQuantModel, name: str) -> list[str]:
    """The weighted layers (conv/linear) that read activation quantizer ``name``'s output."""
    return sorted({u.target for n in qm.module.graph.nodes if n.op == "call_module" and n.target == name
                   for u in n.users if u.op == "call_module" and u.target in qm.weight_layers})


def raise_precision(qm: FakeQuantModel, name: str) -> None:
    """One precision step up for activation quantizer ``name`` and the weights of the layers reading it:
    a sub-8-bit grid becomes 8-bit (same clipping range), an 8-bit one stays in float (FP16 in a
    TensorRT graph). Scales are converted where they exist; a model rebuilt from ``QuantConfig.fallback``
    gets them from its quantization state."""
    profile = qm.config.scheme
    q = qm.act_quantizers[name]
    layers = [qm.weight_layers[t] for t in readers(qm, name)]
    if q.fmt.bits >= 8:
        q.floating = True
        for layer in layers:
            layer.weight_quantizer.floating = True
            layer.weight_quantizer.enabled = False
        return
    fmt = profile.activation_format(8, q.nonnegative)
    with torch.no_grad():
        q.scale.mul_(q.fmt.qmax / fmt.qmax)
    q.fmt, q.zero_point = fmt, 128 if fmt.signed and profile.signed_as_uint8 else 0
    for layer in layers:
        wq = layer.weight_quantizer
        if wq.fmt.bits < 8:
            wfmt = profile.weight_format(8)
            with torch.no_grad():
                wq.scale.mul_(wq.fmt.qmax / wfmt.qmax)
            wq.fmt = wfmt

def _offset_relu_grids(qm: FakeQuantModel, modules: dict[str, nn.Module], padded: bool) -> None:
    """Give 8-bit non-negative quantizers the offset grid [0, 255] (IntFormat.offset) where every
    reader is a linear layer or a conv (without zero padding unless ``padded``): only those can take
    the stored tensor's -128 s back through their bias (export.onnx folds it). A pool, pad, add or
    concat reading the tensor keeps the [0, 127] grid."""
    profile = qm.config.scheme
    readers: dict[str, list[fx.Node]] = {}
    for node in qm.module.graph.nodes:
        if node.op == "call_module" and node.target in qm.act_quantizers:
            readers.setdefault(node.target, []).extend(node.users)
    for name, users in readers.items():
        aq = qm.act_quantizers[name]
        if not (aq.nonnegative and aq.fmt.bits == 8 and users):
            continue
        if all(_takes_offset(u, modules, padded) for u in users):
            aq.fmt = profile.activation_format(8, True, offset=True)


def _takes_offset(node: fx.Node, modules: dict[str, nn.Module], padded: bool) -> bool:
    kind = op_kind(node, modules)
    if kind == "linear":
        return True
    if kind != "conv":
        return False
    conv = modules[node.target]
    unpadded = all(p == 0 for p in conv.padding) if isinstance(conv.padding, tuple) else conv.padding == "valid"
    return conv.padding_mode == "zeros" and (padded or unpadded)


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, child = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
