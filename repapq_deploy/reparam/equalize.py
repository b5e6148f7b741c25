"""Cross-layer equalization of the fused model (Nagel et al., "Data-Free Quantization", ICCV 2019).

A conv ``a`` whose only reader is a positively homogeneous op chain (ReLU, identity) feeding one
conv ``b`` computes the same function when output channel ``c`` of ``a`` (weights and bias) is
multiplied by ``s_c > 0`` and input channel ``c`` of ``b`` is divided by it. Per-tensor activation
quantization of the tensor between them then sees channel ranges ``s_c * r_c`` instead of ``r_c``.

- ``b`` depthwise: its weights are quantized per channel, as are ``a``'s, so the rescaling costs no
  weight precision; ``s_c = R / r_c`` (``R`` the largest channel range) gives every channel of the
  shared activation grid the full range. This is the pair MobileOne repeats (1x1 -> ReLU ->
  depthwise 3x3).
- ``b`` dense: its per-output-channel grid is shared by all input channels, so the rescaling moves
  precision between weights and activations; DFQ's balance ``s_c ~ sqrt(w_c / r_c)`` is used, with
  ``w_c`` the largest |weight| of ``b``'s input channel ``c`` relative to its output channel's largest
  (the share of its row's grid that channel uses), scaled so that the largest channel range stays
  ``R``.

The channel ranges ``r_c`` are measured on calibration images (max |x| per channel). Scales are kept
within ``[1 / MAX_SCALE, MAX_SCALE]``; channels that never fire keep ``s_c = 1``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

EQUALIZE_MODES = ("none", "depthwise", "all")
MAX_SCALE = 64.0
_PASS_MODULES = (nn.ReLU, nn.Identity, nn.Dropout)
_PASS_FUNCS = {F.relu, torch.relu}


@dataclass
class EqualizeReport:
    """What equalization did: the (producer, consumer) pairs rescaled and their scale ranges."""

    mode: str
    pairs: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "pairs": self.pairs}


def _passes(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _PASS_MODULES)
    return node.op == "call_function" and node.target in _PASS_FUNCS


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups == conv.in_channels and conv.groups > 1


def find_pairs(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """``(a, b)`` module names of every conv ``a`` whose output reaches only conv ``b`` through
    ReLU / identity ops, with ``b`` dense (groups 1) or depthwise."""
    modules = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.Conv2d):
            continue
        cur = node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if nxt.args[:1] != (cur,) or len(nxt.all_input_nodes) != 1:
                break
            if nxt.op == "call_module" and isinstance(modules[nxt.target], nn.Conv2d):
                b = modules[nxt.target]
                if b.groups == 1 or _is_depthwise(b):
                    pairs.append((node.target, nxt.target))
                break
            if not _passes(nxt, modules):
                break
            cur = nxt
    return pairs


def _channel_ranges(gm: fx.GraphModule, consumers: list[str], data: torch.Tensor,
                    batch_size: int) -> dict[str, torch.Tensor]:
    modules = dict(gm.named_modules())
    ranges: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_mod, args):
            r = args[0].detach().abs().amax(dim=(0, 2, 3))
            ranges[name] = r if name not in ranges else torch.maximum(ranges[name], r)
        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in consumers]
    try:
        with torch.no_grad():
            for i in range(0, len(data), batch_size):
                gm(data[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    return ranges


def _scales(b: nn.Conv2d, r: torch.Tensor, alpha: float) -> torch.Tensor:
    live = r > 0
    if not live.any():
        return torch.ones_like(r)
    big = r.max()
    if _is_depthwise(b):
        s = big / r.clamp_min(1e-30)
    else:
        # per input channel, relative to each output channel's own grid (weights are per-channel)
        wa = b.weight.detach().abs().flatten(2).amax(2)
        w = (wa / wa.amax(1, keepdim=True).clamp_min(1e-30)).amax(0)
        if alpha == 0.5:
            # DFQ's balance, computed as before alpha existed so that its builds stay bit-identical
            s = torch.sqrt(w / r.clamp_min(1e-30))
        else:
            s = w.clamp_min(1e-30).pow(1 - alpha) / r.clamp_min(1e-30).pow(alpha)
        s = s * big / (r * s)[live].max()
    s = s.clamp(1 / MAX_SCALE, MAX_SCALE)
    return torch.where(live, s, torch.ones_like(s))


def equalize(fused: fx.GraphModule, data: torch.Tensor, mode: str = "all",
             batch_size: int = 32, alpha: float = 0.5) -> tuple[fx.GraphModule, EqualizeReport]:
    """A copy of ``fused`` with cross-layer equalization applied to the pairs ``mode`` selects
    (``depthwise``: pairs whose consumer is depthwise; ``all``: every pair; ``none``: a plain copy);
    ``alpha`` is the migration strength of dense pairs (module docstring)."""
    if mode not in EQUALIZE_MODES:
        raise ValueError(f"equalize mode {mode!r}; choose one of {EQUALIZE_MODES}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"equalize alpha {alpha}; choose a value in [0, 1]")
    gm = copy.deepcopy(fused)
    report = EqualizeReport(mode)
    if mode == "none":
        return gm, report
    modules = dict(gm.named_modules())
    pairs = [(a, b) for a, b in find_pairs(gm) if mode == "all" or _is_depthwise(modules[b])]
    ranges = _channel_ranges(gm, [b for _, b in pairs], data, batch_size)
    with torch.no_grad():
        for a_name, b_name in pairs:
            a, b = modules[a_name], modules[b_name]
            s = _scales(b, ranges[b_name], alpha).to(a.weight.dtype)
            a.weight.mul_(s.view(-1, *[1] * (a.weight.dim() - 1)))
            if a.bias is not None:
                a.bias.mul_(s)
            if _is_depthwise(b):
                # output channel o of a depthwise conv reads input channel o // multiplier
                b.weight.div_(s.repeat_interleave(b.out_channels // b.in_channels).view(-1, 1, 1, 1))
            else:
                b.weight.div_(s.view(1, -1, 1, 1))
            report.pairs[f"{a_name}->{b_name}"] = {"depthwise": _is_depthwise(b), "scale_min": float(s.min()),
                                                   "scale_max": float(s.max())}
    return gm, report
