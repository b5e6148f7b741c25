"""benchmarks/efficientnet_lite0.py: pooling the per-fold builds of ``--folds`` into one row."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from efficientnet_lite0 import pool_folds  # noqa: E402


def _row(name: str, samples: int, agreement: float, cosine: float, cosine_min: float) -> dict:
    return {"name": name, "samples": samples, "fp32_top1": 90.0, "fake_quant_top1": 90.0,
            "fake_quant_agreement_top1": agreement, "engine_top1": 90.0, "agreement_top1": agreement,
            "cosine": cosine, "cosine_min": cosine_min, "int8_op_fraction": 1.0, "build_seconds": 10.0,
            "target_met": agreement == 100 and cosine >= 0.99,
            "agreement_on": {"calibration": {"samples": 100, "agreement_top1": 99.0, "cosine": 0.999,
                                             "cosine_min": 0.99}}}


def test_folds_pool_over_every_evaluated_image() -> None:
    # fold 0 meets the target on its own; pooled with a fold that flips one of 5 images it does not
    rows = [_row("a_0", 15, 100.0, 0.995, 0.98), _row("a_1", 5, 80.0, 0.991, 0.95)]
    pooled = pool_folds("a", rows)
    assert pooled["samples"] == 20 and pooled["name"] == "a" and pooled["folds"] == rows
    assert pooled["agreement_top1"] == pytest.approx(95.0)  # 19 of the 20 images
    assert pooled["cosine"] == pytest.approx((15 * 0.995 + 5 * 0.991) / 20)
    assert pooled["cosine_min"] == 0.95 and pooled["build_seconds"] == 20.0
    assert rows[0]["target_met"] and not pooled["target_met"]
    assert pooled["agreement_on"]["calibration"]["samples"] == 200


def test_a_failed_fold_fails_the_row() -> None:
    rows = [_row("a_0", 10, 100.0, 0.995, 0.98), {"name": "a_1", "error": "DeployError: boom"}]
    pooled = pool_folds("a", rows)
    assert pooled["error"] == "DeployError: boom" and "cosine" not in pooled
