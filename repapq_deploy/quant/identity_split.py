"""Which fused convs get their identity taps split off (``reparam.split_identity``), decided on data.

The split trades one error for another. It takes the fused identity/diagonal out of the weight grid
(the centre tap that sets a RepVGG channel's range), but the shortcut ``d * x`` it creates is one more
tensor to quantize — and under the ONNX Runtime profile the main conv's output is requantized too,
because QLinearAdd takes two quantized inputs. Which side wins depends on the weights, the bit width
and the profile (``benchmarks/diagnostics/identity_taps.py``, 8 and 6 bits): in a trained RepVGG-A0 the split
cuts every 3x3 block's output error 3-180x under both profiles; in MobileOne-S0 it cuts its 1x1
convs' error up to 20x under the TensorRT scheme, changes it by 0.2-1.5x under ONNX Runtime's (where
the requantized main output eats the gain), and always hurts its depthwise 3x3 convs. So each
candidate conv is measured on the calibration images with min-max grids of the configured profile
and bit widths, and split only where that at least halves its output error.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from repapq_deploy.quant.fakequant import fake_quant
from repapq_deploy.quant.scheme import IntFormat, QuantConfig
from repapq_deploy.reparam.fuse import identity_taps

# split where the layer's output error at least halves (the shortcut costs a depthwise conv and an add)
MIN_ERROR_RATIO = 2.0
# calibration images used for the decision (two forward passes over them)
MAX_IMAGES = 256


def _act_quant(t: torch.Tensor, absmax: float, nonneg: bool, config: QuantConfig, bits: int) -> torch.Tensor:
    fmt = config.scheme.activation_format(bits, nonneg)
    return fake_quant(t, torch.tensor(max(absmax, 1e-12) / fmt.qmax), fmt)


def _weight_quant(w: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    scale = w.abs().flatten(1).amax(1).clamp_min(1e-12) / fmt.qmax
    return fake_quant(w, scale.view(-1, 1, 1, 1), fmt)


@torch.no_grad()
def layer_split_errors(fused: nn.Module, data: torch.Tensor, config: QuantConfig,
                       batch_size: int = 32) -> dict[str, tuple[float, float]]:
    """``{conv: (error without split, error with split)}`` for every conv that can carry an identity:
    the mean squared output error (relative to the output's mean square) against the float conv on
    the same quantized input, with per-tensor min-max activation and per-channel min-max weight grids
    of ``config``'s profile and bit widths."""
    gm = fused if isinstance(fused, fx.GraphModule) else fx.symbolic_trace(fused)
    modules = dict(gm.named_modules())
    weighted = [n.target for n in gm.graph.nodes
                if n.op == "call_module" and isinstance(modules[n.target], (nn.Conv2d, nn.Linear))]
    candidates = {name: (modules[name], taps) for name in weighted
                  if isinstance(modules[name], nn.Conv2d) and (taps := identity_taps(modules[name])) is not None}
    if not candidates:
        return {}
    edge = {weighted[0], weighted[-1]}
    data = data[:MAX_IMAGES]
    # pass 1: the ranges of each candidate's input, main-conv output and shortcut
    ranges: dict[str, list[float]] = {name: [0.0, 0.0, 0.0, 0.0] for name in candidates}  # |x|, min x, |main|, |short|
    # pass 2: summed squared errors and the reference's squared sum
    sums: dict[str, list[float]] = {name: [0.0, 0.0, 0.0] for name in candidates}

    both = config.scheme.add_quantizes_both_inputs

    def hook(name: str, second: bool):
        conv, (d, rest) = candidates[name]
        bits = config.first_last_bits if name in edge else config.bits
        add_bits = max(bits, config.add_bits)  # the main output and shortcut feed only the Add
        if second:  # the weight grids do not change from batch to batch
            wfmt = config.scheme.weight_format(bits)
            w_plain, w_rest = _weight_quant(conv.weight, wfmt), _weight_quant(rest, wfmt)

        def run(mod, inputs, out):
            x = inputs[0]
            r = ranges[name]
            if not second:
                r[0], r[1] = max(r[0], float(x.abs().max())), min(r[1], float(x.min()))
                if both:  # only ONNX Runtime quantizes the main conv's output
                    r[2] = max(r[2], float(mod._conv_forward(x, rest, mod.bias).abs().max()))
                r[3] = max(r[3], float((x * d.view(1, -1, 1, 1)).abs().max()))
                return
            xq = _act_quant(x, r[0], r[1] >= 0, config, bits)
            ref = mod._conv_forward(xq, mod.weight, mod.bias)
            plain = mod._conv_forward(xq, w_plain, mod.bias)
            main = mod._conv_forward(xq, w_rest, mod.bias)
            short = xq * d.view(1, -1, 1, 1)
            nonneg_short = r[1] >= 0 and bool((d >= 0).all())
            split = ((_act_quant(main, r[2], False, config, add_bits) if both else main)
                     + _act_quant(short, r[3], nonneg_short, config, add_bits))
            s = sums[name]
            s[0] += float(F.mse_loss(plain, ref, reduction="sum"))
            s[1] += float(F.mse_loss(split, ref, reduction="sum"))
            s[2] += float(ref.pow(2).sum())
        return run

    for second in (False, True):
        handles = [conv.register_forward_hook(hook(name, second)) for name, (conv, _) in candidates.items()]
        try:
            for i in range(0, len(data), batch_size):
                gm(data[i:i + batch_size])
        finally:
            for h in handles:
                h.remove()
    return {name: (s[0] / max(s[2], 1e-30), s[1] / max(s[2], 1e-30)) for name, s in sums.items()}


def choose_identity_splits(errors: dict[str, tuple[float, float]]) -> tuple[str, ...]:
    """The convs to split, from :func:`layer_split_errors`: those whose output error the split at
    least halves (``MIN_ERROR_RATIO``)."""
    return tuple(name for name, (plain, split) in errors.items() if split * MIN_ERROR_RATIO <= plain)


def decide_identity_split(fused: nn.Module, data: torch.Tensor, config: QuantConfig,
                          batch_size: int = 32) -> tuple[QuantConfig, dict[str, tuple[float, float]]]:
    """``config`` with ``split_layers`` measured on ``data`` (what the calibrate stage records), and
    the :func:`layer_split_errors` behind it; ``config`` unchanged when it does not split."""
    if not config.split_identity:
        return config, {}
    errors = layer_split_errors(fused, data, config, batch_size)
    return replace(config, split_layers=choose_identity_splits(errors)), errors
