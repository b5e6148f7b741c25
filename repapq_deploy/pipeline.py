"""The build folder: the stages in order, each skipped when its inputs and options are unchanged.

Stages exchange files in the output folder (``fused.pt``, ``qstate.pt``, ONNX graphs, the engine,
``report.json``) and are recorded in ``manifest.json``. Each stage's work lives in its package
(``load``/``reparam``, ``calibrate.run``, ``export.graphs``, ``backends.engine``, ``verify.run``);
this module only orders them, caches them and records them.
"""

from __future__ import annotations

from dataclasses import fields
from functools import cached_property
from pathlib import Path

import torch

from repapq_deploy.artifacts import model_digest, save_torch, sha256_path, writable_dir
from repapq_deploy.backends import get_backend, resolve_backend
from repapq_deploy.backends.base import EngineInfo
from repapq_deploy.backends.engine import build_engine, engine_outputs, engine_source, open_engine
from repapq_deploy.calibrate.run import calibrate_model, check_method, load_qstate, quant_config, save_qstate
from repapq_deploy.data.loader import Dataset, Preprocess, load_dataset
from repapq_deploy.environment import hardware, limit_threads, versions
from repapq_deploy.errors import ConfigError, InputError
from repapq_deploy.export.graphs import FP32_ONNX, export_graphs, export_outputs
from repapq_deploy.load import load_with_inputs
from repapq_deploy.manifest import Manifest
from repapq_deploy.options import BuildOptions
from repapq_deploy.reparam import fuse_model
from repapq_deploy.verify.report import REPORT_FILES, write_report
from repapq_deploy.verify.run import verify_engine

STAGES = ("reparam", "calibrate", "export", "engine", "verify")
FUSED, QSTATE, FALLBACK_QSTATE = "fused.pt", "qstate.pt", "qstate.fallback.pt"
MANIFEST = "manifest.json"
EXACTNESS_SAMPLES = 32


def load_fused(path: Path) -> torch.nn.Module:
    """The fused FP32 model a reparam stage saved (``fused.pt``), on the CPU, in eval mode. Only for this
    tool's own artifact: it is a pickled module."""
    return torch.load(path, map_location="cpu", weights_only=False).eval()


