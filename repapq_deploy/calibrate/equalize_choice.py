"""``--equalize auto``: which cross-layer equalization a model gets, measured on the calibration images.

Equalizing a conv pair whose second conv is dense moves precision from its weights to the
activation between them (docs/method.md §0b). Whether that pays depends on the model and the grid:
on `mobileone_s0` at W6A6 rescaling every pair halves plain min-max's loss against depthwise pairs
only, while on `repvgg_a0` at W6A6 it costs a range method 3-4 pp of top-1 that the unequalized
model does not lose (docs/benchmarks.md, session 20). Reconstruction (repapq, brecq) relearns the
weights and step sizes and was measured with every pair rescaled over three seeds, so it keeps
``all``; a range method sets its ranges once, so ``auto`` calibrates it under each distinct mode and
keeps the one whose logits are closest to the FP32 model's on the calibration images.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from repapq_deploy.calibrate.methods import calibrate
from repapq_deploy.calibrate.reconstruct import RECONSTRUCTION
from repapq_deploy.quant.identity_split import decide_identity_split
from repapq_deploy.quant.placement import quantize_model
from repapq_deploy.quant.scheme import QuantConfig
from repapq_deploy.reparam.equalize import equalize

# smallest first, so modes that rescale the same pairs are named by the smallest
CANDIDATES = ("none", "depthwise", "all")


def logit_error(quantized: nn.Module, reference: nn.Module, data: torch.Tensor, batch_size: int = 32) -> float:
    """Mean squared output error of ``quantized`` against ``reference`` on ``data``, relative to the
    reference outputs' mean square (0 = identical)."""
    err = ref = 0.0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            x = data[i:i + batch_size]
            want = reference(x).double()
            err += (quantized(x).double() - want).pow(2).sum().item()
            ref += want.pow(2).sum().item()
    return err / max(ref, 1e-300)


def choose_equalization(fused: nn.Module, data: torch.Tensor, config: QuantConfig, method: str,
                        batch_size: int = 32, device: str = "cpu") -> tuple[str, dict[str, float]]:
    """The ``--equalize`` mode ``auto`` stands for, and the relative logit error of each mode tried
    (empty for a reconstruction method). Modes that rescale the same pairs are tried once."""
    if method in RECONSTRUCTION:
        return "all", {}
    errors: dict[str, float] = {}
    seen: dict[tuple[str, ...], str] = {}
    for mode in CANDIDATES:
        eq, report = equalize(fused, data, mode, batch_size)
        key = tuple(sorted(report.pairs))
        if key in seen:
            continue
        seen[key] = mode
        qconfig, _ = decide_identity_split(eq, data, config, batch_size)
        qm = quantize_model(eq, qconfig)
        calibrate(qm, data, method, batch_size, device=device)
        errors[mode] = logit_error(qm.module, eq, data, batch_size)
    return min(errors, key=errors.__getitem__), errors

