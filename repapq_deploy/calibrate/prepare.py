"""From a fused FP32 model to a fake-quant model: graph passes first, then quantizer placement.

The passes rewrite the fused graph into an equivalent one that quantizes better (the identity-tap
split, ``reparam.fuse.split_identity``); placement (``quant.placement``) then only inserts
quantizers, so each step can be tested and replaced on its own.
"""

from __future__ import annotations

import copy

import torch.fx as fx
import torch.nn as nn

from repapq_deploy.quant.placement import FakeQuantModel, place_quantizers, traced
from repapq_deploy.quant.scheme import QuantConfig
from repapq_deploy.reparam.fuse import split_identity


def apply_passes(fused: nn.Module, config: QuantConfig) -> fx.GraphModule:
    """A traced copy of ``fused`` with the graph passes ``config`` asks for applied."""
    gm = traced(fused)
    if config.split_identity:
        gm = copy.deepcopy(gm)  # the caller's model stays as it is
        split_identity(gm, only=config.split_layers)
    return gm


def quantize_model(fused: nn.Module, config: QuantConfig) -> FakeQuantModel:
    """The fake-quant model of ``fused`` under ``config``: graph passes, then quantizer placement."""
    return place_quantizers(apply_passes(fused, config), config)
