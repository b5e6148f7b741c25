"""Calibration on a CUDA device (``--device cuda``): the same results as on the CPU, deterministic under
``--seed``, and the process-wide CUDA settings left as found. Skipped where PyTorch sees no CUDA device."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from repapq_deploy.calibrate import calibrate
from repapq_deploy.calibrate import reconstruct as R
from repapq_deploy.calibrate.prepare import quantize_model
from repapq_deploy.quant.scheme import QuantConfig

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device visible to PyTorch")]


@pytest.fixture(autouse=True)
def tiny_preset(monkeypatch):
    monkeypatch.setitem(R.PRESETS, "tiny", {"iters": 40})


def _state(qm) -> dict[str, np.ndarray]:
    """Everything calibration decides: scales, and (for reconstruction) the folded weights and biases."""
    return {k: v.detach().cpu().numpy().copy() for k, v in qm.module.state_dict().items()}


def _calibrated(gm, x, method: str, device: str, bits: int = 6, seed: int = 0):
    qm = quantize_model(gm, QuantConfig("tensorrt", bits, 8))
    result = calibrate(qm, x, method, device=device, preset="tiny", seed=seed)
    return qm, result


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_range_methods_match_the_cpu(fused_example, calib_x, method):
    gm, _ = fused_example
    cpu, _ = _calibrated(gm, calib_x, method, "cpu")
    gpu, _ = _calibrated(gm, calib_x, method, "cuda")
    a, b = cpu.scales(), gpu.scales()
    for name in a:
        # IEEE FP32 on both: the only differences are the order of float additions in the convs
        np.testing.assert_allclose(b[name].numpy(), a[name].numpy(), rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("method", ["repapq", "brecq"])
def test_reconstruction_is_deterministic_on_cuda(fused_example, calib_x, method):
    gm, _ = fused_example
    first, result = _calibrated(gm, calib_x, method, "cuda", seed=5)
    second, _ = _calibrated(gm, calib_x, method, "cuda", seed=5)
    a, b = _state(first), _state(second)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a), [k for k in a if not np.array_equal(a[k], b[k])][:5]
    assert result.details["peak_cuda_memory_mib"] > 0
    assert next(first.module.parameters()).device.type == "cpu"  # handed back on the CPU for export


def test_repapq_on_cuda_matches_the_cpu_run(fused_example, calib_x, eval_xy):
    gm, _ = fused_example
    x, y = eval_xy
    cpu, _ = _calibrated(gm, calib_x, "repapq", "cpu")
    gpu, _ = _calibrated(gm, calib_x, "repapq", "cuda")
    with torch.no_grad():
        p_cpu, p_gpu = cpu.module(x), gpu.module(x)
    # the same recipe, the same batches: float rounding may flip a few borderline images, no more
    agreement = float((p_cpu.argmax(1) == p_gpu.argmax(1)).float().mean())
    assert agreement >= 0.98
    top1 = [float((p.argmax(1) == y).float().mean()) for p in (p_cpu, p_gpu)]
    # (individual learned step sizes may differ by 10 % and more: Adam turns a near-zero gradient whose
    # sign flips with the rounding into a full-size step the other way, so only outputs are compared)
    assert abs(top1[0] - top1[1]) <= 0.01


def test_cuda_settings_are_restored(fused_example, calib_x):
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    _calibrated(fused_example[0], calib_x[:16], "repapq", "cuda")
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
    assert not torch.are_deterministic_algorithms_enabled()
    torch.backends.cudnn.benchmark = False


def test_build_on_cuda(tmp_path, example_dir):
    from click.testing import CliRunner

    from repapq_deploy.cli import main

    args = ["build", str(example_dir / "model.safetensors"), "--calib", str(example_dir / "calib.npz"),
            "--eval", str(example_dir / "eval.npz"), "--eval-count", "200", "--calib-count", "64",
            "--device", "cuda", "--out", str(tmp_path / "engine"), "--bench-seconds", "0.1", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["calibration"]["details"]["peak_cuda_memory_mib"] > 0
    assert report["accuracy"]["fake_quant_engine_agreement_top1"] >= 98.0
