"""Authors' RepVGG / MobileOne checkpoints -> timm key layout.

The small models below re-implement just enough of the authors' code (DingXiaoH/RepVGG ``repvgg.py``,
apple/ml-mobileone ``mobileone.py``) to produce their exact state-dict names and train-time forward.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import repapq_deploy.models  # noqa: F401  (registers repvgg_nano / mobileone_nano with timm)
from repapq_deploy.errors import DeployError
from repapq_deploy.models.layouts import detect_layout, to_timm_layout

_BASE = (64, 128, 256, 512)  # both papers scale these per-stage widths by width multipliers


def _conv_bn(cin: int, cout: int, k: int, stride: int, padding: int, groups: int = 1) -> nn.Sequential:
    m = nn.Sequential()
    m.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False))
    m.add_module("bn", nn.BatchNorm2d(cout))
    return m


# ---- authors' RepVGG ------------------------------------------------------------------------------------

class RepVggSE(nn.Module):
    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.down = nn.Conv2d(c, hidden, 1, bias=True)
        self.up = nn.Conv2d(hidden, c, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.avg_pool2d(x, kernel_size=x.shape[2:])
        return x * torch.sigmoid(self.up(F.relu(self.down(s))))


class RepVGGBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int = 1, deploy: bool = False,
                 use_se: bool = False):
        super().__init__()
        self.nonlinearity = nn.ReLU()
        self.se = RepVggSE(cout, cout // 16) if use_se else nn.Identity()
        if deploy:
            self.rbr_reparam = nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=True)
        else:
            self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
            self.rbr_dense = _conv_bn(cin, cout, 3, stride, 1, groups)
            self.rbr_1x1 = _conv_bn(cin, cout, 1, stride, 0, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.se(self.rbr_reparam(x)))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.nonlinearity(self.se(self.rbr_dense(x) + self.rbr_1x1(x) + id_out))


class RepVGG(nn.Module):
    def __init__(self, num_blocks, width_multiplier, num_classes=10, override_groups_map=None,
                 deploy=False, use_se=False):
        super().__init__()
        groups = override_groups_map or {}
        self.in_planes = min(64, int(64 * width_multiplier[0]))
        self.stage0 = RepVGGBlock(3, self.in_planes, 2, deploy=deploy, use_se=use_se)
        layer_idx = 1  # the authors count groupwise layers from stage1's first block
        for s, (n, base, w) in enumerate(zip(num_blocks, _BASE, width_multiplier, strict=True), start=1):
            planes, blocks = int(base * w), []
            for i in range(n):
                blocks.append(RepVGGBlock(self.in_planes, planes, 2 if i == 0 else 1,
                                          groups.get(layer_idx, 1), deploy, use_se))
                self.in_planes, layer_idx = planes, layer_idx + 1
            setattr(self, f"stage{s}", nn.Sequential(*blocks))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(self.in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for s in range(5):
            x = getattr(self, f"stage{s}")(x)
        return self.linear(torch.flatten(self.gap(x), 1))


# ---- authors' MobileOne ---------------------------------------------------------------------------------

class MobileOneSE(nn.Module):
    def __init__(self, c: int, rd_ratio: float = 0.0625):
        super().__init__()
        self.reduce = nn.Conv2d(c, int(c * rd_ratio), 1, bias=True)
        self.expand = nn.Conv2d(int(c * rd_ratio), c, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.avg_pool2d(x, kernel_size=x.shape[2:])
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(s))))


class MobileOneBlock(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
                 inference_mode: bool = False, use_se: bool = False, num_conv_branches: int = 1):
        super().__init__()
        self.se = MobileOneSE(cout) if use_se else nn.Identity()
        self.activation = nn.ReLU()
        if inference_mode:
            self.reparam_conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=True)
        else:
            self.rbr_skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
            self.rbr_conv = nn.ModuleList(
                _conv_bn(cin, cout, k, stride, k // 2, groups) for _ in range(num_conv_branches))
            self.rbr_scale = _conv_bn(cin, cout, 1, stride, 0, groups) if k > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "reparam_conv"):
            return self.activation(self.se(self.reparam_conv(x)))
        out = (0 if self.rbr_scale is None else self.rbr_scale(x)) + (
            0 if self.rbr_skip is None else self.rbr_skip(x))
        for branch in self.rbr_conv:
            out = out + branch(x)
        return self.activation(self.se(out))


class MobileOne(nn.Module):
    def __init__(self, num_blocks_per_stage=(2, 8, 10, 1), width_multipliers=(1, 1, 1, 1), num_classes=10,
                 inference_mode=False, use_se=False, num_conv_branches=1):
        super().__init__()
        self.in_planes = min(64, int(64 * width_multipliers[0]))
        self.stage0 = MobileOneBlock(3, self.in_planes, 3, 2, inference_mode=inference_mode)
        for s, (n, base, w) in enumerate(zip(num_blocks_per_stage, _BASE, width_multipliers, strict=True), 1):
            num_se = {3: n // 2, 4: n}.get(s, 0) if use_se else 0
            planes, blocks = int(base * w), []
            for i in range(n):
                se = i >= n - num_se
                blocks += [  # one "block" of the paper = depthwise 3x3 + pointwise 1x1 MobileOneBlock
                    MobileOneBlock(self.in_planes, self.in_planes, 3, 2 if i == 0 else 1, self.in_planes,
                                   inference_mode, se, num_conv_branches),
                    MobileOneBlock(self.in_planes, planes, 1, 1, 1, inference_mode, se, num_conv_branches),
                ]
                self.in_planes = planes
            setattr(self, f"stage{s}", nn.Sequential(*blocks))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(self.in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for s in range(5):
            x = getattr(self, f"stage{s}")(x)
        return self.linear(torch.flatten(self.gap(x), 1))


# Authors' constructors next to the timm model of the same architecture.
_ARCHS = {
    "repvgg_nano": lambda **kw: RepVGG((1, 2, 4, 1), (0.25, 0.25, 0.25, 0.5), **kw),
    "repvgg_a0": lambda **kw: RepVGG((2, 4, 14, 1), (0.75, 0.75, 0.75, 2.5), **kw),
    "repvgg_b1g4": lambda **kw: RepVGG((4, 6, 16, 1), (2, 2, 2, 4),
                                       override_groups_map={i: 4 for i in range(2, 27, 2)}, **kw),
    "repvgg_d2se": lambda **kw: RepVGG((8, 14, 24, 1), (2.5, 2.5, 2.5, 5), use_se=True, **kw),
    "mobileone_nano": lambda **kw: MobileOne((1, 2, 3, 1), (0.25, 0.25, 0.25, 0.5), num_conv_branches=4,
                                             **kw),
    "mobileone_s0": lambda **kw: MobileOne(width_multipliers=(0.75, 1.0, 1.0, 2.0), num_conv_branches=4,
                                           **kw),
    "mobileone_s1": lambda **kw: MobileOne(width_multipliers=(1.5, 1.5, 2.0, 2.5), **kw),
    "mobileone_s4": lambda **kw: MobileOne(width_multipliers=(3.0, 3.5, 3.5, 4.0), use_se=True, **kw),
}


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=gen) + 0.5
            m.bias.data = torch.randn(c, generator=gen) * 0.1
            m.running_mean.data = torch.randn(c, generator=gen) * 0.1
            m.running_var.data = torch.rand(c, generator=gen) + 0.5


@pytest.mark.parametrize("arch", ["repvgg_nano", "repvgg_a0", "mobileone_nano", "mobileone_s0"])
def test_converted_checkpoint_matches_authors_forward(arch: str) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    authors = _ARCHS[arch](num_classes=10).eval()
    _randomize_bn(authors, gen)
    sd = authors.state_dict()
    layout = detect_layout(sd)
    assert layout == ("repvgg-authors" if arch.startswith("repvgg") else "mobileone-authors")

    model = timm.create_model(arch, num_classes=10).eval()
    model.load_state_dict(to_timm_layout(sd, layout), strict=True)

    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        ref, out = authors(x), model(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("arch", ["repvgg_b1g4", "repvgg_d2se", "mobileone_s1", "mobileone_s4"])
def test_full_size_keys_and_shapes_match_timm(arch: str) -> None:
    # Grouped convs and SE blocks: names and shapes only, on the meta device so it costs no memory.
    with torch.device("meta"):
        authors = _ARCHS[arch](num_classes=1000)
        model = timm.create_model(arch)
    converted = to_timm_layout(authors.state_dict(), detect_layout(authors.state_dict()))
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_detect_layout() -> None:
    assert detect_layout(timm.create_model("repvgg_nano").state_dict()) is None
    assert detect_layout(timm.create_model("mobileone_nano").state_dict()) is None
    assert detect_layout({}) is None
    assert detect_layout({"stage0.conv.weight": torch.zeros(1)}) is None
    # DataParallel-saved checkpoints and already-fused ones are still recognised.
    sd = {f"module.{k}": v for k, v in _ARCHS["repvgg_nano"]().state_dict().items()}
    assert detect_layout(sd) == "repvgg-authors"
    assert set(to_timm_layout(sd, "repvgg-authors")) == set(timm.create_model("repvgg_nano").state_dict())
    assert detect_layout(_ARCHS["repvgg_nano"](deploy=True).state_dict()) == "repvgg-authors"
    assert detect_layout(_ARCHS["mobileone_nano"](inference_mode=True).state_dict()) == "mobileone-authors"


def _zeros(*keys: str) -> dict[str, torch.Tensor]:
    return dict.fromkeys(keys, torch.zeros(1))


@pytest.mark.parametrize(
    ("make_state_dict", "layout", "match"),
    [
        (lambda: _ARCHS["repvgg_nano"](deploy=True).state_dict(), "repvgg-authors", "already-fused"),
        (lambda: _ARCHS["mobileone_nano"](inference_mode=True).state_dict(), "mobileone-authors",
         "already-fused"),
        (lambda: _zeros("stage0.rbr_dense.conv.weight", "stage1.0.garbage.weight"), "repvgg-authors",
         "stage1.0.garbage.weight"),
        (lambda: _zeros("linear.weight", "stage5.0.rbr_dense.conv.weight"), "repvgg-authors", "stage5"),
        # Branch names of the other family, or timm's own names, are not silently accepted.
        (lambda: _ARCHS["mobileone_nano"]().state_dict(), "repvgg-authors", "cannot map"),
        (lambda: timm.create_model("repvgg_nano").state_dict(), "repvgg-authors", "cannot map"),
        (lambda: _zeros("linear.weight"), "resnet-authors", "unknown checkpoint layout"),
    ],
    ids=["repvgg-fused", "mobileone-fused", "garbage", "stage5", "wrong-family", "timm", "unknown-layout"],
)
def test_unmappable_checkpoints_raise(make_state_dict, layout: str, match: str) -> None:
    with pytest.raises(DeployError, match=match) as err:
        to_timm_layout(make_state_dict(), layout)
    assert "\n" not in str(err.value)
