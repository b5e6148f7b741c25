"""Files written atomically, content hashes, and JSON helpers shared by the stages."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from repapq_deploy.errors import DeployError, InputError


def writable_dir(path: Path, option: str) -> None:
    """Create ``path`` if needed; an InputError naming ``option`` when it cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"`{option}` {path}: cannot create it ({exc.strerror}); pass a writable folder") from exc
    if not os.access(path, os.W_OK):
        raise InputError(f"`{option}` {path}: not writable; pass a writable folder")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds,
    so an interrupted run never leaves a truncated file that looks valid."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise DeployError(f"{path.parent}: cannot write here ({exc.strerror}); pass a writable `out`") from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; artifacts are ordinary files
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def save_torch(obj: object, path: str | Path) -> None:
    """``torch.save`` atomically and deterministically: saving through a buffer keeps the temporary
    file name out of the archive, so equal objects give equal bytes (and equal manifest hashes)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_digest(path: str | Path) -> str:
    """Hex SHA-256 that names a checkpoint by its content: for ``.safetensors`` the header re-serialized
    with sorted keys, then the tensor data; for other files their bytes. The safetensors writer keeps
    ``metadata`` in a hash map, so the same weights saved twice can order the header differently and
    differ in their bytes (and ``sha256_file``) while holding the same model."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return sha256_file(path)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            # the format: an 8-byte little-endian header length, the JSON header, then the tensor data
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            h.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except (ValueError, MemoryError) as exc:
        raise DeployError(f"{path}: not a readable safetensors file ({exc}); "
                          "if it is truncated, save or export it again") from exc
    return h.hexdigest()


def sha256_path(path: str | Path) -> str:
    """Hash of a file, or of a folder's file names, sizes and contents (for image folders)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()
