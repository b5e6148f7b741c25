"""Cross-layer equalization (reparam.equalize): exact, and it equalizes what it claims to."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from repapq_deploy.reparam import fuse_model
from repapq_deploy.reparam.equalize import MAX_SCALE, equalize, find_pairs


def _x(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def _input_ranges(gm: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = dict(gm.named_modules())[name].register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].abs().amax(dim=(0, 2, 3))))
    with torch.no_grad():
        gm(x)
    handle.remove()
    return seen[0]


@pytest.fixture(scope="module")
def fused_mobileone(make_model):
    model = make_model("mobileone_nano")
    return fuse_model(model, _x(4))[0]


def test_pairs_of_mobileone(fused_mobileone) -> None:
    modules = dict(fused_mobileone.named_modules())
    pairs = find_pairs(fused_mobileone)
    # stem -> dw, then dw -> pw and pw -> dw along the chain of 15 convs (7 blocks of dw + pw)
    assert len(pairs) == 14
    assert all(isinstance(modules[a], nn.Conv2d) and isinstance(modules[b], nn.Conv2d) for a, b in pairs)
    assert sum(modules[b].groups > 1 for _, b in pairs) == 7


@pytest.mark.parametrize("mode", ["depthwise", "all"])
def test_equalize_is_exact_and_leaves_the_input_untouched(fused_mobileone, mode) -> None:
    x, before = _x(), {k: v.clone() for k, v in fused_mobileone.state_dict().items()}
    with torch.no_grad():
        ref = fused_mobileone(x)
        eq, report = equalize(fused_mobileone, x, mode)
        out = eq(_x(seed=1)), fused_mobileone(_x(seed=1))
        again = fused_mobileone(x)
    assert len(report.pairs) == (7 if mode == "depthwise" else 14)
    assert _rel(out[1], out[0]) <= 1e-5
    assert _rel(ref, again) == 0
    assert all(torch.equal(v, before[k]) for k, v in fused_mobileone.state_dict().items())


def test_depthwise_pairs_get_equal_channel_ranges(fused_mobileone) -> None:
    x = _x()
    eq, report = equalize(fused_mobileone, x, "depthwise")
    for pair, info in report.pairs.items():
        consumer = pair.split("->")[1]
        before, after = _input_ranges(fused_mobileone, consumer, x), _input_ranges(eq, consumer, x)
        live = before > 0
        # every live channel reaches the largest range, unless its scale hit the bound
        unclamped = live & (before * MAX_SCALE > before.max())
        assert torch.allclose(after[unclamped], before.max().expand(int(unclamped.sum())), rtol=1e-4)
        assert 1 <= info["scale_min"] <= info["scale_max"] <= MAX_SCALE


def test_none_is_a_plain_copy(fused_mobileone) -> None:
    eq, report = equalize(fused_mobileone, _x(8), "none")
    assert report.pairs == {} and eq is not fused_mobileone
    assert all(torch.equal(a, b) for a, b in zip(eq.state_dict().values(), fused_mobileone.state_dict().values(),
                                                 strict=True))


def test_a_conv_read_twice_is_not_paired() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.c = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.c(torch.relu(self.b(y)) + y)

    gm = fuse_model(Residual().eval(), _x(2))[0]
    # a's output is read by b and by the add; b's by the add only: nothing may be rescaled
    assert find_pairs(gm) == []


@pytest.mark.parametrize(("mode", "pairs"), [("none", 0), ("depthwise", 0), ("all", 8)])
def test_build_option_reaches_the_calibrate_stage(example_dir, tmp_path, mode, pairs) -> None:
    # the bundled RepVGG example has 8 conv -> ReLU -> conv pairs and no depthwise conv; the export
    # (reloaded from qstate.pt) must carry the rescaled weights: fake-quant and engine agree exactly
    from click.testing import CliRunner

    from repapq_deploy.cli import main

    result = CliRunner().invoke(main, [
        "build", str(example_dir / "model.safetensors"), "--calib", str(example_dir / "calib.npz"), "--calib-count",
        "64", "--eval", str(example_dir / "eval.npz"), "--eval-count", "128", "--method", "minmax", "--equalize",
        mode, "--bench-seconds", "0.1", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["calibration"].get("equalize", {}).get("pairs", {})) == pairs
    assert report["accuracy"]["fake_quant_engine_agreement_top1"] == 100.0


def test_alpha_one_equalizes_dense_pairs_activations(fused_example, calib_x) -> None:
    # alpha 1 hands all of the rescaling to the consumer's weights: every live input channel of a
    # dense consumer then reaches the largest range (unless its scale hit the bound); alpha 0.5 is DFQ's
    x, fused = calib_x[:64], fused_example[0]
    eq, report = equalize(fused, x, "all", alpha=1.0)
    assert report.pairs
    for pair in report.pairs:
        consumer = pair.split("->")[1]
        before, after = _input_ranges(fused, consumer, x), _input_ranges(eq, consumer, x)
        unclamped = (before > 0) & (before * MAX_SCALE > before.max())
        assert torch.allclose(after[unclamped], before.max().expand(int(unclamped.sum())), rtol=1e-4)
    with torch.no_grad():
        assert _rel(fused(x), eq(x)) <= 1e-5
    half, _ = equalize(fused, x, "all", alpha=0.5)
    default, _ = equalize(fused, x, "all")
    assert all(torch.equal(a, b) for a, b in zip(half.state_dict().values(), default.state_dict().values(),
                                                 strict=True))
    with pytest.raises(ValueError, match="alpha"):
        equalize(fused, x, "all", alpha=1.5)


def test_logit_error_is_relative_mean_square(fused_example, calib_x) -> None:
    from repapq_deploy.calibrate.equalize_choice import logit_error

    fused, _ = fused_example
    assert logit_error(fused, fused, calib_x[:16]) == 0.0
    # doubling the outputs leaves an error as large as the outputs themselves
    assert logit_error(lambda x: 2 * fused(x), fused, calib_x[:16]) == pytest.approx(1.0, rel=1e-9)


def test_auto_keeps_all_for_reconstruction_and_measures_range_methods(fused_example, fused_mobileone,
                                                                      calib_x) -> None:
    from repapq_deploy.calibrate.equalize_choice import calibrate_under, choose_equalization, logit_error
    from repapq_deploy.quant.scheme import QuantConfig

    fused, _ = fused_example
    config = QuantConfig(bits=6)
    x = calib_x[:32]
    kept, errors, _ = choose_equalization(fused, x, config, "repapq", preset="fast")
    assert kept.mode == "all" and errors == {} and len(kept.equalized.pairs) == 8
    # RepVGG has dense pairs only: depthwise rescales nothing, so it is tried once, as none
    kept, errors, seconds = choose_equalization(fused, x, config, "minmax")
    assert set(errors) == {"none", "all"} and errors[kept.mode] == min(errors.values()) and seconds > 0
    # the kept model is the one calibrated under its mode: an independent calibration gives its error
    # and its scales
    again = calibrate_under(kept.mode, fused, x, config, "minmax")
    assert logit_error(again.qm.module, again.fused, x) == pytest.approx(errors[kept.mode], rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(kept.qm.scales().values(), again.qm.scales().values(), strict=True))
    # MobileOne has both kinds of pairs: three distinct candidates
    _, errors, _ = choose_equalization(fused_mobileone, _x(32), config, "percentile")
    assert set(errors) == {"none", "depthwise", "all"}


def test_build_default_auto_records_its_choice(example_dir, tmp_path) -> None:
    from click.testing import CliRunner

    from repapq_deploy.cli import main

    result = CliRunner().invoke(main, [
        "build", str(example_dir / "model.safetensors"), "--calib", str(example_dir / "calib.npz"), "--calib-count",
        "64", "--eval", str(example_dir / "eval.npz"), "--eval-count", "128", "--method", "minmax", "--bits", "6",
        "--bench-seconds", "0.1", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    calibration = json.loads(result.stdout)["calibration"]
    choice = calibration["equalize_auto"]
    errors = choice["relative_logit_error"]
    assert set(errors) == {"none", "all"} and errors[choice["mode"]] == min(errors.values())
    assert len(calibration.get("equalize", {}).get("pairs", {})) == (8 if choice["mode"] == "all" else 0)
    assert "equalize auto: " + choice["mode"] in result.output
    assert choice["seconds"] >= calibration["seconds"]
