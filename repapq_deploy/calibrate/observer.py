"""Activation statistics collected during calibration forward passes."""

from __future__ import annotations

import torch

BINS = 2048


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
            self.hist += torch.histc(nonzero, BINS, 0.0, self.amax).double().cpu()

    def bin_centers(self) -> torch.Tensor:
        width = self.amax / BINS
        return (torch.arange(BINS, dtype=torch.float64) + 0.5) * width
