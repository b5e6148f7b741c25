"""TensorRT backend.

Two kinds of tests live here:

- CPU tests are INTERFACE tests. They exercise the version dispatch (TensorRT 10 vs 11, strongly
  typed or not), the build flow, the metadata/compatibility rules and the inspector-JSON summary
  against a minimal fake of the tensorrt module's surface, written from TensorRT's documentation;
  they are not proof that TensorRT works. They run everywhere, in well under ten seconds.
- ``@pytest.mark.gpu`` tests build and run real engines. They need TensorRT and a CUDA GPU and are
  skipped where either is missing.
"""

from __future__ import annotations

import copy
import enum
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

import repapq_deploy.backends.tensorrt as trtmod
from repapq_deploy.backends.base import Backend, EngineInfo
from repapq_deploy.backends.tensorrt import (
    TensorRTBackend,
    TrtBuildOptions,
    TrtRunner,
    builder_flags,
    check_compatibility,
    engine_info,
    engine_metadata,
    metadata_path,
    network_flags,
    onnx_is_fp16,
    profile_shapes,
    read_metadata,
    strongly_typed,
    summarize_layers,
    tensor_precision,
    timing_cache_key,
    torch_dtype,
    trt_major,
)
from repapq_deploy.errors import DeployError

# --- a minimal fake of the tensorrt module's surface ------------------------------------------------------

