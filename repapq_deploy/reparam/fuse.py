"""Structural reparameterization to a single-branch, BatchNorm-free model.

Order of work: (1) each block's own fusion method, as its authors wrote it (timm's
``reparameterize()``, the authors' ``switch_to_deploy()``, YOLOv6's ``fuse()``...);
(2) on the traced graph, BatchNorm folded into the conv before it; (3) on the traced graph, any
remaining parallel conv/BN/identity branches of one input that are summed merged into one conv —
this handles models whose fusion code did not travel with the checkpoint (TorchScript,
``torch.export`` archives). The result is checked against the original on real samples.
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from repapq_deploy.errors import DeployError

FUSE_METHODS = ("reparameterize", "switch_to_deploy", "fuse", "fuse_reparam")
MAX_REL_ERROR = 1e-4


@dataclass
class FuseReport:
    """What fusion did and proof that it preserved the function."""

    blocks_fused: dict[str, int] = field(default_factory=dict)  # method name -> count
    bn_folded: int = 0
    branches_merged: int = 0
    bn_remaining: int = 0
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    convs_after: int = 0
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    samples: int = 0

    def to_dict(self) -> dict:
        # FLOPs counted as 2 x multiply-accumulates of convs and linears
        return {**asdict(self), "flops_before": 2 * self.macs_before, "flops_after": 2 * self.macs_after}


def _call_block_fusers(model: nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    # Children before parents, so a parent's fuse() sees already-fused children.
    for module in reversed(list(model.modules())):
        for name in FUSE_METHODS:
            fn = getattr(module, name, None)
            # a submodule that happens to be called `fuse` (a neck's conv) is not a fusion method
            if not callable(fn) or isinstance(fn, nn.Module) or isinstance(module, (nn.Sequential, nn.ModuleList)):
                continue
            params = [p for p in inspect.signature(fn).parameters.values()
                      if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            if params:
                continue
            result = fn()
            if isinstance(result, nn.Module) and result is not module:
                raise DeployError(f"{type(module).__name__}.{name}() returns a new module; "
                                  "only in-place fusion methods are supported")
            counts[name] = counts.get(name, 0) + 1
            break
    return counts


def _replace(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, child = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, child, module)


def _fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    factor = gamma / std
    with torch.no_grad():
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = beta + (bias - bn.running_mean) * factor
        conv.weight.mul_(factor.view(-1, 1, 1, 1))
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias)
        else:
            conv.bias.copy_(new_bias)


def _bn_remainder(bn: nn.BatchNorm2d) -> nn.Module:
    """What stays of a BN after folding: timm's BatchNormAct2d also applies drop + act."""
    parts = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
             if m is not None and not isinstance(m, (nn.Identity, nn.Dropout))]
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


class _Tracer(fx.Tracer):
    """Keeps every BatchNorm (timm's BatchNormAct2d included) a module call, so it can be folded."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.BatchNorm2d) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` trace with BatchNorm subclasses as leaves; functional convs and linears become modules."""
    if isinstance(model, fx.GraphModule):
        return model
    gm = fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    lift_functional_layers(gm)
    return gm


