"""Stage 5, engine: backends behind one interface (build / load / run / benchmark / describe)."""

from repapq_deploy.backends.base import Backend, EngineInfo, LatencyStats, Runner, benchmark_interleaved
from repapq_deploy.backends.registry import BACKENDS, get_backend, resolve_backend

__all__ = ["BACKENDS", "Backend", "EngineInfo", "LatencyStats", "Runner", "benchmark_interleaved",
           "get_backend", "resolve_backend"]