NetworkFlags10 = enum.IntEnum("NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1})
NetworkFlagsOld = enum.IntEnum("NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0})
BuilderFlag10 = enum.Enum("BuilderFlag", ["FP16", "INT8", "VERSION_COMPATIBLE", "STRICT_TYPES"])
BuilderFlag11 = enum.Enum("BuilderFlag", ["VERSION_COMPATIBLE", "REFIT"])  # precision flags removed in 11

ENV = {"tensorrt_version": "10.9.0.34", "cuda_version": "12.8", "driver_version": "12.8",
       "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def fake_trt(version: str = "10.9.0.34", network_flags_enum=NetworkFlags10, builder_flag_enum=None, **surface):
    """The parts of ``tensorrt`` the version dispatch reads; ``surface`` adds builder/runtime classes."""
    if builder_flag_enum is None:
        builder_flag_enum = BuilderFlag11 if version.startswith("11") else BuilderFlag10
    trt = SimpleNamespace(__version__=version, BuilderFlag=builder_flag_enum, **surface)
    if network_flags_enum is not None:
        trt.NetworkDefinitionCreationFlag = network_flags_enum
    return trt


# --- version dispatch ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("version", "major"), [("10.9.0.34", 10), ("11.0.0", 11), ("10.0.1", 10), ("11.2.0rc1", 11)])
def test_trt_major(version, major):
    assert trt_major(fake_trt(version)) == major


def test_trt_major_rejects_an_unreadable_version():
    with pytest.raises(DeployError, match="unreadable version"):
        trt_major(fake_trt("unknown"))


def test_trt10_qdq_graph_is_strongly_typed_without_precision_flags():
    trt = fake_trt("10.9.0.34")
    assert strongly_typed(trt) is True
    assert network_flags(trt, True) == 1 << 1  # STRONGLY_TYPED's bit
    assert builder_flags(trt, True) == []


def test_trt10_without_strongly_typed_flag_sets_int8_and_fp16():
    trt = fake_trt("10.0.0", network_flags_enum=NetworkFlagsOld)
    assert strongly_typed(trt) is False
    assert network_flags(trt, False) == 0
    assert builder_flags(trt, False) == [BuilderFlag10.INT8, BuilderFlag10.FP16]


def test_trt10_fp16_reference_is_weakly_typed_with_fp16_flag():
    trt = fake_trt("10.9.0.34")
    assert strongly_typed(trt, fp16_reference=True) is False
    assert network_flags(trt, False) == 0
    assert builder_flags(trt, False, fp16_reference=True) == [BuilderFlag10.FP16]


@pytest.mark.parametrize("flags_enum", [NetworkFlags10, NetworkFlagsOld, None],
                         ids=["flag-present", "flag-absent", "enum-absent"])
@pytest.mark.parametrize("fp16_reference", [False, True])
def test_trt11_is_always_strongly_typed_and_sets_no_precision_flags(flags_enum, fp16_reference):
    trt = fake_trt("11.0.0", network_flags_enum=flags_enum)
    assert strongly_typed(trt, fp16_reference) is True
    assert network_flags(trt, True) == (2 if flags_enum is NetworkFlags10 else 0)
    assert builder_flags(trt, True, fp16_reference) == []  # never touches the removed INT8/FP16 members


def test_trt11_refuses_a_weakly_typed_build():
    with pytest.raises(DeployError, match="strongly typed networks only"):
        builder_flags(fake_trt("11.0.0"), False)


@pytest.mark.parametrize("version", ["10.9.0.34", "11.0.0"])
def test_version_compatible_adds_its_flag(version):
    trt = fake_trt(version)
    assert builder_flags(trt, True, version_compatible=True) == [trt.BuilderFlag.VERSION_COMPATIBLE]


def test_version_compatible_without_the_flag_is_a_clear_error():
    trt = fake_trt("11.0.0", builder_flag_enum=enum.Enum("BuilderFlag", ["REFIT"]))
    with pytest.raises(DeployError, match="cannot build version-compatible engines"):
        builder_flags(trt, True, version_compatible=True)


def test_profile_shapes():
    assert profile_shapes((-1, 3, 224, 224), (1, 8, 32)) == ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))
    assert profile_shapes((4, 3, 224, 224), (1, 8, 32)) is None  # static batch: no profile
    with pytest.raises(DeployError, match="dynamic non-batch dimensions"):
        profile_shapes((-1, 3, -1, -1), (1, 8, 32))


def test_timing_cache_key_is_file_name_safe_and_distinguishes_environments():
    key = timing_cache_key("NVIDIA GeForce RTX 4090 / OC", (8, 9), "10.9.0.34", "12.8")
    assert key == "NVIDIA-GeForce-RTX-4090-OC_sm89_trt10.9.0.34_cuda12.8"
    assert timing_cache_key("NVIDIA GeForce RTX 4090 / OC", "8.9", "10.9.0.34", "12.8") == key
    assert all(c.isalnum() or c in "._-" for c in key)
    variants = {timing_cache_key("A100", "8.0", "10.9.0", "12.8"), timing_cache_key("A100", "8.6", "10.9.0", "12.8"),
                timing_cache_key("A100", "8.0", "10.8.0", "12.8"), timing_cache_key("A100", "8.0", "10.9.0", "12.4"),
                timing_cache_key("H100", "8.0", "10.9.0", "12.8"), timing_cache_key("A100", "8.0", "10.9.0", None)}
    assert len(variants) == 6
    assert "/" not in timing_cache_key("../../etc", "9.0", "10", "12")


def test_torch_dtype_by_trt_member_name():
    assert torch_dtype(SimpleNamespace(name="FLOAT")) is torch.float32
    assert torch_dtype(SimpleNamespace(name="HALF")) is torch.float16
    assert torch_dtype(SimpleNamespace(name="INT8")) is torch.int8
    with pytest.raises(DeployError, match="FP4"):
        torch_dtype(SimpleNamespace(name="FP4"))


@pytest.mark.parametrize("kwargs", [{"batch": (8, 1, 32)}, {"batch": (0, 1, 2)}, {"batch": (1, 2)},
                                    {"workspace_mib": 0}, {"optimization_level": 6}])
def test_build_options_are_validated(kwargs):
    with pytest.raises(DeployError):
        TrtBuildOptions(**kwargs)


def test_build_options_defaults_and_dict():
    opts = TrtBuildOptions(timing_cache_dir="cache")
    assert opts.timing_cache_dir == Path("cache")
    assert TrtBuildOptions().to_dict() == {
        "batch": [1, 8, 32], "workspace_mib": 4096, "optimization_level": 3, "timing_cache_dir": "engines/.cache",
        "hardware_compatible": False, "version_compatible": False, "fp16_reference": False}


# --- ONNX FP16 detection (TensorRT 11's FP16 reference needs an FP16 graph) ---------------------------------

def conv_onnx(path: Path, dtype: int = TensorProto.FLOAT) -> Path:
    """A one-conv ONNX graph with ``dtype`` weights and a dynamic batch."""
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    w = numpy_helper.from_array(np.ones((4, 1, 3, 3), np_type), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["input", "w"], ["logits"], pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("input", dtype, ["batch", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", dtype, ["batch", 4, 8, 8])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_onnx_is_fp16(tmp_path):
    assert onnx_is_fp16(onnx.load(str(conv_onnx(tmp_path / "h.onnx", TensorProto.FLOAT16))))
    assert not onnx_is_fp16(onnx.load(str(conv_onnx(tmp_path / "f.onnx", TensorProto.FLOAT))))


# --- metadata and compatibility -----------------------------------------------------------------------------

def metadata(**overrides) -> dict:
    opts = TrtBuildOptions(hardware_compatible=overrides.pop("hardware_compatible", False),
                           version_compatible=overrides.pop("version_compatible", False))
    return engine_metadata({**ENV, **overrides}, opts, onnx_sha256="a" * 64, engine_sha256="b" * 64, typed=True,
                           created="2025-01-01T00:00:00+00:00")


def test_engine_metadata_records_what_built_the_engine():
    meta = metadata()
    assert meta == {
        "backend": "tensorrt", **ENV, "hardware_compatible": False, "version_compatible": False,
        "strongly_typed": True, "precision": "qdq", "build_options": TrtBuildOptions().to_dict(),
        "onnx_sha256": "a" * 64, "engine_sha256": "b" * 64, "created": "2025-01-01T00:00:00+00:00"}
    json.dumps(meta)  # serialisable as is
    assert engine_metadata(ENV, TrtBuildOptions(), onnx_sha256="", engine_sha256="", typed=False)["created"]


def test_same_environment_is_compatible():
    check_compatibility(metadata(), dict(ENV))


def test_other_tensorrt_version_is_refused_with_one_line():
    with pytest.raises(DeployError, match=r"TensorRT 10\.9\.0\.34, this machine has TensorRT 10\.8\.0") as exc:
        check_compatibility(metadata(), {**ENV, "tensorrt_version": "10.8.0"})
    assert "\n" not in str(exc.value)
    assert "version_compatible=True" in str(exc.value)


def test_version_compatible_engine_runs_on_later_releases_of_the_same_major():
    check_compatibility(metadata(version_compatible=True), {**ENV, "tensorrt_version": "10.12.0.36"})
    for here in ("10.8.0", "11.0.0"):
        with pytest.raises(DeployError, match="version-compatible engine"):
            check_compatibility(metadata(version_compatible=True), {**ENV, "tensorrt_version": here})


@pytest.mark.parametrize("change", [{"gpu_name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"},
                                    {"compute_capability": "9.1"}, {"gpu_name": "NVIDIA H100 PCIe"}])
def test_other_gpu_is_refused(change):
    with pytest.raises(DeployError, match="rebuild the engine here") as exc:
        check_compatibility(metadata(), {**ENV, **change})
    assert "hardware_compatible=True" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_hardware_compatible_engine_runs_on_ampere_and_newer_only():
    meta = metadata(hardware_compatible=True)
    check_compatibility(meta, {**ENV, "gpu_name": "NVIDIA A10", "compute_capability": "8.6"})
    check_compatibility(meta, {**ENV, "gpu_name": "NVIDIA L4", "compute_capability": "8.9"})
    with pytest.raises(DeployError, match=r"Ampere or newer GPUs \(compute capability 8\.0\+\)"):
        check_compatibility(meta, {**ENV, "gpu_name": "Tesla T4", "compute_capability": "7.5"})


def test_read_metadata(tmp_path):
    plan = tmp_path / "model.plan"
    assert metadata_path(plan) == tmp_path / "model.plan.json"
    assert read_metadata(plan) is None
    metadata_path(plan).write_text(json.dumps(metadata()))
    assert read_metadata(plan) == metadata()
    metadata_path(plan).write_text(json.dumps({"tensorrt_version": "10.9"}))
    with pytest.raises(DeployError, match="lacks gpu_name, compute_capability, engine_sha256"):
        read_metadata(plan)
    metadata_path(plan).write_text("{not json")
    with pytest.raises(DeployError, match="unreadable engine metadata"):
        read_metadata(plan)


# --- engine-inspector JSON ------------------------------------------------------------------------------------

# What IEngineInspector.get_engine_information(LayerInformationFormat.JSON) returns for a small INT8 QDQ
# net on TensorRT 10 (ProfilingVerbosity.DETAILED; fields beyond the ones summarized are abridged).
TRT10_LAYER_INFO = json.loads("""
{"Layers": [
  {"Name": "/conv1/input_quantizer/QuantizeLinear", "LayerType": "Scale",
   "Inputs": [{"Name": "input", "Location": "Device", "Dimensions": [8,1,16,16],
               "Format/Datatype": "Row major linear FP32"}],
   "Outputs": [{"Name": "/conv1/input_quantizer/QuantizeLinear_output_0", "Location": "Device",
                "Dimensions": [8,1,16,16],
                "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
   "ParameterType": "Scale", "Mode": "UNIFORM", "TacticValue": "0x0000000000000000",
   "StreamId": 0, "Metadata": "[ONNX Layer: /conv1/input_quantizer/QuantizeLinear]"},
  {"Name": "/conv1/Conv + /Relu", "LayerType": "CaskConvolution",
   "Inputs": [{"Name": "/conv1/input_quantizer/QuantizeLinear_output_0", "Location": "Device",
               "Dimensions": [8,1,16,16], "Format/Datatype": "Int8 NC/32HW32"}],
   "Outputs": [{"Name": "/Relu_output_0", "Location": "Device", "Dimensions": [8,8,16,16],
                "Format/Datatype": "Int8 NC/32HW32"}],
   "ParameterType": "Convolution", "Kernel": [3,3], "PaddingMode": "kEXPLICIT_ROUND_DOWN",
   "PrePadding": [1,1], "PostPadding": [1,1], "Stride": [1,1], "Dilation": [1,1], "OutMaps": 8,
   "Groups": 1, "Weights": {"Type": "Int8", "Count": 72}, "Bias": {"Type": "Float", "Count": 8},
   "HasBias": 1, "HasReLU": 1, "Activation": "RELU",
   "TacticName": "sm80_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32_nchw_vect_c_32kcrs_vect_c_32",
   "StreamId": 0, "Metadata": "[ONNX Layer: /conv1/Conv]"},
  {"Name": "/conv2/Conv + /conv2/Clip", "LayerType": "CaskConvolution",
   "Inputs": [{"Name": "/Relu_output_0", "Location": "Device", "Dimensions": [8,8,16,16],
               "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
   "Outputs": [{"Name": "/conv2/Clip_output_0", "Location": "Device", "Dimensions": [8,16,8,8],
                "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
   "ParameterType": "Convolution", "Kernel": [3,3], "Stride": [2,2], "OutMaps": 16,
   "Activation": "CLIP", "TacticValue": "0x4d6a7b3c9e1f2a80", "StreamId": 0},
  {"Name": "/conv3/Clip", "LayerType": "Activation",
   "Inputs": [{"Name": "/conv3/Conv_output_0", "Location": "Device", "Dimensions": [8,16,8,8],
               "Format/Datatype": "Half"}],
   "Outputs": [{"Name": "/conv3/Clip_output_0", "Location": "Device", "Dimensions": [8,16,8,8],
                "Format/Datatype": "Half"}],
   "ParameterType": "Activation", "ActivationType": "CLIP", "Alpha": 0, "Beta": 1.9375,
   "TacticValue": "0x0000000000000000", "StreamId": 0},
  {"Name": "Reformatting CopyNode for Input Tensor 0 to /pool/GlobalAveragePool", "LayerType": "Reformat",
   "Inputs": [{"Name": "/conv2/Clip_output_0", "Location": "Device", "Dimensions": [8,16,8,8],
               "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
   "Outputs": [{"Name": "Reformatted Input Tensor 0 to /pool/GlobalAveragePool", "Location": "Device",
                "Dimensions": [8,16,8,8], "Format/Datatype": "Row major linear FP32"}],
   "ParameterType": "Reformat", "Origin": "REFORMAT", "TacticValue": "0x00000000000003e8", "StreamId": 0},
  {"Name": "/pool/GlobalAveragePool", "LayerType": "CaskPooling",
   "Inputs": [{"Name": "Reformatted Input Tensor 0 to /pool/GlobalAveragePool", "Location": "Device",
               "Dimensions": [8,16,8,8], "Format/Datatype": "Float"}],
   "Outputs": [{"Name": "/pool/GlobalAveragePool_output_0", "Location": "Device", "Dimensions": [8,16,1,1],
                "Format/Datatype": "Float"}],
   "ParameterType": "Pooling", "PoolingType": "AVERAGE", "WindowSize": [8,8], "TacticValue": "0x56d7b61f084f251e"},
  {"Name": "/fc/Gemm", "LayerType": "CaskGemmConvolution",
   "Inputs": [{"Name": "/fc/input_quantizer/QuantizeLinear_output_0", "Location": "Device", "Dimensions": [8,16,1,1],
               "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
   "Outputs": [{"Name": "logits", "Location": "Device", "Dimensions": [8,10],
                "Format/Datatype": "Row major linear FP32"}],
   "ParameterType": "Convolution", "Kernel": [1,1], "OutMaps": 10, "TacticValue": "0x00000000000203e4"},
  {"Name": "/head/Conv", "LayerType": "CaskConvolution",
   "Inputs": [{"Name": "/pool/GlobalAveragePool_output_0", "Location": "Device", "Dimensions": [8,16,1,1],
               "Format/Datatype": "Row major linear FP32"}],
   "Outputs": [{"Name": "head", "Location": "Device", "Dimensions": [8,4,1,1],
                "Format/Datatype": "Row major linear FP32"}],
   "ParameterType": "Convolution", "Kernel": [1,1], "OutMaps": 4, "TacticValue": "0x0000000000020318"}
 ],
 "Bindings": ["input", "logits", "head"]}
""")


def test_summarize_layers_on_trt10_detailed_json():
    s = summarize_layers(TRT10_LAYER_INFO)
    assert s["layers"] == 8
    assert (s["int8"], s["fp16"], s["fp32"], s["reformat"]) == (3, 1, 3, 1)  # the Reformat is not counted by type
    assert s["unfused_clips"] == ["/conv3/Clip"]  # "/conv2/Conv + /conv2/Clip" fused into its conv
    assert s["int8_layer_fraction"] == pytest.approx(3 / 7)
    assert (s["integer_ops"], s["float_ops"]) == (3, 1)  # conv1, conv2, fc in INT8; head conv in FP32
    assert s["fp32_layers"] == ["/conv1/input_quantizer/QuantizeLinear", "/pool/GlobalAveragePool", "/head/Conv"]
    assert s["layer_types"]["CaskConvolution"] == 3 and s["layer_types"]["Reformat"] == 1


def test_summarize_layers_reads_trt11_split_datatype_fields():
    # TensorRT 11 splits "Format/Datatype" into "DataType" and "Format", and replaces "Bindings".
    info = {"Layers": [
        {"Name": "/conv1/Conv", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "x", "DataType": "Int8", "Format": "Thirty-two wide channel vectorized row major"}],
         "Outputs": [{"Name": "y", "DataType": "Int8", "Format": "Thirty-two wide channel vectorized row major"}]},
        {"Name": "PWN(/act/Clip)", "LayerType": "PointWise",
         "Inputs": [{"Name": "y", "DataType": "Half", "Format": "Row major linear"}],
         "Outputs": [{"Name": "z", "DataType": "Half", "Format": "Row major linear"}]}],
        "I/O Tensors": [{"Name": "x", "IOMode": "Input", "DataType": "Float"}]}
    s = summarize_layers(info)
    assert (s["layers"], s["int8"], s["fp16"], s["fp32"], s["integer_ops"]) == (2, 1, 1, 0, 1)
    assert s["unfused_clips"] == ["PWN(/act/Clip)"]


def test_summarize_layers_names_only():
    # Without ProfilingVerbosity.DETAILED the layers are bare names: counted, no precision.
    info = {"Layers": ["Reformatting CopyNode for Input Tensor 0 to /conv1/Conv", "/conv1/Conv + /Relu",
                       "/conv2/Conv + /conv2/Clip", "/conv3/Clip", "/fc/Gemm"], "Bindings": ["input", "logits"]}
    s = summarize_layers(info)
    assert (s["layers"], s["int8"], s["fp16"], s["fp32"], s["reformat"]) == (5, 0, 0, 0, 1)
    assert s["int8_layer_fraction"] is None
    assert s["unfused_clips"] == ["/conv3/Clip"]
    assert (s["integer_ops"], s["float_ops"]) == (0, 0)
    info_notes = engine_info("m.plan", s).notes
    assert any("precisions unknown" in n for n in info_notes)


def test_summarize_layers_names_unfused_offset_relu_ops():
    # --offset-relu all's border-map Add should run inside its conv's epilogue; one that TensorRT leaves
    # as its own layer costs a pass over the tensor, and the engine notes say which. A Sub left before a
    # Q (after the pooling, where no conv produces the tensor) has no conv to fuse into: not listed
    info = {"Layers": [
        {"Name": "/reparam_conv_1/Conv + /reparam_conv_1/Conv_offset_border", "LayerType": "CaskConvolution"},
        {"Name": "PWN(/reparam_conv_2/Conv_offset_border)", "LayerType": "PointWise"},
        {"Name": "/act_quant_14/Sub", "LayerType": "ElementWise"},
        {"Name": "/act_quant_3/QuantizeLinear", "LayerType": "Scale"}]}
    s = summarize_layers(info)
    assert s["unfused_offsets"] == ["PWN(/reparam_conv_2/Conv_offset_border)"]
    notes = engine_info("m.plan", s).notes
    assert any(n.startswith("offset_relu border maps not fused") and "reparam_conv_2" in n for n in notes)
    assert summarize_layers({"Layers": ["/reparam_conv_1/Conv + /reparam_conv_1/Conv_offset_border"]})[
        "unfused_offsets"] == []


@pytest.mark.parametrize(("tensor", "precision"), [
    ({"Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format."}, "int8"),
    ({"Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}, "fp16"),
    ({"Format/Datatype": "Row major linear FP32"}, "fp32"),
    ({"DataType": "BFloat16", "Format": "Row major linear"}, "other"),
    ({"Format/Datatype": "Row major linear Int32"}, "other"),
    ({"Format/Datatype": "N/A due to dynamic shapes"}, None),
    ("input", None)])
def test_tensor_precision(tensor, precision):
    assert tensor_precision(tensor) == precision


def test_engine_info_from_summary():
    info = engine_info("model.plan", summarize_layers(TRT10_LAYER_INFO), ["strongly typed network"])
    assert isinstance(info, EngineInfo)
    assert (info.backend, info.path, info.integer_ops, info.float_ops) == ("tensorrt", "model.plan", 3, 1)
    assert info.int8_op_fraction == pytest.approx(0.75)
    assert info.op_counts["CaskConvolution"] == 3
    assert info.notes[0] == "strongly typed network"
    assert "1 of 4 conv/gemm layers run in float" in info.notes
    assert "1 reformat layers" in info.notes
    assert "FP32 layers: /conv1/input_quantizer/QuantizeLinear, /pool/GlobalAveragePool, /head/Conv" in info.notes
    assert "Clip layers not fused into their conv: /conv3/Clip" in info.notes


# --- without TensorRT -----------------------------------------------------------------------------------------

def test_module_does_not_import_tensorrt():
    code = "import sys, repapq_deploy.backends.tensorrt; assert 'tensorrt' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_backend_fits_the_registry_shape():
    assert issubclass(TensorRTBackend, Backend)
    assert (TensorRTBackend.name, TensorRTBackend.engine_suffix) == ("tensorrt", ".plan")
    assert isinstance(TensorRTBackend().runner("model.plan"), TrtRunner)  # lazy: nothing loaded yet


def test_unavailable_and_build_fails_clearly_without_tensorrt(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, even where installed
    assert TensorRTBackend.available() is False
    with pytest.raises(DeployError, match=r"TensorRT is not available here .*backend onnxruntime") as exc:
        TensorRTBackend().build(conv_onnx(tmp_path / "m.onnx"), tmp_path / "m.plan")
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "m.plan").exists()
    with pytest.raises(DeployError, match="TensorRT is not available here"):
        TensorRTBackend().runner(tmp_path / "m.plan").activate()


# --- the build flow against a fake TensorRT -------------------------------------------------------------------

class FakeParser:
    errors: list[str] = []

    def __init__(self, network, logger) -> None:
        self.network = network

    def parse_from_file(self, path: str) -> bool:
        self.network.parsed = path
        return not self.errors

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int):
        return SimpleNamespace(desc=lambda: self.errors[i])


class FakeConfig:
    def __init__(self) -> None:
        self.flags, self.pools, self.profiles, self.cache = [], {}, [], None
        self.hardware_compatibility_level = None

    def set_memory_pool_limit(self, pool, size: int) -> None:
        self.pools[pool] = size

    def set_flag(self, flag) -> None:
        self.flags.append(flag)

    def add_optimization_profile(self, profile) -> None:
        self.profiles.append(profile)

    def create_timing_cache(self, data: bytes):
        return SimpleNamespace(data=bytes(data), serialize=lambda: bytes(data) + b"+timings")

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return not cache.data.startswith(b"corrupt")

    def get_timing_cache(self):
        return self.cache


class FakeProfile:
    def __init__(self) -> None:
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi) -> None:
        self.shapes[name] = (lo, opt, hi)


class FakeBuilder:
    state = SimpleNamespace()

    def __init__(self, logger) -> None:
        self.logger = logger

    def create_network(self, flags: int):
        self.state.network_flags = flags
        self.state.network = SimpleNamespace(num_inputs=1, get_input=lambda i: SimpleNamespace(
            name="input", shape=(-1, 1, 16, 16)))
        return self.state.network

    def create_builder_config(self):
        self.state.config = FakeConfig()
        return self.state.config

    def create_optimization_profile(self):
        return FakeProfile()

    def build_serialized_network(self, network, config):
        if self.state.fail_build:
            self.logger.log(FakeLogger.ERROR, "Error Code 4: Internal Error (could not find any implementation)")
            return None
        return b"PLAN-BYTES"


class FakeLogger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)


class FakeILogger:
    """Stands in for trt.ILogger, which the backend subclasses."""


class FakeEngine:
    num_io_tensors = 2
    shapes = {"input": (-1, 1, 16, 16), "logits": (-1, 10)}

    def get_tensor_name(self, i: int) -> str:
        return ["input", "logits"][i]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name == "input" else "OUTPUT"

    def get_tensor_shape(self, name: str):
        return self.shapes[name]

    def get_tensor_profile_shape(self, name: str, index: int):
        return [(1, 1, 16, 16), (8, 1, 16, 16), (32, 1, 16, 16)]

    def create_execution_context(self):
        context = SimpleNamespace(shapes={})
        context.set_input_shape = lambda name, shape: context.shapes.__setitem__(name, shape) or True
        FakeBuilder.state.context = context
        return context

    def create_engine_inspector(self):
        inspector = SimpleNamespace(execution_context=None)

        def info(fmt):
            assert fmt == "JSON" and inspector.execution_context is not None
            return json.dumps(FakeBuilder.state.layer_info)

        inspector.get_engine_information = info
        return inspector


class FakeRuntime:
    def __init__(self, logger) -> None:
        self.engine_host_code_allowed = False
        FakeBuilder.state.runtime = self

    def deserialize_cuda_engine(self, data: bytes):
        FakeBuilder.state.deserialized = bytes(data)
        return FakeEngine()


@pytest.fixture
def fake(monkeypatch):
    """A fake tensorrt (TensorRT 10.9) with builder, parser, runtime and inspector, and this machine's
    environment fixed to ENV."""

    def make(version: str = "10.9.0.34", **kwargs):
        FakeBuilder.state = SimpleNamespace(fail_build=False, layer_info=TRT10_LAYER_INFO)
        FakeParser.errors = []
        trt = fake_trt(version, ILogger=FakeILogger, Logger=FakeLogger, Builder=FakeBuilder, OnnxParser=FakeParser,
                       Runtime=FakeRuntime, MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
                       ProfilingVerbosity=SimpleNamespace(DETAILED="DETAILED"),
                       HardwareCompatibilityLevel=SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS"),
                       TensorIOMode=SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
                       LayerInformationFormat=SimpleNamespace(JSON="JSON"), **kwargs)
        trt.state = FakeBuilder.state
        monkeypatch.setattr(trtmod, "require_tensorrt", lambda: trt)
        monkeypatch.setattr(trtmod, "current_environment", lambda _trt: {**ENV, "tensorrt_version": version})
        return trt

    return make


def test_build_flow_trt10(fake, tmp_path):
    trt = fake("10.9.0.34")
    onnx_path, plan = conv_onnx(tmp_path / "model.qdq.onnx"), tmp_path / "out" / "model.plan"
    opts = TrtBuildOptions(batch=(1, 4, 16), workspace_mib=512, optimization_level=5,
                           timing_cache_dir=tmp_path / "cache")
    info = TensorRTBackend(opts).build(onnx_path, plan)
    s, config = trt.state, trt.state.config
    assert s.network_flags == 1 << 1 and config.flags == []  # strongly typed, no precision flags
    assert s.network.parsed == str(onnx_path)
    assert config.pools == {"WORKSPACE": 512 << 20}
    assert (config.builder_optimization_level, config.profiling_verbosity) == (5, "DETAILED")
    assert config.hardware_compatibility_level is None
    assert [p.shapes for p in config.profiles] == [
        {"input": ((1, 1, 16, 16), (4, 1, 16, 16), (16, 1, 16, 16))}]
    # the engine and its metadata, written atomically side by side
    assert plan.read_bytes() == b"PLAN-BYTES"
    assert sorted(p.name for p in plan.parent.iterdir()) == ["model.plan", "model.plan.json"]
    meta = read_metadata(plan)
    assert meta["onnx_sha256"] == trtmod.sha256_file(onnx_path)
    assert meta["engine_sha256"] == trtmod.sha256_file(plan)
    assert meta["build_options"]["batch"] == [1, 4, 16] and meta["strongly_typed"] is True
    assert {k: meta[k] for k in ENV} == ENV
    # timing cache saved under its environment key
    cache = tmp_path / "cache" / f"{timing_cache_key('NVIDIA H100 80GB HBM3', '9.0', '10.9.0.34', '12.8')}.cache"
    assert cache.read_bytes() == b"+timings"
    # EngineInfo from the inspector JSON, read with a context set to the profile's opt shape
    assert s.context.shapes == {"input": (8, 1, 16, 16)}
    assert (info.backend, info.integer_ops, info.float_ops) == ("tensorrt", 3, 1)
    assert info.notes[0] == "strongly typed network, TensorRT 10.9.0.34"
    assert f"timing cache {cache} created" in info.notes
    # a second build reuses the cache; describe() reports the same engine
    info2 = TensorRTBackend(opts).build(onnx_path, plan)
    assert f"timing cache {cache} reused" in info2.notes
    desc = TensorRTBackend(opts).describe(plan)
    assert desc["integer_ops"] == 3 and desc["layer_summary"]["unfused_clips"] == ["/conv3/Clip"]
    assert desc["metadata"] == read_metadata(plan)


def test_build_flow_trt10_fp16_reference_and_compatibility_options(fake, tmp_path):
    trt = fake("10.9.0.34")
    opts = TrtBuildOptions(fp16_reference=True, hardware_compatible=True, version_compatible=True,
                           timing_cache_dir=None)
    plan = tmp_path / "model.fp16.plan"
    info = TensorRTBackend(opts).build(conv_onnx(tmp_path / "model.fp32.onnx"), plan)
    config = trt.state.config
    assert trt.state.network_flags == 0
    assert config.flags == [BuilderFlag10.FP16, BuilderFlag10.VERSION_COMPATIBLE]
    assert config.hardware_compatibility_level == "AMPERE_PLUS"
    assert config.cache is None  # no persistent timing cache asked for
    assert trt.state.runtime.engine_host_code_allowed is True  # version-compatible plans carry their runtime
    assert info.notes[0] == "weakly typed network, TensorRT 10.9.0.34"
    meta = read_metadata(plan)
    assert meta["precision"] == "fp16-reference"
    assert meta["hardware_compatible"] is True and meta["version_compatible"] is True


def test_build_flow_trt11(fake, tmp_path):
    trt = fake("11.0.0", network_flags_enum=None)
    TensorRTBackend(TrtBuildOptions(timing_cache_dir=None)).build(conv_onnx(tmp_path / "m.onnx"), tmp_path / "m.plan")
    assert trt.state.network_flags == 0 and trt.state.config.flags == []


def test_trt11_fp16_reference_needs_an_fp16_onnx(fake, tmp_path):
    fake("11.0.0")
    backend = TensorRTBackend(TrtBuildOptions(fp16_reference=True, timing_cache_dir=None))
    with pytest.raises(DeployError, match="needs an FP16 ONNX; convert it first") as exc:
        backend.build(conv_onnx(tmp_path / "fp32.onnx"), tmp_path / "m.plan")
    assert "\n" not in str(exc.value)
    backend.build(conv_onnx(tmp_path / "fp16.onnx", TensorProto.FLOAT16), tmp_path / "m.plan")
    assert (tmp_path / "m.plan").is_file()


def test_parser_errors_are_listed(fake, tmp_path):
    fake()
    FakeParser.errors = ["Unsupported ONNX data type: UINT8 (2)", "In node 3 (parseGraph):\nINVALID_NODE"]
    with pytest.raises(DeployError, match=r"cannot parse this graph: Unsupported ONNX data type: UINT8 \(2\); "
                                          r"In node 3 \(parseGraph\): INVALID_NODE") as exc:
        TensorRTBackend().build(conv_onnx(tmp_path / "m.onnx"), tmp_path / "m.plan")
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "m.plan").exists()


