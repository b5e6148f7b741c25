"""Stage 1, load: checkpoints of every format users bring, turned into an ``nn.Module`` in eval mode.

Accepted: state dicts (``.pt``/``.pth``/``.safetensors``, possibly wrapped under ``state_dict`` /
``model`` / ``model_ema`` with DDP ``module.`` prefixes, timm's layout or the authors' RepVGG /
MobileOne layouts) plus ``arch``; TorchScript files; ``torch.export`` archives; and whole pickled
modules (YOLOv6's ``{'model': module}``) only with ``trust_pickle``.
"""

from __future__ import annotations

import argparse
import operator
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import repapq_deploy.models  # noqa: F401  (registers the built-in architectures with timm)
from repapq_deploy.data.loader import Dataset, Preprocess
from repapq_deploy.data.sources import preprocess_for
from repapq_deploy.errors import DeployError
from repapq_deploy.models.layouts import detect_layout, to_timm_layout
from repapq_deploy.reparam.fuse import layer_from_weights

_WRAPPER_KEYS = ("state_dict", "model_ema", "state_dict_ema", "ema", "model", "net")


@dataclass
class LoadedModel:
    """The loaded model and what was learned about it on the way."""

    module: nn.Module
    source_format: str  # state_dict | safetensors | torchscript | torch.export | pickle
    arch: str | None = None
    num_classes: int | None = None
    in_chans: int | None = None
    layout: str | None = None  # the authors' layout that was converted, if any
    metadata: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"format": self.source_format, "arch": self.arch, "num_classes": self.num_classes,
                "in_chans": self.in_chans, "layout": self.layout or "timm"}


def load_model(path: str | Path, *, arch: str | None = None, num_classes: int | None = None,
               in_chans: int | None = None, trust_pickle: bool = False,
               example_input: torch.Tensor | None = None) -> LoadedModel:
    """Load ``path`` into an eval-mode module. ``example_input`` is needed for TorchScript files."""
    path = Path(path)
    if not path.is_file():
        raise DeployError(f"{path}: model file not found; pass the path to a .pt/.pth/.safetensors/.pt2 file")
    if path.suffix == ".safetensors":
        return _from_state_dict(path, *_read_safetensors(path), arch, num_classes, in_chans, "safetensors")
    names = zip_names(path)
    if names:
        if any("/code/__torch__" in n for n in names):
            return _from_torchscript(path, example_input)
        if any(n.endswith("/archive_format") for n in names):
            return _from_exported(path)
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return _from_module(obj, path)
    if isinstance(obj, Mapping):
        for key in ("model", "ema", "model_ema"):
            if isinstance(obj.get(key), nn.Module):  # YOLOv6 and friends save {'model': module}
                return _from_module(obj[key], path)
        meta = {k: obj[k] for k in ("arch", "num_classes", "in_chans") if isinstance(obj.get(k), (str, int))}
        if "args" in obj and isinstance(getattr(obj["args"], "model", None), str):
            meta.setdefault("arch", obj["args"].model)
        return _from_state_dict(path, _unwrap(obj, path), meta, arch, num_classes, in_chans, "state_dict")
    raise DeployError(f"{path}: holds a {type(obj).__name__}, not a state dict or module; "
                      "save model.state_dict() with torch.save")


def load_with_inputs(path: str | Path, read_calib: Callable[[Preprocess], Dataset], *, arch: str | None = None,
                     num_classes: int | None = None, in_chans: int | None = None, trust_pickle: bool = False,
                     input_size: tuple[int, int, int] | None = None, mean: tuple[float, ...] | None = None,
                     std: tuple[float, ...] | None = None, resize: int | None = None,
                     sample_file: str | Path | None = None) -> tuple[LoadedModel, Preprocess, Dataset]:
    """Load ``path``, resolve its input format and read the calibration data with it (``read_calib``).

    A TorchScript file is converted by running it, so its calibration data are read first, in the
    format the explicit values (or ``sample_file``'s shape) give.
    """
    explicit = {"input_size": input_size, "mean": mean, "std": std, "resize": resize, "sample_file": sample_file}
    example = None
    if any("/code/__torch__" in n for n in zip_names(Path(path))):
        example = read_calib(preprocess_for(nn.Module(), timm_model=False, **explicit)).x
    loaded = load_model(path, arch=arch, num_classes=num_classes, in_chans=in_chans, trust_pickle=trust_pickle,
                        example_input=example)
    preprocess = preprocess_for(loaded.module, timm_model=loaded.arch is not None, metadata=loaded.metadata,
                                in_chans=loaded.in_chans, **explicit)
    return loaded, preprocess, read_calib(preprocess)


def zip_names(path: Path) -> list[str]:
    """Member names of a zip archive (TorchScript, torch.export, torch.save); [] for other files."""
    if not zipfile.is_zipfile(path):
        return []
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DeployError(f"{path}: damaged zip archive ({exc}); is the file truncated or corrupt?") from exc


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise DeployError(f"{path}: not a readable safetensors file ({exc}); is it truncated?") from exc


