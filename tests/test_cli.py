"""The command line end to end on the bundled Fashion-MNIST example (timm ``repvgg_nano``, 1x32x32).

Every command runs in-process through ``click.testing.CliRunner`` (logs go to stderr through the
package's rich console, which follows ``sys.stderr``); one test runs the real console scripts. A
successful build per (profile, bits) is made once and shared; tests that re-run a build work on a
copy of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner, Result
from conftest import EXAMPLE_SPLITS
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from repapq_deploy.artifacts import model_digest
from repapq_deploy.backends.registry import tensorrt_present
from repapq_deploy.cli import main
from repapq_deploy.pipeline import STAGES

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fashion_mnist"
MODEL, CALIB, EVAL = EXAMPLE / "model.safetensors", EXAMPLE / "calib.npz", EXAMPLE / "eval.npz"
FAST = ("--bench-seconds", "0.2", "--eval-count", "200")
ARTIFACTS = {"fused.pt", "qstate.pt", "model.fp32.onnx", "model.qdq.onnx", "model.ort.onnx", "model.ref.onnx",
             "model.qdq.fp16.onnx", "model.fp16.onnx",
             "report.json", "report.md", "latency.png", "accuracy.png"}
REPORTS = {"report.json", "report.md", "latency.png", "accuracy.png"}
METHODS = ("minmax", "percentile", "entropy", "mse", "mae")
REPORT_KEYS = (
    "accuracy.fp32.top1", "accuracy.fake_quant.top1", "accuracy.engine.top1", "accuracy.agreement_top1",
    "accuracy.cosine", "engine.backend", "engine.int8_op_fraction", "latency_ms.fp32.bs1", "latency_ms.engine.bs1",
    "latency_ms.fp32.bs32", "latency_ms.engine.bs32", "calibration.method", "calibration.images",
    "calibration.seconds", "config", "versions",
)


def cli(*args) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def pipeline_args(command: str, out: Path, *extra) -> tuple:
    return (command, MODEL, "--calib", CALIB, "--eval", EVAL, "--out", out, *FAST, *extra)


def stage_log(result: Result) -> tuple[set[str], set[str]]:
    """(stages that ran, stages skipped as up to date), from the log lines on stderr."""
    ran = {s for s in STAGES if re.search(rf"^{s}: done in", result.stderr, re.M)}
    skipped = {s for s in STAGES if re.search(rf"^{s}: up to date", result.stderr, re.M)}
    return ran, skipped


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def dig(d: dict, dotted: str):
    for key in dotted.split("."):
        assert isinstance(d, dict) and key in d, f"report has no {dotted}"
        d = d[key]
    return d


def tmp_leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*") if p.name.endswith(".tmp"))


def copy_build(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@dataclass
class Built:
    profile: str
    bits: int
    out: Path
    result: Result

    @property
    def report(self) -> dict:
        return json.loads((self.out / "report.json").read_text())


@pytest.fixture(scope="module")
def build_of(tmp_path_factory):
    """``build_of(profile, bits)``: the shared successful build of the example for that configuration."""
    cache: dict[tuple[str, int], Built] = {}

    def get(profile: str, bits: int) -> Built:
        if (profile, bits) not in cache:
            out = tmp_path_factory.mktemp(f"build-{profile}-int{bits}")
            result = cli(*pipeline_args("build", out, "--profile", profile, "--bits", bits))
            assert result.exit_code == 0, result.output
            cache[profile, bits] = Built(profile, bits, out, result)
        return cache[profile, bits]

    return get


@pytest.fixture(scope="module")
def ort8(build_of) -> Built:
    return build_of("onnxruntime", 8)


@pytest.fixture(scope="module")
def reparam_dir(tmp_path_factory) -> Path:
    """An output folder after ``repapq-deploy reparam`` only (tests copy it before adding stages)."""
    out = tmp_path_factory.mktemp("reparam-only")
    result = cli(*pipeline_args("reparam", out))
    assert result.exit_code == 0, result.output
    return out


CONFIGS = [("onnxruntime", 8), ("onnxruntime", 6), ("tensorrt", 8), ("tensorrt", 6)]
config_ids = [f"{p}-int{b}" for p, b in CONFIGS]


# --- full builds -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("profile", "bits"), CONFIGS, ids=config_ids)
def test_build_writes_a_complete_report(build_of, profile, bits):
    b = build_of(profile, bits)
    assert b.result.stdout == ""  # without --json, everything goes to stderr
    assert "report.md" in b.result.stderr
    report = b.report
    for key in REPORT_KEYS:
        dig(report, key)
    acc = report["accuracy"]
    assert acc["fp32"]["top1"] > 80
    assert acc["samples"] == 200 and acc["labelled"] is True
    assert acc["engine"]["top1"] >= acc["fp32"]["top1"] - 3  # quantization keeps the accuracy
    assert acc["agreement_top1"] >= 90 and acc["cosine"] > 0.95
    # the paired drop is the top-1 difference, counted image by image
    assert acc["drop"]["drop_pp"] == pytest.approx(acc["fp32"]["top1"] - acc["engine"]["top1"], abs=1e-9)
    assert acc["drop"]["lost"] + acc["drop"]["gained"] <= round((100 - acc["agreement_top1"]) / 100 * 200)
    assert "images lost" in (b.out / "report.md").read_text()
    assert report["export"]["check"]["agreement_top1"] == 100
    assert report["reparam"]["max_rel_error"] <= 1e-4
    assert report["reparam"]["load"] == {"format": "safetensors", "arch": "repvgg_nano", "num_classes": 10,
                                         "in_chans": 1, "layout": "timm"}
    # method auto: the candidates are fitted on 205 images and compared with FP32 on the other 51
    choice = report["calibration"]["choice"]
    assert choice["method"] == "auto" and (choice["fit_images"], choice["held_out_images"]) == (205, 51)
    assert report["calibration"]["method"] == choice["chosen"]
    assert report["calibration"]["images"] == choice["final_fit_images"] in (205, 256)  # range methods refit
    assert [c["method"] for c in choice["candidates"]][:3] == ["minmax", "percentile", "mse"]
    assert all(0 < c["cosine"] <= 1 + 1e-9 and c["images"] == 51 for c in choice["candidates"])
    assert "held out" in (b.out / "report.md").read_text()
    assert report["calibration"]["seconds"] > 0
    assert report["config"]["profile"] == profile and report["config"]["bits"] == bits
    assert report["config"]["out"] == str(b.out)
    assert report["versions"]["onnxruntime"] and report["versions"]["torch"]
    for bs in ("bs1", "bs32"):
        assert report["latency_ms"]["fp32"][bs] > 0 and report["latency_ms"]["engine"][bs] > 0
    md = (b.out / "report.md").read_text()
    assert md.startswith("# repapq-deploy report")
    assert report["engine"]["backend"] in md


@pytest.mark.parametrize("bits", [8, 6])
def test_ort_profile_engine_runs_every_layer_in_integer_kernels(build_of, bits):
    b = build_of("onnxruntime", bits)
    engine = b.report["engine"]
    assert engine["backend"] == "onnxruntime"
    assert engine["path"] == "model.ort.onnx" and (b.out / "model.ort.onnx").is_file()
    assert engine["int8_op_fraction"] == 1.0
    assert engine["float_ops"] == 0
    # the split identity taps run as integer depthwise convs and integer adds too
    assert engine["op_counts"]["QLinearConv"] == 9 + EXAMPLE_SPLITS and engine["op_counts"]["QGemm"] == 1
    assert engine["op_counts"]["QLinearAdd"] == EXAMPLE_SPLITS
    assert b.report["warnings"] == []


@pytest.mark.parametrize("bits", [8, 6])
def test_tensorrt_profile_is_verified_by_reference_execution(build_of, bits):
    b = build_of("tensorrt", bits)
    engine = b.report["engine"]
    assert engine["backend"] == "onnxruntime-reference"
    assert b.report["config"]["engine_backend"] == "onnxruntime-reference"
    assert engine["path"] == "model.ref.onnx"
    assert (b.out / "model.ref.onnx").read_bytes() == (b.out / "model.qdq.onnx").read_bytes()
    assert not (b.out / "model.ort.onnx").exists()
    # reference execution runs float kernels: no integer share to report, but every conv/gemm reads
    # dequantized inputs
    assert engine["int8_op_fraction"] is None and engine["qdq_coverage"] == 1.0
    assert any("not INT8 latency" in n for n in engine["notes"])


@pytest.mark.parametrize(("profile", "bits"), CONFIGS, ids=config_ids)
def test_manifest_records_every_stage(build_of, profile, bits):
    b = build_of(profile, bits)
    m = manifest(b.out)
    assert set(m["stages"]) == set(STAGES)
    for name, entry in m["stages"].items():
        assert entry["status"] == "ok", name
        assert entry["inputs"]["code"] and all(isinstance(v, str) for v in entry["inputs"].values())
        assert isinstance(entry["options"], dict)
        assert entry["outputs"], name
        for file, digest in entry["outputs"].items():
            assert sha256(b.out / file) == digest, f"{name}: {file}"
    assert set(m["stages"]["reparam"]["outputs"]) == {"fused.pt"}
    assert set(m["stages"]["calibrate"]["outputs"]) == {"qstate.pt"}
    fp16 = {"model.qdq.fp16.onnx", "model.fp16.onnx"} if profile == "tensorrt" else set()
    assert set(m["stages"]["export"]["outputs"]) == {"model.fp32.onnx", "model.qdq.onnx"} | fp16
    assert m["stages"]["export"]["result"]["lint"]["violations"] == []
    assert set(m["stages"]["engine"]["outputs"]) == {b.report["engine"]["path"]}
    assert set(m["stages"]["verify"]["outputs"]) == REPORTS
    assert m["stages"]["reparam"]["inputs"]["model"] == model_digest(MODEL)
    assert m["stages"]["calibrate"]["options"]["method"] == "auto"
    assert m["stages"]["calibrate"]["options"]["bits"] == bits
    assert m["stages"]["verify"]["result"] == b.report


@pytest.mark.parametrize(("profile", "bits"), CONFIGS, ids=config_ids)
def test_build_leaves_no_temporary_files(build_of, profile, bits):
    b = build_of(profile, bits)
    assert tmp_leftovers(b.out) == []
    assert {p.name for p in b.out.iterdir()} <= ARTIFACTS | {"manifest.json"}


def test_artifacts_honour_the_umask(ort8):
    umask = os.umask(0)
    os.umask(umask)
    for name in ("fused.pt", "model.ort.onnx", "report.json", "manifest.json"):
        assert stat.S_IMODE((ort8.out / name).stat().st_mode) == 0o666 & ~umask, name


def test_identical_runs_write_identical_artifacts(ort8, reparam_dir):
    # Two independent runs of the reparam stage with the same model, data and options.
    assert sha256(reparam_dir / "fused.pt") == sha256(ort8.out / "fused.pt")


# --- re-runs ----------------------------------------------------------------------------------------------

def test_rerun_skips_every_stage(ort8, tmp_path):
    out = copy_build(ort8.out, tmp_path / "again")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    result = cli(*pipeline_args("build", out, "--profile", "onnxruntime", "--bits", 8))
    assert result.exit_code == 0, result.output
    assert stage_log(result) == (set(), set(STAGES))
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    assert after == before  # manifest ('finished' times included) and every artifact untouched


def test_same_weights_saved_again_skip_every_stage(ort8, tmp_path):
    with safe_open(str(MODEL), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    resaved = tmp_path / "model.safetensors"
    save_file(tensors, str(resaved), metadata=dict(reversed(list(meta.items()))))
    out = copy_build(ort8.out, tmp_path / "resaved")
    result = cli("build", resaved, "--calib", CALIB, "--eval", EVAL, "--out", out, *FAST,
                 "--profile", "onnxruntime", "--bits", 8)
    assert result.exit_code == 0, result.output
    assert stage_log(result) == (set(), set(STAGES))


def test_changed_method_reruns_calibrate_and_later_only(ort8, tmp_path):
    out = copy_build(ort8.out, tmp_path / "minmax")
    old = manifest(out)["stages"]
    result = cli(*pipeline_args("build", out, "--profile", "onnxruntime", "--method", "minmax"))
    assert result.exit_code == 0, result.output
    assert stage_log(result) == ({"calibrate", "export", "engine", "verify"}, {"reparam"})
    new = manifest(out)["stages"]
    assert new["reparam"] == old["reparam"]
    assert new["calibrate"]["options"]["method"] == "minmax"
    old_scales = torch.load(ort8.out / "qstate.pt", weights_only=True)["scales"]
    new_scales = torch.load(out / "qstate.pt", weights_only=True)["scales"]
    assert old_scales.keys() == new_scales.keys()
    assert any(not torch.equal(old_scales[k], new_scales[k]) for k in old_scales)  # really recalibrated
    assert json.loads((out / "report.json").read_text())["calibration"]["method"] == "minmax"


def test_changed_thread_count_reruns_calibrate(ort8, tmp_path, monkeypatch):
    from repapq_deploy import environment

    # float sums split differently across threads and reconstruction amplifies that, so a build made with
    # another thread count is not this one's: the count is a calibrate option
    monkeypatch.setattr(environment, "_threads", environment._threads)  # --threads sets it process-wide
    threads = torch.get_num_threads()
    out = copy_build(ort8.out, tmp_path / "threads")
    assert manifest(out)["stages"]["calibrate"]["options"]["cpu_threads"] == threads
    args = pipeline_args("build", out, "--profile", "onnxruntime", "--method", "minmax")
    assert cli(*args).exit_code == 0
    try:
        result = cli(*args, "--threads", threads + 1)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    # min-max's scales come out the same, so the stages after calibrate find their inputs unchanged
    assert stage_log(result)[0] == {"calibrate"}
    assert manifest(out)["stages"]["calibrate"]["options"]["cpu_threads"] == threads + 1


def test_offset_relu_rebuilds_from_calibrate_with_a_matching_export(build_of, tmp_path):
    import onnx

    out = copy_build(build_of("tensorrt", 8).out, tmp_path / "offset")
    result = cli(*pipeline_args("build", out, "--profile", "tensorrt", "--offset-relu", "all", "--method", "minmax"))
    assert result.exit_code == 0, result.output
    assert stage_log(result)[0] == {"calibrate", "export", "engine", "verify"}
    calibrated = manifest(out)["stages"]["calibrate"]
    assert calibrated["options"]["offset_relu"] == "all"
    counted = calibrated["result"]["offset_relu"]
    assert 0 < counted["offset"] < counted["quantizers"]
    assert f"offset-relu all: {counted['offset']} of {counted['quantizers']}" in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["check"]["agreement_top1"] == 100
    nodes = onnx.load(str(out / "model.qdq.onnx")).graph.node
    producer = {o: n.op_type for n in nodes for o in n.output}
    # the example's unsplit convs and its classifier read offset tensors; a conv's ReLU output is stored
    # by its Q alone (shift in the conv's bias), any other through a Sub before the Q; every weighted
    # layer still reads a DequantizeLinear (the shift went into the biases)
    subs = [n for n in nodes if n.op_type == "Sub"]
    absorbed = [n for n in nodes if n.op_type == "Conv" and n.input[2].endswith("_relu_offset_bias")]
    assert len(subs) == 1 and producer[subs[0].input[0]] == "Flatten"  # the classifier's pooled input
    assert len(absorbed) == counted["offset"] - 1
    assert all([n.op_type for n in nodes if sub.output[0] in n.input] == ["QuantizeLinear"] for sub in subs)
    assert all(producer[n.input[0]] == "DequantizeLinear" for n in nodes if n.op_type in ("Conv", "Gemm"))


@pytest.mark.parametrize(("profile", "resolved"), [("tensorrt", "unpadded"), ("onnxruntime", "none")])
def test_offset_relu_auto_is_the_profiles_choice_and_recorded_as_such(build_of, profile, resolved):
    import onnx

    built = build_of(profile, 8)  # no --offset-relu: auto
    calibrated = manifest(built.out)["stages"]["calibrate"]
    assert calibrated["options"]["offset_relu"] == resolved  # the manifest names the mode that ran
    nodes = onnx.load(str(built.out / "model.qdq.onnx")).graph.node
    ops = {n.op_type for n in nodes}
    if resolved == "none":
        assert "offset_relu" not in calibrated["result"] and "Sub" not in ops
    else:  # unpadded readers only: no border map, and conv outputs need no Sub (only the pooled classifier input)
        assert calibrated["result"]["offset_relu"]["offset"] > 0
        assert f"offset-relu unpadded: {calibrated['result']['offset_relu']['offset']} of" in built.result.stderr
        assert not any(n.name.endswith("_offset_border") for n in nodes)
        producer = {o: n.op_type for n in nodes for o in n.output}
        assert all(producer[n.input[0]] == "Flatten" for n in nodes if n.op_type == "Sub")


def test_offset_relu_on_the_onnxruntime_profile_is_refused(tmp_path):
    out = tmp_path / "out"
    result = cli("build", MODEL, "--calib", CALIB, "--out", out, "--profile", "onnxruntime", "--offset-relu", "all")
    assert_clean_failure(result, out, "recipe key offset_relu all", "--profile tensorrt")


def test_force_reruns_every_stage(ort8, tmp_path):
    out = copy_build(ort8.out, tmp_path / "forced")
    result = cli(*pipeline_args("build", out, "--profile", "onnxruntime", "--force"))
    assert result.exit_code == 0, result.output
    assert stage_log(result) == (set(STAGES), set())
    assert tmp_leftovers(out) == []


def test_json_prints_the_report_and_nothing_else_on_stdout(ort8, tmp_path):
    out = copy_build(ort8.out, tmp_path / "json")
    result = cli(*pipeline_args("build", out, "--profile", "onnxruntime", "--json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads((out / "report.json").read_text())
    assert "up to date" in result.stderr


def test_default_out_folder_is_named_after_the_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("reparam", MODEL, "--calib", CALIB)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "engines" / "model" / "fused.pt").is_file()


# --- stage subcommands -------------------------------------------------------------------------------------

def test_reparam_subcommand_writes_only_the_fused_model(reparam_dir):
    assert {p.name for p in reparam_dir.iterdir()} == {"fused.pt", "manifest.json"}
    entry = manifest(reparam_dir)["stages"]["reparam"]
    assert set(manifest(reparam_dir)["stages"]) == {"reparam"}
    assert entry["status"] == "ok" and entry["result"]["max_rel_error"] <= 1e-4
    fused = torch.load(reparam_dir / "fused.pt", weights_only=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 9


def test_stage_subcommands_build_up_the_folder(reparam_dir, tmp_path):
    out = copy_build(reparam_dir, tmp_path / "stages")
    expected = {"fused.pt", "manifest.json"}
    for command, new_files in (("calibrate", {"qstate.pt"}),
                               ("export", {"model.fp32.onnx", "model.qdq.onnx"}),
                               ("engine", {"model.ort.onnx"})):
        result = cli(*pipeline_args(command, out))
        assert result.exit_code == 0, f"{command}: {result.output}"
        assert stage_log(result) == ({command}, set(STAGES[:STAGES.index(command)])), command
        expected |= new_files
        assert {p.name for p in out.iterdir()} == expected, command
        assert result.stdout == ""
    # a later build reuses all of it and only verifies
    result = cli(*pipeline_args("build", out))
    assert result.exit_code == 0, result.output
    assert stage_log(result) == ({"verify"}, set(STAGES) - {"verify"})
    assert {p.name for p in out.iterdir()} == expected | REPORTS


@pytest.mark.parametrize(("count", "warned"), [(64, True), (256, False)])
def test_reconstruction_on_few_calibration_images_is_warned_about(reparam_dir, tmp_path, count, warned):
    out = copy_build(reparam_dir, tmp_path / "few")
    result = cli(*pipeline_args("build", out, "--calib-count", count, "--method", "repapq", "--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    choice = report["calibration"]["choice"]
    assert report["calibration"]["method"] == "repapq" and choice["fit_images"] + choice["held_out_images"] == count
    assert report["calibration"]["images"] == choice["fit_images"]
    assert any("over-fit" in w for w in report["warnings"]) is warned


@pytest.mark.parametrize("method", METHODS)
def test_every_calibration_method_exports(reparam_dir, tmp_path, method):
    out = copy_build(reparam_dir, tmp_path / method)
    result = cli(*pipeline_args("export", out, "--method", method, "--json"))
    assert result.exit_code == 0, result.output
    assert stage_log(result) == ({"calibrate", "export"}, {"reparam"})
    exported = json.loads(result.stdout)  # --json on a stage command: that stage's result
    assert exported["check"]["agreement_top1"] == 100
    assert exported["qdq_graph"]["ops"]["QuantizeLinear"] > 0
    state = torch.load(out / "qstate.pt", weights_only=True)
    assert state["method"] == method
    assert all(torch.isfinite(s).all() and (s > 0).all() for s in state["scales"].values())
    assert manifest(out)["stages"]["calibrate"]["result"]["method"] == method
    assert {"model.fp32.onnx", "model.qdq.onnx"} <= {p.name for p in out.iterdir()}
    assert not (out / "model.ort.onnx").exists()
    assert tmp_leftovers(out) == []


@pytest.mark.parametrize("split", [True, False])
def test_split_identity_option_decides_the_exported_graph(reparam_dir, tmp_path, split):
    out = copy_build(reparam_dir, tmp_path / str(split))
    flag = "--split-identity" if split else "--no-split-identity"
    result = cli(*pipeline_args("export", out, "--method", "minmax", flag, "--json"))
    assert result.exit_code == 0, result.output
    ops = json.loads(result.stdout)["qdq_graph"]["ops"]
    # split: each identity block's tap is a depthwise 1x1 conv beside its kernel, joined by an Add
    assert ops["Conv"] == 9 + (EXAMPLE_SPLITS if split else 0)
    assert ops.get("Add", 0) == (EXAMPLE_SPLITS if split else 0)
    config = torch.load(out / "qstate.pt", weights_only=True)["config"]
    assert config["split_identity"] is split
    # the calibrate stage measured each candidate's error with and without the split and recorded its choice
    decided = manifest(out)["stages"]["calibrate"]["result"].get("identity_split", {})
    assert len(decided) == (EXAMPLE_SPLITS if split else 0)
    assert all(d["split"] and d["relative_error_split"] < d["relative_error"] for d in decided.values())
    assert (config["split_layers"] is None) is not split
    assert sorted(config["split_layers"] or []) == sorted(decided)


def test_console_scripts(reparam_dir, tmp_path):
    script = Path(sys.executable).with_name("repapq-deploy")
    assert script.is_file(), "repapq-deploy console script not installed next to the interpreter"
    version = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0, version.stderr
    assert metadata.version("repapq-deploy") in version.stdout
    out = copy_build(reparam_dir, tmp_path / "module")
    proc = subprocess.run([sys.executable, "-m", "repapq_deploy", "calibrate", MODEL, "--calib", CALIB,
                           "--out", out, "--method", "minmax", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["method"] == "minmax"  # stdout holds the JSON only
    assert "reparam: up to date" in proc.stderr
    assert (out / "qstate.pt").is_file()


# --- bad inputs ---------------------------------------------------------------------------------------------

def assert_clean_failure(result: Result, out: Path, *needles: str, keep: set[str] = frozenset()) -> str:
    """Exit code 1, one 'error:' line (the last one) containing every needle, no traceback, and no
    artifacts beyond ``keep`` nor temporary files in ``out``. Returns the error line."""
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}\n{result.output}"
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip("\n").endswith(errors[0]), "the message should be a single (last) line"
    for needle in needles:
        assert needle in errors[0]
    if out.exists():
        assert tmp_leftovers(out) == []
        assert {p.name for p in out.iterdir()} & ARTIFACTS <= keep
    return errors[0]


def test_missing_model_file(tmp_path):
    model, out = tmp_path / "missing.safetensors", tmp_path / "out"
    result = cli("build", model, "--calib", CALIB, "--out", out)
    assert_clean_failure(result, out, str(model), "not found")


def test_error_names_a_path_with_brackets(tmp_path):
    model, out = tmp_path / "run[v2]" / "model.safetensors", tmp_path / "out"
    result = cli("build", model, "--calib", CALIB, "--out", out)
    assert_clean_failure(result, out, str(model))


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_truncated_model_file(tmp_path, kind):
    full = tmp_path / f"full.{kind}"
    if kind == "safetensors":
        shutil.copyfile(MODEL, full)
    else:
        torch.save(load_file(str(MODEL)), full)
    model, out = tmp_path / f"truncated.{kind}", tmp_path / "out"
    data = full.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    result = cli("build", model, "--arch", "repvgg_nano", "--calib", CALIB, "--out", out)
    assert_clean_failure(result, out, str(model), "truncated")


def test_model_file_with_damaged_zip_directory(tmp_path):
    full, model, out = tmp_path / "full.pt", tmp_path / "damaged.pt", tmp_path / "out"
    torch.save(load_file(str(MODEL)), full)
    data = full.read_bytes()
    model.write_bytes(data[: len(data) // 2] + data[-22:])  # keeps the end-of-central-directory record
    result = cli("build", model, "--arch", "repvgg_nano", "--calib", CALIB, "--out", out)
    assert_clean_failure(result, out, str(model))


def test_model_file_that_is_not_a_checkpoint(tmp_path):
    model, out = tmp_path / "notes.pt", tmp_path / "out"
    model.write_bytes(b"this is not a checkpoint\n" * 10)
    result = cli("build", model, "--arch", "repvgg_nano", "--calib", CALIB, "--out", out)
    assert_clean_failure(result, out, str(model))


def test_git_lfs_pointer_is_not_blamed_on_pickle(tmp_path):
    model, out = tmp_path / "model.pt", tmp_path / "out"
    model.write_text("version https://git-lfs.github.com/spec/v1\n"
                     f"oid sha256:{sha256(MODEL)}\nsize {MODEL.stat().st_size}\n")
    result = cli("build", model, "--arch", "repvgg_nano", "--calib", CALIB, "--out", out)
    line = assert_clean_failure(result, out, str(model))
    assert "--trust-pickle" not in line


@pytest.fixture
def pickled_module(tmp_path) -> Path:
    path = tmp_path / "pickled.pt"
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), path)
    return path


def test_pickled_module_needs_trust_pickle(pickled_module, tmp_path):
    out = tmp_path / "out"
    result = cli("build", pickled_module, "--calib", CALIB, "--out", out)
    assert_clean_failure(result, out, str(pickled_module), "--trust-pickle")


def test_pickle_refusal_names_the_class(pickled_module, tmp_path):
    out = tmp_path / "out"
    result = cli("build", pickled_module, "--calib", CALIB, "--out", out)
    assert_clean_failure(result, out, "torch.nn.modules.container.Sequential")


def test_wrong_arch(tmp_path):
    out = tmp_path / "out"
    result = cli("build", MODEL, "--arch", "mobileone_nano", "--calib", CALIB, "--out", out)
    assert_clean_failure(result, out, str(MODEL), "--arch mobileone_nano", "missing keys", "unexpected keys")


def test_nan_weights(tmp_path):
    with safe_open(str(MODEL), "pt") as f:
        meta = f.metadata()
    weights = load_file(str(MODEL))
    name = sorted(k for k in weights if k.endswith(".weight") and weights[k].ndim == 4)[0]
    weights[name].view(-1)[3] = float("nan")
    model, out = tmp_path / "nan.safetensors", tmp_path / "out"
    save_file(weights, str(model), metadata=meta)
    result = cli("build", model, "--calib", CALIB, "--out", out)
    assert_clean_failure(result, out, str(model), name, "NaN")


def test_missing_calibration_file(tmp_path):
    calib, out = tmp_path / "nope.npz", tmp_path / "out"
    result = cli("build", MODEL, "--calib", calib, "--out", out)
    assert_clean_failure(result, out, "--calib", str(calib), "not found")


def test_empty_calibration_folder(tmp_path):
    calib, out = tmp_path / "empty", tmp_path / "out"
    calib.mkdir()
    result = cli("build", MODEL, "--calib", calib, "--out", out)
    assert_clean_failure(result, out, "--calib", str(calib), "no images")


@pytest.mark.parametrize("shape", [(8, 3, 32, 32), (8, 1, 28, 28)], ids=["3-channels", "28x28"])
def test_calibration_tensors_of_the_wrong_shape(tmp_path, shape):
    calib, out = tmp_path / "calib.npz", tmp_path / "out"
    np.savez(calib, x=np.zeros(shape, np.float32))
    result = cli("build", MODEL, "--calib", calib, "--out", out)
    assert_clean_failure(result, out, "--calib", str(calib), str(shape), "(N, 1, 32, 32)")


def test_eval_labels_out_of_range(ort8, tmp_path):
    # Reuse the finished stages (only verify reads --eval); no report may appear.
    out = copy_build(ort8.out, tmp_path / "out")
    for name in REPORTS:
        (out / name).unlink()
    with np.load(EVAL) as z:
        x, y = z["x"][:16], z["y"][:16].copy()
    y[5] = 12
    bad = tmp_path / "eval.npz"
    np.savez(bad, x=x, y=y)
    result = cli("build", MODEL, "--calib", CALIB, "--eval", bad, "--out", out, *FAST)
    assert_clean_failure(result, out, "--eval", str(bad), "label 12", "[0, 10)",
                         keep=ARTIFACTS - REPORTS)
    assert manifest(out)["stages"]["verify"]["status"] == "failed"


def test_out_under_a_regular_file(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    out = blocker / "sub"
    result = cli("build", MODEL, "--calib", CALIB, "--out", out)
    assert_clean_failure(result, out, "--out", str(out))
    assert blocker.read_text() == "not a folder"


def test_out_in_a_read_only_folder(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running as a user (root) for whom a 0o500 folder is still writable")
        out = parent / "sub"
        result = cli("build", MODEL, "--calib", CALIB, "--out", out)
        assert_clean_failure(result, out, "--out", str(out))
        assert not out.exists()
    finally:
        parent.chmod(0o700)


def test_bits_4_is_rejected_by_click(tmp_path):
    out = tmp_path / "out"
    result = cli("build", MODEL, "--calib", CALIB, "--out", out, "--bits", "4")
    assert result.exit_code == 2
    assert "Invalid value for '--bits'" in result.stderr
    assert not out.exists()


@pytest.mark.skipif(tensorrt_present(), reason="TensorRT and a GPU are present")
def test_backend_tensorrt_without_tensorrt(tmp_path):
    out = tmp_path / "out"
    result = cli("build", MODEL, "--calib", CALIB, "--out", out, "--backend", "tensorrt")
    assert_clean_failure(result, out, "--backend tensorrt", "--backend onnxruntime")


@pytest.mark.skipif(tensorrt_present(), reason="TensorRT and a GPU are present")
def test_backend_tensorrt_error_keeps_the_install_hint(tmp_path):
    out = tmp_path / "out"
    result = cli("build", MODEL, "--calib", CALIB, "--out", out, "--backend", "tensorrt")
    assert_clean_failure(result, out, "repapq-deploy[gpu]")


def test_threads_limit_reaches_torch_and_onnxruntime(tmp_path):
    import onnx
    import onnx.helper as oh
    import torch

    from repapq_deploy import environment
    from repapq_deploy.backends.onnxruntime import OrtRunner

    before = torch.get_num_threads()
    try:
        environment.limit_threads(1)
        assert torch.get_num_threads() == 1 and environment.ort_threads() == 1
        path = tmp_path / "id.onnx"
        graph = oh.make_graph([oh.make_node("Relu", ["x"], ["y"])], "g",
                              [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
        onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), path)
        assert OrtRunner(path).threads == 1
    finally:
        environment.limit_threads(before)
        environment._threads = 0
