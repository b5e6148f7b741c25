"""The library: quantize a model in memory, export it, build an engine, verify it.

::

    import repapq_deploy as rd

    qm = rd.quantize(model, calib_loader, bits=8, profile="onnxruntime", method="percentile")
    qm.export("model.qdq.onnx")                     # the exact graph the engine is built from
    engine = rd.build_engine(qm, out="engines/my")  # ONNX Runtime or TensorRT
    report = rd.verify(qm, engine, eval_loader)     # accuracy and latency against FP32
    print(report.accuracy.agreement_top1, report.latency.speedup[32])

Every step is the one ``repapq-deploy build`` runs, so the same model, data and settings give the same
graph. :func:`build` runs the whole pipeline on files, with the build folder's caching and manifest.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from repapq_deploy.backends import get_backend, resolve_backend
from repapq_deploy.backends.base import EngineInfo
from repapq_deploy.backends.engine import Engine
from repapq_deploy.backends.engine import build_engine as _build_engine_files
from repapq_deploy.calibrate.run import calibrate_model, check_method, quant_config
from repapq_deploy.data.loader import Preprocess
from repapq_deploy.data.sources import DataSource, as_dataset, preprocess_for
from repapq_deploy.errors import ConfigError, DeployError
from repapq_deploy.export.graphs import export_graphs
from repapq_deploy.export.onnx import export_fp32, export_qdq
from repapq_deploy.load import load_model
from repapq_deploy.quant.placement import FakeQuantModel
from repapq_deploy.quant.scheme import QuantConfig
from repapq_deploy.recipe import Recipe
from repapq_deploy.reparam import fuse_model
from repapq_deploy.verify.report import render_markdown
from repapq_deploy.verify.run import verify_engine

EXACTNESS_SAMPLES = 32


@dataclass
class QuantizedModel:
    """A calibrated model: the fused FP32 network, its fake-quant twin, and how it was made.

    Calling it runs the fake-quant model (bit-exact with the exported QDQ graph up to float rounding).
    """

    fused: nn.Module
    fake_quant: FakeQuantModel
    method: str
    recipe: Recipe
    preprocess: Preprocess
    calibration: dict
    reparam: dict
    samples: torch.Tensor = field(repr=False)  # the calibration samples (export traces and checks on them)
    warnings: list[str] = field(default_factory=list)

    @property
    def config(self) -> QuantConfig:
        """The quantization scheme: profile, bits, identity splits, offset grids."""
        return self.fake_quant.config

    @property
    def profile(self) -> str:
        return self.fake_quant.config.profile

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.fake_quant.module(x)

    def export(self, path: str | Path, opset: int | None = None) -> Path:
        """Write the QDQ ONNX graph (the calibrated model itself) to ``path``; returns the path."""
        export_qdq(self.fake_quant, self.samples, Path(path), opset or self.recipe.opset)
        return Path(path)

    def export_fp32(self, path: str | Path, opset: int | None = None) -> Path:
        """Write the fused FP32 model as ONNX (the float reference) to ``path``; returns the path."""
        export_fp32(self.fused, self.samples, Path(path), opset or self.recipe.opset)
        return Path(path)


def quantize(model: nn.Module | str | Path, calib: DataSource, *, bits: int = 8, first_last_bits: int = 8,
             profile: str | None = None, method: str = "auto", recipe: Recipe | str | Path | None = None,
             device: str = "cpu", seed: int = 0, calib_count: int | None = 256, arch: str | None = None,
             num_classes: int | None = None, input_size: tuple[int, int, int] | None = None,
             mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
             trust_pickle: bool = False) -> QuantizedModel:
    """Fuse ``model``'s multi-branch blocks, place quantizers for ``profile`` and calibrate them on ``calib``.

    ``model``: an ``nn.Module`` (timm model, the authors' RepVGG/MobileOne classes, any module whose
    blocks fuse themselves) or a checkpoint path (with ``arch`` for state dicts). ``calib``: a tensor
    or array of preprocessed N,C,H,W samples, a ``DataLoader`` or any iterable of batches (tensors or
    ``(x, y)`` pairs), or a path (image folder, .npz/.npy/.pt). ``calib_count`` samples are drawn with
    ``seed`` (None: all, in order). ``method``: ``auto`` (the candidate closest to FP32 on a held-out part
    of ``calib``, see ``recipe.holdout``), a reconstruction method or a range method. ``profile``:
    ``onnxruntime`` or ``tensorrt`` (default: TensorRT's where TensorRT and a GPU are present).
    ``recipe``: expert settings (a :class:`Recipe`, a named recipe such as ``"fast"``, or a file).
    """
    recipe = _recipe(recipe)
    check_method(method, recipe)
    profile = resolve_backend("auto", profile)[1]
    if isinstance(model, (str, Path)):
        loaded = load_model(model, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle)
        module, timm_model, metadata = loaded.module, loaded.arch is not None, loaded.metadata
    elif isinstance(model, nn.Module):
        module, timm_model, metadata = model.eval(), hasattr(model, "pretrained_cfg"), {}
    else:
        raise ConfigError(f"`model`: a {type(model).__name__} is not a model; pass an nn.Module or a checkpoint path")
    if isinstance(calib, (str, Path)) or input_size is not None:
        preprocess = _preprocess(module, timm_model, metadata, input_size, mean, std, recipe,
                                 calib if isinstance(calib, (str, Path)) else None)
        data = as_dataset(calib, preprocess=preprocess, count=calib_count, seed=seed)
    else:
        # in-memory samples are preprocessed already: their shape is the input size
        data = as_dataset(calib, count=calib_count, seed=seed)
        preprocess = _preprocess(module, timm_model, metadata, tuple(data.x.shape[1:]), mean, std, recipe, None)
    fused, fuse_report = fuse_model(module, data.x[:EXACTNESS_SAMPLES])
    config = quant_config(profile, bits, first_last_bits, recipe)
    done = calibrate_model(fused, data.x, config, method, recipe, device, seed)
    return QuantizedModel(fused, done.qm, done.details["method"], recipe, preprocess, done.details,
                          fuse_report.to_dict(), data.x, done.warnings)


def build_engine(qm: QuantizedModel, backend: str = "auto", out: str | Path | None = None) -> Engine:
    """Export ``qm``'s graphs into ``out`` and build the engine of ``backend`` from them.

    ``backend``: ``auto`` (TensorRT when the profile is ``tensorrt`` and TensorRT runs here), ``onnxruntime``
    or ``tensorrt``; a TensorRT-profile graph without TensorRT runs in ONNX Runtime's reference execution.
    ``out``: the folder for the graphs and the engine (default: a temporary folder that lives as long as
    the engine).
    """
    name, _ = resolve_backend(backend, qm.profile)
    scratch = None
    if out is None:
        scratch = tempfile.TemporaryDirectory(prefix="repapq-engine-")
        out = scratch.name
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    graphs, warnings = export_graphs(qm.fake_quant, qm.fused, qm.samples, out, qm.recipe.opset)
    engine = _build_engine_files(out, get_backend(name))
    engine.graphs, engine.warnings, engine.scratch = graphs, warnings, scratch
    return engine


@dataclass
class Accuracy:
    """Top-1 (None without labels), agreement with FP32 and logit cosine on the evaluation samples."""

    fp32_top1: float | None
    fake_quant_top1: float | None
    engine_top1: float | None
    agreement_top1: float
    cosine: float
    drop_pp: float | None
    drop_se_pp: float | None
    samples: int


@dataclass
class Latency:
    """p50 milliseconds by batch size of the engine and its float reference, and the paired speed-up."""

    reference: str
    reference_ms: dict[int, float]
    engine_ms: dict[int, float]
    speedup: dict[int, float]


@dataclass
class Report:
    """What ``verify`` found; ``sections`` is the full report.json content."""

    accuracy: Accuracy
    latency: Latency
    engine: EngineInfo
    warnings: list[str]
    sections: dict = field(repr=False)

    @classmethod
    def from_dict(cls, report: dict) -> Report:
        """The typed view of a report.json."""
        acc, lat = report["accuracy"], report["latency_ms"]
        drop = acc.get("drop") or {}
        batches = {int(k[2:]): k for k in lat["engine"]}
        engine = {k: v for k, v in report["engine"].items() if k in EngineInfo.__dataclass_fields__}
        return cls(
            Accuracy(acc["fp32"]["top1"], acc["fake_quant"]["top1"], acc["engine"]["top1"], acc["agreement_top1"],
                     acc["cosine"], drop.get("drop_pp"), drop.get("drop_se_pp"), acc["samples"]),
            Latency(lat.get("reference", "onnxruntime-fp32"), {b: lat["fp32"][k] for b, k in batches.items()},
                    {b: lat["engine"][k] for b, k in batches.items()},
                    {b: lat["speedup"][k] for b, k in batches.items()}),
            EngineInfo(**engine), list(report.get("warnings", [])), report)

    def to_dict(self) -> dict:
        return self.sections

    def to_json(self) -> str:
        return json.dumps(self.sections, indent=2, default=str)

    def to_markdown(self) -> str:
        return render_markdown(self.sections)


def verify(qm: QuantizedModel, engine: Engine, eval_data: DataSource | None = None, *,
           eval_count: int | None = None, bench_seconds: float | None = None, seed: int = 0) -> Report:
    """Compare ``engine`` with the FP32 and fake-quant models on ``eval_data`` (labelled or not; default:
    the calibration samples, agreement only) and time it against its float reference."""
    data = as_dataset(qm.samples if eval_data is None else eval_data, preprocess=qm.preprocess,
                      count=eval_count, seed=seed, option="eval")
    checked = verify_engine(qm.fused, qm.fake_quant, engine, data, qm.samples,
                            bench_seconds or qm.recipe.bench_seconds)
    report = {"accuracy": checked["accuracy"], "engine": engine.info.to_dict(), "latency_ms": checked["latency_ms"],
              "calibration": qm.calibration, "reparam": qm.reparam, "export": engine.graphs,
              "parity": checked["parity"], "config": {"method": qm.method, **qm.config.to_dict(),
                                                      "recipe": qm.recipe.to_dict()},
              "warnings": [*qm.warnings, *engine.warnings, *checked["warnings"]]}
    return Report.from_dict(report)


def build(model: str | Path, calib: str | Path = "calib", **options) -> Report:
    """Run ``repapq-deploy build`` on files: every stage into ``out`` (cached, with a manifest).

    ``options`` are :class:`~repapq_deploy.pipeline.BuildOptions` fields and recipe keys.
    """
    from repapq_deploy.options import BuildOptions
    from repapq_deploy.pipeline import Build

    return Report.from_dict(Build(BuildOptions.from_flat(model=str(model), calib=str(calib), **options)).run())


def _recipe(recipe: Recipe | str | Path | None) -> Recipe:
    if recipe is None:
        return Recipe()
    return recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)


def _preprocess(module: nn.Module, timm_model: bool, metadata: dict, input_size, mean, std, recipe: Recipe,
                sample_file) -> Preprocess:
    """The model's input format; where timm's data config does not fit the input (another channel
    count), the generic one for that size."""
    kwargs = {"metadata": metadata, "input_size": input_size, "mean": mean, "std": std, "resize": recipe.resize,
              "sample_file": sample_file}
    try:
        return preprocess_for(module, timm_model=timm_model, **kwargs)
    except DeployError:
        if not timm_model:
            raise
        return preprocess_for(module, timm_model=False, **kwargs)


__all__ = ["Accuracy", "Engine", "Latency", "QuantizedModel", "Report", "build", "build_engine", "quantize",
           "verify"]
