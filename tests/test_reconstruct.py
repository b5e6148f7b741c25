"""Reconstruction calibration (repapq, brecq): units, QPRep fold, export exactness, pipeline reload."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
from conftest import EXAMPLE_SPLITS

from repapq_deploy.calibrate import calibrate
from repapq_deploy.calibrate import reconstruct as R
from repapq_deploy.calibrate.prepare import quantize_model
from repapq_deploy.errors import DeployError
from repapq_deploy.export import check_against_torch, export_qdq
from repapq_deploy.load import lift_exported
from repapq_deploy.quant.scheme import QuantConfig
from repapq_deploy.reparam import fuse_model


@pytest.fixture(autouse=True)
def tiny_preset(monkeypatch):
    # A few iterations are enough to exercise the machinery; accuracy is the benchmark's job.
    monkeypatch.setitem(R.PRESETS, "tiny", {"iters": 30})


def top1(module, x, y) -> float:
    with torch.no_grad():
        return float((module(x).argmax(1) == y).float().mean() * 100)


def test_stage_units_of_a_timm_model(fused_example, calib_x):
    gm, _ = fused_example
    qm = quantize_model(gm, QuantConfig("tensorrt", 6, 8))
    units = R.split_units(qm.module, R.unit_labels(qm.module, "stage", calib_x[:1]))
    assert [u.name for u in units] == ["stem", "stages.0", "stages.1", "stages.2", "stages.3", "head"]
    # chaining the units reproduces the whole model
    qm.set_mode("off")
    x = calib_x[:4]
    with torch.no_grad():
        out = x
        for u in units:
            out = u.module(out)
        assert torch.allclose(out, qm.module(x))


def test_block_units_one_per_weight_layer(fused_example, calib_x):
    gm, _ = fused_example
    qm = quantize_model(gm, QuantConfig("onnxruntime", 8, 8))
    units = R.split_units(qm.module, R.unit_labels(qm.module, "block", calib_x[:1]))
    # a split identity tap is one unit with the conv it was split from
    assert len(units) == len(qm.weight_layers) - EXAMPLE_SPLITS


def test_resolution_units_without_stage_names(calib_x):
    # A lifted torch.export graph has no timm module paths: units follow resolution changes.
    m = timm.create_model("repvgg_nano", num_classes=10, in_chans=1).eval()
    gm = lift_exported(torch.export.export(m, (calib_x[:2],)).module())
    fused, _ = fuse_model(gm, calib_x[:8])
    qm = quantize_model(fused, QuantConfig("tensorrt", 8, 8))
    names = [u.name for u in R.split_units(qm.module, R.unit_labels(qm.module, "stage", calib_x[:1]))]
    assert names[0] == "stem" and names[-1] == "head"
    assert [n for n in names if n.startswith("resolution_")] == ["resolution_8x8", "resolution_4x4",
                                                                 "resolution_2x2", "resolution_1x1"]


def test_explicit_padding_is_not_a_resolution_change():
    # EfficientNet-Lite pads explicitly (TF "same") before every k>1 conv; a padded map is not a stage.
    from test_backends import PadNet

    x = torch.randn(4, 1, 16, 16)
    gm = lift_exported(torch.export.export(PadNet().eval(), (x[:2],)).module())
    qm = quantize_model(gm, QuantConfig("onnxruntime", 8, 8))
    names = [u.name for u in R.split_units(qm.module, R.unit_labels(qm.module, "stage", x[:1]))]
    assert names == ["stem", "resolution_4x4", "resolution_1x1", "head"]  # no 9x9 or 17x17 units


@pytest.mark.parametrize("profile", ["tensorrt", "onnxruntime"])
def test_qprep_fold_is_exact_and_export_matches(fused_example, calib_x, tmp_path, profile):
    gm, _ = fused_example
    qm = quantize_model(gm, QuantConfig(profile, 6, 8))
    calibrate(qm, calib_x, "repapq", preset="tiny")
    assert not any(layer.has_affine for layer in qm.weight_layers.values())  # folded away
    etas_moved = qm.layer_tensors()
    assert etas_moved
    path = tmp_path / "m.onnx"
    export_qdq(qm, calib_x, path)
    check = check_against_torch(qm, path, calib_x)
    assert check.agreement_top1 == 100.0
    # only float accumulation order differs (ORT vs PyTorch convs); where it flips an activation
    # across a rounding tie that sample moves by a step, every other sample matches to 1e-5
    from repapq_deploy.export.onnx import reference_session

    sess = reference_session(path)
    with torch.no_grad():
        a = qm.module(calib_x)
    c = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: calib_x.numpy()})[0])
    rel = (a - c).abs().max(1).values / a.abs().max(1).values
    assert float((rel <= 1e-5).float().mean()) >= 0.95 and check.max_rel_diff <= 5e-2


@pytest.mark.parametrize("profile", ["tensorrt", "onnxruntime"])
def test_fold_and_export_preserve_the_affine_model(fused_example, calib_x, tmp_path, profile):
    # The check: the exported QDQ graph run by ONNX Runtime equals the PyTorch model *with*
    # the affine layers. Random etas of both signs (negative ones flip integer weights).
    from repapq_deploy.export.onnx import reference_session

    gm, _ = fused_example
    qm = quantize_model(gm, QuantConfig(profile, 6, 8))
    calibrate(qm, calib_x, "minmax")
    torch.manual_seed(0)
    for layer in qm.weight_layers.values():
        layer.enable_affine()
        with torch.no_grad():
            layer.eta.uniform_(-1.5, 1.5)
            layer.eps.normal_(0, 0.1)
    qm.set_mode("quant")
    affine = copy.deepcopy(qm)
    qm.fold_affine()
    x = calib_x[:64]
    with torch.no_grad():
        a, b = affine.module(x), qm.module(x)
    # PyTorch before vs after the fold: the same model up to float rounding (eta * conv vs conv of eta * W)
    rel = (a - b).abs().max(1).values / a.abs().max(1).values
    assert float(torch.median(rel)) <= 1e-5
    path = tmp_path / "m.onnx"
    export_qdq(qm, x, path)
    sess = reference_session(path)
    c = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    rel = (a - c).abs().max(1).values / a.abs().max(1).values
    assert float((a.argmax(1) == c.argmax(1)).float().mean()) == 1.0
    # Samples differ only where a float-rounding difference flips one activation across a rounding
    # tie (ORT and PyTorch accumulate convs in different orders); all others match to 1e-5.
    assert float((rel <= 1e-5).float().mean()) >= 0.95


def test_repapq_keeps_up_with_minmax_at_w6a6(fused_example, calib_x, eval_xy, monkeypatch):
    gm, _ = fused_example
    x, y = eval_xy
    base = quantize_model(gm, QuantConfig("tensorrt", 6, 8))
    calibrate(base, calib_x, "minmax")
    qm = quantize_model(gm, QuantConfig("tensorrt", 6, 8))
    # the real fast preset (~8 s here). With the identity taps split off, min-max is already within
    # about 1 pp of FP32 at W6A6 on this small model, so on 500 images (1 pp = 5 images) the test
    # can only catch a reconstruction that breaks the model, not rank the two
    monkeypatch.setitem(R.PRESETS, "tiny", {"iters": 200})
    result = calibrate(qm, calib_x, "repapq", preset="tiny", seed=0)
    assert top1(qm.module, x, y) >= top1(base.module, x, y) - 1.5
    units = result.details["units"]
    assert all(u["mae_after"] <= u["mae_before"] * 1.05 for u in units)
    assert result.details["peak_memory_mib"] > 0


def test_reconstruction_is_deterministic(fused_example, calib_x):
    gm, _ = fused_example
    outs = []
    for _ in range(2):
        qm = quantize_model(gm, QuantConfig("onnxruntime", 8, 8))
        calibrate(qm, calib_x[:64], "brecq", preset="tiny", seed=3)
        outs.append(np.concatenate([t.numpy().ravel() for t in qm.scales().values()]))
    assert np.array_equal(outs[0], outs[1])


def test_unknown_preset(fused_example, calib_x):
    from repapq_deploy.errors import DeployError

    gm, _ = fused_example
    with pytest.raises(DeployError, match="preset"):
        calibrate(quantize_model(gm, QuantConfig()), calib_x, "repapq", preset="ultra")


def test_pipeline_reloads_folded_layers(tmp_path, example_dir):
    # calibrate in one run, verify in another: qstate.pt must carry the folded weights and biases
    from click.testing import CliRunner

    from repapq_deploy.cli import main

    common = [str(example_dir / "model.safetensors"), "--calib", str(example_dir / "calib.npz"), "--eval",
              str(example_dir / "eval.npz"), "--eval-count", "128", "--calib-count", "64", "--method", "repapq",
              "--preset", "fast", "--bits", "6", "--profile", "tensorrt", "--out", str(tmp_path),
              "--bench-seconds", "0.1", "--adaround", "--qdrop", "0.5", "--calib-augment", "hflip"]
    runner = CliRunner()
    assert runner.invoke(main, ["export", *common]).exit_code == 0
    result = runner.invoke(main, ["build", *common, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["calibration"]["method"] == "repapq"
    assert report["calibration"]["details"]["settings"]["affine"] is True
    assert report["calibration"]["details"]["settings"]["adaround"] is True  # the CLI options reach the recipe
    assert report["calibration"]["details"]["settings"]["qdrop"] == 0.5
    assert report["calibration"]["details"]["settings"]["augment"] == ["hflip"]
    # the images fitted (64 less the held-out 13) and their mirror images
    assert report["calibration"]["details"]["samples"] == 2 * report["calibration"]["images"] == 102
    # fake-quant (reloaded from qstate.pt) and the engine agree exactly on the top-1
    assert report["accuracy"]["fake_quant"]["top1"] == report["accuracy"]["engine"]["top1"]
    assert report["accuracy"]["fake_quant_engine_agreement_top1"] == 100.0


def test_adaround_rounding_starts_soft_and_bakes_onto_the_grid():
    from repapq_deploy.quant.fakequant import WeightQuantizer
    from repapq_deploy.quant.scheme import IntFormat

    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)
    wq = WeightQuantizer(IntFormat(6, signed=True), 4)
    wq.scale.copy_(w.abs().flatten(1).amax(1) / 31)
    wq.enabled = True
    wq.enable_adaround(w)
    # h(alpha) starts at frac(w / s): the soft-rounded weights are the float weights
    assert torch.allclose(wq(w), w, atol=1e-4)
    with torch.no_grad():
        wq.alpha.normal_(0, 3)
    hard = wq.hard_rounded(w)
    assert not wq.has_adaround
    s = wq.scale.view(-1, 1, 1, 1)
    q = hard / s
    assert torch.allclose(q, q.round(), atol=1e-4)  # on the grid
    assert (q.round() - w / s).abs().max() < 1 + 1e-4  # rounded up or down, never further
    assert torch.equal(wq.integer(hard).float(), q.round())  # export's round-to-nearest keeps it


@pytest.mark.parametrize("method", ["brecq", "repapq"])
def test_adaround_exports_exactly(fused_example, calib_x, tmp_path, method):
    gm, _ = fused_example
    qm = quantize_model(gm, QuantConfig("onnxruntime", 6, 8))
    result = calibrate(qm, calib_x[:64], method, preset="tiny", overrides={"adaround": True})
    assert result.details["settings"]["adaround"] is True
    assert not any(layer.weight_quantizer.has_adaround for layer in qm.weight_layers.values())
    for layer in qm.weight_layers.values():  # the learned rounding was baked into the weights
        s = layer.weight_quantizer.scale.view((-1,) + (1,) * (layer.weight.dim() - 1))
        q = layer.weight / s
        assert torch.allclose(q, q.round(), atol=1e-3)
    path = tmp_path / "m.onnx"
    export_qdq(qm, calib_x, path)
    assert check_against_torch(qm, path, calib_x).agreement_top1 == 100.0


def test_reconstruction_options_refused_for_range_methods(fused_example, calib_x):
    from repapq_deploy.errors import DeployError

    gm, _ = fused_example
    with pytest.raises(DeployError, match="adaround applies to reconstruction methods"):
        calibrate(quantize_model(gm, QuantConfig()), calib_x, "minmax", overrides={"adaround": True})


def test_spilling_cached_activations_to_disk_changes_little(fused_example, calib_x, monkeypatch):
    gm, _ = fused_example
    outs, logits = [], []
    for spill in (False, True):
        if spill:  # every cached unit input/output goes through a float16 memory-mapped file
            monkeypatch.setattr(R, "SPILL_BYTES", 0)
        qm = quantize_model(gm, QuantConfig("tensorrt", 6, 8))
        calibrate(qm, calib_x[:64], "repapq", preset="tiny", seed=1)
        outs.append(np.concatenate([t.numpy().ravel() for t in qm.scales().values()]))
        with torch.no_grad():
            logits.append(qm.module(calib_x[:64]).numpy())
    # float16 rounds the cached tensors by 2^-11 relative: the learned steps move a little, the model
    # hardly (a few of the 857 steps move by several percent over the training)
    assert np.median(np.abs(outs[1] / outs[0] - 1)) < 0.01
    assert (logits[0].argmax(1) == logits[1].argmax(1)).mean() >= 0.95


def test_fold_can_be_deferred(fused_example, calib_x):
    gm, _ = fused_example
    qm = quantize_model(gm, QuantConfig("tensorrt", 8, 8))
    calibrate(qm, calib_x[:32], "repapq", preset="tiny", overrides={"fold": False})
    assert all(layer.has_affine for layer in qm.weight_layers.values())  # kept for inspection
    qm.fold_affine()
    assert not any(layer.has_affine for layer in qm.weight_layers.values())


@pytest.mark.parametrize(("lr_weight", "changed"), [(0.0, False), (1e-4, True)])
def test_weights_are_learned_only_when_asked(fused_example, calib_x, lr_weight, changed):
    gm, _ = fused_example
    qm = quantize_model(gm, QuantConfig("tensorrt", 6, 8))
    before = {k: v.clone() for k, v in qm.layer_tensors().items() if k.endswith(".weight")}
    calibrate(qm, calib_x[:32], "repapq", preset="tiny", overrides={"fold": False, "lr_weight": lr_weight})
    after = qm.layer_tensors()
    assert any(not torch.equal(before[k], after[k]) for k in before) is changed
    assert all(not p.requires_grad for p in qm.module.parameters())  # nothing left in training state


def test_repapq_learns_weights_by_default():
    assert R.RECONSTRUCTION["repapq"].lr_weight > 0
    assert R.RECONSTRUCTION["brecq"].adaround  # BRECQ learns rounding of fixed weights instead


def learned_scales(gm, calib_x, overrides: dict) -> np.ndarray:
    """Every step size of a W6A6 TensorRT-scheme repapq calibration with ``overrides``, flattened."""
    qm = quantize_model(gm, QuantConfig("tensorrt", 6, 8))
    calibrate(qm, calib_x, "repapq", preset="tiny", seed=0, overrides=overrides)
    return np.concatenate([t.numpy().ravel() for t in qm.scales().values()])


def test_hard_sample_weights_favour_small_fp32_margins(fused_example, calib_x):
    gm, _ = fused_example
    assert R.sample_weights(gm, calib_x, R.RECONSTRUCTION["repapq"], 32, "cpu") is None
    settings = R.ReconSettings("hard", hard_weight=4.0, hard_tau=1.0)
    w = R.sample_weights(gm, calib_x, settings, 32, "cpu")
    with torch.no_grad():
        top2 = gm(calib_x).topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    assert w.shape == (len(calib_x),) and torch.isclose(w.mean(), torch.tensor(1.0))
    order = margin.argsort()
    assert torch.all(w[order][1:] <= w[order][:-1] + 1e-6)
    # the weighted run reaches the calibrate stage and changes what is learned
    assert not np.array_equal(learned_scales(gm, calib_x, {"hard_weight": 0.0}),
                              learned_scales(gm, calib_x, {"hard_weight": 4.0}))


@pytest.mark.parametrize("spill", [False, True])
def test_margin_weights_are_the_fp32_margin_gradient(fused_example, calib_x, monkeypatch, tmp_path, spill):
    gm, _ = fused_example
    qm = quantize_model(gm, QuantConfig("tensorrt", 6, 8))
    units = R.split_units(qm.module, R.unit_labels(qm.module, "stage", calib_x[:1]))
    qm.set_mode("off")
    x = calib_x[:48]
    assert R.margin_weights(units, x, R.RECONSTRUCTION["repapq"], 16, "cpu") is None
    if spill:
        monkeypatch.setattr(R, "SPILL_BYTES", 0)
    settings = R.ReconSettings("margin", margin_grad=0.75)
    w = R.margin_weights(units, x, settings, 16, "cpu", spill_dir=tmp_path if spill else None)
    assert len(w) == len(units)
    for wk in w:
        assert torch.isclose(wk.double().mean(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5)
        assert float(wk.min()) >= 0.25 - 1e-6
    # the logits: the top-1 and top-2 class get 0.25 + 0.75 * classes / 2, the others 0.25
    with torch.no_grad():
        logits = qm.module(x)
    top2 = logits.topk(2, dim=1).indices
    expected = torch.full_like(logits, 0.25)
    expected.scatter_(1, top2, 0.25 + 0.75 * logits.shape[1] / 2)
    assert torch.allclose(w[-1].float(), expected, atol=1e-3)  # spilled weights are stored in float16
    # an inner unit's weights: the gradient of the margin taken from its output as a leaf
    k = 2
    with torch.no_grad():
        h = x
        for u in units[:k + 1]:
            h = u.module(h)
    leaf = h.clone().requires_grad_(True)
    out = leaf
    for u in units[k + 1:]:
        out = u.module(out)
    (out.gather(1, top2[:, :1]) - out.gather(1, top2[:, 1:])).sum().backward()
    g = leaf.grad.abs()
    assert torch.allclose(w[k].float(), 0.25 + 0.75 * g / g.mean(), rtol=2e-3, atol=1e-3)


def test_margin_weighting_changes_what_is_learned(fused_example, calib_x):
    gm, _ = fused_example
    with pytest.raises(DeployError, match="margin_grad 1.5"):
        R.check_settings(R.ReconSettings("margin", margin_grad=1.5))
    assert not np.array_equal(learned_scales(gm, calib_x, {"margin_grad": 0.0}),
                              learned_scales(gm, calib_x, {"margin_grad": 0.5}))


def test_soup_is_the_mean_of_runs_on_successive_batch_draws(fused_example, calib_x):
    gm, _ = fused_example
    x = calib_x[:48]
    settings = R.ReconSettings("soup", lr_weight=1e-4, iters=15)

    def stem_after(soup: int, runs: int) -> dict[str, torch.Tensor]:
        """The stem unit's state after ``runs`` calls of _train_unit with one generator, each from the
        same starting state (``runs`` single runs, or one soup of ``soup``)."""
        generator = torch.Generator().manual_seed(0)
        out = []
        for _ in range(runs):
            qm = quantize_model(gm, QuantConfig("tensorrt", 6, 8))
            R.set_ranges(qm, x, R.METHODS["mae"], R.METHODS["minmax"], 16, "cpu")
            for layer in qm.weight_layers.values():
                layer.enable_affine()
            qm.module.requires_grad_(False)
            stem = R.split_units(qm.module, R.unit_labels(qm.module, "stage", x[:1]))[0]
            qm.set_mode("off")
            with torch.no_grad():
                y_fp = stem.module(x)
            qm.set_mode("quant")
            R._train_unit(stem, x, y_fp, replace(settings, soup=soup), 16, "cpu", generator)
            out.append({k: v.clone() for k, v in stem.module.state_dict().items() if v.is_floating_point()})
        return out

    first, second = stem_after(1, 2)
    (soup,) = stem_after(2, 1)
    assert any(not torch.equal(first[k], second[k]) for k in first)  # the two draws learn differently
    for k in first:
        assert torch.allclose(soup[k], (first[k] + second[k]) / 2, rtol=1e-5, atol=1e-7), k
    with pytest.raises(DeployError, match="soup 0"):
        R.check_settings(replace(settings, soup=0))
    with pytest.raises(DeployError, match="adaround off"):
        R.check_settings(replace(settings, soup=2, adaround=True))
