"""Calibration views (calibrate.augment) and their use by reconstruction."""

from __future__ import annotations

import pytest
import torch

from repapq_deploy.calibrate import calibrate
from repapq_deploy.calibrate import reconstruct as R
from repapq_deploy.calibrate.augment import SHIFT, augment
from repapq_deploy.calibrate.prepare import quantize_model
from repapq_deploy.errors import DeployError
from repapq_deploy.quant.scheme import QuantConfig


def test_views_are_appended_cumulatively():
    x = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).reshape(2, 1, 4, 6)
    assert torch.equal(augment(x, (), 0), x)
    flipped = augment(x, ("hflip",), 0)
    assert torch.equal(flipped[:2], x) and torch.equal(flipped[2:], x.flip(-1))
    both = augment(x, ("hflip", "shift"), 0)
    assert both.shape == (8, 1, 4, 6) and torch.equal(both[:4], flipped)


def test_shift_moves_each_image_within_the_limit_and_is_seeded():
    x = torch.zeros(64, 1, 9, 9)
    x[:, :, 4, 4] = 1.0  # one bright pixel in the middle: where it lands is the offset
    shifted = augment(x, ("shift",), 3)[64:]
    rows, cols = (shifted[:, 0] == 1).nonzero()[:, 1:].T
    assert len(rows) == 64 and (rows - 4).abs().max() <= SHIFT and (cols - 4).abs().max() <= SHIFT
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 1  # not one offset for all
    assert torch.equal(augment(x, ("shift",), 3), augment(x, ("shift",), 3))
    assert not torch.equal(augment(x, ("shift",), 3), augment(x, ("shift",), 4))


def test_mixup_blends_each_image_with_a_partner_and_stays_dominant():
    x = torch.eye(32).reshape(32, 1, 4, 8)  # one-hot images: each pixel says which image it came from
    mixed = augment(x, ("mixup",), 5)[32:].reshape(32, 32)
    own = mixed.diagonal()
    assert torch.all(own >= 0.5) and torch.all(own <= 1)
    assert torch.allclose(mixed.sum(1), torch.ones(32))  # a convex blend of two images
    assert ((mixed > 0).sum(1) <= 2).all() and ((mixed > 0).sum(1) == 2).sum() > 16
    assert torch.equal(augment(x, ("mixup",), 5), augment(x, ("mixup",), 5))


def test_bad_views_are_refused():
    with pytest.raises(DeployError, match="calib_augment rotate"):
        augment(torch.zeros(2, 1, 4, 4), ("rotate",), 0)
    with pytest.raises(DeployError, match="image input"):
        augment(torch.zeros(2, 16), ("hflip",), 0)


def test_reconstruction_uses_the_views(fused_example, calib_x, monkeypatch):
    monkeypatch.setitem(R.PRESETS, "tiny", {"iters": 20})
    gm, _ = fused_example
    runs = {}
    for views in ((), ("hflip",)):
        qm = quantize_model(gm, QuantConfig("tensorrt", 8, 8))
        result = calibrate(qm, calib_x[:64], "repapq", preset="tiny", seed=0, overrides={"augment": views})
        runs[views] = (result.details["samples"], torch.cat([s.flatten() for s in qm.scales().values()]))
    assert runs[()][0] == 64 and runs[("hflip",)][0] == 128
    assert not torch.equal(runs[()][1], runs[("hflip",)][1])


def test_unknown_view_is_a_usage_error(example_dir, tmp_path):
    from click.testing import CliRunner

    from repapq_deploy.cli import main

    result = CliRunner().invoke(main, ["calibrate", str(example_dir / "model.safetensors"), "--calib-augment",
                                       "hflip,rotate", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "'calib_augment': 'rotate' is not one of" in result.output
    assert not (tmp_path / "out").exists()


def test_views_are_refused_for_range_methods(fused_example, calib_x):
    qm = quantize_model(fused_example[0], QuantConfig("tensorrt", 8, 8))
    with pytest.raises(DeployError, match="calib_augment applies to reconstruction methods"):
        calibrate(qm, calib_x[:16], "minmax", overrides={"augment": ("hflip",)})
