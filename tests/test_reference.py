"""benchmarks/_reference.py: the environment the reference models are trained in."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _reference as ref  # noqa: E402


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_x86_training_is_capped_at_avx2(monkeypatch: pytest.MonkeyPatch, capability: str) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    for key in ref.PINNED_ISA:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX512")  # the caller's own setting wins
    assert ref.isa_caps() == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_other_cpus_train_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    for key in ref.PINNED_ISA:
        monkeypatch.delenv(key, raising=False)
    assert ref.isa_caps() == {}