def test_failed_build_is_a_deploy_error_with_tensorrt_message(fake, tmp_path):
    trt = fake()
    trt.state.fail_build = True
    with pytest.raises(DeployError, match="could not build an engine .*could not find any implementation"):
        TensorRTBackend(TrtBuildOptions(timing_cache_dir=None)).build(conv_onnx(tmp_path / "m.onnx"),
                                                                       tmp_path / "m.plan")
    assert not (tmp_path / "m.plan").exists() and not metadata_path(tmp_path / "m.plan").exists()


def test_corrupt_timing_cache_is_replaced(fake, tmp_path):
    fake()
    cache = tmp_path / "cache" / f"{timing_cache_key('NVIDIA H100 80GB HBM3', '9.0', '10.9.0.34', '12.8')}.cache"
    cache.parent.mkdir()
    cache.write_bytes(b"corrupt")
    info = TensorRTBackend(TrtBuildOptions(timing_cache_dir=tmp_path / "cache")).build(
        conv_onnx(tmp_path / "m.onnx"), tmp_path / "m.plan")
    assert f"timing cache {cache} was unusable and is replaced" in info.notes
    assert cache.read_bytes() == b"+timings"


def test_hardware_compatible_build_needs_an_ampere_gpu(fake, monkeypatch, tmp_path):
    fake()
    monkeypatch.setattr(trtmod, "current_environment", lambda _trt: {**ENV, "compute_capability": "7.5"})
    with pytest.raises(DeployError, match="needs an Ampere or newer GPU"):
        TensorRTBackend(TrtBuildOptions(hardware_compatible=True)).build(conv_onnx(tmp_path / "m.onnx"),
                                                                          tmp_path / "m.plan")


