"""`repapq-deploy bench` and `repapq-deploy check`: the CI regression gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from repapq_deploy import gate
from repapq_deploy.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fashion_mnist"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gate") / "build"
    result = cli("build", EXAMPLE / "model.safetensors", "--calib", EXAMPLE / "calib.npz", "--eval",
                 EXAMPLE / "eval.npz", "--eval-count", "200", "--bench-seconds", "0.2", "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def baseline(build_dir, tmp_path) -> Path:
    path = tmp_path / "baselines" / "example.json"
    result = cli("check", build_dir, "--baseline", path, "--update-baseline")
    assert result.exit_code == 0, result.output
    return path


def edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_update_baseline_writes_the_compared_figures(build_dir, baseline):
    data = json.loads(baseline.read_text())
    report = json.loads((build_dir / "report.json").read_text())
    assert data["schema"] == gate.SCHEMA
    assert data["accuracy"]["engine_top1"] == report["accuracy"]["engine"]["top1"]
    assert data["latency"]["speedup"] == report["latency_ms"]["speedup"]
    assert data["int8_op_fraction"] == 1.0
    assert data["hardware"]["cpu"] == report["hardware"]["cpu"]
    assert not list(baseline.parent.glob(".*.tmp"))


def test_unchanged_build_passes(build_dir, baseline, tmp_path):
    summary = tmp_path / "summary.md"
    result = cli("check", build_dir / "report.json", "--baseline", baseline, "--summary", summary)
    assert result.exit_code == gate.PASS, result.output
    assert "REGRESSION" not in result.output
    text = summary.read_text()
    assert text.startswith("### repapq-deploy gate: passed")
    assert "| engine top-1 % |" in text


@pytest.mark.parametrize("edited,change,metric", [
    ("baseline", lambda d: d["accuracy"].update(engine_top1=d["accuracy"]["engine_top1"] + 1.0), "engine top-1"),
    # agreement is edited on the build's side: the build may agree 100 % with FP32 on its 200 images
    ("report", lambda d: d.update(agreement_top1=d["agreement_top1"] - 5), "agreement"),
    ("baseline", lambda d: d["latency"]["speedup"].update(bs32=d["latency"]["speedup"]["bs32"] * 1.5), "bs32"),
])
def test_injected_regression_fails(build_dir, baseline, tmp_path, edited, change, metric):
    # A baseline more accurate / faster than the build (or a build worse than its baseline) is a regression.
    report = tmp_path / "report.json"
    shutil.copy(build_dir / "report.json", report)
    if edited == "baseline":
        edit(baseline, change)
    else:
        edit(report, lambda d: change(d["accuracy"]))
    result = cli("check", report, "--baseline", baseline, "--json")
    assert result.exit_code == gate.REGRESSION, result.output
    out = json.loads(result.stdout)
    failed = [c["metric"] for c in out["checks"] if not c["ok"]]
    assert any(metric in m for m in failed), failed


def test_tolerances_are_respected(build_dir, baseline):
    edit(baseline, lambda d: d["latency"]["speedup"].update(bs1=d["latency"]["speedup"]["bs1"] * 1.05))
    assert cli("check", build_dir, "--baseline", baseline, "--max-latency-regression", "10%").exit_code == 0
    assert cli("check", build_dir, "--baseline", baseline, "--max-latency-regression", "2%").exit_code == 1


def test_int8_fraction_drop_is_a_regression(build_dir, baseline, tmp_path):
    report = tmp_path / "report.json"
    edit_src = json.loads((build_dir / "report.json").read_text())
    edit_src["engine"]["int8_op_fraction"] = 0.9
    report.write_text(json.dumps(edit_src))
    assert cli("check", report, "--baseline", baseline).exit_code == gate.REGRESSION


def test_other_hardware_is_refused_not_compared(build_dir, baseline):
    edit(baseline, lambda d: d["hardware"].update(cpu="Some Other CPU", cores=64))
    # even a much faster baseline is not a latency regression on other hardware
    edit(baseline, lambda d: d["latency"]["speedup"].update(bs1=99.0))
    result = cli("check", build_dir, "--baseline", baseline)
    assert result.exit_code == gate.OTHER_HARDWARE, result.output
    assert "Some Other CPU" in result.output


def test_accuracy_is_still_gated_on_other_hardware(build_dir, baseline):
    edit(baseline, lambda d: (d["hardware"].update(cpu="Some Other CPU"),
                              d["accuracy"].update(engine_top1=d["accuracy"]["engine_top1"] + 2)))
    assert cli("check", build_dir, "--baseline", baseline).exit_code == gate.REGRESSION


def test_missing_baseline(build_dir, tmp_path):
    result = cli("check", build_dir, "--baseline", tmp_path / "nope.json")
    assert result.exit_code == gate.BAD_INPUT
    assert "nope.json: not found" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"schema": 99}', '{"schema": 1}'])
def test_corrupt_baseline(build_dir, tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    result = cli("check", build_dir, "--baseline", path)
    assert result.exit_code == gate.BAD_INPUT, result.output
    assert "bad.json" in result.output and "error:" in result.output


def test_report_that_is_not_a_report(tmp_path, baseline):
    other = tmp_path / "report.json"
    other.write_text('{"hello": 1}')
    result = cli("check", other, "--baseline", baseline)
    assert result.exit_code == gate.BAD_INPUT
    assert "no 'accuracy' section" in result.output


def test_summary_appends(build_dir, baseline, tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("# earlier step\n")
    assert cli("check", build_dir, "--baseline", baseline, "--summary", summary).exit_code == 0
    text = summary.read_text()
    assert text.startswith("# earlier step\n") and "repapq-deploy gate" in text


def test_bench_engine_with_interleaved_reference(build_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = cli("bench", build_dir / "model.ort.onnx", "--reference", build_dir / "model.fp32.onnx",
                 "--batch", "1,4", "--iters", "15", "--warmup", "2", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert json.loads(out.read_text())["batches"].keys() == data["batches"].keys() == {"1", "4"}
    for entry in data["batches"].values():
        e = entry["engine"]
        assert e["iterations"] == 15 and 0 < e["p50_ms"] <= e["p90_ms"] <= e["p99_ms"]
        # the paired speed-up (median of per-iteration ratios), close to the ratio of the medians
        assert entry["speedup"] == pytest.approx(entry["reference"]["p50_ms"] / e["p50_ms"], rel=0.5)
    assert data["backend"] == "onnxruntime"
    assert data["hardware"]["cores"] >= 1 and data["versions"]["onnxruntime"]


def test_bench_table_and_reference_backend(build_dir, tmp_path):
    shutil.copy(build_dir / "model.qdq.onnx", tmp_path / "model.ref.onnx")
    result = cli("bench", tmp_path / "model.ref.onnx", "--batch", "2", "--iters", "5", "--warmup", "1")
    assert result.exit_code == 0, result.output
    assert "onnxruntime-reference" in result.output and "p50 ms" in result.output
    assert (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("args,message", [
    (("missing.onnx",), "not found"),
    (("{dir}/report.json",), "not a readable ONNX model"),
    (("{dir}/model.ort.onnx", "--reference", "nope.onnx"), "--reference nope.onnx: not found"),
])
def test_bench_bad_input(build_dir, args, message):
    result = cli("bench", *[a.format(dir=build_dir) for a in args], "--iters", "2")
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_bench_rejects_bad_batches(build_dir):
    result = cli("bench", build_dir / "model.ort.onnx", "--batch", "0,x")
    assert result.exit_code == 2
