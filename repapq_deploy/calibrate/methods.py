"""Range-setting calibration methods (min-max, percentile, entropy, MSE, MAE) behind one interface.

Each method turns an activation histogram into a clipping value ``amax`` and a weight tensor into
per-channel ``amax`` values; the scale is ``amax / qmax`` of the tensor's integer grid. The calibrator
registry (``calibrate.registry``) offers them beside the reconstruction methods.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from repapq_deploy.calibrate.observer import HistogramObserver
from repapq_deploy.errors import BackendUnavailableError, ConfigError
from repapq_deploy.progress import track
from repapq_deploy.quant.placement import FakeQuantModel
from repapq_deploy.quant.scheme import IntFormat

_EPS = 1e-8
# Below this clip a tensor or weight channel is dead: every value rounds to 0 at any usable scale, so
# it gets scale 1 instead of a tiny one (which would underflow in FP16 Q/DQ graphs for TensorRT).
DEAD = 1e-5


def scale_from_amax(amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """Step size for a clipping value; dead tensors/channels get 1."""
    return torch.where(amax < DEAD, torch.ones_like(amax), amax / qmax)
_SEARCH_POINTS = 100


class RangeMethod:
    """Base: min-max for weights and activations."""

    name = "minmax"
    needs_histogram = False

    def activation_amax(self, obs: HistogramObserver, fmt: IntFormat) -> float:  # noqa: ARG002
        return obs.amax

    def weight_amax(self, w: torch.Tensor, fmt: IntFormat) -> torch.Tensor:  # noqa: ARG002
        """Per-output-channel clipping values for ``w`` reshaped to (C, -1)."""
        return w.abs().amax(dim=1)


class Percentile(RangeMethod):
    """Clip activations at a percentile of ``|x|`` (weights: min-max)."""

    name = "percentile"
    needs_histogram = True

    def __init__(self, percentile: float = 99.99) -> None:
        self.percentile = percentile

    def activation_amax(self, obs: HistogramObserver, fmt: IntFormat) -> float:  # noqa: ARG002
        counts = torch.cat([torch.tensor([float(obs.zeros)], dtype=torch.float64), obs.hist])
        cdf = torch.cumsum(counts, 0) / counts.sum()
        idx = int(torch.searchsorted(cdf, torch.tensor(self.percentile / 100, dtype=torch.float64)))
        # counts[0] holds the exact zeros; counts[j] is the bin whose upper edge is j * width
        return float(min(idx, len(obs.hist)) * obs.amax / len(obs.hist)) or obs.amax


class Entropy(RangeMethod):
    """TensorRT's classic KL-divergence calibration on the ``|x|`` histogram (weights: min-max)."""

    name = "entropy"
    needs_histogram = True

    def activation_amax(self, obs: HistogramObserver, fmt: IntFormat) -> float:
        # Exact zeros are left out: they are represented exactly at any clip, but as a spike in the
        # first bin they dominate the KL term and drive the clip far too low on post-ReLU tensors.
        hist = obs.hist.numpy()
        nbins = len(hist)
        levels = min(fmt.qmax + 1, nbins)  # grid points available to |x|
        best_i, best_kl = nbins, np.inf
        for i in range(levels, nbins + 1, 16):
            ref = hist[:i].copy()
            ref[i - 1] += hist[i:].sum()
            if ref.sum() == 0:
                continue
            nonzero = hist[:i] != 0
            # quantize the first i bins into `levels` groups, expand back over non-empty bins
            groups = np.array_split(np.arange(i), levels)
            cand = np.zeros(i)
            for g in groups:
                nz = nonzero[g]
                if nz.any():
                    cand[g[nz]] = hist[:i][g].sum() / nz.sum()
            p = ref / ref.sum()
            q = cand / cand.sum() if cand.sum() > 0 else cand
            mask = p > 0
            if (q[mask] == 0).any():
                continue
            kl = float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
            if kl < best_kl:
                best_kl, best_i = kl, i
        return best_i * obs.amax / nbins