_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _torch_load(path: Path, trust_pickle: bool) -> object:
    try:
        # timm training checkpoints keep their argparse.Namespace of options: plain data, safe to allow
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's weights-only unpickler raises many types on foreign files
        found = _GLOBAL.search(str(exc))
        if not found:
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
            raise DeployError(f"{path}: not a readable PyTorch checkpoint ({first}); is it truncated, "
                              "a Git LFS pointer, or another format?") from exc
        if not trust_pickle:
            raise DeployError(f"{path}: refused to unpickle {found.group(1)} (unpickling runs arbitrary code); "
                              "pass `trust_pickle` if you trust this file, or save a state dict") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # arbitrary pickled code may raise anything
        raise DeployError(f"{path}: unpickling failed ({type(exc).__name__}: {exc}); the classes it needs "
                          "must be importable (install the model's package)") from exc


def _unwrap(obj: Mapping, path: Path) -> dict[str, torch.Tensor]:
    sd = obj
    for key in _WRAPPER_KEYS:
        if isinstance(sd.get(key), Mapping) and sd[key]:
            sd = sd[key]
            break
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise DeployError(f"{path}: no tensors found (keys: {list(obj)[:6]}); expected a state dict")
    prefix = "module."
    if all(k.startswith(prefix) for k in tensors):  # saved from DistributedDataParallel
        tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _check_finite(named: Mapping[str, torch.Tensor], path: Path) -> None:
    for name, t in named.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise DeployError(f"{path}: tensor '{name}' has {bad} NaN/Inf values; the checkpoint is broken "
                              "(diverged training?) and cannot be quantized")


def _from_state_dict(path: Path, sd: dict[str, torch.Tensor], meta: dict, arch: str | None,
                     num_classes: int | None, in_chans: int | None, fmt: str) -> LoadedModel:
    arch = arch or meta.get("arch")
    if not arch:
        raise DeployError(f"{path}: is a state dict without an architecture; pass `arch` NAME "
                          "(a timm model name such as repvgg_a0, mobileone_s0, repghostnet_100)")
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        raise DeployError(f"`arch` {arch}: not a timm model name" + (f" (did you mean {', '.join(close)}?)"
                                                                    if close else ""))
    _check_finite(sd, path)
    layout = detect_layout(sd)
    if layout:
        sd = to_timm_layout(sd, layout)
    cfg = timm.create_model(arch, pretrained=False, num_classes=1).pretrained_cfg
    # option > checkpoint metadata > the shape of the classifier / first conv weight (timm's data config)
    num_classes = _dimension(num_classes, meta, "num_classes", cfg, "classifier", sd, 0)
    in_chans = _dimension(in_chans, meta, "in_chans", cfg, "first_conv", sd, 1)
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    model = timm.create_model(arch, pretrained=False, in_chans=in_chans or 3, **kwargs)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise DeployError(f"{path}: does not match `arch` {arch}: {len(missing)} missing keys "
                          f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}; check `arch`")
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if sd[k].shape != v.shape]
    if wrong:
        raise DeployError(f"{path}: shapes do not match `arch` {arch} (checkpoint vs model: {wrong[0]}"
                          f"{f' and {len(wrong) - 1} more' if len(wrong) > 1 else ''}); "
                          "check `arch` / `num_classes` / `in_chans`")
    model.load_state_dict(sd, strict=True)
    return LoadedModel(model.eval(), fmt, arch, model.num_classes, in_chans or 3, layout, dict(meta))


def _dimension(explicit: int | None, meta: dict, key: str, cfg: dict, layer_key: str,
               sd: dict[str, torch.Tensor], axis: int) -> int | None:
    if explicit is not None:
        return explicit
    if key in meta:
        return int(meta[key])
    layer = cfg.get(layer_key)
    layer = layer[0] if isinstance(layer, (list, tuple)) else layer
    if layer and f"{layer}.weight" in sd:
        return sd[f"{layer}.weight"].shape[axis]
    return None


def _from_module(module: nn.Module, path: Path) -> LoadedModel:
    module = module.float().eval()
    _check_finite(dict(module.state_dict()), path)
    return LoadedModel(module, "pickle", arch=type(module).__name__)


def _from_torchscript(path: Path, example_input: torch.Tensor | None) -> LoadedModel:
    if example_input is None:
        raise DeployError(f"{path}: TorchScript files need calibration data to convert them; pass `calib`")
    try:
        ts = torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError as exc:
        raise DeployError(f"{path}: not a readable TorchScript file ({str(exc).splitlines()[0]})") from exc
    from torch._export.converter import TS2EPConverter

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the converter warns once per TorchScript op
            ep = TS2EPConverter(ts, (example_input[:1],)).convert()
    except Exception as exc:  # the converter is experimental and raises many types
        raise DeployError(f"{path}: TorchScript to torch.export conversion failed ({type(exc).__name__}); "
                          "export the model with torch.export.save or save its state dict instead") from exc
    module = lift_exported(ep.module())
    _check_finite(dict(module.state_dict()), path)
    return LoadedModel(module, "torchscript")


