"""The backend interface, after Polygraphy's runners: a backend builds an engine file from a QDQ
ONNX graph and hands out runners (``activate / infer / deactivate``); timing lives here, so every
backend is timed the same way."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from repapq_deploy.progress import track


@dataclass
class EngineInfo:
    """What a build produced and how much of it runs in integer kernels.

    ``int8_op_fraction`` is the share of conv/gemm ops observed running as integer kernels (in ONNX
    Runtime's optimized graph, in TensorRT's engine inspector); None where no integer kernel can be
    observed (reference execution). ``qdq_coverage`` is the share of conv/gemm ops whose inputs are
    quantized in the graph: what an explicit-quantization backend would run in INT8.
    """

    backend: str
    path: str
    integer_ops: int | None
    float_ops: int | None
    int8_op_fraction: float | None
    op_counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    qdq_coverage: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Runner(ABC):
    """Runs one engine. Use as a context manager, or call activate()/deactivate()."""

    def __init__(self) -> None:
        self.is_active = False

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        if not self.is_active:
            self.activate_impl()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    @abstractmethod
    def activate_impl(self) -> None: ...

    def deactivate_impl(self) -> None:  # noqa: B027  (optional hook)
        """Release resources (optional)."""

    @abstractmethod
    def infer(self, x: np.ndarray) -> np.ndarray:
        """Run one batch (float32 N,C,H,W) and return the output logits."""


class Backend(ABC):
    """Builds engines from QDQ ONNX and loads them into runners."""

    name: str
    engine_suffix: str

    @classmethod
    @abstractmethod
    def available(cls) -> bool:
        """True when this machine can build and run this backend's engines."""

    @abstractmethod
    def build(self, onnx_path: Path, engine_path: Path) -> EngineInfo:
        """Build an engine from ``onnx_path`` into ``engine_path`` (atomically)."""

    @abstractmethod
    def runner(self, engine_path: Path) -> Runner:
        """A runner for a built engine."""

    @abstractmethod
    def describe(self, engine_path: Path) -> dict:
        """Human/machine-readable facts about a built engine (op/layer counts, precisions)."""


@dataclass
class LatencyStats:
    """Per-batch latency percentiles in milliseconds and throughput in images/s."""

    batch: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float
    times_ms: list[float] = field(default_factory=list, repr=False)  # per iteration, in run order

    @classmethod
    def from_times(cls, batch: int, seconds: list[float]) -> LatencyStats:
        ms = np.asarray(seconds) * 1e3
        p50 = float(np.percentile(ms, 50))
        return cls(batch, len(ms), p50, float(np.percentile(ms, 90)), float(np.percentile(ms, 99)),
                   float(ms.mean()), batch / (p50 / 1e3), ms.tolist())

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["times_ms"]
        return d


def paired_speedup(reference: LatencyStats, engine: LatencyStats) -> float:
    """Median over iterations of reference time / engine time, both measured back to back.

    On a shared machine, load comes in bursts; a ratio of two medians mixes iterations that saw
    different load, the median of per-pair ratios does not.
    """
    return float(np.median(np.asarray(reference.times_ms) / np.asarray(engine.times_ms)))


def benchmark_interleaved(runners: dict[str, Runner], x: np.ndarray, *, warmup: int = 5,
                          iterations: int | None = None, seconds: float = 3.0,
                          description: str = "benchmark") -> dict[str, LatencyStats]:
    """Time several runners on the same input, alternating them every iteration.

    On a noisy shared machine, interleaving exposes every runner to the same background load,
    so their ratio is measured in one run. Without ``iterations``, the count is chosen so the
    whole measurement takes about ``seconds``.
    """
    for r in runners.values():
        r.activate()
        for _ in range(warmup):
            r.infer(x)
    if iterations is None:
        t0 = time.perf_counter()
        for r in runners.values():
            r.infer(x)
        per_round = max(time.perf_counter() - t0, 1e-6)
        iterations = int(min(500, max(10, seconds / per_round)))
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in track(range(iterations), f"{description} (batch {len(x)})", total=iterations):
        for name, r in runners.items():
            t0 = time.perf_counter()
            r.infer(x)
            times[name].append(time.perf_counter() - t0)
    return {k: LatencyStats.from_times(len(x), v) for k, v in times.items()}
