"""The build pipeline: load+reparam -> calibrate -> export -> engine -> verify.

Stages exchange files in the output folder (``fused.pt``, ``qstate.pt``, ONNX graphs, the engine,
``report.json``) and are recorded in ``manifest.json``; a stage whose inputs and options are
unchanged is skipped. Within one run, objects already in memory are reused.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
import torch

from repapq_deploy.artifacts import atomic_path, model_digest, save_torch, sha256_path, write_json, write_text
from repapq_deploy.backends import benchmark_interleaved, get_backend, resolve_backend
from repapq_deploy.backends.base import paired_speedup
from repapq_deploy.backends.onnxruntime import OrtRunner
from repapq_deploy.calibrate.equalize_choice import calibrate_under, choose_equalization
from repapq_deploy.calibrate.reconstruct import RECONSTRUCTION, check_recipe
from repapq_deploy.data.loader import (
    TENSOR_EXTENSIONS,
    Dataset,
    Preprocess,
    load_dataset,
    preprocess_from_timm,
)
from repapq_deploy.environment import code_hash, hardware, limit_threads, versions
from repapq_deploy.errors import DeployError
from repapq_deploy.export import (
    check_against_torch,
    convert_to_fp16,
    export_fp32,
    export_qdq,
    fp16_report,
    graph_summary,
)
from repapq_deploy.export.lint import lint_model
from repapq_deploy.export.onnx import INPUT_NAME, reference_session
from repapq_deploy.load import LoadedModel, load_model, zip_names
from repapq_deploy.manifest import Manifest
from repapq_deploy.progress import log
from repapq_deploy.quant.placement import QuantizedModel, quantize_model
from repapq_deploy.quant.scheme import QuantConfig, resolve_offset_relu
from repapq_deploy.reparam import fuse_model
from repapq_deploy.verify import (
    ACCURACY_PNG,
    LATENCY_PNG,
    accuracy_metrics,
    plot_accuracy,
    plot_latency,
    predict,
    render_markdown,
)

STAGES = ("reparam", "calibrate", "export", "engine", "verify")
FUSED, QSTATE, FP32_ONNX, QDQ_ONNX = "fused.pt", "qstate.pt", "model.fp32.onnx", "model.qdq.onnx"
# Below this many calibration images a reconstruction method is warned about (it learns weights and
# scales from them; the benchmarks use 1024, the bundled example 256)
FEW_RECONSTRUCTION_IMAGES = 256
# TensorRT profile: the QDQ graph with FP16 outside the Q/DQ pairs (TensorRT builds strongly typed),
# and the FP32 model in FP16 for the FP16 reference engine
QDQ_FP16_ONNX, FP16_ONNX, FP16_PLAN = "model.qdq.fp16.onnx", "model.fp16.onnx", "model.fp16.plan"
REPORT_JSON, REPORT_MD, MANIFEST = "report.json", "report.md", "manifest.json"
EXACTNESS_SAMPLES = 32


@dataclass
class BuildOptions:
    """Every option of ``build`` (recorded in the report's ``config``)."""

    model: str
    arch: str | None = None
    num_classes: int | None = None
    in_chans: int | None = None
    calib: str = "calib"
    calib_count: int | None = 256
    eval: str | None = None
    eval_count: int | None = None
    bits: int = 8
    first_last_bits: int = 8
    add_bits: int = 8
    offset_relu: str = "auto"  # see quant.scheme.resolve_offset_relu
    split_identity: bool = True
    equalize: str = "auto"  # see calibrate.equalize_choice
    method: str = "repapq"
    preset: str = "default"
    adaround: bool | None = None  # None: the reconstruction method's own setting
    qdrop: float | None = None
    gptq: bool | None = None  # None: the reconstruction method's own setting
    calib_augment: tuple[str, ...] | None = None  # None: the reconstruction method's own views
    profile: str | None = None
    backend: str = "auto"
    out: str | None = None  # default: engines/<model file stem>
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 32
    opset: int = 17
    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: int | None = None
    trust_pickle: bool = False
    force: bool = False
    bench_seconds: float = 3.0
    threads: int | None = None  # CPU threads (PyTorch and ONNX Runtime); None: all cores
    trt_batch: tuple[int, int, int] = (1, 8, 32)
    workspace_mib: int = 4096
    builder_opt_level: int = 3
    hardware_compatible: bool = False
    version_compatible: bool = False
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def load_fused(path: Path) -> torch.nn.Module:
    """The fused FP32 model a reparam stage saved (``fused.pt``), on the CPU, in eval mode. Only for this
    tool's own artifact: it is a pickled module."""
    return torch.load(path, map_location="cpu", weights_only=False).eval()


def load_calibrated(fused: torch.nn.Module, qstate: Path) -> QuantizedModel:
    """The fake-quant model a calibrate stage left in ``qstate`` (``qstate.pt``), on ``fused``."""
    state = torch.load(qstate, map_location="cpu", weights_only=True)
    qm = quantize_model(fused, QuantConfig(**state["config"]))
    qm.load_scales(state["scales"])
    qm.load_layer_tensors(state["layers"])
    qm.set_mode("quant")
    return qm


class Build:
    """One build folder: runs the stages in order, skipping those already up to date."""

    def __init__(self, opts: BuildOptions) -> None:
        if opts.out is None:
            opts.out = str(Path("engines") / Path(opts.model).name.split(".")[0])
        self.opts = opts
        self.out = Path(opts.out)
        check_recipe(opts.method, self._recon_overrides())  # before any stage writes anything
        self._check_out_dir()
        limit_threads(opts.threads)
        self.engine_backend, self.profile = resolve_backend(opts.backend, opts.profile)
        self.qconfig = QuantConfig(self.profile, opts.bits, opts.first_last_bits, opts.split_identity,
                                   add_bits=opts.add_bits,
                                   offset_relu=resolve_offset_relu(opts.offset_relu, self.profile))
        self.manifest = Manifest(self.out / MANIFEST, versions())
        self.results: dict[str, dict] = {}
        self._fused: torch.nn.Module | None = None
        self._qm: QuantizedModel | None = None
        self._preprocess: Preprocess | None = None
        self.warnings: list[str] = []

    def _check_out_dir(self) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DeployError(f"--out {self.out}: cannot create it ({exc.strerror}); pass a writable folder") from exc
        if not os.access(self.out, os.W_OK):
            raise DeployError(f"--out {self.out}: not writable; pass a writable folder")

    # --- inputs ---------------------------------------------------------------------------------------

    def _data_hash(self, path: str | None) -> str:
        if path is None:
            return "none"
        p = Path(path)
        if not p.exists():
            option = "--calib" if path == self.opts.calib else "--eval"
            raise DeployError(f"{option} {path}: not found; pass a folder of images or a .npz/.npy/.pt file")
        return sha256_path(p)

    @cached_property
    def model_hash(self) -> str:
        return self._data_hash_model()

    def _data_hash_model(self) -> str:
        p = Path(self.opts.model)
        if not p.is_file():
            raise DeployError(f"{p}: model file not found; pass the path to a .pt/.pth/.safetensors/.pt2 file")
        # by content: the same weights saved again can come in other bytes (safetensors' header order)
        return model_digest(p)

    @cached_property
    def calib_hash(self) -> str:
        return self._data_hash(self.opts.calib)

    @cached_property
    def eval_hash(self) -> str:
        return self._data_hash(self.opts.eval) if self.opts.eval else self.calib_hash

    def _fallback_preprocess(self) -> Preprocess:
        """Input format for models without a timm data config (TorchScript, export, pickles)."""
        size = self.opts.input_size
        if size is None and Path(self.opts.calib).suffix in TENSOR_EXTENSIONS and Path(self.opts.calib).is_file():
            size = _peek_shape(Path(self.opts.calib))
        size = tuple(size or (3, 224, 224))
        c = size[0]
        mean = self.opts.mean or ((0.485, 0.456, 0.406) if c == 3 else (0.5,) * c)
        std = self.opts.std or ((0.229, 0.224, 0.225) if c == 3 else (0.5,) * c)
        return Preprocess(size, tuple(mean) * (c if len(mean) == 1 else 1),
                          tuple(std) * (c if len(std) == 1 else 1), self.opts.resize)

    def _preprocess_for(self, loaded: LoadedModel) -> Preprocess:
        if loaded.arch is None or not hasattr(loaded.module, "pretrained_cfg"):
            return self._fallback_preprocess()
        meta = loaded.metadata
        size = self.opts.input_size
        if size is None and "input_size" in meta:
            size = tuple(int(v) for v in str(meta["input_size"]).split(","))
        if size is None and loaded.in_chans and loaded.in_chans != 3:
            _, h, w = loaded.module.pretrained_cfg.get("input_size", (3, 224, 224))
            size = (loaded.in_chans, h, w)
        mean = self.opts.mean or (tuple(json.loads(meta["mean"])) if "mean" in meta else None)
        std = self.opts.std or (tuple(json.loads(meta["std"])) if "std" in meta else None)
        return preprocess_from_timm(loaded.module, input_size=size, mean=mean, std=std, resize=self.opts.resize)

    def dataset(self, which: str, preprocess: Preprocess) -> Dataset:
        o = self.opts
        if which == "calib":
            return load_dataset(o.calib, preprocess=preprocess, count=o.calib_count, seed=o.seed, option="--calib")
        path = o.eval or o.calib
        option = "--eval" if o.eval else "--calib"
        labelled = bool(o.eval)
        return load_dataset(path, preprocess=preprocess, count=o.eval_count, labelled=labelled,
                            num_classes=self.results["reparam"]["load"]["num_classes"], seed=o.seed,
                            option=option)

    @cached_property
    def calib_data(self) -> Dataset:
        return self.dataset("calib", self.preprocess)

    @property
    def preprocess(self) -> Preprocess:
        if self._preprocess is None:
            self._preprocess = Preprocess(**self.results["reparam"]["preprocess"])
        return self._preprocess

    # --- stage machinery --------------------------------------------------------------------------------

    def _stage(self, name: str, inputs: dict[str, str], options: dict, outputs: list[str], fn) -> dict:
        inputs = {**inputs, "code": code_hash()}  # a different tool version re-runs every stage
        if not self.opts.force:
            cached = self.manifest.up_to_date(name, inputs, options)
            if cached is not None:
                log(f"[dim]{name}: up to date, skipped[/dim]")
                self.results[name] = cached
                return cached
        log(f"[bold]{name}[/bold] ...")
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception:
            self.manifest.record(name, inputs, options, [], {}, time.perf_counter() - t0, status="failed")
            raise
        seconds = time.perf_counter() - t0
        self.manifest.record(name, inputs, options, outputs, result, seconds)
        self.results[name] = json.loads(json.dumps(result, default=str))
        log(f"{name}: done in {seconds:.1f} s")
        return self.results[name]

    def _hash(self, stage: str, name: str) -> str:
        return self.manifest.output_hash(stage, name)

    # --- stages -----------------------------------------------------------------------------------------

    def reparam(self) -> dict:
        o = self.opts
        options = {k: getattr(o, k) for k in ("arch", "num_classes", "in_chans", "trust_pickle", "input_size",
                                               "mean", "std", "resize", "seed")}
        inputs = {"model": self.model_hash, "calib": self.calib_hash}
        return self._stage("reparam", inputs, options, [FUSED], self._run_reparam)

    def _run_reparam(self) -> dict:
        o = self.opts
        example = None
        if Path(o.model).is_file() and _is_torchscript(Path(o.model)):
            example = self.dataset("calib", self._fallback_preprocess()).x
        loaded = load_model(o.model, arch=o.arch, num_classes=o.num_classes, in_chans=o.in_chans,
                            trust_pickle=o.trust_pickle, example_input=example)
        self._preprocess = self._preprocess_for(loaded)
        samples = self.calib_data.x[:EXACTNESS_SAMPLES]
        fused, report = fuse_model(loaded.module, samples)
        num_classes = loaded.num_classes
        if num_classes is None:
            with torch.no_grad():
                num_classes = int(fused(samples[:1]).shape[1])
        save_torch(fused, self.out / FUSED)
        self._fused = fused
        log(f"  fused {sum(report.blocks_fused.values())} blocks, folded {report.bn_folded} BN, "
            f"merged {report.branches_merged} branches; max relative error {report.max_rel_error:.1e}")
        return {"load": {**loaded.describe(), "num_classes": num_classes},
                "preprocess": self._preprocess.to_dict(), **report.to_dict()}

    @property
    def fused(self) -> torch.nn.Module:
        if self._fused is None:
            # Our own artifact, whose hash the manifest just verified: safe to unpickle.
            self._fused = load_fused(self.out / FUSED)
        return self._fused

    def calibrate(self) -> dict:
        o = self.opts
        # a reconstruction method's auto is always "all": recorded as such, so its builds keep their hash
        eq_option = "all" if o.equalize == "auto" and o.method in RECONSTRUCTION else o.equalize
        options = {"method": o.method, "preset": o.preset, "equalize": eq_option, **self._recon_overrides(),
                   **self.qconfig.to_dict(),
                   "calib_count": o.calib_count,
                   "seed": o.seed,
                   "device": o.device, "batch_size": o.batch_size,
                   # float sums split differently across threads, and the thousands of reconstruction
                   # steps amplify that: same seed, 1 vs 2 threads moved a W6A6 top-1 by 0.2 pp
                   "cpu_threads": torch.get_num_threads()}
        inputs = {"fused": self._hash("reparam", FUSED), "calib": self.calib_hash}
        result = self._stage("calibrate", inputs, options, [QSTATE], self._run_calibrate)
        if o.method in RECONSTRUCTION and result["images"] < FEW_RECONSTRUCTION_IMAGES:
            self.warnings.append(f"--method {o.method} trained on only {result['images']} calibration images and "
                                 f"can over-fit them (EfficientNet-Lite0 on crops of 16-26 photos: worse than "
                                 f"percentile); use {FEW_RECONSTRUCTION_IMAGES}+ distinct images, not crops of a "
                                 f"few, or compare with --method percentile")
        return result

    def _recon_overrides(self) -> dict:
        """Reconstruction settings the user changed from the method's own (--adaround, --qdrop, --gptq,
        --calib-augment)."""
        o = self.opts
        return {k: v for k, v in (("adaround", o.adaround), ("qdrop", o.qdrop), ("gptq", o.gptq),
                                  ("augment", o.calib_augment)) if v is not None}

    def _run_calibrate(self) -> dict:
        o = self.opts
        args = (self.fused, self.calib_data.x, self.qconfig, o.method, o.batch_size, o.device)
        kwargs = {"preset": o.preset, "seed": o.seed, "overrides": self._recon_overrides()}
        tried: dict[str, float] = {}
        if o.equalize == "auto":
            done, tried, search_seconds = choose_equalization(*args, **kwargs)
            if tried:
                log(f"  --equalize auto: {done.mode} (relative logit error on the calibration images: "
                    + ", ".join(f"{m} {e:.2e}" for m, e in tried.items()) + f"; {search_seconds:.1f} s)")
        else:
            done = calibrate_under(o.equalize, *args, **kwargs)
        qconfig, qm, equalized, errors = done.qconfig, done.qm, done.equalized, done.split_errors
        if equalized.pairs:
            log(f"  cross-layer equalization ({done.mode}): {len(equalized.pairs)} conv pairs rescaled")
        if qconfig.split_identity:
            log(f"  identity split: {len(qconfig.split_layers)} of {len(errors)} candidate convs "
                f"(where it at least halves the output error)")
        offset = sum(q.fmt.offset > 0 for q in qm.act_quantizers.values())
        if qconfig.offset_relu != "none":
            log(f"  offset-relu {qconfig.offset_relu}: {offset} of {len(qm.act_quantizers)} activation quantizers "
                "on [0, 255] stored as x - 128 s")
        save_torch({"scales": qm.scales(), "layers": qm.layer_tensors(), "config": qconfig.to_dict(),
                    "method": o.method}, self.out / QSTATE)
        self._qm = qm
        out = done.result.to_dict()
        if equalized.pairs:
            out["equalize"] = equalized.to_dict()
        if tried:
            # the search's seconds include the kept mode's calibration (the result's own "seconds")
            out["equalize_auto"] = {"mode": done.mode, "relative_logit_error": tried, "seconds": search_seconds}
        if qconfig.offset_relu != "none":
            out["offset_relu"] = {"offset": offset, "quantizers": len(qm.act_quantizers)}
        if qconfig.split_identity:
            out["identity_split"] = {n: {"relative_error": plain, "relative_error_split": split,
                                         "split": n in qconfig.split_layers}
                                     for n, (plain, split) in errors.items()}
        return out

    @property
    def qmodel(self) -> QuantizedModel:
        if self._qm is None:
            self._qm = load_calibrated(self.fused, self.out / QSTATE)
        return self._qm

    @property
    def export_outputs(self) -> list[str]:
        return [FP32_ONNX, QDQ_ONNX] + ([QDQ_FP16_ONNX, FP16_ONNX] if self.profile == "tensorrt" else [])

    def export(self) -> dict:
        inputs = {"fused": self._hash("reparam", FUSED), "qstate": self._hash("calibrate", QSTATE),
                  "calib": self.calib_hash}
        return self._stage("export", inputs, {"opset": self.opts.opset, "profile": self.profile},
                           self.export_outputs, self._run_export)

    def _run_export(self) -> dict:
        x = self.calib_data.x
        export_fp32(self.fused, x, self.out / FP32_ONNX, self.opts.opset)
        export_qdq(self.qmodel, x, self.out / QDQ_ONNX, self.opts.opset)
        check = check_against_torch(self.qmodel, self.out / QDQ_ONNX, x)
        if check.agreement_top1 < 100.0:
            # the offset grids' compensating biases are large and cancel, so float32 round-off grows
            why = (f" (expected within a few samples with --offset-relu {self.qconfig.offset_relu}: "
                   "its compensating biases change float32 round-off; docs/method.md)"
                   if self.qconfig.offset_relu != "none" else "")
            self.warnings.append(f"ONNX Runtime reference and PyTorch fake-quant agree on only "
                                 f"{check.agreement_top1:.2f} % of calibration samples{why}")
        log(f"  ORT reference vs PyTorch fake-quant: agreement {check.agreement_top1:.2f} %, "
            f"max abs diff {check.max_abs_diff:.3g}")
        result = {"check": check.to_dict(), "fp32_graph": graph_summary(self.out / FP32_ONNX),
                  "qdq_graph": graph_summary(self.out / QDQ_ONNX)}
        linted = QDQ_ONNX
        if self.profile == "tensorrt":
            for src, dst in ((QDQ_ONNX, QDQ_FP16_ONNX), (FP32_ONNX, FP16_ONNX)):
                converted = convert_to_fp16(onnx.load(str(self.out / src)))
                with atomic_path(self.out / dst) as tmp:
                    onnx.save(converted, str(tmp))
            result["fp16"] = fp16_report(onnx.load(str(self.out / QDQ_FP16_ONNX)))
            linted = QDQ_FP16_ONNX  # the graph TensorRT builds from
        violations = lint_model(self.out / linted, self.profile)
        for v in violations:
            self.warnings.append(f"lint ({linted}): {v}")
        log(f"  lint {linted} for {self.profile}: {len(violations)} violation(s)")
        result["lint"] = {"graph": linted, "target": self.profile, "violations": [str(v) for v in violations]}
        return result

    @property
    def engine_file(self) -> str:
        return "model" + self.backend.engine_suffix

    @cached_property
    def backend(self):
        """The engine backend, with the TensorRT build options when it is TensorRT."""
        if self.engine_backend != "tensorrt":
            return get_backend(self.engine_backend)
        from repapq_deploy.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(self.trt_options())

    def trt_options(self, **overrides):
        from repapq_deploy.backends.tensorrt import TrtBuildOptions

        o = self.opts
        return TrtBuildOptions(batch=o.trt_batch, workspace_mib=o.workspace_mib,
                               optimization_level=o.builder_opt_level, hardware_compatible=o.hardware_compatible,
                               version_compatible=o.version_compatible, **overrides)

    @property
    def engine_source(self) -> str:
        return QDQ_FP16_ONNX if self.engine_backend == "tensorrt" else QDQ_ONNX

    def engine(self) -> dict:
        inputs = {"source": self._hash("export", self.engine_source)}
        outputs = [self.engine_file]
        if self.engine_backend == "tensorrt":
            outputs += [self.engine_file + ".json", FP16_PLAN, FP16_PLAN + ".json"]
        options = {"backend": self.engine_backend}
        if self.engine_backend == "tensorrt":
            options["tensorrt"] = {k: getattr(self.opts, k) for k in ("trt_batch", "workspace_mib", "builder_opt_level",
                                                                       "hardware_compatible", "version_compatible")}
        return self._stage("engine", inputs, options, outputs, self._run_engine)

    def _run_engine(self) -> dict:
        backend = self.backend
        info = backend.build(self.out / self.engine_source, self.out / self.engine_file)
        info.path = self.engine_file
        result = info.to_dict()
        if self.engine_backend == "tensorrt":
            # the float speed/accuracy reference on the same GPU: an FP16 engine of the FP32 model
            from repapq_deploy.backends.tensorrt import TensorRTBackend

            TensorRTBackend(self.trt_options(fp16_reference=True)).build(self.out / FP16_ONNX, self.out / FP16_PLAN)
            result["reference_engine"] = FP16_PLAN
        return result

    def verify(self) -> dict:
        o = self.opts
        inputs = {"engine": self._hash("engine", self.engine_file), "fp32": self._hash("export", FP32_ONNX),
                  "fused": self._hash("reparam", FUSED), "qstate": self._hash("calibrate", QSTATE),
                  "eval": self.eval_hash}
        options = {"eval_count": o.eval_count, "bench_seconds": o.bench_seconds, "seed": o.seed}
        return self._stage("verify", inputs, options, [REPORT_JSON, REPORT_MD, LATENCY_PNG, ACCURACY_PNG],
                           self._run_verify)

    def _run_verify(self) -> dict:
        data = self.dataset("eval", self.preprocess)
        labels = data.y.numpy() if data.y is not None else None
        with torch.no_grad():
            fp32 = predict(lambda a: self.fused(torch.from_numpy(a)).numpy(), data.x, "verify: FP32 PyTorch")
            fq = predict(lambda a: self.qmodel.module(torch.from_numpy(a)).numpy(), data.x,
                         "verify: fake-quant PyTorch")
        backend = self.backend
        with backend.runner(self.out / self.engine_file) as runner:
            eng = predict(runner.infer, data.x, f"verify: engine ({backend.name})")
        accuracy = accuracy_metrics(fp32, fq, eng, labels)
        parity = None
        if self.engine_backend == "tensorrt":
            # TensorRT's INT8 engine vs ONNX Runtime's reference execution of the same QDQ graph
            reference = reference_session(self.out / QDQ_ONNX)
            ref = predict(lambda a: reference.run(None, {INPUT_NAME: a})[0], data.x, "verify: ORT reference")
            with backend.runner(self.out / FP16_PLAN) as runner:
                fp16 = predict(runner.infer, data.x, "verify: TensorRT FP16")
            parity = {"ort_reference_agreement_top1": float((ref.argmax(1) == eng.argmax(1)).mean() * 100),
                      "ort_reference_max_abs_diff": float(np.abs(ref - eng).max()),
                      "fp16_engine_top1": accuracy_metrics(fp32, fp16, fp16, labels)["engine"]["top1"]}
        latency = self._latency(backend)
        engine = dict(self.results["engine"])
        if engine["int8_op_fraction"] < 1.0:
            self.warnings.append(f"only {engine['int8_op_fraction']:.0%} of conv/gemm ops run in integer "
                                 f"kernels in the {engine['backend']} engine")
        report = {
            "accuracy": accuracy,
            "engine": engine,
            "latency_ms": latency,
            "calibration": self.results["calibrate"],
            "reparam": self.results["reparam"],
            "export": self.results["export"],
            "parity": parity,
            "data": {"calib": self.opts.calib, "eval": self.opts.eval or self.opts.calib},
            "config": {**self.opts.to_dict(), "profile": self.profile, "engine_backend": self.engine_backend},
            "versions": versions(),
            "hardware": hardware(),
            "warnings": self.warnings,
        }
        plot_latency(latency, backend.name, self.out / LATENCY_PNG)
        plot_accuracy(accuracy, self.out / ACCURACY_PNG)
        write_json(self.out / REPORT_JSON, report)
        write_text(self.out / REPORT_MD, render_markdown(report))
        return report

    def _latency(self, backend) -> dict:
        """p50 latency of the engine and its float reference in the same backend, interleaved.

        The reference is the FP32 ONNX in ONNX Runtime, or the FP16 engine on TensorRT (the
        ``fp32`` keys keep their name so reports and baselines compare across backends).
        """
        x = self.calib_data.x.numpy()
        trt = self.engine_backend == "tensorrt"
        out: dict = {"fp32": {}, "engine": {}, "speedup": {}, "details": {},
                     "reference": "tensorrt-fp16" if trt else "onnxruntime-fp32"}
        for bs in (1, 32):
            batch = np.ascontiguousarray(np.resize(x, (bs,) + x.shape[1:]))
            reference = backend.runner(self.out / FP16_PLAN) if trt else OrtRunner(self.out / FP32_ONNX)
            runners = {"fp32": reference, "engine": backend.runner(self.out / self.engine_file)}
            stats = benchmark_interleaved(runners, batch, seconds=self.opts.bench_seconds,
                                          description="verify: latency")
            for name, s in stats.items():
                out[name][f"bs{bs}"] = s.p50_ms
                out["details"][f"{name}_bs{bs}"] = s.to_dict()
            out["speedup"][f"bs{bs}"] = paired_speedup(stats["fp32"], stats["engine"])
            for r in runners.values():
                r.deactivate()
        return out

    def run(self, until: str = "verify") -> dict:
        """Run the stages up to and including ``until``; returns that stage's result."""
        if until not in STAGES:
            raise DeployError(f"unknown stage {until}; stages are {', '.join(STAGES)}")
        result: dict = {}
        for stage in STAGES[:STAGES.index(until) + 1]:
            result = getattr(self, stage)()
        return result


def _peek_shape(path: Path) -> tuple[int, ...] | None:
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                return tuple(z["x"].shape[1:]) if "x" in z else None
        if path.suffix == ".npy":
            return tuple(np.load(path, mmap_mode="r").shape[1:])
    except (OSError, ValueError):
        return None
    return None


def _is_torchscript(path: Path) -> bool:
    return any("/code/__torch__" in n for n in zip_names(path))