class ErrorSearch(RangeMethod):
    """Search the clipping value that minimises the mean |error|^p of the quantized tensor.

    ``p=2`` is MSE, ``p=1`` is MAE (RepAPQ's choice: rare outliers pull the scale less).
    Activations are searched on the histogram, weights per output channel on the exact values.
    """

    needs_histogram = True

    def __init__(self, name: str, power: int) -> None:
        self.name = name
        self.power = power

    def activation_amax(self, obs: HistogramObserver, fmt: IntFormat) -> float:
        v = obs.bin_centers()
        counts = obs.hist
        best, best_err = obs.amax, float("inf")
        for frac in torch.linspace(1.0 / _SEARCH_POINTS, 1.0, _SEARCH_POINTS, dtype=torch.float64):
            amax = float(frac) * obs.amax
            s = amax / fmt.qmax
            err = (v - torch.clamp(torch.round(v / s), max=fmt.qmax) * s).abs().pow(self.power)
            total = float((err * counts).sum())
            if total < best_err:
                best, best_err = amax, total
        return best

    def weight_amax(self, w: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
        full = w.abs().amax(dim=1).clamp_min(_EPS)
        best = full.clone()
        best_err = torch.full_like(full, float("inf"))
        for frac in torch.linspace(1.0 / _SEARCH_POINTS, 1.0, _SEARCH_POINTS):
            amax = full * frac
            s = (amax / fmt.qmax)[:, None]
            err = (w - torch.clamp(torch.round(w / s), fmt.qmin, fmt.qmax) * s).abs().pow(self.power).sum(1)
            better = err < best_err
            best = torch.where(better, amax, best)
            best_err = torch.where(better, err, best_err)
        return best


METHODS: dict[str, RangeMethod] = {
    "minmax": RangeMethod(),
    "percentile": Percentile(),
    "entropy": Entropy(),
    "mse": ErrorSearch("mse", 2),
    "mae": ErrorSearch("mae", 1),
}


@dataclass
class CalibrationResult:
    """What a calibration run did: method, images, time, the quantizer count and method details."""

    method: str
    images: int
    seconds: float
    activation_quantizers: int
    weight_quantizers: int
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def _run(qm: FakeQuantModel, data: torch.Tensor, batch_size: int, description: str, device: str) -> None:
    batches = range(0, len(data), batch_size)
    for i in track(batches, description, total=len(batches)):
        qm.module(data[i:i + batch_size].to(device))


def resolve_device(device: str) -> str:
    """Validate ``device``."""
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"`device` {device}: choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("`device` cuda: no CUDA device is visible to PyTorch; use `device` cpu")
    return device


@contextlib.contextmanager
def calibration_numerics(device: str) -> Iterator[None]:
    """On CUDA: IEEE FP32 and deterministic kernels for the duration, the previous settings restored after.

    TF32 (PyTorch's default for cuDNN convs) rounds products to a 10-bit mantissa, ~1e-3 relative
    error in the FP32 targets -- as large as the 8-bit quantization error being minimised; cuDNN's
    autotuned and atomics-based kernels would make ``seed`` meaningless on a GPU.
    """
    if device != "cuda":
        yield
        return
    # cuBLAS is only deterministic with a fixed workspace; it must be set before its first handle
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    cudnn.deterministic, cudnn.benchmark = True, False
    # warn_only: an op without a deterministic CUDA kernel warns instead of stopping the build
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32, cudnn.deterministic, cudnn.benchmark = saved[:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


def set_ranges(qm: FakeQuantModel, data: torch.Tensor, act: RangeMethod, weight: RangeMethod,
               batch_size: int = 32, device: str = "cpu") -> None:
    """Set every scale from calibration statistics: activations with ``act``, weights with ``weight``.

    Leaves ``qm`` in ``quant`` mode on ``device``.
    """
    qm.module.eval().to(device)
    observers = {}
    for name, q in qm.act_quantizers.items():
        q.observer = observers[name] = HistogramObserver()
    qm.set_mode("observe")
    _run(qm, data, batch_size, f"calibrate [{act.name}] ranges", device)
    if act.needs_histogram:
        for obs in observers.values():
            obs.collect_histogram = True
        _run(qm, data, batch_size, f"calibrate [{act.name}] histograms", device)
    with torch.no_grad():
        for name, q in qm.act_quantizers.items():
            amax = act.activation_amax(observers[name], q.fmt) if observers[name].amax > 0 else 0.0
            q.scale.copy_(scale_from_amax(torch.tensor(float(amax)), q.fmt.qmax).clamp(max=q.max_scale))
            q.observer = None
        for layer in qm.weight_layers.values():
            wq = layer.weight_quantizer
            w = layer.weight.detach().reshape(layer.weight.shape[0], -1).cpu()
            wq.scale.copy_(scale_from_amax(weight.weight_amax(w, wq.fmt), wq.fmt.qmax).to(wq.scale.device))
    qm.set_mode("quant")
