"""benchmarks/fp16_constants.py: a QDQ graph run with its float constants rounded to float16."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from fp16_constants import rounded_constants, run  # noqa: E402

from repapq_deploy.calibrate import calibrate  # noqa: E402
from repapq_deploy.calibrate.prepare import quantize_model  # noqa: E402
from repapq_deploy.export import export_qdq  # noqa: E402
from repapq_deploy.quant.scheme import QuantConfig  # noqa: E402


def test_rounding_touches_only_float_constants_and_saturates(offset_net, tmp_path) -> None:
    net, x = offset_net
    qm = quantize_model(net, QuantConfig("tensorrt", 8, 8, offset_relu="all"))
    calibrate(qm, x, "minmax")
    export_qdq(qm, x, tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1e6, -1e6], np.float32), "huge"))
    rounded, changed = rounded_constants(model)
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in rounded.graph.initializer}
    assert after.keys() == before.keys() and 0 < changed <= len(before)
    for name, value in before.items():
        if value.dtype == np.float32:
            assert np.array_equal(after[name], np.clip(value, -65504, 65504).astype(np.float16).astype(np.float32))
        else:  # int8 weights and zero points are already what the engine stores
            assert np.array_equal(after[name], value), name
    assert model.graph.initializer[-1].data_type == TensorProto.FLOAT  # the input model is left alone
    # the rounded graph still runs and stays close: a float16 constant moves a value by < 0.1 %
    a, b = run(model, x.numpy()), run(rounded, x.numpy())
    assert a.shape == b.shape == (64, 10) and np.abs(a - b).max() < 0.05 * np.abs(a).max()
