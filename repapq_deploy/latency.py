"""The one latency measurement: an engine against its float reference, interleaved, with one speed-up.

``verify`` (the report's ``latency_ms``), ``bench`` and therefore ``check`` all measure through
:func:`measure`, so a speed-up means the same everywhere: the median over iterations of reference
time / engine time, the two timed back to back (``backends.base.paired_speedup``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from repapq_deploy.backends.base import LatencyStats, Runner, benchmark_interleaved, paired_speedup

REPORT_BATCHES = (1, 32)


def measure(engine: Callable[[], Runner], reference: Callable[[], Runner] | None, inputs: Callable[[int], np.ndarray],
            batches: Sequence[int] = REPORT_BATCHES, *, warmup: int = 5, iterations: int | None = None,
            seconds: float = 3.0, description: str = "latency") -> dict[int, dict]:
    """Time fresh runners of ``engine`` (and ``reference``, interleaved) on ``inputs(batch)`` per batch size.

    Returns ``{batch: {"engine": LatencyStats, "reference": LatencyStats, "speedup": float}}`` (the
    last two only with a reference).
    """
    out: dict[int, dict] = {}
    for bs in batches:
        runners = {"engine": engine()}
        if reference is not None:
            runners["reference"] = reference()
        try:
            stats = benchmark_interleaved(runners, inputs(bs), warmup=warmup, iterations=iterations,
                                          seconds=seconds, description=description)
        finally:
            for r in runners.values():
                r.deactivate()
        entry: dict = dict(stats)
        if reference is not None:
            entry["speedup"] = paired_speedup(stats["reference"], stats["engine"])
        out[bs] = entry
    return out


def report_section(measured: dict[int, dict], reference_name: str) -> dict:
    """``latency_ms`` of report.json: p50 per batch of the reference (key ``fp32``, kept so reports and
    baselines compare across backends) and the engine, the speed-up, and every statistic."""
    out: dict = {"fp32": {}, "engine": {}, "speedup": {}, "details": {}, "reference": reference_name}
    for bs, entry in measured.items():
        key = f"bs{bs}"
        for name, report_name in (("reference", "fp32"), ("engine", "engine")):
            s: LatencyStats = entry[name]
            out[report_name][key] = s.p50_ms
            out["details"][f"{report_name}_{key}"] = s.to_dict()
        out["speedup"][key] = entry["speedup"]
    return out


def resized(x: np.ndarray) -> Callable[[int], np.ndarray]:
    """Inputs of any batch size from the samples ``x`` (repeated as needed)."""
    return lambda bs: np.ascontiguousarray(np.resize(x, (bs,) + x.shape[1:]))
