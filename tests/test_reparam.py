"""Stage 2, reparam: block fusion, BatchNorm folding and graph-level branch merging are exact."""

from __future__ import annotations

import operator
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from repapq_deploy.errors import DeployError
from repapq_deploy.load import load_model
from repapq_deploy.reparam import FuseReport, fuse_model
from repapq_deploy.reparam.fuse import MAX_REL_ERROR


def _x(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def _count(module: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


def _adds(gm: fx.GraphModule) -> int:
    return sum(n.op == "call_function" and n.target in (operator.add, operator.iadd, torch.add)
               for n in gm.graph.nodes)


def _batchnorm_ops(gm: fx.GraphModule) -> list[str]:
    """Graph nodes that still normalize: BatchNorm modules, or F.batch_norm traced out of a custom BN module."""
    modules = dict(gm.named_modules())
    return [n.name for n in gm.graph.nodes
            if (n.op == "call_module" and isinstance(modules[n.target], nn.modules.batchnorm._BatchNorm))
            or (n.op == "call_function" and n.target in (F.batch_norm, torch.batch_norm))]


def _check_exact(model: nn.Module, gm: fx.GraphModule, report: FuseReport, x: torch.Tensor) -> None:
    """The report's claims, re-measured independently on fresh samples."""
    assert isinstance(gm, fx.GraphModule) and not gm.training
    assert 0 <= report.max_rel_error <= MAX_REL_ERROR
    assert report.bn_remaining == 0 and _count(gm, nn.BatchNorm2d) == 0
    assert report.convs_after == _count(gm, nn.Conv2d)
    assert report.params_after == sum(p.numel() for p in gm.parameters())
    assert report.params_before == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        ref, out = model(x), gm(x)
    assert float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    # the input-dependent part too (a deep random-BN net's logits can be nearly constant across inputs)
    ref_c, out_c = ref - ref.mean(0), out - out.mean(0)
    assert float(ref_c.abs().max()) > 0
    assert float((out_c - ref_c).abs().max()) <= 1e-2 * float(ref_c.abs().max())


def test_example_repvgg_nano(example_model: nn.Module, fused_example, calib_x: torch.Tensor) -> None:
    gm, report = fused_example
    assert report.samples == 32
    assert report.blocks_fused == {"reparameterize": 9}  # stem + 1 + 2 + 4 + 1 blocks
    assert report.convs_after == 9
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    assert _adds(gm) == 0  # single-branch: no add is left
    assert _batchnorm_ops(gm) == []
    _check_exact(example_model, gm, report, calib_x[32:64])


def test_fuse_leaves_the_input_model_untouched(make_model) -> None:
    model = make_model("repvgg_nano", seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_model(model, _x())
    after = model.state_dict()
    assert before.keys() == after.keys()  # still the multi-branch model: no reparam_conv added
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_repvgg_nano_random_bn(make_model) -> None:
    model = make_model("repvgg_nano", seed=1)
    gm, report = fuse_model(model, _x())
    assert report.convs_after == 9 and report.blocks_fused == {"reparameterize": 9}
    assert report.params_after < report.params_before
    assert _batchnorm_ops(gm) == []
    _check_exact(model, gm, report, _x(seed=5))


def test_mobileone_nano_random_bn(make_model) -> None:
    model = make_model("mobileone_nano")
    gm, report = fuse_model(model, _x())
    # stem + 7 blocks, each a depthwise and a pointwise MobileOne block
    assert report.blocks_fused == {"reparameterize": 15}
    assert report.convs_after == 15
    assert report.params_after < report.params_before
    assert _adds(gm) == 0
    assert _batchnorm_ops(gm) == []
    _check_exact(model, gm, report, _x(seed=5))


def test_repghostnet_random_bn(make_model) -> None:
    model = make_model("repghostnet_050")
    gm, report = fuse_model(model, _x())
    assert report.blocks_fused.get("reparameterize", 0) > 0
    assert report.bn_folded > 0  # the non-RepGhost convs' BatchNorms are folded on the graph
    assert report.params_after < report.params_before
    _check_exact(model, gm, report, _x(seed=5))


def test_repghostnet_has_no_batchnorm_left(make_model) -> None:
    model = make_model("repghostnet_050")
    gm, report = fuse_model(model, _x())
    assert report.bn_remaining == 0
    assert _batchnorm_ops(gm) == []


def test_resnet18_folds_every_batchnorm(resnet18_model: nn.Module, fused_resnet18) -> None:
    gm, report = fused_resnet18
    assert report.blocks_fused == {}
    assert report.bn_folded == 20 and report.convs_after == 20  # conv1 + 8 blocks x 2 + 3 downsamples
    assert report.branches_merged == 0  # residual adds are not parallel branches of one input
    assert _adds(gm) == 8
    assert report.macs_after == report.macs_before
    assert _batchnorm_ops(gm) == []
    _check_exact(resnet18_model, gm, report, _x(seed=5))


def test_graph_level_branch_merging_on_torch_export_archive(tmp_path: Path, make_model) -> None:
    """A torch.export archive has no reparameterize(): the branches are merged on the graph."""
    model = make_model("repvgg_nano", seed=2)
    path = tmp_path / "repvgg_nano.pt2"
    torch.export.save(torch.export.export(model, (_x(2),)), str(path))
    loaded = load_model(path)
    gm, report = fuse_model(loaded.module, _x())
    assert report.blocks_fused == {}
    assert report.branches_merged > 0
    assert report.convs_after == 9
    assert _adds(gm) == 0
    assert report.params_after < report.params_before
    assert _batchnorm_ops(gm) == []
    _check_exact(model, gm, report, _x(seed=5))


class _TwoBranch(nn.Module):
    """conv3x3(x) + conv1x1(x), with a ``reparameterize()`` that can be told to be wrong."""

    def __init__(self, wrong: bool = False, new_module: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv3 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(1, 4, 1)
        self.fused: nn.Conv2d | None = None
        self.wrong = wrong
        self.new_module = new_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        return self.conv3(x) + self.conv1(x)

    def reparameterize(self):
        fused = nn.Conv2d(1, 4, 3, padding=1)
        with torch.no_grad():
            fused.weight.copy_(self.conv3.weight)
            fused.bias.copy_(self.conv3.bias)
            if not self.wrong:  # the wrong version forgets the 1x1 branch
                fused.weight[:, :, 1:2, 1:2] += self.conv1.weight
                fused.bias += self.conv1.bias
        if self.new_module:
            return nn.Sequential(fused)
        self.fused = fused
        del self.conv3, self.conv1
        return None


def test_correct_custom_reparameterize_is_used() -> None:
    model = _TwoBranch().eval()
    gm, report = fuse_model(model, _x())
    assert report.blocks_fused == {"reparameterize": 1}
    assert report.convs_after == 1 and report.branches_merged == 0
    _check_exact(model, gm, report, _x(seed=5))


def test_wrong_reparameterize_is_caught() -> None:
    with pytest.raises(DeployError) as info:
        fuse_model(_TwoBranch(wrong=True).eval(), _x())
    message = str(info.value)
    assert "\n" not in message
    assert "max relative error" in message and f"{MAX_REL_ERROR:.0e}" in message


def test_reparameterize_returning_a_new_module_is_refused() -> None:
    with pytest.raises(DeployError) as info:
        fuse_model(_TwoBranch(new_module=True).eval(), _x())
    message = str(info.value)
    assert "\n" not in message and "_TwoBranch.reparameterize()" in message


def test_untraceable_model_is_refused() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y if y.sum() > 0 else -y  # data-dependent control flow: torch.fx cannot trace it

    with pytest.raises(DeployError) as info:
        fuse_model(DataDependent().eval(), _x())
    message = str(info.value)
    assert "\n" not in message and "torch.fx" in message


def test_graph_level_branch_merging_on_mobileone_export_archive(tmp_path: Path, make_model) -> None:
    model = make_model("mobileone_nano")
    path = tmp_path / "mobileone_nano.pt2"
    torch.export.save(torch.export.export(model, (_x(2),)), str(path))
    gm, report = fuse_model(load_model(path).module, _x())
    assert report.branches_merged > 0
    _check_exact(model, gm, report, _x(seed=5))  # asserts no BatchNorm is left
    assert report.convs_after == 15  # as with MobileOne's own reparameterize()


class _SameConv(nn.Conv2d):
    """TF-"same" padding as in the efficientnet-lite package: a Conv2d subclass with its own forward."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1) if self.stride[0] == 2 else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class _SamePadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = _SameConv(1, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn2 = _SameConv(8, 8, 3, groups=8, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Parameter(torch.randn(10, 8))  # a functional classifier: F.linear on a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn(self.stem(x)))
        x = x + F.relu6(self.bn2(self.dw(x)))
        x = F.relu6(F.conv2d(x, self.dw.weight, None, 1, 1, 1, 8))  # the same weight a second time
        return F.linear(x.mean((2, 3)), self.head)


def test_conv_subclass_with_its_own_forward_is_lifted_to_modules() -> None:
    from conftest import randomize_bn

    from repapq_deploy.calibrate.prepare import quantize_model
    from repapq_deploy.quant.scheme import QuantConfig

    torch.manual_seed(0)
    model = randomize_bn(_SamePadNet())
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    gm, report = fuse_model(model, x)
    # torch.fx traces into the subclass's forward; the bare F.conv2d / F.linear calls become modules
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (F.conv2d, F.linear)]
    layers = {n: type(m) for n, m in gm.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert layers == {"stem_lifted": nn.Conv2d, "dw_lifted": nn.Conv2d, "dw_lifted_1": nn.Conv2d, "lifted": nn.Linear}
    assert report.bn_folded == 2 and report.bn_remaining == 0 and report.max_rel_error <= MAX_REL_ERROR
    # the owners (still called for their padding) keep no second copy of the lifted weights
    assert {k.rpartition(".")[0] for k in gm.state_dict()} == set(layers)
    assert len(quantize_model(gm, QuantConfig("onnxruntime")).weight_layers) == 4  # all quantized


def _weight_only_error(gm: fx.GraphModule, x: torch.Tensor) -> float:
    """Relative logit error of ``gm`` with its conv/linear weights on the 8-bit per-channel min-max
    grid (activations in float)."""
    import copy

    q = copy.deepcopy(gm)
    with torch.no_grad():
        for m in q.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                s = m.weight.flatten(1).abs().amax(1).clamp_min(1e-12) / 127
                s = s.view(-1, *[1] * (m.weight.dim() - 1))
                m.weight.copy_((m.weight / s).round() * s)
        ref, out = gm(x), q(x)
    return float((out - ref).norm() / ref.norm())


def test_split_identity_is_exact_and_takes_the_identity_tap_off_the_weight_grid(fused_example, calib_x) -> None:
    import copy

    from repapq_deploy.reparam import split_identity

    gm, _ = fused_example
    split = copy.deepcopy(gm)
    n = split_identity(split)
    # the trained example's stride-1 blocks (1 + 3 in stages 2-3) carry an identity branch
    assert n == 4
    shortcuts = {k: m for k, m in split.named_modules() if k.endswith("_identity")}
    assert len(shortcuts) == n and all(m.groups == m.in_channels and m.kernel_size == (1, 1)
                                       for m in shortcuts.values())
    for name, short in shortcuts.items():
        conv, orig = split.get_submodule(name[:-len("_identity")]), gm.get_submodule(name[:-len("_identity")])
        c, k = orig.out_channels, orig.kernel_size[0] // 2
        idx = torch.arange(c)
        assert torch.equal(short.weight.flatten(), orig.weight[idx, idx, k, k])
        assert not conv.weight[idx, idx, k, k].any()
    x = calib_x[:32]
    with torch.no_grad():
        ref, out = gm(x), split(x)
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    # the point of the split: 8-bit weights cost far less (measured ~4x less on this model)
    assert _weight_only_error(split, x) < 0.5 * _weight_only_error(gm, x)


def test_split_identity_leaves_convs_without_a_dominant_identity_tap() -> None:
    from repapq_deploy.reparam import split_identity

    torch.manual_seed(0)
    convs = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.Conv2d(8, 16, 3, padding=1))
    gm = fx.symbolic_trace(convs)
    with torch.no_grad():  # a dominant centre diagonal, but stride 2 and 8->16 channels cannot carry it
        for conv in (convs[2], convs[3]):
            conv.weight[torch.arange(8), torch.arange(8), 1, 1] = 10.0
    assert split_identity(gm) == 0  # conv 0: random weights, no dominant centre tap
    with torch.no_grad():
        convs[0].weight[torch.arange(8), torch.arange(8), 1, 1] = 10.0
    gm = fx.symbolic_trace(convs)
    assert split_identity(gm) == 1 and _adds(gm) == 1
