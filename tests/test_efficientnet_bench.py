"""benchmarks/efficientnet_lite0.py: pooling the per-fold builds of ``--folds`` into one row, and
``--heldout-crops``'s comparison of a build's two graphs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from efficientnet_lite0 import graph_agreement, pool_folds  # noqa: E402

from repapq_deploy.export.graphs import FP32_ONNX, QDQ_ONNX  # noqa: E402


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


def _export(model: torch.nn.Module, path: Path) -> None:
    torch.onnx.export(model.eval(), (torch.zeros(1, 3, 8, 8),), str(path), input_names=["x"],
                      dynamic_axes={"x": {0: "n"}}, dynamo=False)


def test_graph_agreement_compares_the_two_graphs_on_every_set(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 5))
    _export(net, tmp_path / FP32_ONNX)
    _export(net, tmp_path / QDQ_ONNX)
    x = np.random.default_rng(2).standard_normal((5, 3, 8, 8)).astype(np.float32)
    same = graph_agreement(tmp_path, "onnxruntime", {"x": x})["x"]
    assert same["agreement_top1"] == 100 and same["cosine"] == pytest.approx(1, abs=1e-6)
    with torch.no_grad():
        net[2].weight.neg_()  # a "quantized" graph that disagrees: negated logits
    _export(net, tmp_path / QDQ_ONNX)
    sets = {"a": np.random.default_rng(0).standard_normal((20, 3, 8, 8)).astype(np.float32),
            "b": np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)}
    out = graph_agreement(tmp_path, "tensorrt", sets)
    assert set(out) == {"a", "b"} and out["a"]["samples"] == 20 and out["b"]["samples"] == 3
    # the bias is not negated, so the logits are not exactly -1x: the cosine is low, not -1
    assert out["a"]["cosine"] < 0 and out["a"]["agreement_top1"] < 100
