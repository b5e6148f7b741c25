"""GPTQ weight rounding (Frantar et al., 2023) for the convolutions and linears of one unit.

Round-to-nearest rounds each weight on its own; GPTQ rounds the input columns of a layer one at a
time and moves each rounding error onto the columns not yet rounded, weighted by the inverse of the
layer's input second moment ``H = sum x x^T`` (im2col patches for a convolution). That minimises
``||(W - Q) X||`` for the layer's real inputs in closed form: nothing is trained, so it cannot
over-fit the calibration images the way learned weights do, and ``H`` is estimated from every
spatial position of every image. The grid is the layer's current per-channel weight scale; the result
is written back as dequantized weights, which round-to-nearest (training, the fold, export) then
reproduces exactly.
"""

from __future__ import annotations

from contextlib import suppress

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from repapq_deploy.quant.fakequant import QuantConv2d, QuantLinear

DAMP = 0.01  # of the mean diagonal of H, as in the GPTQ reference implementation
BLOCK = 128  # columns updated lazily together (same result, matrix products instead of outer products)


class _Collected(Exception):
    """Raised by the input hook once the target layer has seen its batch: the rest of the unit is not needed."""


def _columns(layer: QuantConv2d | QuantLinear, x: torch.Tensor) -> list[torch.Tensor]:
    """The layer's input as rows of its matrix product, one (rows, fan-in) matrix per group."""
    if isinstance(layer, QuantLinear):
        return [x.reshape(-1, x.shape[-1])]
    padding = layer.padding
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = 0
    patches = F.unfold(x, layer.kernel_size, layer.dilation, padding, layer.stride).transpose(1, 2)
    per = patches.shape[-1] // layer.groups
    return [patches[..., g * per:(g + 1) * per].reshape(-1, per) for g in range(layer.groups)]


@torch.no_grad()
def input_moments(module: nn.Module, layer: QuantConv2d | QuantLinear, x: torch.Tensor, batch_size: int,
                  device: str) -> list[torch.Tensor]:
    """``sum x x^T`` of ``layer``'s inputs (per group, float64) over ``module`` applied to all of ``x``."""
    moments: list[torch.Tensor] = []

    def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        for g, cols in enumerate(_columns(layer, args[0])):
            h = (cols.T @ cols).double()
            if len(moments) <= g:
                moments.append(h)
            else:
                moments[g] += h
        raise _Collected

    handle = layer.register_forward_pre_hook(hook)
    try:
        for i in range(0, len(x), batch_size):
            with suppress(_Collected):  # raised by the hook once the layer's input is collected
                module(x[i:i + batch_size].to(device, torch.float32))
    finally:
        handle.remove()
    return moments


@torch.no_grad()
def gptq_round(weight: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int,
               moments: list[torch.Tensor]) -> torch.Tensor:
    """``weight`` (out, ...) rounded by GPTQ onto the per-output-channel grid ``scale * [qmin, qmax]``,
    given the input moments of each group; returns the dequantized weights."""
    out = weight.shape[0]
    per_group = out // len(moments)
    w_all = weight.reshape(out, -1).double()
    q_all = torch.empty_like(w_all)
    for g, h in enumerate(moments):
        rows = slice(g * per_group, (g + 1) * per_group)
        w, s = w_all[rows].clone(), scale[rows].double().view(-1, 1)
        h = h.clone()
        dead = torch.diag(h) == 0  # inputs that are always zero: their weights never matter
        h[dead, dead] = 1
        w[:, dead] = 0
        h += DAMP * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype, device=h.device)
        # the upper Cholesky factor of H^-1 gives every step's error propagation in one go
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
        q = torch.empty_like(w)
        for start in range(0, w.shape[1], BLOCK):
            end = min(start + BLOCK, w.shape[1])
            block, errors = w[:, start:end].clone(), torch.empty(w.shape[0], end - start, dtype=w.dtype)
            hb = hinv[start:end, start:end]
            for i in range(end - start):
                col = block[:, i:i + 1]
                rounded = torch.clamp(torch.round(col / s), qmin, qmax) * s
                q[:, start + i:start + i + 1] = rounded
                err = (col - rounded) / hb[i, i]
                block[:, i:] -= err * hb[i:i + 1, i:]
                errors[:, i:i + 1] = err
            w[:, end:] -= errors @ hinv[start:end, end:]
        q_all[rows] = q
    return q_all.reshape(weight.shape).to(weight.dtype)


@torch.no_grad()
def gptq_unit(module: nn.Module, x: torch.Tensor, batch_size: int, device: str) -> int:
    """Round every weight layer of ``module`` (a reconstruction unit, quantizers on) by GPTQ, in
    execution order, each from the inputs it gets with the layers before it already rounded; ``x`` is
    the unit's input. Returns the number of layers rounded."""
    modules = dict(module.named_modules())
    order = ([modules[n.target] for n in module.graph.nodes if n.op == "call_module"]
             if isinstance(module, fx.GraphModule) else list(modules.values()))
    rounded_layers = 0
    for layer in (m for m in order if isinstance(m, (QuantConv2d, QuantLinear))):
        wq = layer.weight_quantizer
        moments = input_moments(module, layer, x, batch_size, device)
        if not moments:  # not reached by this unit's forward pass
            continue
        rounded = gptq_round(layer.weight.detach().cpu(), wq.scale.detach().cpu(), wq.fmt.qmin, wq.fmt.qmax,
                             [m.cpu() for m in moments])
        layer.weight.copy_(rounded.to(layer.weight.device))
        rounded_layers += 1
    return rounded_layers
