"""The machine and software a figure was measured with: hardware fingerprint, versions, code hash."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("repapq-deploy", "torch", "torchvision", "timm", "onnx", "onnxruntime", "onnx-graphsurgeon",
            "polygraphy", "numpy")


def versions() -> dict:
    """Versions of everything that influences the numbers."""
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg.replace("-", "_")] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg.replace("-", "_")] = None
    return out


@functools.cache
def hardware() -> dict:
    """CPU model, core count, SIMD features relevant to INT8 kernels, and the GPU if one is visible.

    Two measurements are comparable when these match (the CI gate refuses to compare otherwise).
    """
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = sorted({f for f in value.split() if f.startswith(("avx", "amx")) or f.endswith("vnni")})
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "isa": flags, "machine": platform.machine(), "gpu": gpu}


@functools.cache
def code_hash() -> str:
    """Hash of this package's source files (a changed tool re-runs every stage)."""
    h = hashlib.sha256()
    root = Path(__file__).parent
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


_threads = 0  # 0: each library's own default (all cores)


def limit_threads(threads: int | None) -> None:
    """Use at most ``threads`` CPU threads in this process, in PyTorch and in every ONNX Runtime session
    created afterwards (containers with CPU quotas, several builds side by side). None: defaults."""
    global _threads
    if threads:
        import torch

        torch.set_num_threads(threads)
        _threads = threads


def ort_threads() -> int:
    """``intra_op_num_threads`` for new ONNX Runtime sessions (0 = ONNX Runtime's default)."""
    return _threads
