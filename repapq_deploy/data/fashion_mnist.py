"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (idx gz files, no download)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from repapq_deploy.errors import DeployError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
MEAN = 0.2860
STD = 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_raw(split: str, root: Path = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 [N,28,28], labels int64 [N])`` for ``split`` in {train, test}."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = root / f"{prefix}-images-idx3-ubyte.gz"
    labels = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists():
        raise DeployError(f"{images}: not found; install it with `apt-get install dataset-fashion-mnist`")
    return _read_idx(images), _read_idx(labels).astype(np.int64)


def to_model_input(images: np.ndarray, size: int = 32) -> np.ndarray:
    """uint8 [N,28,28] -> normalized float32 [N,1,size,size] (zero-padded to ``size``)."""
    pad = (size - images.shape[-1]) // 2
    x = images.astype(np.float32) / 255.0
    x = np.pad(x, ((0, 0), (pad, size - 28 - pad), (pad, size - 28 - pad)))
    return ((x - MEAN) / STD)[:, None].astype(np.float32)
