"""GPTQ weight rounding (calibrate.gptq) and its use by reconstruction."""

from __future__ import annotations

import torch
import torch.nn as nn

from repapq_deploy.calibrate import calibrate
from repapq_deploy.calibrate import reconstruct as R
from repapq_deploy.calibrate.gptq import gptq_round, gptq_unit, input_moments
from repapq_deploy.calibrate.prepare import quantize_model
from repapq_deploy.quant.fakequant import QuantConv2d
from repapq_deploy.quant.scheme import PROFILES, QuantConfig

W8 = PROFILES["tensorrt"].weight_format(8)


def _rtn(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(w / s.view(-1, 1)), -127, 127) * s.view(-1, 1)


def test_uncorrelated_inputs_give_round_to_nearest():
    w = torch.randn(8, 20, generator=torch.Generator().manual_seed(0))
    s = w.abs().amax(1) / 127
    q = gptq_round(w, s, -127, 127, [torch.eye(20, dtype=torch.float64) * 3])
    assert torch.allclose(q, _rtn(w, s))


def test_correlated_inputs_lower_the_output_error_on_the_same_grid():
    g = torch.Generator().manual_seed(1)
    # strongly correlated inputs, as neighbouring pixels of an image are
    x = torch.randn(4096, 4, generator=g) @ torch.randn(4, 32, generator=g) + 0.1 * torch.randn(4096, 32, generator=g)
    w = torch.randn(16, 32, generator=g)
    s = w.abs().amax(1) / 7  # a coarse grid makes the difference large
    q = gptq_round(w, s, -7, 7, [(x.T @ x).double()])
    ints = q / s.view(-1, 1)
    assert torch.allclose(ints, ints.round(), atol=1e-4) and ints.abs().max() <= 7 + 1e-4
    err_gptq = ((w - q) @ x.T).pow(2).mean()
    err_rtn = ((w - _rtn(w, s).clamp(-7 * s.view(-1, 1), 7 * s.view(-1, 1))) @ x.T).pow(2).mean()
    assert err_gptq < 0.5 * err_rtn


def test_moments_of_a_grouped_conv_are_per_group_im2col():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
    layer = QuantConv2d.from_float(conv, W8)
    x = torch.randn(5, 4, 6, 6)
    moments = input_moments(nn.Sequential(nn.Identity(), layer, nn.ReLU()), layer, x, 2, "cpu")
    assert len(moments) == 2 and moments[0].shape == (18, 18)
    patches = nn.functional.unfold(x[:, :2], 3, padding=1).transpose(1, 2).reshape(-1, 18)
    assert torch.allclose(moments[0], (patches.T @ patches).double(), rtol=1e-5, atol=1e-4)


def test_reconstruction_with_gptq_keeps_the_weights_on_a_fixed_grid(fused_example, calib_x, monkeypatch):
    monkeypatch.setitem(R.PRESETS, "tiny", {"iters": 20})
    qm = quantize_model(fused_example[0], QuantConfig("tensorrt", 8, 8))
    reference = quantize_model(fused_example[0], QuantConfig("tensorrt", 8, 8))
    calibrate(reference, calib_x[:64], "minmax")
    calibrate(qm, calib_x[:64], "repapq", preset="tiny", seed=0, overrides={"gptq": True, "fold": False})
    changed = 0
    for name, layer in qm.weight_layers.items():
        s = layer.weight_quantizer.scale.detach()
        assert torch.equal(s, reference.weight_layers[name].weight_quantizer.scale)  # min-max steps, not learned
        ints = layer.weight.detach() / s.view((-1,) + (1,) * (layer.weight.dim() - 1))
        assert torch.allclose(ints, ints.round(), atol=1e-3)
        changed += int(not torch.equal(layer.weight_quantizer(layer.weight), reference.weight_layers[name]
                                       .weight_quantizer(reference.weight_layers[name].weight)))
    assert changed > 0  # GPTQ moved some weights off their nearest grid point


def test_gptq_unit_skips_layers_the_forward_pass_does_not_reach():
    used = QuantConv2d.from_float(nn.Conv2d(2, 2, 1), W8)
    unused = QuantConv2d.from_float(nn.Conv2d(2, 2, 1), W8)
    before = unused.weight.detach().clone()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = used, unused

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    for m in (used, unused):
        m.weight_quantizer.scale.data = m.weight.detach().abs().flatten(1).amax(1) / 127
        m.weight_quantizer.enabled = True
    assert gptq_unit(Net(), torch.randn(8, 2, 3, 3), 4, "cpu") == 1
    assert torch.equal(unused.weight, before)


def test_cli_gptq_reaches_the_recipe_and_the_engine_matches(tmp_path, example_dir):
    import json

    from click.testing import CliRunner

    from repapq_deploy.cli import main

    common = [str(example_dir / "model.safetensors"), "--calib", str(example_dir / "calib.npz"), "--eval",
              str(example_dir / "eval.npz"), "--eval-count", "128", "--calib-count", "64",
              "--method", "repapq", "--preset", "fast",
              "--bits", "6", "--profile", "onnxruntime", "--bench-seconds", "0.1"]
    runner = CliRunner()
    result = runner.invoke(main, ["build", *common, "--gptq", "--out", str(tmp_path / "ok"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["calibration"]["details"]["settings"]["gptq"] is True
    assert report["accuracy"]["fake_quant_engine_agreement_top1"] == 100.0
    result = runner.invoke(main, ["build", *common, "--method", "brecq", "--gptq", "--out", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "recipe key gptq and recipe key adaround" in result.output
    assert not (tmp_path / "bad").exists()  # refused before any stage ran
    result = runner.invoke(main, ["build", *common, "--method", "minmax", "--gptq", "--out", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "recipe key gptq applies to reconstruction methods" in result.output
    assert not (tmp_path / "bad").exists()
