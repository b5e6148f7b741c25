"""Shared fixtures: the bundled Fashion-MNIST example, its fused form, and models with random BN statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn as nn

import repapq_deploy.models  # noqa: F401  (registers repvgg_nano / mobileone_nano with timm)
from repapq_deploy.load import LoadedModel, load_model
from repapq_deploy.reparam import FuseReport, fuse_model

# Two cores shared with other work: several intra-op threads oversubscribe them and make small convs
# tens of times slower; one thread keeps the suite fast and deterministic.
torch.set_num_threads(1)

EXAMPLE_DIR = Path(__file__).resolve().parent.parent / "examples" / "fashion_mnist"
# The bundled example after fusion: 9 convs + 1 linear; 4 of the convs (the stride-1 blocks) carry a
# dominant identity tap that quantization splits off into a depthwise 1x1 conv and an add.
EXAMPLE_LAYERS, EXAMPLE_SPLITS = 10, 4


def example_act_quantizers(profile: str) -> int:
    """Activation quantizers of the quantized example: 11 conv/linear inputs, plus per split add the
    inputs its profile quantizes (both on ONNX Runtime, the shortcut only on TensorRT)."""
    return 11 + EXAMPLE_SPLITS * (2 if profile == "onnxruntime" else 1)


@pytest.fixture(scope="session", autouse=True)
def short_reconstruction():
    """``repapq`` is build's default: every preset runs a few iterations per unit in the tests, which
    exercise the machinery (accuracy at the real presets is the benchmarks' job). Scoped to the whole run
    and autouse, so it is in place before any module-scoped build fixture runs."""
    from repapq_deploy.calibrate import reconstruct as R

    with pytest.MonkeyPatch.context() as mp:
        for preset, iters in (("fast", 5), ("default", 10), ("thorough", 15)):
            mp.setitem(R.PRESETS, preset, {"iters": iters})
        yield


@pytest.fixture(scope="session")
def example_dir() -> Path:
    assert (EXAMPLE_DIR / "model.safetensors").is_file()
    return EXAMPLE_DIR


@pytest.fixture(scope="session")
def calib_x(example_dir: Path) -> torch.Tensor:
    """The first 64 calibration images, [64, 1, 32, 32] float32."""
    x = np.load(example_dir / "calib.npz")["x"][:64]
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


@pytest.fixture(scope="session")
def eval_xy(example_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 500 labelled evaluation images."""
    data = np.load(example_dir / "eval.npz")
    x = torch.from_numpy(np.ascontiguousarray(data["x"][:500], dtype=np.float32))
    return x, torch.from_numpy(data["y"][:500].astype(np.int64))


@pytest.fixture(scope="session")
def example_loaded(example_dir: Path) -> LoadedModel:
    return load_model(example_dir / "model.safetensors")


@pytest.fixture(scope="session")
def example_model(example_loaded: LoadedModel) -> nn.Module:
    """The example's multi-branch (unfused) repvgg_nano, eval mode. Tests must not modify it."""
    return example_loaded.module


@pytest.fixture(scope="session")
def fused_example(example_model: nn.Module, calib_x: torch.Tensor) -> tuple[torch.fx.GraphModule, FuseReport]:
    return fuse_model(example_model, calib_x[:32])


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so folding them is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
                    m.bias.copy_(0.2 * torch.randn(c, generator=g))
    return model.eval()


def _make_model(arch: str, seed: int = 0, **kwargs) -> nn.Module:
    """A 1-channel, 10-class timm model with deterministic random weights and random BN statistics."""
    torch.manual_seed(seed)
    kwargs = {"num_classes": 10, "in_chans": 1, **kwargs}
    return randomize_bn(timm.create_model(arch, **kwargs), seed)


@pytest.fixture(scope="session")
def make_model():
    """``make_model(arch, seed=0, **timm_kwargs)``: see :func:`_make_model`."""
    return _make_model


@pytest.fixture(scope="session")
def resnet18_model() -> nn.Module:
    return _make_model("resnet18")


@pytest.fixture(scope="session")
def fused_resnet18(resnet18_model: nn.Module) -> tuple[torch.fx.GraphModule, FuseReport]:
    return fuse_model(resnet18_model, torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1)))


def _ort_session(model_or_path) -> ort.InferenceSession:
    """A single-threaded ONNX Runtime CPU session with graph optimizations off (executes the graph as written)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    src = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def ort_session():
    """``ort_session(onnx_model_or_path)``: see :func:`_ort_session`."""
    return _ort_session


class OffsetNet(nn.Module):
    """Post-ReLU tensors with every kind of reader ``--offset-relu`` distinguishes: an unpadded 1x1 conv,
    a padded strided depthwise conv, an unpadded 3x3 conv, a MaxPool and the classifier."""

    # activation quantizers in placement order: stem input (signed), pw, dw, valid, pool and fc inputs
    OFFSET = {"none": [], "unpadded": [1, 3, 5], "all": [1, 2, 3, 5]}

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.pw = nn.Conv2d(8, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.valid = nn.Conv2d(16, 16, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.pw(x))
        x = torch.relu(self.dw(x))
        x = self.pool(torch.relu(self.valid(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="session")
def offset_net() -> tuple[nn.Module, torch.Tensor]:
    """An :class:`OffsetNet` with fixed random weights and 64 inputs of 1 x 16 x 16."""
    torch.manual_seed(0)
    return OffsetNet().eval(), torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(2))
