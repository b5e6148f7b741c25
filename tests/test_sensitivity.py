"""benchmarks/quant_sensitivity.py: one quantizer at a time against FP32, on the bundled example."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from repapq_deploy.calibrate import calibrate
from repapq_deploy.calibrate.prepare import quantize_model
from repapq_deploy.quant.scheme import QuantConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from quant_sensitivity import sensitivity  # noqa: E402
from sensitivity_compare import compare  # noqa: E402


def test_one_row_per_quantizer_and_the_full_row_is_the_model(fused_example, calib_x, eval_xy) -> None:
    gm, _ = fused_example
    x, y = eval_xy
    with torch.no_grad():
        ref = gm(x).numpy()
    qm = quantize_model(gm, QuantConfig("tensorrt", 6, 8))
    calibrate(qm, calib_x, "minmax")
    rows = sensitivity(qm, x, y.numpy(), ref)
    assert len(rows) == 1 + len(qm.act_quantizers) + len(qm.weight_layers)
    with torch.no_grad():
        out = qm.module(x).numpy()
    assert rows[0]["quantized"] == "all"
    assert rows[0]["flips"] == int((out.argmax(1) != ref.argmax(1)).sum())
    assert np.isclose(rows[0]["mean_max_abs_logit_error"], np.abs(out - ref).max(1).mean(), rtol=1e-5)
    # activation rows are named by the tensor they quantize; the network input is one of them
    assert "activation x" in {r["quantized"] for r in rows}
    singles = [r["mean_max_abs_logit_error"] for r in rows[1:]]
    assert all(e >= 0 for e in singles) and max(singles) < rows[0]["mean_max_abs_logit_error"]


def _r(name: str, flips: int, err: float) -> dict:
    return {"quantized": name, "flips": flips, "lost": 0, "gained": 0, "mean_max_abs_logit_error": err}


def test_compare_pairs_quantizers_by_name_and_kind() -> None:
    a = [_r("all", 9, 0.5), _r("activation x", 4, 0.2), _r("activation y", 2, 0.3), _r("activation z", 1, 0.1),
         _r("weights c", 3, 0.1)]
    b = [_r("all", 5, 0.3), _r("activation x", 2, 0.1), _r("activation y", 1, 0.1), _r("weights c", 3, 0.1)]
    act, weights = compare(a, b)
    # "all" is no quantizer; "z" is only in A and stays out of the sums and the ratio
    assert act == {"kind": "activation", "tensors": 2, "only_a": 1, "only_b": 0, "flips_a": 6, "flips_b": 3,
                   "median_error_ratio": 2.5}
    assert weights["tensors"] == 1 and weights["median_error_ratio"] == 1.0