def _from_exported(path: Path) -> LoadedModel:
    try:
        ep = torch.export.load(str(path))
    except Exception as exc:  # torch.export.load raises many types on foreign zips
        raise DeployError(f"{path}: not a readable torch.export archive ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:120]})") from exc
    module = lift_exported(ep.module())
    _check_finite(dict(module.state_dict()), path)
    return LoadedModel(module, "torch.export")


# --- lifting an aten-level graph back to nn modules ------------------------------------------------

_aten = torch.ops.aten
_FUNCS = {
    _aten.relu.default: torch.relu, _aten.relu_.default: torch.relu,
    _aten.add.Tensor: operator.add, _aten.add_.Tensor: operator.add,
    _aten.cat.default: torch.cat, _aten.flatten.using_ints: torch.flatten,
    _aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    _aten.max_pool2d.default: F.max_pool2d, _aten.avg_pool2d.default: F.avg_pool2d,
    _aten.mean.dim: torch.mean,
}


def lift_exported(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite an exported program's aten graph into module calls (Conv2d, Linear, BatchNorm2d, ReLU).

    Fusion, quantizer placement and ONNX export all work on module-level graphs; an exported
    program stores weights as graph attributes and calls ``aten.conv2d`` directly.
    """
    graph = gm.graph
    count = 0

    def attr(node) -> torch.Tensor | None:
        if node is None:
            return None
        if not (isinstance(node, fx.Node) and node.op == "get_attr"):
            raise DeployError("the exported program computes weights at run time; export it in eval mode")
        return operator.attrgetter(node.target)(gm).detach()

    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            # shape guards specialise the batch size the program was exported with; the
            # deployment has a dynamic batch, and the checks below re-verify every output
            graph.erase_node(node)
            continue
        if node.op != "call_function":
            continue
        module = None
        args = list(node.args)
        if node.target in (_aten.conv2d.default, _aten.convolution.default):
            w, b = attr(args[1]), attr(args[2] if len(args) > 2 else None)
            defaults = {3: (1, 1), 4: (0, 0), 5: (1, 1)}  # stride, padding, dilation
            stride, padding, dilation = (tuple(args[i]) if len(args) > i else defaults[i] for i in (3, 4, 5))
            if node.target is _aten.convolution.default:
                if args[6]:
                    raise DeployError("transposed convolutions are not supported")
                groups = args[8]
            else:
                groups = args[6] if len(args) > 6 else 1
            module = layer_from_weights(w, b, stride, padding, dilation, groups)
        elif node.target is _aten.linear.default:
            module = layer_from_weights(attr(args[1]), attr(args[2] if len(args) > 2 else None))
        elif node.target in (_aten.batch_norm.default, _aten._native_batch_norm_legit_no_training.default):
            w, b, mean, var = (attr(a) for a in args[1:5])
            eps = args[7] if node.target is _aten.batch_norm.default else args[6]
            module = nn.BatchNorm2d(mean.shape[0], eps=eps)
            module.running_mean.copy_(mean)
            module.running_var.copy_(var)
            module.weight.data.copy_(w if w is not None else torch.ones_like(mean))
            module.bias.data.copy_(b if b is not None else torch.zeros_like(mean))
        elif node.target in (_aten.hardtanh.default, _aten.hardtanh_.default) and list(args[1:3]) == [0.0, 6.0]:
            module = nn.ReLU6()  # so placement knows the output is non-negative (uint8 on ORT)
        elif (node.target in (_aten.view.default, _aten.reshape.default) and len(args[1]) == 2 and args[1][1] == -1
              and isinstance(args[1][0], fx.Node) and args[1][0].target is _aten.sym_size.int
              and args[1][0].args[1] == 0 and args[1][0].args[0].op == "placeholder"):
            # x.view(batch, -1) with the input's batch size: the ONNX exporter would freeze the traced value
            node.target, node.args = torch.flatten, (args[0], 1)
            continue
        elif node.target in (_aten.dropout.default, _aten.clone.default, _aten.contiguous.default):
            node.replace_all_uses_with(args[0])
            graph.erase_node(node)
            continue
        elif node.target in _FUNCS:
            node.target = _FUNCS[node.target]
            continue
        if module is None:
            continue
        name = f"{type(module).__name__.lower()}_{count}"
        count += 1
        gm.add_submodule(name, module.eval())
        with graph.inserting_before(node):
            new = graph.call_module(name, (args[0],))
        if node.target in (_aten._native_batch_norm_legit_no_training.default,):
            for user in list(node.users):  # returns a tuple; users take item 0
                user.replace_all_uses_with(new)
                graph.erase_node(user)
        else:
            node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    graph.lint()
    gm.recompile()
    # a plain GraphModule: the exported program's wrapper refuses .eval() and deepcopy
    return fx.GraphModule(gm, graph).eval()
