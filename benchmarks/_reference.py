"""Reference models and data of the Fashion-MNIST benchmarks, trained and cached on first use.

Checkpoints and arrays live under ``~/.cache/repapq-deploy/fmnist/`` (outside git); a missing
checkpoint is trained by ``examples/fashion_mnist/train.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from repapq_deploy.artifacts import write_json
from repapq_deploy.data import fashion_mnist as fm

CACHE = Path.home() / ".cache" / "repapq-deploy" / "fmnist"
ROOT = Path(__file__).resolve().parents[1]
# the reference models of the calibration benchmark (ARCH:EPOCHS[:wWARMUP]; see parse_model_spec)
DEFAULT_MODELS = "repvgg_a0:15,mobileone_s0:15:w1"
# The measured reference checkpoints were trained on AVX2 CPUs. PyTorch and oneDNN choose their kernels by
# the CPU's instruction set, and 15 epochs carry the last-bit differences into other weights; capping both at
# AVX2 retrains the same weights on an AVX-512 CPU (the reference repvgg_a0 again, its min-max rows equal
# to the last digit of the cosine) and repeats a RepAPQ reconstruction of an AVX2 machine (the
# same logit cosine to 16 digits). On AVX2, train.py ignores --channels-last.
PINNED_ISA = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def parse_model_spec(spec: str) -> tuple[str, int, float | None]:
    """``ARCH:EPOCHS[:wWARMUP]`` (e.g. ``mobileone_s0:10:w1``) as ``(arch, epochs, warmup_epochs)``."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit() or (len(parts) == 3 and not parts[2].startswith("w")):
        raise SystemExit(f"--models {spec}: write ARCH:EPOCHS or ARCH:EPOCHS:wWARMUP, e.g. mobileone_s0:10:w1")
    return parts[0], int(parts[1]), float(parts[2][1:]) if len(parts) == 3 else None


def model_name(arch: str, epochs: int, warmup: float | None = None) -> str:
    """The cache folder name of a reference model (also names its calibration work folder)."""
    return f"{arch}-e{epochs}" + ("" if warmup is None else f"-w{warmup:g}")


def ensure_model(arch: str, epochs: int, warmup: float | None = None) -> Path:
    """Train ``arch`` for ``epochs`` (one-cycle warm-up of ``warmup`` epochs; default 15 %) unless a
    cached checkpoint exists; return its folder (a training cut off earlier resumes from the
    ``train_state.pt`` that train.py leaves there), with ``isa_caps()`` (on x86 its kernels capped at AVX2,
    where train.py trains in the contiguous format: half the speed of channels-last on AVX-512)."""
    folder = CACHE / model_name(arch, epochs, warmup)
    if not (folder / "model.safetensors").exists():
        cmd = [sys.executable, str(ROOT / "examples/fashion_mnist/train.py"), "--arch", arch,
               "--epochs", str(epochs), "--out", str(folder), "--channels-last"]
        subprocess.run(cmd + ([] if warmup is None else ["--warmup-epochs", f"{warmup:g}"]), check=True,
                       env={**os.environ, **isa_caps()})
    return folder


def isa_caps() -> dict[str, str]:
    """The variables to add to the environment reference models are trained and the calibration benchmark's
    builds run in: on x86 CPUs with AVX2 or AVX-512, those of ``PINNED_ISA`` the caller has not set, so that
    an AVX-512 machine trains and calibrates as an AVX2 one does (measured to the last digit);
    elsewhere none."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        return {}
    return {k: v for k, v in PINNED_ISA.items() if k not in os.environ}


def ensure_test_set() -> Path:
    """The full 10 000-image test set with labels, as model input."""
    path = CACHE / "test10k.npz"
    if not path.exists():
        x, y = fm.load_raw("test")
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=fm.to_model_input(x), y=y)
    return path


def ensure_calib_set(count: int, seed: int) -> Path:
    """``count`` training images drawn without replacement with ``seed``."""
    path = CACHE / f"calib{count}_s{seed}.npz"
    if not path.exists():
        x, _ = fm.load_raw("train")
        idx = np.random.default_rng(seed).choice(len(x), count, replace=False)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=fm.to_model_input(x[idx]))
    return path


def ensure_holdout_set(count: int, calib_count: int, seed: int) -> Path:
    """``count`` labelled training images disjoint from ``ensure_calib_set(calib_count, seed)``: a
    validation set for choosing recipes without looking at the test set."""
    path = CACHE / f"holdout{count}_c{calib_count}_s{seed}.npz"
    if not path.exists():
        x, y = fm.load_raw("train")
        calib_idx = np.random.default_rng(seed).choice(len(x), calib_count, replace=False)
        rest = np.setdiff1d(np.arange(len(x)), calib_idx)
        idx = np.random.default_rng(seed + 1).choice(rest, count, replace=False)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=fm.to_model_input(x[idx]), y=y[idx])
    return path


def write_results(path: Path, args: object, results: dict) -> None:
    """Write a script's command-line options (home folder as ``~``) and ``results`` as JSON, atomically."""
    options = {k: (str(v).replace(str(Path.home()), "~") if isinstance(v, Path) else v)
               for k, v in vars(args).items()}
    write_json(path, options | results)


def logits(module: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """``module``'s outputs on all of ``x``, 500 images at a time."""
    with torch.no_grad():
        return torch.cat([module(x[i:i + 500]) for i in range(0, len(x), 500)]).numpy()


def logit_error(out: np.ndarray, ref: np.ndarray) -> float:
    """Mean over images of the largest absolute logit difference: how close two models are where their
    top-1 flips do not tell them apart."""
    return float(np.abs(out - ref).max(1).mean())
