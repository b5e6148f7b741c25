"""Data from wherever a user has it, and the input format a model expects.

:func:`as_dataset` takes a path (image folder or tensor file), a tensor or array, a ``DataLoader`` or
any iterable of batches (tensors, or ``(x, y)`` pairs); :func:`preprocess_for` resolves the image
preprocessing from timm's data config, checkpoint metadata and explicit overrides.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from repapq_deploy.data.loader import TENSOR_EXTENSIONS, Dataset, Preprocess, load_dataset, preprocess_from_timm
from repapq_deploy.errors import InputError

DataSource = str | Path | torch.Tensor | np.ndarray | Dataset | Iterable


def as_dataset(data: DataSource, *, preprocess: Preprocess | None = None, count: int | None = None,
               labelled: bool = False, num_classes: int | None = None, seed: int = 0,
               option: str = "calib") -> Dataset:
    """``data`` as preprocessed float32 N,C,H,W samples (plus labels when it has them).

    A path is read with :func:`~repapq_deploy.data.loader.load_dataset` (``preprocess`` needed for
    image folders); in-memory data is taken as already preprocessed. ``count`` keeps a seeded sample.
    """
    if isinstance(data, (str, Path)):
        if preprocess is None:
            raise InputError(f"`{option}` {data}: reading files needs the model's input format; pass input_size")
        return load_dataset(data, preprocess=preprocess, count=count, labelled=labelled, num_classes=num_classes,
                            seed=seed, option=option)
    if isinstance(data, Dataset):
        x, y, source = data.x, data.y, data.source
    elif isinstance(data, (torch.Tensor, np.ndarray)):
        x, y, source = torch.as_tensor(data), None, f"{type(data).__name__} in memory"
    elif isinstance(data, Iterable):
        x, y = _collect(data, option)
        source = f"{type(data).__name__} in memory"
    else:
        raise InputError(f"`{option}`: a {type(data).__name__} is not data; pass a tensor, a DataLoader, an "
                         "iterable of batches or a path")
    x = x.float().contiguous()
    if x.dim() != 4:
        raise InputError(f"`{option}`: expected N,C,H,W samples, got shape {tuple(x.shape)}")
    if preprocess is not None and tuple(x.shape[1:]) != preprocess.input_size:
        raise InputError(f"`{option}`: samples of shape {tuple(x.shape[1:])} but the model takes "
                         f"{preprocess.input_size}; resize them or pass input_size")
    if y is not None:
        y = y.long()
        if len(y) != len(x) or y.dim() != 1:
            raise InputError(f"`{option}`: {len(y)} labels for {len(x)} samples; give one class index per sample")
        if num_classes is not None and len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise InputError(f"`{option}`: labels outside [0, {num_classes}) for a {num_classes}-class model")
    elif labelled:
        raise InputError(f"`{option}`: has no labels; pass (x, y) batches or a Dataset with labels")
    if count is not None:
        if count <= 0:
            raise InputError(f"`{option}`: sample count {count} must be at least 1")
        keep = torch.from_numpy(np.random.default_rng(seed).permutation(len(x))[:count])
        x, y = x[keep], (y[keep] if y is not None else None)
    return Dataset(x=x, y=y, source=source, kind="memory", classes=None)


def _collect(batches: Iterable, option: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    xs, ys = [], []
    for batch in batches:
        if isinstance(batch, Mapping):
            batch = (batch.get("x", batch.get("image")), batch.get("y", batch.get("label")))
        if isinstance(batch, (tuple, list)):
            x, y = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, y = batch, None
        if x is None:
            raise InputError(f"`{option}`: a batch without inputs; yield tensors or (x, y) pairs")
        xs.append(torch.as_tensor(x))
        if y is not None:
            ys.append(torch.as_tensor(y).reshape(-1))
    if not xs:
        raise InputError(f"`{option}`: the iterable yielded no batches")
    if ys and len(ys) != len(xs):
        raise InputError(f"`{option}`: some batches carry labels and some do not")
    return torch.cat(xs), (torch.cat(ys) if ys else None)


def preprocess_for(module: nn.Module, *, timm_model: bool, metadata: Mapping | None = None,
                   in_chans: int | None = None, input_size: tuple[int, int, int] | None = None,
                   mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                   resize: int | None = None, sample_file: str | Path | None = None) -> Preprocess:
    """The input format of ``module``: timm's data config (with the checkpoint's ``metadata`` and the
    explicit values winning) for timm models; else the explicit values, the shape of a tensor
    ``sample_file``, or ImageNet's 3x224x224."""
    meta = dict(metadata or {})
    if not timm_model or not hasattr(module, "pretrained_cfg"):
        size = input_size
        if size is None and sample_file is not None and Path(sample_file).suffix in TENSOR_EXTENSIONS:
            size = peek_shape(Path(sample_file))
        size = tuple(size or (3, 224, 224))
        c = size[0]
        mean = mean or ((0.485, 0.456, 0.406) if c == 3 else (0.5,) * c)
        std = std or ((0.229, 0.224, 0.225) if c == 3 else (0.5,) * c)
        return Preprocess(size, tuple(mean) * (c if len(mean) == 1 else 1),
                          tuple(std) * (c if len(std) == 1 else 1), resize)
    size = input_size
    if size is None and "input_size" in meta:
        size = tuple(int(v) for v in str(meta["input_size"]).split(","))
    if size is None and in_chans and in_chans != 3:
        _, h, w = module.pretrained_cfg.get("input_size", (3, 224, 224))
        size = (in_chans, h, w)
    mean = mean or (tuple(json.loads(meta["mean"])) if "mean" in meta else None)
    std = std or (tuple(json.loads(meta["std"])) if "std" in meta else None)
    return preprocess_from_timm(module, input_size=size, mean=mean, std=std, resize=resize)


def peek_shape(path: Path) -> tuple[int, ...] | None:
    """C,H,W of the samples in a .npz/.npy file without reading them all (None when unknown)."""
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                return tuple(z["x"].shape[1:]) if "x" in z else None
        if path.suffix == ".npy":
            return tuple(np.load(path, mmap_mode="r").shape[1:])
    except (OSError, ValueError):
        return None
    return None
