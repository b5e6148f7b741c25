"""Activation statistics collected during calibration forward passes."""

from __future__ import annotations

import warnings

import torch

BINS = 2048
# float32 holds every whole number up to 2**24 exactly: a histogram of at most that many values has
# exact counts whatever order CUDA's atomic adds run in, so it is deterministic.
_EXACT_COUNTS = 2**24


def _histc(x: torch.Tensor, amax: float) -> torch.Tensor:
    """``torch.histc`` of at most ``_EXACT_COUNTS`` values on ``[0, amax]``: exact, hence deterministic."""
    with warnings.catch_warnings():
        # under torch.use_deterministic_algorithms CUDA's histc warns that its float atomics are
        # unordered; with whole-number counts below 2**24 the order cannot change the result
        warnings.filterwarnings("ignore", message="_histc_cuda")
        return torch.histc(x, BINS, 0.0, amax)


class HistogramObserver:
    """Collects ``max|x|`` (first pass) and then a histogram of ``|x|`` on ``[0, max]`` (second pass).

    Exact zeros are counted apart: post-ReLU tensors are mostly zeros, which every grid represents
    exactly, and folding them into the first bin would bias error-based range searches.
    """

    def __init__(self) -> None:
        self.amax = 0.0
        self.hist: torch.Tensor | None = None
        self.zeros = 0
        self.collect_histogram = False

    def update(self, x: torch.Tensor) -> None:
        a = x.abs().float()
        if not self.collect_histogram:
            self.amax = max(self.amax, float(a.max())) if a.numel() else self.amax
            return
        if self.hist is None:
            self.hist = torch.zeros(BINS, dtype=torch.float64)
        nonzero = a[a > 0]
        self.zeros += a.numel() - nonzero.numel()
        if self.amax > 0 and nonzero.numel():
            for chunk in nonzero.split(_EXACT_COUNTS):
                self.hist += _histc(chunk, self.amax).double().cpu()

    def bin_centers(self) -> torch.Tensor:
        width = self.amax / BINS
        return (torch.arange(BINS, dtype=torch.float64) + 0.5) * width
