"""Rename checkpoints saved by the model authors' own code to timm's ``ByobNet`` key layout.

The authors' RepVGG (github DingXiaoH/RepVGG, ``repvgg.py``) and MobileOne (github apple/ml-mobileone,
``mobileone.py``) training-time checkpoints hold exactly the tensors of timm's ``repvgg_*`` /
``mobileone_*`` models, block for block and in the same order; only module names differ. Conversion is
therefore a pure key rename: no tensor is reshaped, split or fused, so the timm model computes the same
function as the authors' model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from repapq_deploy.errors import DeployError

REPVGG = "repvgg-authors"
MOBILEONE = "mobileone-authors"

_BN = r"(?:weight|bias|running_mean|running_var|num_batches_tracked)"
_CONV_BN = rf"(?:conv\.weight|bn\.{_BN})"  # the authors' conv_bn(): Sequential(conv without bias, bn)

# Where a block lives: the authors' ``stage0`` block is timm's stem, and their ``stage1..4``
# (nn.Sequential of blocks; MobileOne's already alternate depthwise / pointwise, as timm's do)
# are timm's ``stages.0..3`` with the same block indices.
_LOCATION = re.compile(r"(?:stage0|stage(?P<stage>[1-4])\.(?P<block>\d+))\.(?P<tensor>.+)")

# Tensor names inside one block, matched against the whole rest of the key.
_BLOCK_RULES: dict[str, list[tuple[re.Pattern[str], str]]] = {
    REPVGG: [
        (re.compile(rf"rbr_dense\.({_CONV_BN})"), r"conv_kxk.\1"),
        (re.compile(rf"rbr_1x1\.({_CONV_BN})"), r"conv_1x1.\1"),
        (re.compile(rf"rbr_identity\.({_BN})"), r"identity.\1"),
        # RepVGG-D2se: the authors' SEBlock(down, up) sits where timm's SEModule(fc1, fc2) does.
        (re.compile(r"se\.down\.(weight|bias)"), r"attn.fc1.\1"),
        (re.compile(r"se\.up\.(weight|bias)"), r"attn.fc2.\1"),
    ],
    MOBILEONE: [
        (re.compile(rf"rbr_conv\.(\d+\.{_CONV_BN})"), r"conv_kxk.\1"),
        (re.compile(rf"rbr_scale\.({_CONV_BN})"), r"conv_scale.\1"),
        (re.compile(rf"rbr_skip\.({_BN})"), r"identity.\1"),
        # MobileOne-S4: SEBlock(reduce, expand) -> SEModule(fc1, fc2).
        (re.compile(r"se\.reduce\.(weight|bias)"), r"attn.fc1.\1"),
        (re.compile(r"se\.expand\.(weight|bias)"), r"attn.fc2.\1"),
    ],
}
_HEAD = (re.compile(r"linear\.(weight|bias)"), r"head.fc.\1")

# Module names that exist only once the authors' code has fused the branches (RepVGG deploy=True,
# MobileOne inference_mode=True); the per-branch tensors timm's train-time model needs are gone by then.
_FUSED = re.compile(r"(?:^|\.)(?:rbr_reparam|reparam_conv)\.")
_MARKERS = {
    REPVGG: re.compile(r"\.(?:rbr_dense|rbr_1x1|rbr_identity|rbr_reparam)\."),
    MOBILEONE: re.compile(r"\.(?:rbr_conv|rbr_scale|rbr_skip|reparam_conv)\."),
}


def _strip(key: str) -> str:
    # DataParallel / DDP training saves "module."-prefixed keys; the authors' convert.py strips it too.
    return key.removeprefix("module.")


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """'repvgg-authors', 'mobileone-authors', or None for anything else (e.g. timm's own layout).

    Fused (deploy / inference-mode) authors' checkpoints are detected too, so that
    :func:`to_timm_layout` can reject them with a message instead of timm failing on missing keys.
    """
    keys = [_strip(k) for k in state_dict]
    if not any(k.startswith("stage0.") for k in keys):  # timm names its stem "stem"
        return None
    for layout, marker in _MARKERS.items():
        if any(marker.search(k) for k in keys):
            return layout
    return None


def _rename(key: str, layout: str) -> str | None:
    pattern, repl = _HEAD
    if m := pattern.fullmatch(key):
        return m.expand(repl)
    loc = _LOCATION.fullmatch(key)
    if loc is None:
        return None
    prefix = "stem" if loc["stage"] is None else f"stages.{int(loc['stage']) - 1}.{loc['block']}"
    for pattern, repl in _BLOCK_RULES[layout]:
        if m := pattern.fullmatch(loc["tensor"]):
            return f"{prefix}.{m.expand(repl)}"
    return None


def to_timm_layout(state_dict: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Return a new state dict with timm key names; raise repapq_deploy.errors.DeployError (one line, saying
    what to do) on keys that cannot be mapped, e.g. an already-fused `rbr_reparam` checkpoint.

    The tensors themselves are shared with ``state_dict``, not copied.
    """
    if layout not in _BLOCK_RULES:
        raise DeployError(f"unknown checkpoint layout {layout!r}; use one of: {', '.join(_BLOCK_RULES)}")
    keys = {key: _strip(key) for key in state_dict}
    # Check fusion first so a fused checkpoint gets this message whatever its key order.
    if fused := next((key for key, name in keys.items() if _FUSED.search(name)), None):
        raise DeployError(
            f"checkpoint key {fused!r} is from an already-fused {layout} model, whose branch weights are "
            "gone; use the authors' unfused training-time checkpoint (RepVGG '*-train.pth', "
            "MobileOne '*_unfused.pth.tar') instead"
        )
    out: dict[str, torch.Tensor] = {}
    for key, name in keys.items():
        new = _rename(name, layout)
        if new is None:
            raise DeployError(
                f"cannot map checkpoint key {key!r} of a {layout} checkpoint to timm's layout; pass the "
                "authors' unmodified training-time RepVGG / MobileOne state dict (RepVGGplus and custom "
                "heads are not supported)"
            )
        out[new] = state_dict[key]
    return out
