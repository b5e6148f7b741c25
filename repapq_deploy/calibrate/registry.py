"""Every calibration method behind one interface, by name: the range methods (``calibrate.methods``)
and the reconstruction methods (``calibrate.reconstruct``), in the way ONNX Runtime's ``calibrate.py``
offers its calibrators.
"""

from __future__ import annotations

import resource
import time
from abc import ABC, abstractmethod

import torch

from repapq_deploy.calibrate.methods import (
    METHODS,
    CalibrationResult,
    RangeMethod,
    calibration_numerics,
    resolve_device,
    set_ranges,
)
from repapq_deploy.calibrate.reconstruct import RECONSTRUCTION, ReconSettings, check_recipe, reconstruct
from repapq_deploy.errors import ConfigError
from repapq_deploy.quant.placement import FakeQuantModel


class Calibrator(ABC):
    """Sets every scale of a fake-quant model from calibration data; returns details for the report."""

    name: str
    reconstruction = False

    @abstractmethod
    def run(self, qm: FakeQuantModel, data: torch.Tensor, batch_size: int, device: str, preset: str, seed: int,
            overrides: dict) -> dict: ...


class RangeCalibrator(Calibrator):
    """One statistic per tensor (seconds): the range method for activations and weights alike."""

    def __init__(self, method: RangeMethod) -> None:
        self.name, self.method = method.name, method

    def run(self, qm, data, batch_size, device, preset, seed, overrides) -> dict:  # noqa: ARG002
        set_ranges(qm, data, self.method, self.method, batch_size, device)
        return {}


class ReconstructionCalibrator(Calibrator):
    """Learned step sizes (and affine, rounding or weights) fitted to the FP32 model's outputs (minutes)."""

    reconstruction = True

    def __init__(self, settings: ReconSettings) -> None:
        self.name, self.settings = settings.name, settings

    def run(self, qm, data, batch_size, device, preset, seed, overrides) -> dict:
        return reconstruct(qm, data, self.settings, preset, batch_size, device, seed, overrides)


def calibrator(method: str) -> Calibrator:
    """The calibrator registered as ``method`` (looked up when asked, so added entries count)."""
    if method in METHODS:
        return RangeCalibrator(METHODS[method])
    if method in RECONSTRUCTION:
        return ReconstructionCalibrator(RECONSTRUCTION[method])
    raise ConfigError(f"`method` {method}: unknown; choose one of {', '.join(all_methods())}")


def all_methods() -> list[str]:
    """Every calibration method name: range methods and reconstruction methods."""
    return sorted(METHODS) + sorted(RECONSTRUCTION)


def calibrate(qm: FakeQuantModel, data: torch.Tensor, method: str, batch_size: int = 32,
              device: str = "cpu", preset: str = "default", seed: int = 0,
              overrides: dict | None = None) -> CalibrationResult:
    """Set every scale of ``qm`` from ``data`` with ``method``; leaves ``qm`` in ``quant`` mode on the CPU.

    ``overrides`` change fields of a reconstruction method's settings (e.g. ``adaround``, ``qdrop``).
    """
    chosen = calibrator(method)
    device = resolve_device(device)
    check_recipe(method, overrides or {})
    t0 = time.perf_counter()
    with calibration_numerics(device):
        details = chosen.run(qm, data, batch_size, device, preset, seed, overrides or {})
    qm.module.cpu()
    qm.set_mode("quant")
    # the process's high-water mark so far (loading, fusing and calibrating; not yet exporting)
    details["peak_memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        details["peak_cuda_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return CalibrationResult(method, len(data), time.perf_counter() - t0,
                             len(qm.act_quantizers), len(qm.weight_layers), details)
