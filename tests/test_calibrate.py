"""Stage 3, calibrate: every range-setting method gives usable scales, and W8A8 keeps the example's accuracy."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import EXAMPLE_LAYERS, EXAMPLE_SPLITS, example_act_quantizers

from repapq_deploy.calibrate import METHODS, calibrate
from repapq_deploy.calibrate.methods import CalibrationResult
from repapq_deploy.calibrate.prepare import quantize_model
from repapq_deploy.errors import DeployError
from repapq_deploy.quant.fakequant import ActQuantizer
from repapq_deploy.quant.placement import FakeQuantModel
from repapq_deploy.quant.scheme import QuantConfig

CALIB = 32  # images; small but enough for every quantizer to see thousands of values


@pytest.fixture(scope="module")
def calibrated(fused_example, calib_x) -> dict[str, tuple[FakeQuantModel, CalibrationResult]]:
    gm, _ = fused_example
    out = {}
    for method in METHODS:
        qm = quantize_model(gm, QuantConfig("onnxruntime", 8, 8))
        out[method] = (qm, calibrate(qm, calib_x[:CALIB], method, batch_size=16))
    return out


def _clips(qm: FakeQuantModel) -> dict[str, float]:
    return {n: float(q.scale) * q.fmt.qmax for n, q in qm.act_quantizers.items()}


def test_methods_registry() -> None:
    assert set(METHODS) == {"minmax", "percentile", "entropy", "mse", "mae"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_scale_is_positive_and_finite(calibrated, method: str) -> None:
    qm, result = calibrated[method]
    assert result.method == method and result.images == CALIB
    acts, layers = example_act_quantizers(qm.config.profile), EXAMPLE_LAYERS + EXAMPLE_SPLITS
    assert result.activation_quantizers == len(qm.act_quantizers) == acts
    assert result.weight_quantizers == len(qm.weight_layers) == layers
    scales = qm.scales()
    assert len(scales) == acts + layers
    for name, s in scales.items():
        assert torch.isfinite(s).all() and (s > 0).all(), name
    for name, layer in qm.weight_layers.items():
        assert layer.weight_quantizer.scale.shape == (layer.weight.shape[0],), name
    # calibration leaves the model quantizing, on the CPU, with no observer attached
    assert all(q.mode == "quant" and q.observer is None for q in qm.act_quantizers.values())
    assert all(layer.weight_quantizer.enabled for layer in qm.weight_layers.values())
    assert all(p.device.type == "cpu" for p in qm.module.parameters())


def test_minmax_activation_clip_is_the_observed_max(calibrated, fused_example, calib_x) -> None:
    """Independent check: record max|x| at each quantizer's input with hooks, quantizers off."""
    qm, _ = calibrated["minmax"]
    seen: dict[str, float] = {}
    hooks = []
    for name, q in qm.act_quantizers.items():
        def hook(_mod, args, name=name):
            seen[name] = max(seen.get(name, 0.0), float(args[0].abs().max()))
        hooks.append(q.register_forward_pre_hook(hook))
    try:
        qm.set_mode("off")
        with torch.no_grad():
            qm.module(calib_x[:CALIB])
    finally:
        qm.set_mode("quant")
        for h in hooks:
            h.remove()
    clips = _clips(qm)
    assert seen.keys() == clips.keys()
    for name in clips:
        assert math.isclose(clips[name], seen[name], rel_tol=1e-5), name


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse", "mae"])
def test_clipping_methods_clip_no_more_than_minmax(calibrated, method: str) -> None:
    minmax = _clips(calibrated["minmax"][0])
    clips = _clips(calibrated[method][0])
    assert clips.keys() == minmax.keys()
    for name in clips:
        assert clips[name] <= minmax[name] * (1 + 1e-6), name
    # and they do clip: on post-ReLU activations the largest values are rare outliers
    assert any(clips[n] < 0.99 * minmax[n] for n in clips)


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_weight_scale_is_max_abs_over_127_per_channel(calibrated, method: str) -> None:
    qm, _ = calibrated[method]
    for name, layer in qm.weight_layers.items():
        w = layer.weight.detach()
        expected = w.reshape(w.shape[0], -1).abs().amax(1) / 127
        torch.testing.assert_close(layer.weight_quantizer.scale.detach(), expected, rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("method", ["mse", "mae"])
def test_error_search_weight_scales_do_not_exceed_minmax(calibrated, method: str) -> None:
    qm, _ = calibrated[method]
    for name, layer in qm.weight_layers.items():
        w = layer.weight.detach()
        minmax = w.reshape(w.shape[0], -1).abs().amax(1) / 127
        assert (layer.weight_quantizer.scale <= minmax * (1 + 1e-6)).all(), name


def test_six_bit_weight_scale_is_max_abs_over_31(fused_example, calib_x) -> None:
    gm, _ = fused_example
    qm = quantize_model(gm, QuantConfig("tensorrt", 6, 8))
    calibrate(qm, calib_x[:8], "minmax")
    for name, layer in qm.weight_layers.items():
        w = layer.weight.detach()
        qmax = 127 if name in ("stem.reparam_conv", "head.fc") else 31
        expected = w.reshape(w.shape[0], -1).abs().amax(1) / qmax
        torch.testing.assert_close(layer.weight_quantizer.scale.detach(), expected, rtol=1e-6, atol=0, msg=name)
    six = [q for q in qm.act_quantizers.values() if q.fmt.bits == 6]
    # post-ReLU 6-bit tensors use the unsigned grid [0, 63] (in int8 storage), signed ones [-32, 31]
    assert six and all(q.fmt.qmax == (63 if q.nonnegative else 31) for q in six)


def _top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 250]).argmax(1) for i in range(0, len(x), 250)])
    return float((pred == y).float().mean() * 100)


