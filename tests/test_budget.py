"""The accuracy budget: precision fallback of the most sensitive quantized tensors."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner

from repapq_deploy.calibrate.fallback import rank, with_fallback
from repapq_deploy.calibrate.prepare import quantize_model
from repapq_deploy.calibrate.registry import calibrate
from repapq_deploy.cli import main
from repapq_deploy.export import export_qdq
from repapq_deploy.quant.placement import readers
from repapq_deploy.quant.scheme import QuantConfig

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fashion_mnist"


def _calibrated(fused_example, calib_x, bits: int):
    qm = quantize_model(fused_example[0], QuantConfig("onnxruntime", bits, bits))
    calibrate(qm, calib_x, "minmax")
    return qm


def test_six_bit_tensors_are_raised_to_eight_bits_on_the_same_range(fused_example, calib_x) -> None:
    qm = _calibrated(fused_example, calib_x, 6)
    name = next(iter(qm.act_quantizers))
    q = qm.act_quantizers[name]
    raised = with_fallback(qm, [name])
    r = raised.act_quantizers[name]
    assert (q.fmt.bits, r.fmt.bits) == (6, 8) and not r.floating
    assert float(r.scale) * r.fmt.qmax == pytest.approx(float(q.scale) * q.fmt.qmax)  # same clipping range
    for layer in readers(raised, name):
        assert raised.weight_layers[layer].weight_quantizer.fmt.bits == 8
    assert raised.config.fallback == (name,) and qm.config.fallback == ()  # the original is untouched


def test_eight_bit_tensors_fall_back_to_float_without_qdq(fused_example, calib_x, tmp_path) -> None:
    qm = _calibrated(fused_example, calib_x, 8)
    ranked = rank(qm, fused_example[0], calib_x[:32])
    assert len(ranked) == len(qm.act_quantizers)
    assert [r["gain"] for r in ranked] == sorted((r["gain"] for r in ranked), reverse=True)
    name = ranked[0]["quantizer"]
    raised = with_fallback(qm, [name])
    assert raised.act_quantizers[name].floating
    assert all(not raised.weight_layers[t].weight_quantizer.enabled for t in ranked[0]["layers"])
    with torch.no_grad():
        closer = (raised.module(calib_x[:32]) - fused_example[0](calib_x[:32])).abs().mean()
        before = (qm.module(calib_x[:32]) - fused_example[0](calib_x[:32])).abs().mean()
    assert closer < before
    export_qdq(qm, calib_x, tmp_path / "q.onnx")
    export_qdq(raised, calib_x, tmp_path / "r.onnx")

    def dequantize_count(path: Path) -> int:
        return sum(n.op_type == "DequantizeLinear" for n in onnx.load(str(path)).graph.node)

    assert dequantize_count(tmp_path / "r.onnx") < dequantize_count(tmp_path / "q.onnx")


def _build(tmp_path: Path, *extra: str):
    out = tmp_path / "out"
    args = ["build", str(EXAMPLE / "model.safetensors"), "--calib", str(EXAMPLE / "calib.npz"), "--out", str(out),
            "--bits", "6", "--first-last-bits", "6", "--method", "minmax", "--bench-seconds", "0.1", *extra]
    return CliRunner().invoke(main, args), out


def test_budget_raises_the_fewest_tensors_until_it_holds(tmp_path) -> None:
    result, out = _build(tmp_path, "--eval", str(EXAMPLE / "eval.npz"), "--eval-count", "400", "--max-drop", "0.3",
                         "--json")
    assert result.exit_code == 0, result.output
    budget = json.loads(result.stdout)["budget"]
    assert budget["met"] and budget["steps"][0]["raised"] == 0
    assert budget["steps"][0]["shortfall"] > 0.3 >= budget["steps"][-1]["shortfall"] or budget["raised"] == 0
    assert len(budget["raised_quantizers"]) == budget["raised"] >= 1 and budget["raised_layers"]
    assert (out / "budget.png").is_file() and (out / "qstate.fallback.pt").is_file()
    assert "## Accuracy budget" in (out / "report.md").read_text()


def test_unreachable_budget_exits_1_and_keeps_the_closest_build(tmp_path, monkeypatch) -> None:
    import repapq_deploy.budget as budget

    # the two least sensitive tensors only: raising them cannot recover a 6-bit minmax build's drop
    monkeypatch.setattr(budget, "rank", lambda *args, **kwargs: rank(*args, **kwargs)[-2:])
    result, out = _build(tmp_path, "--eval", str(EXAMPLE / "eval.npz"), "--max-drop", "0")
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--max-drop 0 not met" in lines[0] and "kept" in lines[0]
    report = json.loads((out / "report.json").read_text())
    assert report["budget"]["met"] is False and (out / "model.ort.onnx").is_file()
    kept = report["budget"]["raised"]
    assert report["budget"]["steps"][-1]["shortfall"] >= 0 and kept in (1, 2)
    # the folder holds the closest step: its report and its fallback state
    assert report["accuracy"]["drop"]["drop_pp"] == min(s["shortfall"] for s in report["budget"]["steps"][1:])
