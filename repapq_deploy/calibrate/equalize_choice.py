"""Recipe key ``equalize: auto``: which cross-layer equalization a model gets, measured on calibration images.

Equalizing a conv pair whose second conv is dense moves precision from its weights to the activation
between them (docs/method.md, "Cross-layer equalization"). Whether that pays depends on the model and the grid:
on `mobileone_s0` at W6A6 rescaling every pair halves plain min-max's loss against depthwise pairs
only, while on `repvgg_a0` at W6A6 it costs a range method 3-4 pp of top-1 that the unequalized
model does not lose (docs/benchmarks.md, "What each part of RepAPQ buys"). Reconstruction (repapq, brecq) relearns the
weights and step sizes and was measured with every pair rescaled over three seeds, so it keeps
``all``; a range method sets its ranges once, so ``auto`` calibrates it under each distinct mode and
keeps the one whose logits are closest to the FP32 model's on the calibration images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from repapq_deploy.calibrate.methods import CalibrationResult
from repapq_deploy.calibrate.prepare import quantize_model
from repapq_deploy.calibrate.reconstruct import RECONSTRUCTION
from repapq_deploy.calibrate.registry import calibrate
from repapq_deploy.quant.identity_split import decide_identity_split
from repapq_deploy.quant.placement import FakeQuantModel
from repapq_deploy.quant.scheme import QuantConfig
from repapq_deploy.reparam.equalize import EqualizeReport, equalize

# smallest first, so modes that rescale the same pairs are named by the smallest
CANDIDATES = ("none", "depthwise", "all")


@dataclass
class Calibrated:
    """A model equalized under one mode, split, quantized and calibrated: what the calibrate stage keeps."""

    mode: str
    fused: nn.Module
    equalized: EqualizeReport
    qconfig: QuantConfig
    split_errors: dict[str, tuple[float, float]]
    qm: FakeQuantModel
    result: CalibrationResult


def calibrate_under(mode: str, fused: nn.Module, data: torch.Tensor, config: QuantConfig, method: str,
                    batch_size: int = 32, device: str = "cpu", preset: str = "default", seed: int = 0,
                    overrides: dict | None = None,
                    equalized: tuple[nn.Module, EqualizeReport] | None = None) -> Calibrated:
    """Equalize ``fused`` with ``mode`` (or take ``equalized``, its result), decide the identity splits,
    quantize and calibrate with ``method`` (seeded with ``seed`` first, so every mode starts from the
    same generator state)."""
    torch.manual_seed(seed)
    eq, report = equalized or equalize(fused, data, mode, batch_size)
    qconfig, errors = decide_identity_split(eq, data, config, batch_size)
    qm = quantize_model(eq, qconfig)
    result = calibrate(qm, data, method, batch_size, device=device, preset=preset, seed=seed, overrides=overrides)
    return Calibrated(mode, eq, report, qconfig, errors, qm, result)


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
                        batch_size: int = 32, device: str = "cpu", seed: int = 0,
                        **kwargs) -> tuple[Calibrated, dict[str, float], float]:
    """What ``--equalize auto`` stands for: the calibrated model of the chosen mode, the relative logit
    error of each mode tried (empty for a reconstruction method, which gets ``all`` untried) and the
    seconds the search took. Modes that rescale the same pairs are tried once. ``kwargs`` go to
    :func:`calibrate_under`."""
    if method in RECONSTRUCTION:
        return calibrate_under("all", fused, data, config, method, batch_size, device, seed=seed, **kwargs), {}, 0.0
    t0 = time.perf_counter()
    errors: dict[str, float] = {}
    best: Calibrated | None = None
    seen: set[tuple[str, ...]] = set()
    for mode in CANDIDATES:
        eq = equalize(fused, data, mode, batch_size)
        key = tuple(sorted(eq[1].pairs))
        if key in seen:
            continue
        seen.add(key)
        cand = calibrate_under(mode, fused, data, config, method, batch_size, device, seed=seed, equalized=eq,
                               **kwargs)
        errors[mode] = logit_error(cand.qm.module, cand.fused, data, batch_size)
        if best is None or errors[mode] < errors[best.mode]:
            best = cand
    return best, errors, time.perf_counter() - t0
