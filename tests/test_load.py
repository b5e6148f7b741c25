"""Stage 1, load: every checkpoint format ``load_model`` accepts, and every way a checkpoint can be bad."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from repapq_deploy.errors import DeployError
from repapq_deploy.load import LoadedModel, load_model


def _message(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, f"not a one-line message: {message!r}"
    return message


@pytest.fixture(scope="module")
def x(calib_x: torch.Tensor) -> torch.Tensor:
    return calib_x[:8]


@pytest.fixture(scope="module")
def reference(example_model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return example_model(x)


@pytest.fixture(scope="module")
def state_dict(example_model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in example_model.state_dict().items()}


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory: pytest.TempPathFactory, state_dict: dict[str, torch.Tensor]) -> Path:
    path = tmp_path_factory.mktemp("load") / "weights.pt"
    torch.save(state_dict, path)
    return path


def _assert_same_function(loaded: LoadedModel, x: torch.Tensor, reference: torch.Tensor) -> None:
    module = loaded.module
    assert isinstance(module, nn.Module)
    assert not module.training, "load_model must return an eval-mode module"
    assert all(p.dtype == torch.float32 for p in module.parameters())
    with torch.no_grad():
        out = module(x)
    assert out.shape == reference.shape
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ accepted formats


def test_safetensors_with_metadata_needs_no_arch(example_dir: Path, x: torch.Tensor) -> None:
    loaded = load_model(example_dir / "model.safetensors")
    assert loaded.describe() == {"format": "safetensors", "arch": "repvgg_nano", "num_classes": 10,
                                 "in_chans": 1, "layout": "timm"}
    assert loaded.metadata["dataset"] == "fashion-mnist"
    # independent reference: timm's own model with the file's tensors
    ref = timm.create_model("repvgg_nano", num_classes=10, in_chans=1)
    ref.load_state_dict(load_file(str(example_dir / "model.safetensors")))
    with torch.no_grad():
        expected = ref.eval()(x)
    _assert_same_function(loaded, x, expected)


def test_state_dict_pt_with_arch(sd_path: Path, x: torch.Tensor, reference: torch.Tensor) -> None:
    loaded = load_model(sd_path, arch="repvgg_nano", num_classes=10, in_chans=1)
    assert loaded.source_format == "state_dict"
    assert (loaded.arch, loaded.num_classes, loaded.in_chans, loaded.layout) == ("repvgg_nano", 10, 1, None)
    _assert_same_function(loaded, x, reference)


def test_state_dict_pt_with_only_arch_infers_classes_and_channels(sd_path: Path, x: torch.Tensor,
                                                                  reference: torch.Tensor) -> None:
    loaded = load_model(sd_path, arch="repvgg_nano")
    assert (loaded.num_classes, loaded.in_chans) == (10, 1)
    _assert_same_function(loaded, x, reference)


def test_state_dict_infers_classes_and_channels_from_timm_cfg(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=7, in_chans=1).eval()
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    loaded = load_model(tmp_path / "r18.pth", arch="resnet18")
    assert (loaded.num_classes, loaded.in_chans) == (7, 1)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        _assert_same_function(loaded, x, model(x))


@pytest.mark.parametrize("key", ["state_dict", "model", "model_ema"])
def test_wrapped_state_dict(tmp_path: Path, key: str, state_dict: dict, x: torch.Tensor,
                            reference: torch.Tensor) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({key: state_dict, "epoch": 12, "best_acc1": 91.5}, path)
    loaded = load_model(path, arch="repvgg_nano", num_classes=10, in_chans=1)
    assert loaded.source_format == "state_dict"
    _assert_same_function(loaded, x, reference)


def test_wrapped_state_dict_carries_its_own_arch(tmp_path: Path, state_dict: dict, x: torch.Tensor,
                                                 reference: torch.Tensor) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"arch": "repvgg_nano", "num_classes": 10, "in_chans": 1, "state_dict": state_dict}, path)
    loaded = load_model(path)
    assert loaded.arch == "repvgg_nano"
    _assert_same_function(loaded, x, reference)


def test_timm_training_checkpoint_with_args(tmp_path: Path, state_dict: dict, x: torch.Tensor,
                                            reference: torch.Tensor) -> None:
    import argparse

    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 14, "arch": "repvgg_nano", "state_dict": state_dict, "version": 2, "metric": 91.6,
                "args": argparse.Namespace(model="repvgg_nano", num_classes=10, in_chans=1)}, path)
    loaded = load_model(path, num_classes=10, in_chans=1)
    assert loaded.arch == "repvgg_nano"
    _assert_same_function(loaded, x, reference)


def test_ddp_module_prefix(tmp_path: Path, state_dict: dict, x: torch.Tensor, reference: torch.Tensor) -> None:
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, path)
    loaded = load_model(path, arch="repvgg_nano", num_classes=10, in_chans=1)
    _assert_same_function(loaded, x, reference)


def _to_authors_repvgg(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm repvgg key names back to DingXiaoH/RepVGG's (see repapq_deploy/models/layouts.py)."""
    out = {}
    for key, value in sd.items():
        new = re.sub(r"^stages\.(\d+)\.(\d+)\.", lambda m: f"stage{int(m[1]) + 1}.{m[2]}.", key)
        new = re.sub(r"^stem\.", "stage0.", new)
        new = re.sub(r"^head\.fc\.", "linear.", new)
        new = new.replace(".conv_kxk.", ".rbr_dense.").replace(".conv_1x1.", ".rbr_1x1.")
        new = new.replace(".identity.", ".rbr_identity.")
        out[new] = value
    return out