def test_loading_checks_the_metadata_first(fake, monkeypatch, tmp_path):
    trt = fake()
    plan = tmp_path / "m.plan"
    TensorRTBackend(TrtBuildOptions(timing_cache_dir=None)).build(conv_onnx(tmp_path / "m.onnx"), plan)
    trt.state.deserialized = None
    monkeypatch.setattr(trtmod, "current_environment", lambda _trt: {**ENV, "gpu_name": "NVIDIA A100-SXM4-80GB",
                                                                     "compute_capability": "8.0"})
    with pytest.raises(DeployError, match=rf"{plan}: engine built on NVIDIA H100 80GB HBM3") as exc:
        TensorRTBackend().describe(plan)
    assert "\n" not in str(exc.value)
    assert trt.state.deserialized is None  # refused before TensorRT saw the plan
    # a plan that does not match its metadata is refused too
    plan.write_bytes(b"OTHER")
    with pytest.raises(DeployError, match="describes another engine"):
        trtmod.load_engine(trt, plan)


# --- real TensorRT on a GPU -----------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not TensorRTBackend.available(), reason="needs TensorRT and a CUDA GPU")


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """(input batch, FP32 ONNX, TensorRT-profile QDQ ONNX) of a small calibrated conv net."""
    from repapq_deploy.calibrate import calibrate
    from repapq_deploy.calibrate.prepare import quantize_model
    from repapq_deploy.export import export_fp32, export_qdq
    from repapq_deploy.quant.scheme import QuantConfig

    torch.manual_seed(0)
    model, x = SmallNet().eval(), torch.randn(64, 1, 16, 16)
    folder = tmp_path_factory.mktemp("trt")
    export_fp32(model, x, folder / "fp32.onnx")
    qm = quantize_model(model, QuantConfig("tensorrt", 8, 8))
    calibrate(qm, x, "minmax", batch_size=32)
    export_qdq(qm, x, folder / "qdq.onnx")
    return x.numpy(), folder / "fp32.onnx", folder / "qdq.onnx"