@pytest.mark.parametrize("profile", ["onnxruntime", "tensorrt"])
def test_w8a8_percentile_keeps_accuracy(fused_example, calib_x, eval_xy, profile: str) -> None:
    gm, _ = fused_example
    x, y = eval_xy
    fp32 = _top1(gm, x, y)
    assert fp32 > 85  # the example is a trained model (91.6 % on the full test set)
    qm = quantize_model(gm, QuantConfig(profile, 8, 8))
    calibrate(qm, calib_x, "percentile")
    int8 = _top1(qm.module, x, y)
    assert abs(fp32 - int8) <= 3.0, (fp32, int8)
    # the quantizers really are active: the logits differ from FP32's
    with torch.no_grad():
        assert not torch.equal(qm.module(x[:8]), gm(x[:8]))


def test_unknown_method(fused_example, calib_x) -> None:
    qm = quantize_model(fused_example[0], QuantConfig())
    with pytest.raises(DeployError) as info:
        calibrate(qm, calib_x[:4], "kl-divergence")
    message = str(info.value)
    assert "\n" not in message and message.startswith("method kl-divergence") and "minmax" in message
    assert all(q.mode == "off" for q in qm.act_quantizers.values())  # nothing was touched


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_cuda_device_without_cuda(fused_example, calib_x) -> None:
    qm = quantize_model(fused_example[0], QuantConfig())
    with pytest.raises(DeployError) as info:
        calibrate(qm, calib_x[:4], "minmax", device="cuda")
    message = str(info.value)
    assert "\n" not in message and "device cuda" in message and "device cpu" in message


def test_unknown_device(fused_example, calib_x) -> None:
    qm = quantize_model(fused_example[0], QuantConfig())
    with pytest.raises(DeployError) as info:
        calibrate(qm, calib_x[:4], "minmax", device="tpu")
    assert str(info.value).startswith("device tpu")


def test_all_zero_activation_gets_a_positive_scale(calib_x) -> None:
    """A tensor that is always 0 (a dead ReLU) must not produce a zero scale (division by zero in Q)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Conv2d(2, 2, 1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-1.0)
    qm = quantize_model(torch.fx.symbolic_trace(model.eval()), QuantConfig())
    for method in METHODS:
        calibrate(qm, calib_x[:4], method)
        for name, q in qm.act_quantizers.items():
            assert isinstance(q, ActQuantizer) and float(q.scale) > 0 and math.isfinite(float(q.scale)), (method, name)


def test_dead_channels_get_scale_one(fused_example, calib_x):
    # a channel of zeros (or ~1e-9 weights) must not get a 1e-10 step: FP16 graphs would underflow
    from repapq_deploy.calibrate.prepare import quantize_model
    from repapq_deploy.quant.scheme import QuantConfig

    gm, _ = fused_example
    qm = quantize_model(gm, QuantConfig("tensorrt", 8, 8))
    layer = next(iter(qm.weight_layers.values()))
    with torch.no_grad():
        layer.weight[0].zero_()
        layer.weight[1].fill_(1e-9)
    calibrate(qm, calib_x[:32], "minmax")
    assert layer.weight_quantizer.scale[0] == 1.0 and layer.weight_quantizer.scale[1] == 1.0
    assert layer.weight_quantizer.scale[2] < 1.0


def test_histogram_in_exact_chunks_equals_one_histc(monkeypatch) -> None:
    """The observer splits a tensor into chunks whose float32 counts stay exact (deterministic on CUDA)."""
    from repapq_deploy.calibrate import observer as O

    x = torch.randn(4, 3, 17, 19, generator=torch.Generator().manual_seed(0))
    whole = O.HistogramObserver()
    whole.update(x)
    whole.collect_histogram = True
    whole.update(x)
    monkeypatch.setattr(O, "_EXACT_COUNTS", 101)
    chunked = O.HistogramObserver()
    chunked.update(x)
    chunked.collect_histogram = True
    chunked.update(x)
    assert torch.equal(whole.hist, chunked.hist) and whole.hist.sum() == x.numel() - whole.zeros