def test_authors_repvgg_layout(tmp_path: Path, state_dict: dict, x: torch.Tensor, reference: torch.Tensor) -> None:
    authors = _to_authors_repvgg(state_dict)
    assert len(authors) == len(state_dict)
    assert "stage2.1.rbr_identity.running_var" in authors and "linear.weight" in authors
    assert not any(k.startswith(("stem.", "stages.", "head.")) for k in authors)
    path = tmp_path / "RepVGG-nano-train.pth"
    torch.save(authors, path)
    loaded = load_model(path, arch="repvgg_nano", num_classes=10, in_chans=1)
    assert loaded.layout == "repvgg-authors"
    assert loaded.describe()["layout"] == "repvgg-authors"
    _assert_same_function(loaded, x, reference)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated in recent PyTorch
def test_torchscript(tmp_path: Path, example_model: nn.Module, x: torch.Tensor, reference: torch.Tensor) -> None:
    path = tmp_path / "traced.pt"
    with torch.no_grad():
        torch.jit.trace(example_model, x[:1]).save(str(path))
    loaded = load_model(path, example_input=x)
    assert loaded.source_format == "torchscript"
    _assert_same_function(loaded, x, reference)  # batch 8, traced and converted with batch 1


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_without_example_input(tmp_path: Path, example_model: nn.Module, x: torch.Tensor) -> None:
    path = tmp_path / "traced.pt"
    with torch.no_grad():
        torch.jit.trace(example_model, x[:1]).save(str(path))
    with pytest.raises(DeployError) as info:
        load_model(path)
    message = _message(info)
    assert str(path) in message and "calib" in message


def test_torch_export_archive(tmp_path: Path, example_model: nn.Module, x: torch.Tensor,
                              reference: torch.Tensor) -> None:
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(example_model, (x[:2],)), str(path))
    loaded = load_model(path)
    assert loaded.source_format == "torch.export"
    assert isinstance(loaded.module, torch.fx.GraphModule)
    kinds = {type(m) for m in loaded.module.modules()}
    assert nn.Conv2d in kinds and nn.BatchNorm2d in kinds and nn.Linear in kinds  # lifted back to modules
    _assert_same_function(loaded, x, reference)  # exported with batch 2, run with batch 8


@pytest.fixture(scope="module")
def pickled_module(tmp_path_factory: pytest.TempPathFactory, example_model: nn.Module) -> Path:
    path = tmp_path_factory.mktemp("pickle") / "whole.pt"
    torch.save(example_model, path)
    return path


def test_pickled_module_refused_without_trust_pickle(pickled_module: Path) -> None:
    with pytest.raises(DeployError) as info:
        load_model(pickled_module)
    message = _message(info)
    assert str(pickled_module) in message and "trust_pickle" in message


def test_pickle_refusal_names_the_refused_class(pickled_module: Path) -> None:
    with pytest.raises(DeployError) as info:
        load_model(pickled_module)
    assert "refused to unpickle timm.models.byobnet.ByobNet" in _message(info)


def test_pickled_module_with_trust_pickle(pickled_module: Path, x: torch.Tensor, reference: torch.Tensor) -> None:
    loaded = load_model(pickled_module, trust_pickle=True)
    assert loaded.source_format == "pickle"
    _assert_same_function(loaded, x, reference)


def test_yolov6_style_model_dict(tmp_path: Path, example_model: nn.Module, x: torch.Tensor,
                                 reference: torch.Tensor) -> None:
    path = tmp_path / "yolov6.pt"
    torch.save({"model": example_model, "epoch": 299, "optimizer": None}, path)
    with pytest.raises(DeployError) as info:
        load_model(path)
    assert "trust_pickle" in _message(info)
    loaded = load_model(path, trust_pickle=True)
    assert loaded.source_format == "pickle"
    _assert_same_function(loaded, x, reference)


def test_half_precision_pickled_module_is_loaded_as_float32(tmp_path: Path, make_model) -> None:
    model = make_model("repvgg_nano")
    path = tmp_path / "half.pt"
    torch.save({"model": model.half()}, path)  # YOLOv6 saves its checkpoints in fp16
    loaded = load_model(path, trust_pickle=True)
    assert all(p.dtype == torch.float32 for p in loaded.module.parameters())
    assert not loaded.module.training
    with torch.no_grad():
        assert torch.isfinite(loaded.module(torch.randn(2, 1, 32, 32))).all()


# ------------------------------------------------------------------------------------ bad inputs


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(DeployError) as info:
        load_model(path, arch="repvgg_nano")
    message = _message(info)
    assert str(path) in message and "not found" in message