@pytest.mark.gpu
@needs_gpu
def test_gpu_int8_engine_builds_runs_and_matches_the_qdq_graph(graphs, tmp_path):
    from repapq_deploy.export.onnx import reference_session

    x, _, qdq = graphs
    opts = TrtBuildOptions(timing_cache_dir=tmp_path / "cache")
    plan = tmp_path / "model.plan"
    info = TensorRTBackend(opts).build(qdq, plan)
    assert plan.is_file() and metadata_path(plan).is_file()
    assert list((tmp_path / "cache").glob("*.cache"))
    assert info.backend == "tensorrt" and info.integer_ops >= 2 and info.int8_op_fraction > 0.5, info
    meta = read_metadata(plan)
    import tensorrt as trt

    check_compatibility(meta, trtmod.current_environment(trt))
    want = reference_session(qdq).run(None, {"input": x})[0]
    with TensorRTBackend().runner(plan) as runner:
        got = runner.infer(x)  # 64 > the profile's max 32: run in two slices
        assert got.shape == want.shape and got.dtype == np.float32
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9
        assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
        # another batch size may pick other tactics: equal up to a requantization step
        np.testing.assert_allclose(runner.infer(x[:5]), got[:5], rtol=0, atol=0.02 * np.abs(got).max())
        times = runner.time_gpu(x[:32], warmup=3, iterations=20)
        assert len(times) == 20 and all(0 < t < 1 for t in times)
        with pytest.raises(DeployError, match="outside the engine's range"):
            runner.time_gpu(x, warmup=0, iterations=1)
    desc = TensorRTBackend().describe(plan)
    assert desc["layer_summary"]["int8"] > 0 and desc["metadata"] == meta