def layer_from_weights(weight: torch.Tensor, bias: torch.Tensor | None, stride=1, padding=0, dilation=1,
                       groups: int = 1) -> nn.Module:
    """An eval-mode ``nn.Linear`` (2-D weight) or ``nn.Conv2d`` holding copies of ``weight`` and ``bias``."""
    if weight.dim() == 2:
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        module = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride, padding,
                           dilation, groups, bias=bias is not None)
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
    return module.eval()


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def lift_functional_layers(gm: fx.GraphModule) -> int:
    """Turn ``F.conv2d`` / ``F.linear`` calls on the model's own parameters into Conv2d / Linear modules.

    A ``nn.Conv2d`` subclass with its own ``forward`` (TF-"same" padding layers such as
    ``Conv2dStaticSamePadding``) is traced into, leaving a bare ``F.conv2d``: BatchNorm folding,
    quantizer placement and the linter all work on modules, so without this such a model's convs
    would stay in float. Calls whose weights are computed, or whose padding is a string, are left alone.
    """
    def is_param(arg) -> bool:
        return isinstance(arg, fx.Node) and arg.op == "get_attr"

    def value(arg) -> torch.Tensor | None:
        return None if arg is None else operator.attrgetter(arg.target)(gm).detach()

    lifted, moved = 0, []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (F.conv2d, torch.conv2d, F.linear):
            continue
        names = _CONV_ARGS if node.target is not F.linear else _CONV_ARGS[:3]
        call = {**{k: _CONV_DEFAULTS.get(k) for k in names[2:]}, **dict(zip(names, node.args, strict=False)),
                **node.kwargs}
        if (not is_param(call["weight"]) or not (call["bias"] is None or is_param(call["bias"]))
                or isinstance(call.get("padding"), str)):
            continue
        options = {k: call[k] for k in names[3:]}
        module = layer_from_weights(value(call["weight"]), value(call["bias"]), **options)
        # beside the layer that owned the weight, so names (and stage units) keep the model's hierarchy
        owner = call["weight"].target.rpartition(".")[0]
        name = f"{owner}_lifted" if owner else "lifted"
        taken = dict(gm.named_modules())
        if name in taken:  # a weight used by several calls (tied, or another stride): one module each
            name = next(f"{name}_{k}" for k in range(1, len(taken) + 2) if f"{name}_{k}" not in taken)
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (call["input"],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        moved += [a.target for a in (call["weight"], call["bias"]) if a is not None]
        lifted += 1
    if lifted:
        gm.graph.eliminate_dead_code()  # the get_attr nodes of the lifted weights
        gm.delete_all_unused_submodules()
        for target in moved:
            # an owner still in use (its padding child is called) must not keep a second copy
            owner, _, attr = target.rpartition(".")
            try:
                holder = gm.get_submodule(owner) if owner else gm
            except AttributeError:  # the owner went with the unused submodules
                continue
            if attr in holder._parameters and not any(n.op == "get_attr" and n.target == target
                                                      for n in gm.graph.nodes):
                delattr(holder, attr)
        gm.recompile()
    return lifted


def fold_batchnorm(gm: fx.GraphModule) -> int:
    """Fold every BatchNorm2d that directly follows a conv (whose output nothing else reads)."""
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module"
                and isinstance(modules.get(src.target), nn.Conv2d) and len(src.users) == 1):
            continue
        bn = modules[node.target]
        _fold_bn_into_conv(modules[src.target], bn)
        rest = _bn_remainder(bn)
        if isinstance(rest, nn.Identity):  # drop the node so branch merging sees conv outputs
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
        _replace(gm, node.target, rest)
        folded += 1
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded


def _as_conv_branch(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node, nn.Conv2d] | None:
    """Express a branch as (input, equivalent conv): a conv, a standalone BN or an identity."""
    if node.op == "call_module":
        mod = modules[node.target]
        if type(mod) is nn.Conv2d and mod.padding_mode == "zeros":
            return node.args[0], mod
        if type(mod) is nn.BatchNorm2d:
            c = mod.num_features
            conv = nn.Conv2d(c, c, 1, groups=c, bias=False)
            with torch.no_grad():
                conv.weight.fill_(1.0)
            _fold_bn_into_conv(conv, mod)
            return node.args[0], conv
    return None


