"""Calibration and evaluation data: an image folder or a tensor file, loaded as one preprocessed tensor.

Accepted inputs (``calib`` / ``eval``):

* an image folder (searched recursively; jpg, jpeg, png, bmp, webp). With labels, the immediate
  sub-folders are the classes, sorted by name (torchvision ``ImageFolder`` convention);
* ``.npz`` with ``x`` (N,C,H,W, already preprocessed) and optional ``y`` (N int labels);
* ``.npy`` holding x only;
* ``.pt`` holding x as a tensor, or a dict with ``x`` and optional ``y`` (read with ``weights_only``).
"""

from __future__ import annotations

import math
import pickle
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.progress import track
from timm.data import resolve_data_config
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from repapq_deploy.errors import DeployError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TENSOR_EXTENSIONS = (".npz", ".npy", ".pt")
_ACCEPTED = (f"an image folder ({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}) "
             f"or a {', '.join(TENSOR_EXTENSIONS)} file")
# Below this many images decoding is near-instant and a progress bar would only flicker.
_PROGRESS_MIN_IMAGES = 64


@dataclass(frozen=True)
class Preprocess:
    """How raw images become model input; tensor files are taken as already preprocessed."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None = None
    interpolation: str = "bilinear"
    crop_pct: float = 0.875

    def __post_init__(self) -> None:
        # Normalise sequences to tuples so a dict read back from JSON (lists) round-trips and hashes.
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.input_size) != 3 or min(self.input_size) < 1:
            raise DeployError(f"`input_size` {_fmt(self.input_size)}: expected three positive integers C,H,W")
        c, h, w = self.input_size
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != c:
                raise DeployError(f"`{name}` {_fmt(values)}: has {len(values)} value(s) but the input has "
                                  f"{c} channel(s); pass one value per channel")
        if min(self.std) <= 0:
            raise DeployError(f"`std` {_fmt(self.std)}: every value must be > 0")
        if not 0 < self.crop_pct <= 1:
            raise DeployError(f"crop_pct {self.crop_pct}: must be in (0, 1]")
        if self.resize is not None and self.resize < max(h, w):
            raise DeployError(f"`resize` {self.resize}: smaller than the {h}x{w} crop; "
                              f"pass a value >= {max(h, w)} or leave it out")
        try:
            InterpolationMode(self.interpolation)
        except ValueError:
            modes = ", ".join(m.value for m in InterpolationMode)
            raise DeployError(f"interpolation {self.interpolation!r}: unknown; use one of {modes}") from None

    def to_dict(self) -> dict:
        """JSON-friendly dict; ``Preprocess(**d)`` rebuilds an equal object."""
        d = asdict(self)
        for key in ("input_size", "mean", "std"):
            d[key] = list(d[key])
        return d

    def _transform(self) -> Callable[[Image.Image], torch.Tensor]:
        _, h, w = self.input_size
        # timm's eval rule: scale so the crop keeps crop_pct of the image (exactly timm's for H == W;
        # using the larger side keeps a non-square crop inside the image).
        scale = self.resize if self.resize is not None else math.floor(max(h, w) / self.crop_pct)
        return transforms.Compose([
            transforms.Resize(scale, interpolation=InterpolationMode(self.interpolation)),
            transforms.CenterCrop((h, w)),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])


def preprocess_from_timm(
    model: torch.nn.Module,
    *,
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize: int | None = None,
) -> Preprocess:
    """``timm.data.resolve_data_config(model=model)`` with user overrides (overrides win).

    A single ``mean`` / ``std`` value is repeated for every channel. Raises DeployError when the
    resolved normalization does not match the channel count (e.g. a 1-channel model with timm's
    ImageNet defaults), naming the option to pass.
    """
    cfg = resolve_data_config(model=model)
    if input_size is not None:
        if len(input_size) != 3:
            raise DeployError(f"`input_size` {_fmt(input_size)}: expected three integers C,H,W")
        cfg["input_size"] = tuple(input_size)
    channels = int(cfg["input_size"][0])
    # Overrides are applied here rather than through timm's ``args`` because timm asserts on a
    # channel mismatch instead of reporting it.
    for name, value in (("mean", mean), ("std", std)):
        if value is not None:
            value = tuple(value)
            cfg[name] = value * channels if len(value) == 1 else value
    return Preprocess(
        input_size=cfg["input_size"],
        mean=cfg["mean"],
        std=cfg["std"],
        resize=resize,
        interpolation=cfg["interpolation"],
        crop_pct=cfg["crop_pct"],
    )


@dataclass
class Dataset:
    """Preprocessed samples and, when known, their labels."""

    x: torch.Tensor
    y: torch.Tensor | None
    source: str
    kind: str
    classes: list[str] | None


def load_dataset(
    path: str | Path,
    *,
    preprocess: Preprocess,
    count: int | None = None,
    labelled: bool = False,
    num_classes: int | None = None,
    seed: int = 0,
    option: str = "calib",
) -> Dataset:
    """Load an image folder or a .npz/.npy/.pt file as float32 N,C,H,W (plus int64 labels if present).

    ``count`` keeps the first ``count`` samples of a ``numpy.random.default_rng(seed)`` permutation
    (all of them, shuffled, when fewer exist); ``None`` keeps every sample in file order. With
    ``labelled`` the data must carry labels, checked against ``[0, num_classes)`` when given.
    Every bad input raises DeployError with a one-line message that starts with ``option`` and
    the path.
    """
    source = str(path)
    where = f"`{option}` {source}"
    path = Path(path)
    if count is not None and count <= 0:
        raise DeployError(f"{where}: sample count {count} must be at least 1")
    if not path.exists():
        raise DeployError(f"{where}: not found; pass {_ACCEPTED}")

    if path.is_dir():
        return _load_images(path, source, where, preprocess, count, labelled, num_classes, seed)

    suffix = path.suffix.lower()
    if suffix not in TENSOR_EXTENSIONS:
        hint = "; put images in a folder and pass the folder" if suffix in IMAGE_EXTENSIONS else ""
        raise DeployError(f"{where}: unsupported format {suffix or '(no extension)'!r}; "
                          f"pass {_ACCEPTED}{hint}")
    x, y = _read_tensor_file(path, suffix, where)
    x = _check_x(x, where, preprocess)
    if y is not None:
        y = _check_y(y, len(x), where, num_classes)
    elif labelled:
        raise DeployError(f"{where} has no labels: save them as 'y' (N integer class indices) "
                          "in a .npz or .pt dict next to 'x', or use an image folder with class sub-folders")
    if count is not None:
        keep = torch.from_numpy(_sample_order(len(x), count, seed))
        x = x[keep]
        y = y[keep] if y is not None else None
    return Dataset(x=x.contiguous(), y=y, source=source, kind=suffix[1:], classes=None)


def _sample_order(n: int, count: int | None, seed: int) -> np.ndarray:
    """Indices of the samples to keep: all in order, or the first ``count`` of a seeded shuffle."""
    if count is None:
        return np.arange(n)
    return np.random.default_rng(seed).permutation(n)[:count]


def _reason(e: Exception) -> str:
    """The first line of an exception's message, kept short so the error stays one line."""
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _fmt(values: Sequence) -> str:
    return ",".join(str(v) for v in values)


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def _load_images(
    root: Path, source: str, where: str, preprocess: Preprocess,
    count: int | None, labelled: bool, num_classes: int | None, seed: int,
) -> Dataset:
    c, h, w = preprocess.input_size
    if c not in (1, 3):
        raise DeployError(f"{where}: the model expects {c} input channels but images give 1 (L) or 3 (RGB); "
                          "pass a .npz/.pt tensor file instead")
    # Hidden entries (.git, macOS '._x.jpg' resource forks) are never images the user meant.
    paths = sorted(p for p in root.rglob("*")
                   if _is_image(p) and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not paths:
        exts = ", ".join(IMAGE_EXTENSIONS)
        raise DeployError(f"{where}: no images found (looked recursively for {exts}); "
                          "add images or pass a .npz/.npy/.pt file")

    labels: list[int] | None = None
    classes: list[str] | None = None
    if labelled:
        loose = [p for p in paths if p.parent == root]
        if loose:
            raise DeployError(f"{where} has no labels: {loose[0].name} sits directly in the folder; "
                              "put the images in one sub-folder per class (sorted names give indices 0..K-1)")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        class_of = {p.relative_to(root).parts[0] for p in paths}
        empty = [name for name in classes if name not in class_of]
        if empty:
            # Skipping it would silently shift every later class index.
            raise DeployError(f"{where}: class folder {empty[0]!r} has no images; add images or remove it")
        if num_classes is not None and len(classes) > num_classes:
            raise DeployError(f"{where}: class folder {classes[num_classes]!r} gets label {num_classes}, "
                              f"outside [0, {num_classes}); keep at most one sub-folder per model class")
        index = {name: i for i, name in enumerate(classes)}
        labels = [index[p.relative_to(root).parts[0]] for p in paths]

    order = _sample_order(len(paths), count, seed)
    transform = preprocess._transform()
    mode = "L" if c == 1 else "RGB"
    # Decode one image at a time into a preallocated tensor: peak overhead is a single image.
    x = torch.empty((len(order), c, h, w), dtype=torch.float32)
    progress = track(order, description=f"decoding {len(order)} images", total=len(order),
                     console=Console(stderr=True), transient=True,
                     disable=len(order) <= _PROGRESS_MIN_IMAGES)
    for i, j in enumerate(progress):
        p = paths[j]
        try:
            with Image.open(p) as im:
                x[i] = transform(im.convert(mode))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DeployError(f"{where}: cannot read image {p} ({_reason(e)}); fix or remove the file") from e
    y = torch.tensor([labels[j] for j in order], dtype=torch.int64) if labels is not None else None
    return Dataset(x=x, y=y, source=source, kind="images", classes=classes)


def _read_tensor_file(path: Path, suffix: str, where: str) -> tuple[object, object | None]:
    """Return the raw ``(x, y)`` objects stored in a tensor file; ``y`` is None when absent."""
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False), None
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "x" not in z.files:
                    found = ", ".join(z.files) or "none"
                    raise DeployError(f"{where}: no array 'x' (found: {found}); save images as x "
                                      "(N,C,H,W float32) and labels as y")
                return z["x"], (z["y"] if "y" in z.files else None)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):
            raise DeployError(f"{where}: cannot read the file (not a torch.save file?); "
                              "check that it is a valid .pt file") from e
        raise DeployError(f"{where}: holds objects other than tensors, which torch.load(weights_only=True) "
                          "refuses; save only tensors: torch.save({'x': x, 'y': y}, path)") from e
    except (OSError, ValueError, EOFError, RuntimeError, zipfile.BadZipFile) as e:
        raise DeployError(f"{where}: cannot read the file ({_reason(e)}); "
                          f"check that it is a valid {suffix} file") from e
    if isinstance(obj, dict):
        if "x" not in obj:
            found = ", ".join(map(str, obj)) or "none"
            raise DeployError(f"{where}: dict has no key 'x' (found: {found}); store images as x "
                              "(N,C,H,W float32) and labels as y")
        return obj["x"], obj.get("y")
    return obj, None