@pytest.mark.gpu
@needs_gpu
def test_gpu_fp16_reference_engine(graphs, tmp_path):
    import tensorrt as trt

    x, fp32, _ = graphs
    backend = TensorRTBackend(TrtBuildOptions(fp16_reference=True, timing_cache_dir=None))
    if trt_major(trt) >= 11:
        with pytest.raises(DeployError, match="needs an FP16 ONNX"):
            backend.build(fp32, tmp_path / "fp16.plan")
        return
    backend.build(fp32, tmp_path / "fp16.plan")
    from repapq_deploy.export.onnx import reference_session

    want = reference_session(fp32).run(None, {"input": x})[0]
    with backend.runner(tmp_path / "fp16.plan") as runner:
        got = runner.infer(x)
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max() + 1e-3


@pytest.mark.gpu
@needs_gpu
def test_gpu_engine_from_another_gpu_is_refused(graphs, tmp_path):
    plan = tmp_path / "model.plan"
    TensorRTBackend(TrtBuildOptions(timing_cache_dir=None)).build(graphs[2], plan)
    meta = copy.deepcopy(read_metadata(plan))
    meta["gpu_name"] = "Some Other GPU"
    metadata_path(plan).write_text(json.dumps(meta))
    with pytest.raises(DeployError, match="rebuild the engine here"):
        TensorRTBackend().runner(plan).activate()
