"""TensorRT backend: builds ``.plan`` engines from QDQ ONNX (explicit quantization) and runs them.

Written against the documented TensorRT 10 and 11 Python APIs. ``tensorrt`` is imported inside
functions only, so this module imports (and ``TensorRTBackend.available()`` answers False) on machines
without it. The version-dependent decisions are small pure functions taking the ``tensorrt`` module
as an argument, so they can be checked against a fake of its surface:

- TensorRT 11 builds strongly typed networks only: no INT8/FP16 builder flags, no calibrators; the
  ONNX graph's types are the precisions (Q/DQ -> INT8, FP16 tensors -> FP16).
- TensorRT 10 builds a QDQ graph as a strongly typed network where the flag exists (explicit
  quantization, nothing left to the builder's choice), else with the INT8 and FP16 builder flags.
- An FP16 reference engine from an FP32 ONNX is weakly typed with ``BuilderFlag.FP16`` on TensorRT 10;
  TensorRT 11 needs the ONNX converted to FP16 first.

Every ``.plan`` gets a metadata JSON beside it (``model.plan.json``): the TensorRT, CUDA and driver
versions, the GPU, build options and hashes. Loading an engine checks it against this machine first,
because TensorRT engines are specific to the TensorRT version and the GPU they were built with.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import torch

from repapq_deploy.artifacts import atomic_path, sha256_file
from repapq_deploy.backends.base import Backend, EngineInfo, Runner
from repapq_deploy.errors import DeployError
from repapq_deploy.export.onnx import OFFSET_BORDER_SUFFIX

# Engine-inspector layer types that are convolutions or matrix products (the "ops" of int8_op_fraction).
# Myelin layers are fused subgraphs TensorRT 10 uses for gemm/matmul regions.
CONV_GEMM_MARKERS = ("convolution", "gemm", "matrixmultiply", "fullyconnected")
MYELIN_TYPES = {"myelin"}
POINTWISE_TYPES = {"activation", "elementwise", "pointwise", "pointwisev2"}
MAX_NAMES_IN_NOTE = 5


# --- version dispatch (pure: the tensorrt module is an argument) --------------------------------------

def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", str(version)))


def trt_major(trt: ModuleType) -> int:
    """Major version of a ``tensorrt`` module (``trt.__version__`` like ``'10.9.0.34'``)."""
    parts = _version_tuple(trt.__version__)
    if not parts:
        raise DeployError(f"TensorRT reports an unreadable version {trt.__version__!r}")
    return parts[0]


def _strongly_typed_flag(trt: ModuleType) -> Any:
    """``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, or None where the enum or the member is absent."""
    return getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)


def strongly_typed(trt: ModuleType, fp16_reference: bool = False) -> bool:
    """Whether the network is built strongly typed (its precisions are the ONNX graph's types).

    TensorRT 11 knows nothing else. On TensorRT 10, a QDQ graph is built strongly typed where the flag
    exists; an FP16 reference engine from an FP32 graph is weakly typed, so the FP16 flag can lower it.
    """
    if trt_major(trt) >= 11:
        return True
    return not fp16_reference and _strongly_typed_flag(trt) is not None


def network_flags(trt: ModuleType, typed: bool) -> int:
    """The ``flags`` argument of ``builder.create_network``: the STRONGLY_TYPED bit when asked for and
    the flag exists (on TensorRT 11 it may be absent because strong typing is implicit)."""
    flag = _strongly_typed_flag(trt)
    return 1 << int(flag) if typed and flag is not None else 0


def builder_flags(trt: ModuleType, typed: bool, fp16_reference: bool = False,
                  version_compatible: bool = False) -> list:
    """``BuilderFlag`` members to set on the builder config.

    Strongly typed networks take no precision flags (TensorRT rejects them, and TensorRT 11 removed
    them). A weakly typed TensorRT 10 build enables INT8 (for the Q/DQ graph) and FP16 (so unquantized
    regions run in half precision), or FP16 alone for the FP16 reference engine.
    """
    flags = []
    if not typed:
        if trt_major(trt) >= 11:
            raise DeployError(f"TensorRT {trt.__version__} builds strongly typed networks only")
        flags = [trt.BuilderFlag.FP16] if fp16_reference else [trt.BuilderFlag.INT8, trt.BuilderFlag.FP16]
    if version_compatible:
        flag = getattr(trt.BuilderFlag, "VERSION_COMPATIBLE", None)
        if flag is None:
            raise DeployError(f"TensorRT {trt.__version__} cannot build version-compatible engines; "
                              "build with version_compatible=False")
        flags.append(flag)
    return flags


def profile_shapes(dims: tuple[int, ...], batch: tuple[int, int, int]
                   ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """(min, opt, max) shapes of an optimization profile for an input of ``dims`` (-1 = dynamic), or
    None when the input has a static batch and needs no profile."""
    if any(d < 0 for d in dims[1:]):
        raise DeployError(f"input shape {list(dims)} has dynamic non-batch dimensions; export with a fixed input size")
    if not dims or dims[0] >= 0:
        return None
    lo, opt, hi = batch
    rest = tuple(dims[1:])
    return (lo, *rest), (opt, *rest), (hi, *rest)


def timing_cache_key(gpu: str, cc: str | tuple[int, int], trt_version: str, cuda_version: str | None) -> str:
    """File-name-safe key of a timing cache: tactic timings are only valid for the same GPU model,
    compute capability, TensorRT and CUDA version."""
    cc_text = "".join(str(c) for c in cc) if isinstance(cc, tuple) else str(cc).replace(".", "")
    raw = f"{gpu}_sm{cc_text}_trt{trt_version}_cuda{cuda_version or 'none'}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.")


def onnx_is_fp16(model: onnx.ModelProto) -> bool:
    """True when the graph computes in FP16: it holds FP16 tensors (initializers or casts to FP16) and
    no conv/gemm/matmul takes an FP32 weight initializer."""
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    types = {i.name: i.data_type for i in model.graph.initializer}
    nodes = model.graph.node
    fp32_weights = any(types.get(n.input[1]) == fp32 for n in nodes
                       if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) > 1)
    casts = any(n.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in n.attribute) for n in nodes)
    return (casts or fp16 in types.values()) and not fp32_weights


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    """The torch dtype of a ``trt.DataType`` member (matched by member name, which is stable across versions)."""
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool}
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in table:
        raise DeployError(f"engine I/O tensor of TensorRT type {name} has no torch equivalent")
    return table[name]


# --- build options and engine metadata -----------------------------------------------------------------

@dataclass
class TrtBuildOptions:
    """How to build a TensorRT engine.

    ``batch``: (min, opt, max) of the optimization profile for a dynamic batch dimension.
    ``hardware_compatible``: runs on any Ampere or newer GPU (slower kernels may be chosen).
    ``version_compatible``: runs on later TensorRT releases of the same major version.
    ``fp16_reference``: an FP16 engine from the FP32 ONNX (the float speed reference), not INT8.
    ``timing_cache_dir``: where tactic timings persist across builds (None: no persistent cache).
    """

    batch: tuple[int, int, int] = (1, 8, 32)
    workspace_mib: int = 4096
    optimization_level: int = 3
    timing_cache_dir: Path | None = Path("engines/.cache")
    hardware_compatible: bool = False
    version_compatible: bool = False
    fp16_reference: bool = False

    def __post_init__(self) -> None:
        self.batch = tuple(int(b) for b in self.batch)  # type: ignore[assignment]
        if len(self.batch) != 3 or not 1 <= self.batch[0] <= self.batch[1] <= self.batch[2]:
            raise DeployError(f"TensorRT batch profile {self.batch}: give (min, opt, max) with 1 <= min <= opt <= max")
        if self.workspace_mib <= 0:
            raise DeployError(f"TensorRT workspace {self.workspace_mib} MiB: must be positive")
        if not 0 <= self.optimization_level <= 5:
            raise DeployError(f"TensorRT optimization level {self.optimization_level}: choose 0..5")
        if self.timing_cache_dir is not None:
            self.timing_cache_dir = Path(self.timing_cache_dir)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["batch"] = list(self.batch)
        d["timing_cache_dir"] = None if self.timing_cache_dir is None else str(self.timing_cache_dir)
        return d


def metadata_path(engine_path: str | Path) -> Path:
    """The metadata JSON beside an engine: ``model.plan`` -> ``model.plan.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def engine_metadata(environment: dict, options: TrtBuildOptions, *, onnx_sha256: str, engine_sha256: str,
                    typed: bool, created: str | None = None) -> dict:
    """The metadata recorded beside a ``.plan``: what built it, where, how, and from which ONNX.

    ``environment`` is :func:`current_environment`'s dict (TensorRT/CUDA/driver versions, GPU name and
    compute capability).
    """
    return {
        "backend": "tensorrt",
        **{k: environment.get(k) for k in ("tensorrt_version", "cuda_version", "driver_version", "gpu_name",
                                            "compute_capability")},
        "hardware_compatible": options.hardware_compatible,
        "version_compatible": options.version_compatible,
        "strongly_typed": typed,
        "precision": "fp16-reference" if options.fp16_reference else "qdq",
        "build_options": options.to_dict(),
        "onnx_sha256": onnx_sha256,
        "engine_sha256": engine_sha256,
        "created": created or datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _cc_tuple(cc: Any) -> tuple[int, ...]:
    return _version_tuple(cc) if cc is not None else ()


def check_compatibility(metadata: dict, current: dict) -> None:
    """Raise DeployError (one line) when an engine built as ``metadata`` says cannot run here.

    The TensorRT version must match, unless the engine is version-compatible (then any release of the
    same major version at or above the building one). The GPU (name and compute capability) must match,
    unless the engine is hardware-compatible (then any Ampere or newer GPU, compute capability >= 8.0).
    """
    built, here = metadata.get("tensorrt_version"), current.get("tensorrt_version")
    if built != here:
        if not metadata.get("version_compatible"):
            raise DeployError(f"engine built with TensorRT {built}, this machine has TensorRT {here}; rebuild the "
                              "engine here, or build it with version_compatible=True")
        b, h = _version_tuple(built), _version_tuple(here)
        if not b or not h or h[0] != b[0] or h < b:
            major = f"{b[0]}.x " if b else ""
            raise DeployError(f"version-compatible engine built with TensorRT {built} runs on TensorRT {major}releases "
                              f"at or above it only, this machine has TensorRT {here}; rebuild the engine")
    built_gpu = (metadata.get("gpu_name"), _cc_tuple(metadata.get("compute_capability")))
    here_gpu = (current.get("gpu_name"), _cc_tuple(current.get("compute_capability")))
    if built_gpu != here_gpu:
        where = (f"built on {built_gpu[0]} (compute capability {metadata.get('compute_capability')}), this machine "
                 f"has {here_gpu[0]} (compute capability {current.get('compute_capability')})")
        if not metadata.get("hardware_compatible"):
            raise DeployError(f"engine {where}; rebuild the engine here, or build it with hardware_compatible=True "
                              "(Ampere and newer GPUs)")
        if here_gpu[1] < (8, 0):
            raise DeployError(f"hardware-compatible engine {where}: it runs on Ampere or newer GPUs "
                              "(compute capability 8.0+) only; rebuild the engine here")


REQUIRED_METADATA = ("tensorrt_version", "gpu_name", "compute_capability", "engine_sha256")


def read_metadata(engine_path: str | Path) -> dict | None:
    """The metadata JSON of an engine, or None for a ``.plan`` that has none (built elsewhere)."""
    path = metadata_path(engine_path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DeployError(f"{path}: unreadable engine metadata ({exc}); rebuild the engine") from exc
    missing = [k for k in REQUIRED_METADATA if k not in data] if isinstance(data, dict) else list(REQUIRED_METADATA)
    if missing:
        raise DeployError(f"{path}: engine metadata lacks {', '.join(missing)}; rebuild the engine")
    return data


# --- engine-inspector layer information ---------------------------------------------------------------

def tensor_precision(tensor: Any) -> str | None:
    """'int8' / 'fp16' / 'fp32' / 'other' from an inspector tensor entry, None if it gives no type.

    TensorRT 10 writes one ``"Format/Datatype"`` string ("Thirty-two wide channel vectorized row major
    Int8 format", "Half", "Row major linear FP32"); TensorRT 11 splits it into ``"DataType"`` and
    ``"Format"``. "N/A due to dynamic shapes" carries no type.
    """
    if not isinstance(tensor, dict):
        return None
    text = " ".join(str(tensor[k]) for k in ("DataType", "Format/Datatype", "Format") if tensor.get(k)).lower()
    if "int8" in text:
        return "int8"
    if "half" in text or "fp16" in text:
        return "fp16"
    if "bf16" in text or "bfloat" in text:
        return "other"
    if "float" in text or "fp32" in text:
        return "fp32"
    if re.search(r"int\d|bool|fp8|fp4|uint", text):
        return "other"
    return None


def layer_precision(layer: dict) -> str | None:
    """A layer's compute precision: that of its first typed input (a conv's kernel is chosen by its input
    type; an INT8 conv may write float), else of its first typed output."""
    for key in ("Inputs", "Outputs"):
        for tensor in layer.get(key) or []:
            p = tensor_precision(tensor)
            if p is not None and p != "other":
                return p
    return None


def is_conv_gemm(layer_type: str) -> bool:
    """Whether an inspector LayerType is a convolution / matrix-product layer."""
    t = layer_type.lower()
    return t in MYELIN_TYPES or any(m in t for m in CONV_GEMM_MARKERS)


def summarize_layers(info: dict) -> dict:
    """Count an engine's layers by precision from its inspector JSON (``{"Layers": [...], ...}``).

    Reformat layers (LayerType "Reformat", or "reformat" in the name) are counted apart and not by
    precision: they move data, they do not compute. ``unfused_clips`` lists Clip layers that run as
    their own pointwise layer instead of in a conv epilogue (the INT6 emulation wants them fused);
    ``unfused_offsets`` does the same for ``--offset-relu all``'s border-map Adds.
    Layers given as plain strings (engines built without detailed profiling verbosity) are counted,
    with no precision. ``int8_layer_fraction`` is over layers of known precision (None if none).
    """
    layers = info.get("Layers", []) if isinstance(info, dict) else []
    counts: Counter = Counter()
    types: Counter = Counter()
    fp32_layers, unfused_clips, unfused_offsets = [], [], []
    reformat = integer_ops = float_ops = 0
    for layer in layers:
        if isinstance(layer, str):
            name, layer_type, precision = layer, None, None
        else:
            name, layer_type = str(layer.get("Name", "")), str(layer.get("LayerType", ""))
            precision = layer_precision(layer)
            types[layer_type] += 1
        lowered = name.lower()
        if layer_type == "Reformat" or "reformat" in lowered:
            reformat += 1
            continue
        standalone = layer_type.lower() in POINTWISE_TYPES if layer_type else " + " not in name
        if "clip" in lowered and standalone:
            unfused_clips.append(name)
        # a border map left as its own layer (a Sub of a shifted quantizer stays only where no conv
        # produces the tensor, e.g. after the pooling, so it has no conv to fuse into)
        if standalone and OFFSET_BORDER_SUFFIX in name:
            unfused_offsets.append(name)
        if precision in ("int8", "fp16", "fp32"):
            counts[precision] += 1
            if precision == "fp32":
                fp32_layers.append(name)
        if layer_type and is_conv_gemm(layer_type) and precision is not None:
            if precision == "int8":
                integer_ops += 1
            else:
                float_ops += 1
    known = counts["int8"] + counts["fp16"] + counts["fp32"]
    return {
        "layers": len(layers), "int8": counts["int8"], "fp16": counts["fp16"], "fp32": counts["fp32"],
        "reformat": reformat, "unfused_clips": unfused_clips, "unfused_offsets": unfused_offsets,
        "int8_layer_fraction": counts["int8"] / known if known else None,
        "integer_ops": integer_ops, "float_ops": float_ops, "fp32_layers": fp32_layers,
        "layer_types": dict(sorted(types.items())),
    }


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES_IN_NOTE])
    return shown + (f" (+{len(names) - MAX_NAMES_IN_NOTE} more)" if len(names) > MAX_NAMES_IN_NOTE else "")


def engine_info(path: str | Path, summary: dict, notes: list[str] | None = None) -> EngineInfo:
    """EngineInfo from a layer summary: conv/gemm layers with INT8 inputs are the integer ops."""
    integer, floating = summary["integer_ops"], summary["float_ops"]
    notes = list(notes or [])
    if summary["int8_layer_fraction"] is None:
        notes.append("layer precisions unknown: the engine was built without detailed profiling verbosity")
    if floating:
        notes.append(f"{floating} of {integer + floating} conv/gemm layers run in float")
    if summary["reformat"]:
        notes.append(f"{summary['reformat']} reformat layers")
    if summary["fp32_layers"]:
        notes.append(f"FP32 layers: {_names(summary['fp32_layers'])}")
    if summary["unfused_clips"]:
        notes.append(f"Clip layers not fused into their conv: {_names(summary['unfused_clips'])}")
    if summary.get("unfused_offsets"):
        notes.append("offset_relu border maps not fused into their conv (an extra pass over its output "
                     f"each): {_names(summary['unfused_offsets'])}")
    return EngineInfo("tensorrt", str(path), integer, floating,
                      integer / (integer + floating) if integer + floating else 0.0,
                      summary["layer_types"], notes)


# --- TensorRT and CUDA access (lazy) --------------------------------------------------------------------

def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or a DeployError saying how to get it."""
    try:
        import tensorrt as trt
    except Exception as exc:  # not only ImportError: a wheel without its CUDA libraries fails in other ways
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise DeployError(f"TensorRT is not available here (import tensorrt: {reason}); install repapq-deploy[gpu] "
                          "on a host with an NVIDIA GPU, or use `backend` onnxruntime") from exc
    return trt


def require_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, after checking that a CUDA GPU is visible."""
    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise DeployError("TensorRT needs an NVIDIA GPU, and PyTorch sees no CUDA device here; "
                          "use `backend` onnxruntime")
    return trt


def driver_version() -> str | None:
    """The CUDA version the installed driver supports (cuda-python ``cuDriverGetVersion``), or None."""
    try:
        try:
            from cuda.bindings import driver
        except ImportError:  # cuda-python before 12.6
            from cuda import cuda as driver
        err, version = driver.cuDriverGetVersion()
        if err != driver.CUresult.CUDA_SUCCESS:
            return None
    except Exception:  # no cuda-python, no driver library, or a failing driver: the field is optional
        return None
    return f"{version // 1000}.{version % 1000 // 10}"


def current_environment(trt: ModuleType) -> dict:
    """This machine as engine metadata sees it: TensorRT, CUDA and driver versions, GPU and compute capability."""
    device = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(device)
    return {"tensorrt_version": trt.__version__, "cuda_version": torch.version.cuda,
            "driver_version": driver_version(), "gpu_name": torch.cuda.get_device_name(device),
            "compute_capability": f"{major}.{minor}"}


def make_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that prints warnings and errors and keeps the errors for DeployError messages."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.Logger.INTERNAL_ERROR, trt.Logger.ERROR):
                self.errors.append(msg)
            if severity in (trt.Logger.INTERNAL_ERROR, trt.Logger.ERROR, trt.Logger.WARNING):
                print(f"[TensorRT] {msg}", file=sys.stderr)

    return _Logger()


def _errors(logger: Any) -> str:
    # One line: the CLI prints DeployError messages as a single line.
    return " | ".join(" ".join(str(e).split()) for e in logger.errors[-3:]) or "no error message from TensorRT"


def load_engine(trt: ModuleType, engine_path: str | Path) -> tuple[Any, Any, dict | None]:
    """(runtime, engine, metadata) of a ``.plan``, after checking its metadata against this machine.

    A plan without metadata (built outside this tool) is handed to TensorRT as is; TensorRT refuses an
    incompatible one, and that refusal becomes a DeployError.
    """
    path = Path(engine_path)
    if not path.is_file():
        raise DeployError(f"{path}: engine not found; build it first (repapq-deploy engine ...)")
    meta = read_metadata(path)
    if meta is not None:
        if meta["engine_sha256"] != sha256_file(path):
            raise DeployError(f"{metadata_path(path)}: describes another engine than {path.name}; rebuild the engine")
        try:
            check_compatibility(meta, current_environment(trt))
        except DeployError as exc:
            raise DeployError(f"{path}: {exc}") from exc
    logger = make_logger(trt)
    runtime = trt.Runtime(logger)
    if meta is not None and meta.get("version_compatible"):
        runtime.engine_host_code_allowed = True  # version-compatible plans embed the lean runtime they run on
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise DeployError(f"{path}: TensorRT {trt.__version__} cannot load this engine ({_errors(logger)}); "
                          "rebuild it on this machine")
    return runtime, engine, meta


def _io_names(engine: Any, mode: Any) -> list[str]:
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    return [n for n in names if engine.get_tensor_mode(n) == mode]


def inspect_engine(trt: ModuleType, engine: Any) -> dict:
    """The engine inspector's JSON for the whole engine, with dynamic inputs set to the profile's opt
    shape (without a shape, TensorRT reports formats as "N/A due to dynamic shapes")."""
    context = engine.create_execution_context()
    if context is None:
        raise DeployError("TensorRT could not create an execution context (out of GPU memory?)")
    for name in _io_names(engine, trt.TensorIOMode.INPUT):
        if any(d < 0 for d in engine.get_tensor_shape(name)):
            context.set_input_shape(name, tuple(engine.get_tensor_profile_shape(name, 0)[1]))
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise DeployError(f"TensorRT's engine inspector returned unreadable JSON ({exc})") from exc


# --- build ------------------------------------------------------------------------------------------------

def _configure(trt: ModuleType, builder: Any, network: Any, config: Any, options: TrtBuildOptions,
               typed: bool) -> None:
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    config.builder_optimization_level = options.optimization_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # per-layer precisions for the inspector
    for flag in builder_flags(trt, typed, options.fp16_reference, options.version_compatible):
        config.set_flag(flag)
    if options.hardware_compatible:
        level = getattr(getattr(trt, "HardwareCompatibilityLevel", None), "AMPERE_PLUS", None)
        if level is None:
            raise DeployError(f"TensorRT {trt.__version__} cannot build hardware-compatible engines; "
                              "build with hardware_compatible=False")
        config.hardware_compatibility_level = level
    profile, dynamic = builder.create_optimization_profile(), False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shapes = profile_shapes(tuple(tensor.shape), options.batch)
        if shapes is not None:
            profile.set_shape(tensor.name, *shapes)
            dynamic = True
    if dynamic:
        config.add_optimization_profile(profile)


def _use_timing_cache(config: Any, options: TrtBuildOptions, environment: dict) -> tuple[Path | None, list[str]]:
    """Load the persistent timing cache for this GPU/TensorRT/CUDA into the config; (its file, notes)."""
    if options.timing_cache_dir is None:
        return None, []
    key = timing_cache_key(environment["gpu_name"], environment["compute_capability"],
                           environment["tensorrt_version"], environment["cuda_version"])
    path = options.timing_cache_dir / f"{key}.cache"
    data = path.read_bytes() if path.is_file() else b""
    note = f"timing cache {path} {'reused' if data else 'created'}"
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # A corrupt or foreign cache file costs build time, not the build: start from an empty cache.
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
        note = f"timing cache {path} was unusable and is replaced"
    return path, [note]


def _save_timing_cache(config: Any, path: Path) -> list[str]:
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(config.get_timing_cache().serialize())
    except DeployError as exc:  # the engine is built; an unwritable cache folder only costs the next build time
        return [f"timing cache not saved: {exc}"]
    return []


class TensorRTBackend(Backend):
    """TensorRT engines from QDQ ONNX graphs (explicit quantization), TensorRT 10 and 11."""

    name = "tensorrt"
    engine_suffix = ".plan"

    def __init__(self, options: TrtBuildOptions | None = None) -> None:
        self.options = options or TrtBuildOptions()

    @classmethod
    def available(cls) -> bool:
        try:
            import_tensorrt()
        except DeployError:
            return False
        return torch.cuda.is_available()

    def build(self, onnx_path: Path, engine_path: Path) -> EngineInfo:
        """Build ``engine_path`` (.plan) and its metadata JSON from ``onnx_path``, both atomically."""
        trt = require_tensorrt()
        onnx_path, engine_path, opts = Path(onnx_path), Path(engine_path), self.options
        if not onnx_path.is_file():
            raise DeployError(f"{onnx_path}: ONNX file not found")
        environment = current_environment(trt)
        typed = strongly_typed(trt, opts.fp16_reference)
        if opts.fp16_reference and typed and not onnx_is_fp16(onnx.load(str(onnx_path), load_external_data=False)):
            raise DeployError(f"{onnx_path}: TensorRT {trt.__version__} builds strongly typed networks only, so an "
                              "FP16 reference engine needs an FP16 ONNX; convert it first (python -m "
                              f"modelopt.onnx.autocast --onnx_path {onnx_path}) and build from the converted file")
        if opts.hardware_compatible and _cc_tuple(environment["compute_capability"]) < (8, 0):
            raise DeployError(f"hardware_compatible=True needs an Ampere or newer GPU to build on; "
                              f"{environment['gpu_name']} has compute capability {environment['compute_capability']}")
        logger = make_logger(trt)
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags(trt, typed))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [" ".join(str(parser.get_error(i).desc()).split()) for i in range(parser.num_errors)]
            raise DeployError(f"{onnx_path}: TensorRT {trt.__version__} cannot parse this graph: "
                              f"{'; '.join(errors) or _errors(logger)}")
        config = builder.create_builder_config()
        _configure(trt, builder, network, config, opts, typed)
        cache_path, cache_notes = _use_timing_cache(config, opts, environment)
        notes = [f"{'strongly' if typed else 'weakly'} typed network, TensorRT {trt.__version__}", *cache_notes]
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise DeployError(f"{onnx_path}: TensorRT {trt.__version__} could not build an engine ({_errors(logger)})")
        if cache_path is not None:
            notes += _save_timing_cache(config, cache_path)
        with atomic_path(engine_path) as tmp_plan, atomic_path(metadata_path(engine_path)) as tmp_meta:
            tmp_plan.write_bytes(plan)
            meta = engine_metadata(environment, opts, onnx_sha256=sha256_file(onnx_path),
                                   engine_sha256=sha256_file(tmp_plan), typed=typed)
            tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
        return self._info(trt, engine_path, notes)

    def _info(self, trt: ModuleType, engine_path: Path, notes: list[str] | None = None) -> EngineInfo:
        _, engine, _ = load_engine(trt, engine_path)
        return engine_info(engine_path, summarize_layers(inspect_engine(trt, engine)), notes)

    def runner(self, engine_path: Path) -> Runner:
        return TrtRunner(engine_path)

    def describe(self, engine_path: Path) -> dict:
        """EngineInfo of a built engine, plus its layer summary and its metadata."""
        trt = require_tensorrt()
        _, engine, meta = load_engine(trt, engine_path)
        summary = summarize_layers(inspect_engine(trt, engine))
        return {**engine_info(engine_path, summary).to_dict(), "layer_summary": summary, "metadata": meta}


