"""The calibrate stage: from a fused FP32 model and calibration images to a calibrated fake-quant model.

Cross-layer equalization (``recipe.equalize``), the measured identity split, quantizer placement and
the chosen method run here, in that order; ``save_qstate`` / ``load_qstate`` keep the result as the
stage's artifact (``qstate.pt``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from repapq_deploy.artifacts import save_torch
from repapq_deploy.calibrate.choice import (
    AUTO,
    RECONSTRUCTION_CANDIDATE,
    RECONSTRUCTION_MIN_IMAGES,
    holdout_split,
    validated,
)
from repapq_deploy.calibrate.prepare import quantize_model
from repapq_deploy.calibrate.reconstruct import RECONSTRUCTION, check_recipe
from repapq_deploy.calibrate.registry import calibrator
from repapq_deploy.progress import log
from repapq_deploy.quant.placement import FakeQuantModel
from repapq_deploy.quant.scheme import QuantConfig, resolve_offset_relu
from repapq_deploy.recipe import Recipe


def quant_config(profile: str, bits: int, first_last_bits: int, recipe: Recipe) -> QuantConfig:
    """The quantization scheme a build asks for (first/last layers follow ``bits`` at 8 bits)."""
    return QuantConfig(profile, bits, first_last_bits if bits != 8 else 8, recipe.split_identity,
                       add_bits=recipe.add_bits, offset_relu=resolve_offset_relu(recipe.offset_relu, profile))


def check_method(method: str, recipe: Recipe) -> None:
    """Refuse an unknown method, or a recipe whose reconstruction settings do not apply to ``method``
    (cheap: before any work)."""
    if method != AUTO:
        calibrator(method)
    check_recipe(RECONSTRUCTION_CANDIDATE if method == AUTO else method, recipe.reconstruction_overrides())


@dataclass
class CalibrationOutcome:
    """The calibrate stage's result: the fake-quant model (its ``config`` is the scheme) and the report
    section (with its ``warnings``)."""

    qm: FakeQuantModel
    details: dict

    @property
    def warnings(self) -> list[str]:
        return self.details["warnings"]


def calibrate_model(fused: nn.Module, data: torch.Tensor, config: QuantConfig, method: str, recipe: Recipe,
                    device: str = "cpu", seed: int = 0) -> CalibrationOutcome:
    """Equalize, split, place quantizers on ``fused`` and calibrate them with ``method`` (``auto``: the
    candidate closest to FP32 on held-out calibration images, ``calibrate.choice``) on the images of
    ``data`` that are not held out."""
    check_method(method, recipe)
    fit_idx, held_idx = holdout_split(len(data), recipe.holdout, seed)
    kept, choice = validated(fused, data, fit_idx, held_idx, config, method, equalize=recipe.equalize,
                             preset=recipe.preset, overrides=recipe.reconstruction_overrides(),
                             time_budget=recipe.time_budget, batch_size=recipe.batch_size, device=device, seed=seed)
    done = kept.done
    qconfig, qm, equalized, errors = done.qconfig, done.qm, done.equalized, done.split_errors
    if equalized.pairs:
        log(f"  cross-layer equalization ({done.mode}): {len(equalized.pairs)} conv pairs rescaled")
    if qconfig.split_identity:
        log(f"  identity split: {len(qconfig.split_layers)} of {len(errors)} candidate convs "
            f"(where it at least halves the output error)")
    offset = sum(q.fmt.offset > 0 for q in qm.act_quantizers.values())
    if qconfig.offset_relu != "none":
        log(f"  offset-relu {qconfig.offset_relu}: {offset} of {len(qm.act_quantizers)} activation quantizers "
            "on [0, 255] stored as x - 128 s")
    out = {**done.result.to_dict(), "choice": choice}
    if equalized.pairs:
        out["equalize"] = equalized.to_dict()
    if kept.equalize_auto:
        out["equalize_auto"] = kept.equalize_auto
    if qconfig.offset_relu != "none":
        out["offset_relu"] = {"offset": offset, "quantizers": len(qm.act_quantizers)}
    if qconfig.split_identity:
        out["identity_split"] = {n: {"relative_error": plain, "relative_error_split": split,
                                     "split": n in qconfig.split_layers}
                                 for n, (plain, split) in errors.items()}
    warnings = list(choice["warnings"])
    if method in RECONSTRUCTION and len(data) < RECONSTRUCTION_MIN_IMAGES:
        warnings.append(f"method {method} trained on only {len(data)} calibration images and can over-fit them "
                        f"(EfficientNet-Lite0 on crops of 16-26 photos: worse than percentile); use "
                        f"{RECONSTRUCTION_MIN_IMAGES}+ distinct images, not crops of a few, or use "
                        f"method auto, which validates it on held-out images")
    out["warnings"] = warnings
    return CalibrationOutcome(qm, out)


def save_qstate(qm: FakeQuantModel, method: str, path: Path) -> None:
    """Write the calibrated scales, layer tensors and scheme (``qstate.pt``), atomically."""
    save_torch({"scales": qm.scales(), "layers": qm.layer_tensors(), "config": qm.config.to_dict(),
                "method": method}, path)


def load_qstate(fused: nn.Module, path: Path) -> FakeQuantModel:
    """The fake-quant model a calibrate stage left in ``path`` (``qstate.pt``), on ``fused``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    qm = quantize_model(fused, QuantConfig(**state["config"]))
    qm.load_scales(state["scales"])
    qm.load_layer_tensors(state["layers"])
    qm.set_mode("quant")
    return qm