def _as_tensor(value: object, name: str, where: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, torch.Tensor):
        return value
    raise DeployError(f"{where}: {name} is a {type(value).__name__}, expected a tensor or array")


def _check_x(value: object, where: str, preprocess: Preprocess) -> torch.Tensor:
    x = _as_tensor(value, "x", where)
    c, h, w = preprocess.input_size
    expected = f"(N, {c}, {h}, {w})"
    if not x.is_floating_point():
        # Integer data is almost always raw uint8 pixels, which would skip normalization silently.
        dtype = str(x.dtype).removeprefix("torch.")
        raise DeployError(f"{where}: x has dtype {dtype}; tensor files must hold preprocessed float images "
                          f"{expected}, or pass an image folder")
    if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
        raise DeployError(f"{where}: x has shape {tuple(x.shape)}, expected {expected} "
                          "(the model's input size; see `input_size`)")
    if len(x) == 0:
        raise DeployError(f"{where}: x holds no samples (shape {tuple(x.shape)}); pass a non-empty file")
    x = x.to(torch.float32)
    finite = torch.isfinite(x).flatten(1).all(1)
    if not finite.all():
        bad = (~finite).nonzero().flatten()
        raise DeployError(f"{where}: x has NaN/Inf values in {len(bad)} sample(s), the first at index "
                          f"{int(bad[0])}; fix or drop those samples")
    return x


def _check_y(value: object, n: int, where: str, num_classes: int | None) -> torch.Tensor:
    y = _as_tensor(value, "y", where)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DeployError(f"{where}: y has dtype {str(y.dtype).removeprefix('torch.')}; labels must be "
                          "integer class indices")
    if y.ndim != 1 or len(y) != n:
        raise DeployError(f"{where}: y has shape {tuple(y.shape)}, expected ({n},): one class index per "
                          "sample of x (not one-hot)")
    y = y.to(torch.int64)
    bad = (y < 0) if num_classes is None else (y < 0) | (y >= num_classes)
    if bad.any():
        i = int(bad.nonzero()[0])
        allowed = ">= 0" if num_classes is None else f"[0, {num_classes})"
        raise DeployError(f"{where}: label {int(y[i])} at index {i} is outside {allowed}; "
                          "labels must be class indices of the model's classifier")
    return y
