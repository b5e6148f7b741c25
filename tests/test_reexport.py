"""benchmarks/reexport.py: a build's qstate exported again, without calibrating again."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from reexport import reexport  # noqa: E402

from repapq_deploy.cli import main  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fashion_mnist"


def test_reexport_of_a_build_by_the_same_exporter_gives_the_same_graph(tmp_path) -> None:
    out = tmp_path / "build"
    result = CliRunner().invoke(main, ["build", str(EXAMPLE / "model.safetensors"), "--calib",
                                       str(EXAMPLE / "calib.npz"), "--out", str(out), "--profile", "tensorrt",
                                       "--method", "minmax", "--calib-count", "64", "--bench-seconds", "0.1"])
    assert result.exit_code == 0, result.output
    x = torch.from_numpy(np.load(EXAMPLE / "calib.npz")["x"][:64])
    r = reexport(out, tmp_path / "again", x)
    assert r["ops_after"] == r["ops_before"] and "Sub" in r["ops_after"]  # the default offsets the classifier input
    assert r["check"] == r["check_before"] and r["check"]["agreement_top1"] == 100
    assert (tmp_path / "again" / "model.fp32.onnx").read_bytes() == (out / "model.fp32.onnx").read_bytes()


def test_reexport_names_what_a_folder_lacks(tmp_path) -> None:
    with pytest.raises(SystemExit, match="no fused.pt; pass a build folder"):
        reexport(tmp_path, tmp_path / "again", torch.zeros(1, 1, 32, 32))
