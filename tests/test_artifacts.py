"""artifacts.model_digest: a checkpoint's identity that survives a re-save of the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from repapq_deploy.artifacts import model_digest, sha256_file
from repapq_deploy.errors import DeployError

META = {f"key{i}": str(i) for i in range(8)}


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    save_file(tensors, str(path), metadata=meta)
    return path


def test_same_weights_same_digest_whatever_the_header_order(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tensors = {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4),
               "bn.weight": torch.randn(4).to(torch.bfloat16)}
    files = [_save(tmp_path / f"m{i}.safetensors", tensors, dict(sorted(META.items(), reverse=bool(i % 2))))
             for i in range(4)]
    assert len({model_digest(f) for f in files}) == 1


def test_other_weights_or_metadata_other_digest(tmp_path: Path) -> None:
    w = torch.ones(2, 2)
    base = model_digest(_save(tmp_path / "a.safetensors", {"w": w}, META))
    assert model_digest(_save(tmp_path / "b.safetensors", {"w": w + 1e-6}, META)) != base
    assert model_digest(_save(tmp_path / "c.safetensors", {"w": w}, {**META, "epochs": "16"})) != base
    assert model_digest(_save(tmp_path / "d.safetensors", {"v": w}, META)) != base


def test_other_formats_hash_their_bytes(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, path)
    assert model_digest(path) == sha256_file(path)


def test_truncated_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.safetensors", {"w": torch.ones(2)}, META)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DeployError, match="m.safetensors: not a readable safetensors file") as err:
        model_digest(path)
    assert "save or export it again" in str(err.value) and "\n" not in str(err.value)