def _kernel_to(conv: nn.Conv2d, k: tuple[int, int], groups: int) -> torch.Tensor:
    """The conv's weight as a dense (groups-compatible) kernel of size ``k``, centred."""
    w = conv.weight.detach()
    if conv.groups != groups:  # depthwise identity/BN branch into a dense conv
        out_c, in_c = w.shape[0], w.shape[1] * conv.groups // groups
        dense = torch.zeros(out_c, in_c, *w.shape[2:])
        per = out_c // conv.groups
        for o in range(out_c):
            dense[o, (o // per) % in_c] = w[o, 0]
        w = dense
    ph, pw = (k[0] - w.shape[2]) // 2, (k[1] - w.shape[3]) // 2
    return F.pad(w, (pw, pw, ph, ph))


def merge_branches(gm: fx.GraphModule) -> int:
    """Merge ``conv_a(x) + conv_b(x)`` (or BN(x), or x) into one conv, repeatedly."""
    merged = 0
    for node in list(gm.graph.nodes):
        # timm sums branches starting from 0: `0 + conv(x)` would hide the conv from the merge
        if node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2:
            zero = [isinstance(v, (int, float)) and v == 0 for v in node.args]
            keep = node.args[1] if zero[0] else node.args[0] if zero[1] else None
            if isinstance(keep, fx.Node):
                node.replace_all_uses_with(keep)
                gm.graph.erase_node(node)
    changed = True
    while changed:
        changed = False
        modules = dict(gm.named_modules())
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in (operator.add, torch.add) or len(node.args) != 2:
                continue
            if not all(isinstance(a, fx.Node) for a in node.args):
                continue
            # each branch as (its input, equivalent conv); a branch that is neither is an identity
            branches = [(_as_conv_branch(a, modules) if len(a.users) == 1 else None) or (a, None)
                        for a in node.args]
            convs = [c for _, c in branches if c is not None]
            if not convs or branches[0][0] is not branches[1][0]:
                continue
            main = max(convs, key=lambda c: c.kernel_size[0] * c.kernel_size[1])
            if not all(c.stride == main.stride and c.dilation == (1, 1) and
                       all(2 * p == k - 1 for p, k in zip(c.padding, c.kernel_size, strict=True)) for c in convs):
                continue
            identity = any(c is None for _, c in branches)
            if identity and (main.stride != (1, 1) or main.in_channels != main.out_channels):
                continue
            source = branches[0][0]
            groups = main.groups
            k = main.kernel_size
            weight = torch.zeros_like(main.weight)
            bias = torch.zeros(main.out_channels)
            for _, conv in branches:
                if conv is None:  # identity branch
                    conv = nn.Conv2d(main.out_channels, main.out_channels, 1, groups=main.out_channels, bias=False)
                    with torch.no_grad():
                        conv.weight.fill_(1.0)
                weight += _kernel_to(conv, k, groups)
                if conv.bias is not None:
                    bias += conv.bias.detach()
            fused = nn.Conv2d(main.in_channels, main.out_channels, k, main.stride,
                              tuple((kk - 1) // 2 for kk in k), 1, groups, bias=True)
            with torch.no_grad():
                fused.weight.copy_(weight)
                fused.bias.copy_(bias)
            name = f"merged_conv_{merged}"
            gm.add_submodule(name, fused)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (source,))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            gm.graph.eliminate_dead_code()
            merged += 1
            changed = True
            break
    gm.delete_all_unused_submodules()
    gm.recompile()
    return merged


# Split a fused kernel's identity tap off when removing it shrinks most channels' weight range by at
# least this factor (one bit of the per-channel grid).
SPLIT_MIN_GAIN = 2.0


def identity_taps(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(d, rest)``: the per-channel weight ``d`` that ``conv`` applies to its own input channel at
    the kernel centre (what the fused identity/BN branch and 1x1 diagonal put there) and the kernel
    without it; None when ``conv`` cannot carry an identity (stride, dilation, channel count or
    padding do not line up)."""
    kh, kw = conv.kernel_size
    pad = conv.padding if isinstance(conv.padding, tuple) else None
    c = conv.out_channels
    if (conv.in_channels != c or conv.groups not in (1, c) or kh != kw or kh % 2 == 0
            or conv.stride != (1, 1) or conv.dilation != (1, 1) or pad != (kh // 2, kw // 2)
            or conv.padding_mode != "zeros"):
        return None
    k = kh // 2
    rest = conv.weight.detach().clone()
    # the input channel of output channel i is i (groups 1) or its own group's only one (depthwise)
    cols = torch.arange(c) if conv.groups == 1 else torch.zeros(c, dtype=torch.long)
    rows = torch.arange(c)
    d = rest[rows, cols, k, k].clone()
    rest[rows, cols, k, k] = 0
    return d, rest


def split_identity(gm: fx.GraphModule, min_gain: float = SPLIT_MIN_GAIN,
                   only: Iterable[str] | None = None) -> int:
    """Rewrite ``conv(x)`` as ``conv'(x) + d * x`` for the convs named in ``only`` or, without it,
    where the fused kernel's centre diagonal ``d`` dominates its per-channel range (by ``min_gain``);
    return the number of convs split.

    Fusing an identity (or BN-only) branch adds it to one tap per output channel, which then sets the
    channel's quantization range: in a trained RepVGG-A0 the centre tap is the channel maximum in
    81-95 % of the channels and 25-70 % of the other weights round to zero on the 8-bit grid
    (``benchmarks/diagnostics/identity_taps.py``). The split keeps ``d`` as a depthwise 1x1 conv (one weight
    per channel: exact on any per-channel grid) that reads the same quantized input, so only the
    remaining taps go through the weight grid. The result is the same function up to float rounding;
    the cost is one depthwise conv and an add per split block.
    """
    modules = dict(gm.named_modules())
    wanted = None if only is None else set(only)
    split = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.Conv2d):
            continue
        if wanted is not None and node.target not in wanted:
            continue
        conv = modules[node.target]
        taps = identity_taps(conv)
        if taps is None:
            continue
        d, rest = taps
        if wanted is None:
            rest_max = rest.abs().flatten(1).amax(1)
            if not bool((rest_max > 0).all()):
                continue
            gain = conv.weight.detach().abs().flatten(1).amax(1) / rest_max
            if float(gain.median()) < min_gain:
                continue
        with torch.no_grad():
            conv.weight.copy_(rest)
        shortcut = layer_from_weights(d.view(-1, 1, 1, 1), None, groups=len(d))
        name = f"{node.target}_identity"
        gm.add_submodule(name, shortcut)
        with gm.graph.inserting_after(node):
            short = gm.graph.call_module(name, (node.args[0],))
        with gm.graph.inserting_after(short):
            total = gm.graph.call_function(operator.add, (node, short))
        node.replace_all_uses_with(total, delete_user_cb=lambda user, keep=total: user is not keep)
        split += 1
        if wanted is not None:
            wanted.discard(node.target)
    if wanted:
        raise DeployError(f"cannot split the identity taps of {sorted(wanted)[:3]}: no such conv with an "
                          "identity-shaped kernel in this model; re-run calibrate with `force`")
    gm.graph.lint()
    gm.recompile()
    return split


def _stats(model: nn.Module, sample: torch.Tensor) -> tuple[int, int, int]:
    """(parameters, multiply-accumulates per image, conv count) of ``model``."""
    macs = [0]
    convs = [0]

    def hook(mod, inputs, out):
        if isinstance(mod, nn.Conv2d):
            convs[0] += 1
            macs[0] += out[0].numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            macs[0] += out[0].numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(sample[:1])
    finally:
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    return params, macs[0], convs[0]


def fuse_model(model: nn.Module, samples: torch.Tensor) -> tuple[fx.GraphModule, FuseReport]:
    """Fuse ``model`` (left untouched) into a single-branch GraphModule; check it on ``samples``."""
    report = FuseReport(samples=len(samples))
    model = model.eval()
    report.params_before, report.macs_before, _ = _stats(model, samples)
    with torch.no_grad():
        reference = model(samples)
    fused = copy.deepcopy(model)
    report.blocks_fused = _call_block_fusers(fused)
    fused.eval()
    try:
        gm = trace(fused)
    except Exception as exc:  # tracing errors come from arbitrary user code
        raise DeployError(f"cannot trace the model with torch.fx after fusion ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160]})") from exc
    report.bn_folded = fold_batchnorm(gm)
    report.branches_merged = merge_branches(gm)
    report.bn_folded += fold_batchnorm(gm)
    report.bn_remaining = sum(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    report.params_after, report.macs_after, report.convs_after = _stats(gm, samples)
    with torch.no_grad():
        out = gm(samples)
    if not isinstance(out, torch.Tensor) or out.shape != reference.shape:
        raise DeployError("the fused model's output differs in shape from the original's")
    report.max_abs_error = float((out - reference).abs().max())
    report.max_rel_error = report.max_abs_error / max(float(reference.abs().max()), 1e-12)
    if not report.max_rel_error <= MAX_REL_ERROR:
        raise DeployError(f"fusion changed the model's output: max relative error {report.max_rel_error:.2e} "
                          f"> {MAX_REL_ERROR:.0e} on {len(samples)} samples; the model's fusion code is "
                          "inconsistent with its forward (report this model family)")
    return gm.eval(), report