# --- runner -----------------------------------------------------------------------------------------------

class TrtRunner(Runner):
    """Runs a ``.plan`` with TensorRT's name-based I/O API (``execute_async_v3``); device buffers are
    torch CUDA tensors on a private stream."""

    def __init__(self, engine_path: str | Path) -> None:
        super().__init__()
        self.path = Path(engine_path)
        self._runtime = self.engine = self.context = self.stream = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._bound: tuple[int, ...] | None = None

    def activate_impl(self) -> None:
        trt = require_tensorrt()
        self._runtime, self.engine, _ = load_engine(trt, self.path)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise DeployError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?)")
        inputs = _io_names(self.engine, trt.TensorIOMode.INPUT)
        self.outputs = _io_names(self.engine, trt.TensorIOMode.OUTPUT)
        if len(inputs) != 1 or not self.outputs:
            raise DeployError(f"{self.path}: the runner takes engines with one input and an output; "
                              f"this one has inputs {inputs} and outputs {self.outputs}")
        self.input = inputs[0]
        self.dtypes = {n: torch_dtype(self.engine.get_tensor_dtype(n)) for n in [self.input, *self.outputs]}
        self.input_shape = tuple(self.engine.get_tensor_shape(self.input))
        if self.input_shape[0] >= 0:
            self.batch_range = (self.input_shape[0], self.input_shape[0])
        else:
            lo, _, hi = self.engine.get_tensor_profile_shape(self.input, 0)
            self.batch_range = (lo[0], hi[0])
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self._bound = None

    def deactivate_impl(self) -> None:
        self._buffers.clear()
        self.context = self.engine = self._runtime = self.stream = None
        self._bound = None

    def _bind(self, shape: tuple[int, ...]) -> None:
        """Set the input shape and (re)allocate and bind the device buffers, when the shape changes."""
        if shape == self._bound:
            return
        fixed = [(e, s) for e, s in zip(self.input_shape[1:], shape[1:], strict=False) if e >= 0]
        if len(shape) != len(self.input_shape) or any(e != s for e, s in fixed):
            raise DeployError(f"{self.path}: input of shape {list(shape)} does not fit the engine's input "
                              f"{list(self.input_shape)} (-1 = any)")
        if not self.context.set_input_shape(self.input, shape):
            raise DeployError(f"{self.path}: TensorRT rejects input shape {list(shape)}")
        self._buffers = {self.input: torch.empty(shape, dtype=self.dtypes[self.input], device=self.device)}
        for name in self.outputs:
            out_shape = tuple(self.context.get_tensor_shape(name))
            self._buffers[name] = torch.empty(out_shape, dtype=self.dtypes[name], device=self.device)
        for name, buffer in self._buffers.items():
            self.context.set_tensor_address(name, int(buffer.data_ptr()))
        self._bound = shape

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise DeployError(f"{self.path}: TensorRT execution failed")

    def _check_batch(self, n: int) -> None:
        lo, hi = self.batch_range
        if not lo <= n <= hi:
            raise DeployError(f"{self.path}: batch {n} is outside the engine's range [{lo}, {hi}]; rebuild with "
                              "another TrtBuildOptions.batch")

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Copy ``x`` in, execute, synchronize, return the first output as float32. Batches larger than
        the engine's profile are run in slices."""
        if not self.is_active:
            self.activate()
        x = np.ascontiguousarray(x, dtype=np.float32)
        hi = self.batch_range[1]
        if len(x) > hi:
            return np.concatenate([self.infer(x[i:i + hi]) for i in range(0, len(x), hi)])
        self._check_batch(len(x))
        with torch.cuda.stream(self.stream):
            self._bind(tuple(x.shape))
            self._buffers[self.input].copy_(torch.from_numpy(x))
            self._execute()
            out = self._buffers[self.outputs[0]].float().cpu()
        self.stream.synchronize()
        return out.numpy()

    def time_gpu(self, x: np.ndarray, warmup: int = 10, iterations: int = 100) -> list[float]:
        """GPU time in seconds of each of ``iterations`` executions on ``x`` (CUDA events around
        ``execute_async_v3``; host copies excluded)."""
        if not self.is_active:
            self.activate()
        x = np.ascontiguousarray(x, dtype=np.float32)
        self._check_batch(len(x))
        with torch.cuda.stream(self.stream):
            self._bind(tuple(x.shape))
            self._buffers[self.input].copy_(torch.from_numpy(x))
            for _ in range(warmup):
                self._execute()
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(iterations)]
            for start, end in events:
                start.record(self.stream)
                self._execute()
                end.record(self.stream)
        self.stream.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in events]