class Build:
    """One build folder: runs the stages in order, skipping those already up to date."""

    def __init__(self, opts: BuildOptions) -> None:
        opts.out = opts.out or str(Path("engines") / Path(opts.model).name.split(".")[0])
        self.opts, self.recipe, self.out = opts, opts.recipe, Path(opts.out)
        check_method(opts.method, opts.recipe)  # before any stage writes anything
        writable_dir(self.out, "out")
        limit_threads(opts.threads)
        self.engine_backend, self.profile = resolve_backend(opts.backend, opts.profile)
        self.qconfig = quant_config(self.profile, opts.bits, opts.first_last_bits, opts.recipe)
        self.manifest = Manifest(self.out / MANIFEST, versions())
        self.results: dict[str, dict] = {}
        self.warnings: list[str] = []
        self._fused = self._qm = self._engine = None
        self.fallback_active = False  # set by the accuracy budget (repapq_deploy.budget)

    # --- inputs and the stage machinery ---------------------------------------------------------------

    def _data_hash(self, path: str, option: str) -> str:
        if not Path(path).exists():
            raise InputError(f"`{option}` {path}: not found; pass a folder of images or a .npz/.npy/.pt file")
        return sha256_path(Path(path))

    @cached_property
    def hashes(self) -> dict[str, str]:
        model = Path(self.opts.model)
        if not model.is_file():
            raise InputError(f"{model}: model file not found; pass the path to a .pt/.pth/.safetensors/.pt2 file")
        calib = self._data_hash(self.opts.calib, "calib")
        # the model by content: the same weights saved again can come in other bytes (safetensors' header)
        return {"model": model_digest(model), "calib": calib,
                "eval": self._data_hash(self.opts.eval, "eval") if self.opts.eval else calib}

    def dataset(self, which: str, preprocess: Preprocess) -> Dataset:
        o = self.opts
        if which == "calib":
            return load_dataset(o.calib, preprocess=preprocess, count=o.calib_count, seed=o.seed, option="calib")
        return load_dataset(o.eval or o.calib, preprocess=preprocess, count=self.recipe.eval_count,
                            labelled=bool(o.eval), num_classes=self.results["reparam"]["load"]["num_classes"],
                            seed=o.seed, option="eval" if o.eval else "calib")

    @cached_property
    def calib_data(self) -> Dataset:
        return self.dataset("calib", Preprocess(**self.results["reparam"]["preprocess"]))

    def _stage(self, name: str, inputs: dict[str, str], options: dict, outputs: list[str], fn) -> dict:
        self.results[name] = self.manifest.run(name, inputs, options, outputs, fn, self.opts.force)
        self.warnings += self.results[name].get("warnings", [])
        return self.results[name]

    def _hash(self, stage: str, name: str) -> str:
        return self.manifest.output_hash(stage, name)

    # --- stages -----------------------------------------------------------------------------------------

    def reparam(self) -> dict:
        o = self.opts
        options = {k: getattr(o, k) for k in ("arch", "num_classes", "in_chans", "trust_pickle", "input_size",
                                               "mean", "std", "seed")} | {"resize": self.recipe.resize}
        return self._stage("reparam", {k: self.hashes[k] for k in ("model", "calib")}, options, [FUSED],
                           self._run_reparam)

    def _run_reparam(self) -> dict:
        o = self.opts
        loaded, preprocess, samples = load_with_inputs(
            o.model, lambda p: self.dataset("calib", p), arch=o.arch, num_classes=o.num_classes, in_chans=o.in_chans,
            trust_pickle=o.trust_pickle, input_size=o.input_size, mean=o.mean, std=o.std, resize=self.recipe.resize,
            sample_file=o.calib)
        self.__dict__["calib_data"] = samples
        self._fused, report = fuse_model(loaded.module, samples.x[:EXACTNESS_SAMPLES])
        save_torch(self._fused, self.out / FUSED)
        with torch.no_grad():
            num_classes = loaded.num_classes or int(self._fused(samples.x[:1]).shape[1])
        return {"load": {**loaded.describe(), "num_classes": num_classes}, "preprocess": preprocess.to_dict(),
                **report.to_dict()}

    @property
    def fused(self) -> torch.nn.Module:
        # our own artifact, whose hash the manifest just verified: safe to unpickle
        self._fused = self._fused or load_fused(self.out / FUSED)
        return self._fused

    def calibrate(self) -> dict:
        o, r = self.opts, self.recipe
        options = {"method": o.method, "preset": r.preset, "equalize": r.equalize, **r.reconstruction_overrides(),
                   "holdout": r.holdout, "time_budget": r.time_budget if o.method == "auto" else None,
                   **self.qconfig.to_dict(), "calib_count": o.calib_count, "seed": o.seed, "device": o.device,
                   "batch_size": r.batch_size,
                   # float sums split differently across threads, and the thousands of reconstruction
                   # steps amplify that: same seed, 1 vs 2 threads moved a W6A6 top-1 by 0.2 pp
                   "cpu_threads": torch.get_num_threads()}
        inputs = {"fused": self._hash("reparam", FUSED), "calib": self.hashes["calib"]}
        return self._stage("calibrate", inputs, options, [QSTATE], self._run_calibrate)

    def _run_calibrate(self) -> dict:
        done = calibrate_model(self.fused, self.calib_data.x, self.qconfig, self.opts.method, self.recipe,
                               self.opts.device, self.opts.seed)
        save_qstate(done.qm, self.opts.method, self.out / QSTATE)
        self._qm = done.qm
        return done.details

    @property
    def qmodel(self):
        self._qm = self._qm or load_qstate(self.fused, self.out / QSTATE)
        return self._qm

    @property
    def qstate_hash(self) -> str:
        """The calibrated state the later stages take: the calibrate stage's, or a fallback's
        (``budget``) when one is in use."""
        fallback = self.out / FALLBACK_QSTATE
        return sha256_path(fallback) if self.fallback_active else self._hash("calibrate", QSTATE)

    def export(self) -> dict:
        inputs = {"fused": self._hash("reparam", FUSED), "qstate": self.qstate_hash,
                  "calib": self.hashes["calib"]}
        return self._stage("export", inputs, {"opset": self.recipe.opset, "profile": self.profile},
                           export_outputs(self.profile),
                           lambda: export_graphs(self.qmodel, self.fused, self.calib_data.x, self.out,
                                                 self.recipe.opset)[0])

    @cached_property
    def backend(self):
        """The engine backend, with the TensorRT build options when it is TensorRT."""
        if self.engine_backend != "tensorrt":
            return get_backend(self.engine_backend)
        from repapq_deploy.backends.tensorrt import TensorRTBackend, TrtBuildOptions

        o = self.opts
        return TensorRTBackend(TrtBuildOptions(batch=o.trt_batch, workspace_mib=o.workspace_mib,
                                               optimization_level=o.builder_opt_level,
                                               hardware_compatible=o.hardware_compatible,
                                               version_compatible=o.version_compatible))

    @property
    def engine_file(self) -> str:
        return engine_outputs(self.backend)[0]

    def engine(self) -> dict:
        options = {"backend": self.engine_backend}
        if self.engine_backend == "tensorrt":
            options["tensorrt"] = {k: getattr(self.opts, k) for k in ("trt_batch", "workspace_mib", "builder_opt_level",
                                                                       "hardware_compatible", "version_compatible")}
        return self._stage("engine", {"source": self._hash("export", engine_source(self.backend))}, options,
                           engine_outputs(self.backend), self._run_engine)

    def _run_engine(self) -> dict:
        self._engine = build_engine(self.out, self.backend)
        return self._engine.info.to_dict()

    def verify(self) -> dict:
        inputs = {"engine": self._hash("engine", self.engine_file),
                  "fp32": self._hash("export", FP32_ONNX), "fused": self._hash("reparam", FUSED),
                  "qstate": self.qstate_hash, "eval": self.hashes["eval"]}
        options = {"eval_count": self.recipe.eval_count, "bench_seconds": self.recipe.bench_seconds,
                   "seed": self.opts.seed}
        return self._stage("verify", inputs, options, list(REPORT_FILES), self._run_verify)

    def _run_verify(self) -> dict:
        info = {k: v for k, v in self.results["engine"].items() if k in {f.name for f in fields(EngineInfo)}}
        engine = self._engine or open_engine(self.out, self.backend, EngineInfo(**info))
        data = self.dataset("eval", Preprocess(**self.results["reparam"]["preprocess"]))
        checked = verify_engine(self.fused, self.qmodel, engine, data, self.calib_data.x, self.recipe.bench_seconds)
        r = self.results
        report = {**checked, "engine": r["engine"], "calibration": r["calibrate"], "reparam": r["reparam"],
                  "export": r["export"], "data": {"calib": self.opts.calib, "eval": self.opts.eval or self.opts.calib},
                  "config": {**self.opts.to_dict(), "profile": self.profile, "engine_backend": self.engine_backend},
                  "versions": versions(), "hardware": hardware(), "warnings": self.warnings + checked["warnings"]}
        write_report(report, engine.backend.name, self.out)
        return report

    def run(self, until: str = "verify") -> dict:
        """Run the stages up to and including ``until``; returns that stage's result."""
        if until not in STAGES:
            raise ConfigError(f"unknown stage {until}; stages are {', '.join(STAGES)}")
        result: dict = {}
        for stage in STAGES[:STAGES.index(until) + 1]:
            result = getattr(self, stage)()
        if until == "verify" and self.opts.max_drop is not None:
            from repapq_deploy.budget import meet_budget

            result = meet_budget(self, result)
        return result
