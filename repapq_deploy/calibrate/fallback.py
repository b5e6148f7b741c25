"""Precision fallback for an accuracy budget: which quantized tensors to raise, most useful first.

Each activation quantizer is kept in float on its own, together with the weights of the layers that
read it, and the logit error against FP32 on the given images is measured (one forward pass per
quantizer); the tensors whose fallback removes the most error come first. The build then raises the
fewest of them one precision step (``quant.placement.raise_precision``: 6 -> 8 bits in a 6-bit build,
8 bits -> float in an 8-bit one) until its budget holds, in the spirit of NNCF's
``quantize_with_accuracy_control``.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.nn as nn

from repapq_deploy.calibrate.equalize_choice import logit_error
from repapq_deploy.quant.placement import FakeQuantModel, raise_precision, readers


def rank(qm: FakeQuantModel, reference: nn.Module, x: torch.Tensor, batch_size: int = 64) -> list[dict]:
    """Every quantizer not yet raised, with the relative logit error against ``reference`` on ``x``
    when it alone is kept in float, largest error reduction first."""
    base = logit_error(qm.module, reference, x, batch_size)
    rows = []
    for name, q in qm.act_quantizers.items():
        if q.floating:
            continue
        weights = [qm.weight_layers[t].weight_quantizer for t in readers(qm, name)]
        enabled = [w.enabled for w in weights]
        q.floating = True
        for w in weights:
            w.enabled = False
        try:
            error = logit_error(qm.module, reference, x, batch_size)
        finally:
            q.floating = False
            for w, e in zip(weights, enabled, strict=True):
                w.enabled = e
        rows.append({"quantizer": name, "layers": readers(qm, name), "error_without": error,
                     "gain": base - error})
    return sorted(rows, key=lambda r: -r["gain"])


def with_fallback(qm: FakeQuantModel, names: list[str]) -> FakeQuantModel:
    """A copy of ``qm`` with the quantizers ``names`` raised one precision step (recorded in its config)."""
    raised = copy.deepcopy(qm)
    for name in names:
        raise_precision(raised, name)
    raised.config = replace(qm.config, fallback=(*qm.config.fallback, *names))
    raised.set_mode("quant")
    return raised
