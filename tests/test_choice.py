"""Method choice on held-out calibration images (``method="auto"``)."""

from __future__ import annotations

import numpy as np
import pytest

from repapq_deploy.calibrate.choice import (
    HOLDOUT_MIN_IMAGES,
    Candidate,
    estimate_reconstruction,
    holdout_split,
    pick,
    validated,
)
from repapq_deploy.calibrate.prepare import quantize_model
from repapq_deploy.calibrate.registry import calibrate
from repapq_deploy.quant.scheme import QuantConfig

SPLIT = (np.arange(48), np.arange(48, 64))


@pytest.fixture
def fused(fused_example):
    return fused_example[0]


def test_holdout_split_is_seeded_disjoint_and_spares_small_sets() -> None:
    fit, held = holdout_split(256, 0.2, seed=0)
    assert len(held) == 51 and len(fit) == 205 and not set(fit) & set(held)
    assert set(fit) | set(held) == set(range(256))
    again = holdout_split(256, 0.2, seed=0)
    assert (again[1] == held).all() and not (holdout_split(256, 0.2, seed=1)[1] == held).all()
    small = HOLDOUT_MIN_IMAGES * 5 - 3  # 20 % of it rounds below the minimum
    assert len(holdout_split(small, 0.2, 0)[1]) == 0 and len(holdout_split(100, 0.0, 0)[1]) == 0


def _candidate(name: str, errors) -> Candidate:
    return Candidate(name, None, None, errors=np.asarray(errors, dtype=float))


def test_pick_keeps_the_simplest_unless_clearly_beaten() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(1e-3, 2e-3, 200)
    noisy = base + rng.normal(0, 5e-4, 200)  # no better on average
    clearly = base * 0.5  # half the error on every image
    kept, why = pick([_candidate("minmax", base), _candidate("percentile", noisy), _candidate("repapq", clearly)])
    assert kept.method == "repapq" and "repapq closer to FP32 than minmax" in why
    kept, why = pick([_candidate("minmax", base), _candidate("percentile", noisy)])
    assert kept.method == "minmax" and "not clearly closer" in why


def test_auto_without_enough_images_keeps_a_range_method(fused, calib_x) -> None:
    kept, section = validated(fused, calib_x[:64], *SPLIT, QuantConfig("onnxruntime"), "auto", equalize="none",
                              preset="default", overrides={}, time_budget=900, batch_size=32, device="cpu", seed=0)
    assert kept.method in ("minmax", "percentile", "mse") and section["chosen"] == kept.method
    assert section["reconstruction"].startswith("not tried: 64 calibration images")
    assert [c["method"] for c in section["candidates"]] == ["minmax", "percentile", "mse"]
    assert all(c["images"] == 16 for c in section["candidates"])
    assert section["final_fit_images"] == 64 and kept.done.result.images == 64


def test_auto_over_the_time_budget_skips_reconstruction(fused, calib_x) -> None:
    x = calib_x[:64].repeat(5, 1, 1, 1)[:300]  # enough images for reconstruction to be a candidate
    kept, section = validated(fused, x, np.arange(240), np.arange(240, 300), QuantConfig("onnxruntime"), "auto",
                              equalize="none", preset="default", overrides={}, time_budget=0.0, batch_size=32,
                              device="cpu", seed=0)
    assert "over the time budget" in section["reconstruction"] and kept.method != "repapq"


def test_named_method_reports_held_out_figures(fused, calib_x) -> None:
    kept, section = validated(fused, calib_x[:64], *SPLIT, QuantConfig("onnxruntime"), "percentile",
                              equalize="none", preset="default", overrides={}, time_budget=900, batch_size=32,
                              device="cpu", seed=0)
    assert kept.method == "percentile" and section["reason"] == "named by the user"
    # a range method is refitted on every image once its held-out figures are taken
    assert section["final_fit_images"] == 64 and kept.done.result.images == 64
    assert [c["method"] for c in section["candidates"]] == ["percentile"]


def test_reconstruction_estimate_scales_with_iterations(fused, calib_x) -> None:
    qm = quantize_model(fused, QuantConfig("onnxruntime"))
    calibrate(qm, calib_x[:32], "minmax")
    flags = [p.requires_grad for p in qm.module.parameters()]
    fast = estimate_reconstruction(qm.module, calib_x, "fast", {"iters": 100}, 16)
    slow = estimate_reconstruction(qm.module, calib_x, "fast", {"iters": 1000}, 16)
    assert 0 < fast < slow  # ten times the iterations (each call times its own passes: only the order is sure)
    assert [p.requires_grad for p in qm.module.parameters()] == flags  # the model is left as it was
    assert all(p.grad is None for p in qm.module.parameters())


def test_recipe_reconstruction_settings_win_over_the_preset(fused, calib_x) -> None:
    qm = quantize_model(fused, QuantConfig("onnxruntime"))
    details = calibrate(qm, calib_x[:32], "repapq", preset="thorough", overrides={"iters": 2}).details
    assert details["settings"]["iters"] == 2 and details["preset"] == "thorough"
