"""The Python API on in-memory models and DataLoaders, against what ``build`` makes of the same inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
import torch.nn as nn
from onnx import numpy_helper
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

import repapq_deploy as rd
from repapq_deploy.options import BuildOptions
from repapq_deploy.pipeline import Build

README = Path(__file__).resolve().parents[1] / "README.md"
SAMPLES, SHAPE = 48, (1, 32, 32)


class RepBlock(nn.Module):
    """A RepVGG-style block as a user writes it: 3x3 conv+BN, 1x1 conv+BN and an identity BN, summed."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.point = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.identity = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x) + self.point(x) + self.identity(x))


class TinyRepNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(RepBlock(8), RepBlock(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _randomize_bn(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def samples() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(SAMPLES, *SHAPE, generator=g), torch.randint(0, 10, (SAMPLES,), generator=g)


def _graph(path: Path) -> tuple[list[tuple], dict[str, np.ndarray]]:
    model = onnx.load(str(path))
    nodes = [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    return nodes, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _assert_same_graph(a: Path, b: Path) -> None:
    nodes_a, init_a = _graph(a)
    nodes_b, init_b = _graph(b)
    assert nodes_a == nodes_b
    assert init_a.keys() == init_b.keys()
    for name, value in init_a.items():
        np.testing.assert_array_equal(value, init_b[name], err_msg=name)


def _build_export(tmp_path: Path, model_file: Path, x: torch.Tensor, **options) -> Path:
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x.numpy())
    out = tmp_path / "build"
    Build(BuildOptions.from_flat(model=str(model_file), calib=str(calib), out=str(out), **options)).run("export")
    return out / "model.qdq.onnx"


@pytest.mark.parametrize("method", ["minmax", "repapq"])
def test_timm_model_in_memory_exports_what_build_exports(tmp_path: Path, samples, method: str) -> None:
    x, y = samples
    model = _randomize_bn(timm.create_model("repvgg_a0", num_classes=10, in_chans=1))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    recipe = rd.Recipe(reconstruction={"iters": 3} if method == "repapq" else {})
    qm = rd.quantize(model, loader, method=method, recipe=recipe, calib_count=32, seed=3)
    assert isinstance(qm, rd.QuantizedModel) and qm.profile == "onnxruntime"
    ours = qm.export(tmp_path / "api.qdq.onnx")

    checkpoint = tmp_path / "repvgg_a0.safetensors"
    save_file(model.state_dict(), checkpoint,
              metadata={"arch": "repvgg_a0", "num_classes": "10", "in_chans": "1", "input_size": "1,32,32",
                        "mean": "[0.5]", "std": "[0.5]"})
    theirs = _build_export(tmp_path, checkpoint, x, method=method, calib_count=32, seed=3,
                           recipe=recipe, threads=torch.get_num_threads())
    _assert_same_graph(ours, theirs)


def test_hand_written_module_exports_what_build_exports(tmp_path: Path, samples) -> None:
    x, _ = samples
    model = _randomize_bn(TinyRepNet())
    qm = rd.quantize(model, DataLoader(TensorDataset(x), batch_size=8), method="percentile", profile="tensorrt",
                     calib_count=None)
    assert qm.reparam["branches_merged"] > 0  # the user's parallel branches became one conv each
    ours = qm.export(tmp_path / "api.qdq.onnx")
    pickled = tmp_path / "tiny.pt"
    torch.save(model, pickled)
    theirs = _build_export(tmp_path, pickled, x, method="percentile", profile="tensorrt", calib_count=None,
                           trust_pickle=True, input_size=SHAPE, mean=(0.5,), std=(0.5,),
                           threads=torch.get_num_threads())
    _assert_same_graph(ours, theirs)


def test_engine_and_typed_report(tmp_path: Path, samples) -> None:
    x, y = samples
    model = _randomize_bn(TinyRepNet())
    qm = rd.quantize(model, x, method="minmax", calib_count=None)
    out = qm(x[:4])
    assert out.shape == (4, 10)
    engine = rd.build_engine(qm, out=tmp_path / "engine")
    assert (tmp_path / "engine" / "model.ort.onnx").is_file() and engine.info.int8_op_fraction == 1.0
    assert engine(x[:2].numpy()).shape == (2, 10)
    report = rd.verify(qm, engine, [(x, y)], bench_seconds=0.1)
    assert isinstance(report, rd.Report) and report.accuracy.samples == SAMPLES
    assert report.accuracy.fp32_top1 is not None and 0 <= report.accuracy.agreement_top1 <= 100
    assert set(report.latency.speedup) == {1, 32} and report.latency.reference == "onnxruntime-fp32"
    assert json.loads(report.to_json())["accuracy"]["samples"] == SAMPLES
    assert "## Latency" in report.to_markdown()


def test_reference_engine_reports_no_integer_kernels(samples) -> None:
    x, _ = samples
    qm = rd.quantize(_randomize_bn(TinyRepNet()), x, method="minmax", profile="tensorrt", calib_count=None)
    engine = rd.build_engine(qm)  # a temporary folder that lives with the engine
    assert engine.backend.name == "onnxruntime-reference"
    assert engine.info.int8_op_fraction is None and engine.info.qdq_coverage == 1.0


def test_bad_inputs_name_the_argument(samples) -> None:
    x, _ = samples
    with pytest.raises(rd.ConfigError, match="model"):
        rd.quantize(object(), x)
    with pytest.raises(rd.InputError, match="calib"):
        rd.quantize(TinyRepNet(), [])
    with pytest.raises(rd.InputError, match=r"calib.*N,C,H,W"):
        rd.quantize(TinyRepNet(), torch.randn(4, 32, 32))
    with pytest.raises(rd.ConfigError, match="qdrop"):
        rd.quantize(TinyRepNet(), x, method="minmax", recipe=rd.Recipe(qdrop=0.1))


def test_readme_api_example_runs(tmp_path: Path, monkeypatch) -> None:
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = next(b for b in blocks if "rd.quantize" in b)
    monkeypatch.chdir(README.parent)
    namespace: dict = {}
    exec(compile(example.replace("engines/", f"{tmp_path}/"), "README.md", "exec"), namespace)
    report = namespace["report"]
    assert isinstance(report, rd.Report) and report.accuracy.engine_top1 > 80


def test_build_runs_the_file_pipeline_and_returns_a_typed_report(tmp_path: Path) -> None:
    example = README.parent / "examples" / "fashion_mnist"
    report = rd.build(example / "model.safetensors", example / "calib.npz", out=str(tmp_path / "b"),
                      eval=str(example / "eval.npz"), method="minmax", eval_count=200, bench_seconds=0.1)
    assert isinstance(report, rd.Report) and report.accuracy.samples == 200
    assert report.engine.int8_op_fraction == 1.0 and (tmp_path / "b" / "report.json").is_file()
    with pytest.raises(rd.ConfigError, match="unknown build setting 'evaluation'"):
        rd.build(example / "model.safetensors", evaluation="x")


def test_export_fp32_writes_the_fused_model(tmp_path: Path, samples) -> None:
    x, _ = samples
    qm = rd.quantize(_randomize_bn(TinyRepNet()), x, method="minmax", calib_count=None)
    nodes, _ = _graph(qm.export_fp32(tmp_path / "fp32.onnx"))
    assert not any(op in ("QuantizeLinear", "DequantizeLinear") for op, _, _ in nodes)
    assert sum(op == "Conv" for op, _, _ in nodes) == 3  # the stem and one fused conv per block