def test_truncated_pt(tmp_path: Path, sd_path: Path) -> None:
    data = sd_path.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DeployError) as info:
        load_model(path, arch="repvgg_nano")
    message = _message(info)
    assert str(path) in message and "truncated" in message


@pytest.mark.parametrize("text", ["hello world\n", "this is not a checkpoint", '{"arch": "repvgg_nano"}\n'])
def test_text_file_named_pt(tmp_path: Path, text: str) -> None:
    path = tmp_path / "notes.pt"
    path.write_text(text)
    with pytest.raises(DeployError) as info:
        load_model(path, arch="repvgg_nano")
    message = _message(info)
    assert str(path) in message and "not a readable PyTorch checkpoint" in message
    assert "trust_pickle" not in message  # a text file is not a pickle: trusting it cannot help


def test_pickle_of_a_class_that_cannot_be_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "vanished_pkg.py").write_text(
        "import torch.nn as nn\n\nclass Net(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.fc = nn.Linear(2, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import vanished_pkg

    path = tmp_path / "ckpt.pt"
    torch.save({"model": vanished_pkg.Net()}, path)
    monkeypatch.delitem(sys.modules, "vanished_pkg")
    (tmp_path / "vanished_pkg.py").unlink()  # the model's package is not installed where we deploy
    with pytest.raises(DeployError) as info:
        load_model(path, trust_pickle=True)
    message = _message(info)
    assert str(path) in message and "vanished_pkg" in message and "importable" in message


def test_state_dict_without_arch(sd_path: Path) -> None:
    with pytest.raises(DeployError) as info:
        load_model(sd_path)
    message = _message(info)
    assert str(sd_path) in message and "arch" in message


def test_unknown_arch(sd_path: Path) -> None:
    with pytest.raises(DeployError) as info:
        load_model(sd_path, arch="repvggz_nano9")
    assert "arch repvggz_nano9" in _message(info)


def test_wrong_arch_lists_missing_and_unexpected_keys(sd_path: Path) -> None:
    with pytest.raises(DeployError) as info:
        load_model(sd_path, arch="mobileone_nano", num_classes=10, in_chans=1)
    message = _message(info)
    assert str(sd_path) in message and "arch mobileone_nano" in message
    assert re.search(r"\d+ missing keys", message) and re.search(r"\d+ unexpected keys", message)
    assert "stem.conv_kxk.0.conv.weight" in message  # a mobileone key the checkpoint lacks
    assert "stem.conv_kxk.conv.weight" in message  # a repvgg key mobileone does not have


def test_wrong_num_classes_names_the_option(sd_path: Path) -> None:
    with pytest.raises(DeployError) as info:
        load_model(sd_path, arch="repvgg_nano", num_classes=5, in_chans=1)
    message = _message(info)
    assert "head.fc.weight" in message and "num_classes" in message


def test_nan_weight_names_the_tensor(tmp_path: Path, state_dict: dict) -> None:
    sd = dict(state_dict)
    bad = sd["stages.2.1.conv_kxk.conv.weight"].clone()
    bad[3, 0, 1, 1] = float("nan")
    bad[4, 0, 1, 1] = float("inf")
    sd["stages.2.1.conv_kxk.conv.weight"] = bad
    path = tmp_path / "diverged.pt"
    torch.save(sd, path)
    with pytest.raises(DeployError) as info:
        load_model(path, arch="repvgg_nano", num_classes=10, in_chans=1)
    message = _message(info)
    assert str(path) in message and "'stages.2.1.conv_kxk.conv.weight'" in message and "2 NaN/Inf" in message


def test_truncated_safetensors(tmp_path: Path, example_dir: Path) -> None:
    data = (example_dir / "model.safetensors").read_bytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DeployError) as info:
        load_model(path)
    message = _message(info)
    assert str(path) in message and "truncated" in message


def test_safetensors_metadata_arch_is_overridable(tmp_path: Path, state_dict: dict) -> None:
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path),
              metadata={"arch": "repvgg_nano", "num_classes": "10", "in_chans": "1"})
    assert load_model(path).arch == "repvgg_nano"
    with pytest.raises(DeployError) as info:
        load_model(path, arch="mobileone_nano")  # an explicit --arch wins over the metadata
    assert "arch mobileone_nano" in _message(info)


def test_lift_maps_relu6_and_batch_flatten(tmp_path):
    # found on EfficientNet-Lite0: ReLU6 arrives as aten.hardtanh, and x.view(x.size(0), -1) as a
    # view on the traced batch size, which the ONNX export would freeze
    from repapq_deploy.load import lift_exported

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act, self.fc = nn.Conv2d(1, 4, 3), nn.ReLU6(), nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            y = self.act(self.conv(x))
            return self.fc(y.view(y.size(0), -1))

    model = Head().eval()
    x = torch.randn(2, 1, 8, 8)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    gm = lift_exported(ep.module())
    assert any(isinstance(m, nn.ReLU6) for m in gm.modules())
    assert not any("view" in str(n.target) or "sym_size" in str(n.target) for n in gm.graph.nodes)
    x5 = torch.randn(5, 1, 8, 8)
    assert torch.allclose(gm(x5), model(x5), atol=1e-6)
