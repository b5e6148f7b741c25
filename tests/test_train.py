"""The reference-model training script: a run split by ``stop_after`` and resumed from its state file
ends with exactly the weights of an uninterrupted run. Synthetic images stand in for Fashion-MNIST
(CI machines need not have Debian's dataset package)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "examples" / "fashion_mnist" / "train.py"


@pytest.fixture
def train_module(monkeypatch):
    spec = importlib.util.spec_from_file_location("fmnist_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def load_raw(split: str) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng({"train": 1, "test": 2}[split])
        count = {"train": 512, "test": 200}[split]
        return rng.integers(0, 256, (count, 28, 28), dtype=np.uint8), rng.integers(0, 10, count)

    monkeypatch.setattr(module.fm, "load_raw", load_raw)
    return module


def test_resumed_training_equals_uninterrupted(train_module, tmp_path):
    settings = dict(arch="repvgg_nano", epochs=2, seed=3, batch=128, train_images=384)
    whole, acc = train_module.train(**settings)
    state = tmp_path / "train_state.pt"
    part, part_acc = train_module.train(**settings, state_path=state, stop_after=1)
    assert part_acc is None and state.exists()
    first = {k: v.clone() for k, v in part.state_dict().items()}
    resumed, resumed_acc = train_module.train(**settings, state_path=state)
    assert resumed_acc == acc
    whole_sd, resumed_sd = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(whole_sd[k], resumed_sd[k]) for k in whole_sd)
    # and the second epoch did change the weights (the comparison above is not trivially true)
    assert not all(torch.equal(first[k], resumed_sd[k]) for k in first)


def test_state_from_other_settings_is_refused(train_module, tmp_path):
    state = tmp_path / "train_state.pt"
    train_module.train("repvgg_nano", 2, 0, train_images=256, state_path=state, stop_after=1)
    with pytest.raises(SystemExit, match="other settings.*'epochs': \\(2, 3\\)"):
        train_module.train("repvgg_nano", 3, 0, train_images=256, state_path=state)


@pytest.mark.parametrize(("args", "message"), [(["--stop-after", "0"], "--stop-after must be at least 1"),
                                               (["--train-images", "64"], "--train-images must be at least --batch")])
def test_cli_refuses_bad_counts(args, message, tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), *args],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 2 and message in run.stderr
    assert not any(tmp_path.iterdir())  # nothing written
