"""Small reparameterizable architectures registered into timm's model registry.

They exist so the bundled example and the tests have real multi-branch models that train in
minutes on a laptop CPU and fit in a few MB; they use timm's own RepVGG and MobileOne blocks,
so fusion goes through exactly the code path of ``repvgg_a0`` / ``mobileone_s0``.
"""

from __future__ import annotations

from timm.models import register_model
from timm.models._builder import build_model_with_cfg
from timm.models._registry import is_model
from timm.models.byobnet import ByobNet, ByoModelCfg, _mobileone_bcfg, _rep_vgg_bcfg

_CFGS: dict[str, ByoModelCfg] = {
    # RepVGG-A layout (1, 2, 4, 1 blocks) at a quarter of A0's width.
    "repvgg_nano": ByoModelCfg(
        blocks=_rep_vgg_bcfg(d=(1, 2, 4, 1), wf=(0.25, 0.25, 0.25, 0.5)),
        stem_type="rep",
        stem_chs=16,
    ),
    # MobileOne-S0 layout (depthwise + pointwise, 4 conv branches) at reduced depth and width.
    "mobileone_nano": ByoModelCfg(
        blocks=_mobileone_bcfg(d=(1, 2, 3, 1), wf=(0.25, 0.25, 0.25, 0.5), num_conv_branches=4),
        stem_type="one",
        stem_chs=16,
    ),
}


# timm's data config: where the first conv and the classifier are (the loader reads in_chans and
# num_classes from their weights) and the input the bundled example was trained with.
_PRETRAINED_CFGS: dict[str, dict] = {
    "repvgg_nano": {"first_conv": "stem.conv_kxk.conv"},
    "mobileone_nano": {"first_conv": "stem.conv_kxk.0.conv"},
}


def _builder(name: str):
    def build(pretrained: bool = False, **kwargs) -> ByobNet:
        if pretrained:
            raise ValueError(f"{name} has no pretrained weights; load a checkpoint instead")
        cfg = {"num_classes": 1000, "input_size": (3, 32, 32), "pool_size": (1, 1), "crop_pct": 1.0,
               "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
               "classifier": "head.fc", **_PRETRAINED_CFGS[name]}
        return build_model_with_cfg(
            ByobNet, name, False, model_cfg=_CFGS[name], pretrained_cfg=kwargs.pop("pretrained_cfg", None) or cfg,
            feature_cfg=dict(flatten_sequential=True), **kwargs,
        )

    build.__name__ = name
    build.__doc__ = f"{name}: a small timm ByobNet reparameterizable model (repapq-deploy)."
    return build


def register_builtin_models() -> None:
    """Register this package's small architectures with timm (idempotent)."""
    for name in _CFGS:
        if not is_model(name):
            register_model(_builder(name))
