"""Reconstruction-based calibration: RepAPQ (QPRep + MAE + across-block calibration) and BRECQ-style.

RepAPQ (arXiv 2402.16121), as implemented here (every choice is documented in docs/method.md):

1. range initialisation: MAE clip search for activations (per tensor, exact zeros left out) and
   min-max for weights (per channel);
2. QPRep: a channel-wise affine ``eta * op(Q(x), Q(W)) + eps`` on every conv/linear output, learned
   with the quantizers and folded exactly into the weight scales and biases afterwards;
3. ABC: the network is cut into units (timm's stem / ``stages[i]`` / head, or cuts at spatial
   resolution changes); unit k is trained on the output of the already-calibrated quantized units
   1..k-1 against the FP32 output of unit k on the same images, so errors are corrected rather than
   compounded. Step sizes (LSQ-style straight-through gradients), eta and eps are trained jointly with
   Adam on the mean absolute error, with cosine decay.

``brecq`` is the classic baseline in the same machinery: one unit per weight layer (block-wise), MSE,
no affine, AdaRound (learned weight rounding) with fixed weight scales.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from repapq_deploy.calibrate.augment import augment
from repapq_deploy.calibrate.gptq import gptq_unit
from repapq_deploy.calibrate.methods import METHODS, set_ranges
from repapq_deploy.errors import ConfigError, DeployError
from repapq_deploy.progress import console, log
from repapq_deploy.quant.fakequant import ActQuantizer, QuantConv2d, QuantLinear
from repapq_deploy.quant.placement import FakeQuantModel, op_kind


@dataclass(frozen=True)
class ReconSettings:
    """One reconstruction recipe."""

    name: str
    init_act: str = "mae"
    # min-max, not MAE, for weights: an MAE clip search cuts the large centre tap that a fused
    # identity branch adds to RepVGG kernels (W6A6 fell to ~39 % that way; see docs/method.md)
    init_weight: str = "minmax"
    loss: str = "mae"  # mae | mse
    affine: bool = True  # QPRep
    learn_scales: bool = True  # LSQ step sizes
    granularity: str = "stage"  # stage (ABC) | block
    iters: int = 1000
    lr_affine: float = 1e-3
    lr_scale: float = 4e-5
    qdrop: float = 0.0
    # AdaRound: learn each weight's rounding direction; weight step sizes then stay fixed (as in
    # AdaRound/BRECQ) and only activation steps (and the affine, whose eta rescales channels) learn
    adaround: bool = False
    lr_round: float = 1e-3
    round_weight: float = 0.01  # BRECQ's lambda, relative to a loss summed over a sample's outputs
    round_warmup: float = 0.2  # fraction of the iterations before the rounding regulariser starts
    # learn the float weights themselves too (Adam lr; 0: frozen). Ignored with AdaRound, which learns
    # the rounding of fixed weights instead. The export quantizes the learned weights as usual.
    lr_weight: float = 0.0
    # hard-sample weighting: image i's loss is weighted 1 + hard_weight * exp(-m_i / hard_tau), m_i the
    # FP32 model's top-1 minus top-2 logit on it (label-free), so that the images whose top-1 a small
    # error flips count most; weights are normalised to mean 1. 0: every image alike.
    hard_weight: float = 0.0
    hard_tau: float = 1.0
    # margin-gradient weighting: element j of a unit's output is weighted (1 - margin_grad) +
    # margin_grad * |g_j| / mean|g|, g the gradient of the FP32 model's top-1 minus top-2 logit with
    # respect to that output (label-free): a first-order measure of how much an error there moves the
    # decision, in the spirit of BRECQ's Fisher weighting. 0: every element alike.
    margin_grad: float = 0.0
    # GPTQ (calibrate.gptq): round each unit's weights from their input moments before training it;
    # the weights and their step sizes then stay fixed (learned weights or steps would re-round them)
    # and the activation steps and the affine learn on top
    gptq: bool = False
    # extra views of the calibration images to reconstruct on (calibrate.augment; e.g. ("hflip",)):
    # more distinct inputs for the learned weights to fit without drawing more images
    augment: tuple[str, ...] = ()
    # parameter averaging ("soup"): train each unit this many times from the same starting point on
    # different batch draws and keep the mean of the learned parameters, which averages out what
    # one run fits to its own draw of batches. 1: a single run. Costs that many times the iterations.
    soup: int = 1
    # fold the QPRep affine into scales and biases at the end (off only to inspect the unfolded model)
    fold: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


RECONSTRUCTION: dict[str, ReconSettings] = {
    # weights fine-tuned too: W6A6 repvgg_a0 0.54 -> 0.30 pp (docs/method.md)
    "repapq": ReconSettings("repapq", lr_weight=1e-4),
    "brecq": ReconSettings("brecq", init_act="mse", init_weight="mse", loss="mse", affine=False,
                           granularity="block", adaround=True),
}
# Cached unit inputs/outputs above this size live in memory-mapped temporary files instead of RAM.
SPILL_BYTES = 1 << 30
MIN_SCALE = 1e-7  # FP16's smallest subnormal is 6e-8
PRESETS: dict[str, dict] = {
    "fast": {"iters": 200},
    "default": {"iters": 1000},
    "thorough": {"iters": 3000},
}


# --- units ------------------------------------------------------------------------------------------

_STAGE = re.compile(r"^(stem|stages\.\d+|layer\d+|features\.\d+)")


def _is_quantizer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules.get(node.target), ActQuantizer)


def _is_weighted(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules.get(node.target), (QuantConv2d, QuantLinear))


def _resolution_labels(gm: fx.GraphModule, nodes: list[fx.Node], sample: torch.Tensor) -> dict[str, str]:
    """Stages found by tracing: a new unit at every change of spatial resolution; the head is what
    follows the last 4-D tensor."""
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(sample)
    modules = dict(gm.named_modules())
    labels, current, resolution = {}, "stem", None
    for node in nodes:
        if op_kind(node, modules) == "pad":
            # explicit padding (TF "same") only widens the map for the conv that follows: not a stage
            labels[node.name] = current
            continue
        meta = node.meta.get("tensor_meta")
        shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()
        if len(shape) == 4 and shape[-2:] != resolution:
            current = "stem" if resolution is None else f"resolution_{shape[-2]}x{shape[-1]}"
            resolution = shape[-2:]
        elif len(shape) != 4 and resolution is not None:
            current = "head"
        labels[node.name] = current
    return labels


def unit_labels(gm: fx.GraphModule, granularity: str, sample: torch.Tensor) -> dict[str, str]:
    """Label every compute node with the unit it belongs to.

    ``stage``: timm-style module paths (``stem``, ``stages.i``/``layerN``...; what follows the last
    stage is the head), or resolution changes found by tracing when the model has no such names.
    ``block``: one unit per weight layer with the ops that follow it. A quantizer belongs to the unit
    of the layer that reads it, since its scale is learned there.
    """
    modules = dict(gm.named_modules())
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    compute = [n for n in nodes if not _is_quantizer(n, modules)]
    labels: dict[str, str] = {}
    current, seen_stage = "stem", False
    for node in compute:
        if granularity == "block":
            if _is_weighted(node, modules):
                current = node.target
        elif node.op == "call_module":
            m = _STAGE.match(node.target)
            if m and m.group(1) != "stem":
                seen_stage = True
            current = m.group(1) if m else ("head" if seen_stage else "stem")
        labels[node.name] = current
    if granularity == "stage" and not seen_stage:
        labels = _resolution_labels(gm, compute, sample)
    for node in reversed(nodes):
        if _is_quantizer(node, modules):
            users = [u for u in node.users if u.name in labels]
            labels[node.name] = labels[users[0].name] if users else current
    return labels


@dataclass
class Unit:
    """A contiguous piece of the graph with one input tensor and one output tensor."""

    name: str
    module: fx.GraphModule
    input_node: str
    output_node: str


def split_units(gm: fx.GraphModule, labels: dict[str, str]) -> list[Unit]:
    """Cut the graph into single-input, single-output units in topological order.

    Runs of equal labels are merged with the next run when they have more than one external input
    or more than one output used later (e.g. a residual that crosses the cut).
    """
    nodes = [n for n in gm.graph.nodes if n.name in labels]
    runs: list[list[fx.Node]] = []
    for node in nodes:
        if runs and labels[runs[-1][-1].name] == labels[node.name]:
            runs[-1].append(node)
        else:
            runs.append([node])
    units: list[Unit] = []
    pending: list[fx.Node] = []
    for i, run in enumerate(runs):
        pending += run
        inside = {n.name for n in pending}
        external = {a.name for n in pending for a in n.all_input_nodes if a.name not in inside}
        used_later = [n for n in pending if any(u.name not in inside for u in n.users)]
        last = i == len(runs) - 1
        if not last and (len(external) != 1 or len(used_later) != 1 or used_later[0] is not pending[-1]):
            continue
        if len(external) != 1:
            raise DeployError("reconstruction needs a graph with one input; this model has several")
        units.append(_subgraph(gm, pending, next(iter(external)), labels[pending[0].name]))
        pending = []
    return units


def _subgraph(gm: fx.GraphModule, nodes: list[fx.Node], input_name: str, name: str) -> Unit:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {input_name: graph.placeholder("x")}
    for node in nodes:
        env[node.name] = graph.node_copy(node, lambda n: env[n.name])
    graph.output(env[nodes[-1].name])
    return Unit(name, fx.GraphModule(gm, graph, f"unit_{name.replace('.', '_')}"), input_name, nodes[-1].name)


# --- training ---------------------------------------------------------------------------------------

def _weight_layers(unit: Unit) -> list[QuantConv2d | QuantLinear]:
    return [m for m in unit.module.modules() if isinstance(m, (QuantConv2d, QuantLinear))]


def _unit_params(unit: Unit, settings: ReconSettings) -> dict[str, list[nn.Parameter]]:
    """The unit's trainable parameters by group: step sizes, affine, AdaRound rounding, weights."""
    params: dict[str, list[nn.Parameter]] = {"scales": [], "affine": [], "rounding": [], "weights": []}
    for m in unit.module.modules():
        if isinstance(m, ActQuantizer) and settings.learn_scales:
            params["scales"].append(m.scale)
    for m in _weight_layers(unit):
        if settings.adaround:
            m.weight_quantizer.enable_adaround(m.weight)
            params["rounding"].append(m.weight_quantizer.alpha)
        elif settings.learn_scales and not settings.gptq:
            params["scales"].append(m.weight_quantizer.scale)
        if settings.lr_weight > 0 and not settings.adaround and not settings.gptq:
            params["weights"].append(m.weight)
        if m.has_affine:
            params["affine"] += [m.eta, m.eps]
    return params


def _rounding_penalty(unit: Unit, step: int, settings: ReconSettings) -> torch.Tensor | None:
    """AdaRound's regulariser sum(1 - |2h - 1|^beta), beta annealed from 20 to 2 after the warm-up."""
    start = int(settings.round_warmup * settings.iters)
    if step < start:
        return None
    beta = 2 + 18 * (1 - (step - start) / max(1, settings.iters - start))
    return sum((1 - (2 * m.weight_quantizer.rounding() - 1).abs().pow(beta)).sum() for m in _weight_layers(unit))


def _loss(pred: torch.Tensor, target: torch.Tensor, kind: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute (or squared) error; ``weight`` per image (1-D) or per element (the shape of ``pred``)."""
    diff = pred - target
    err = diff.abs() if kind == "mae" else diff.pow(2)
    if weight is None:
        return err.mean()
    if weight.dim() == 1:
        weight = weight.view(-1, *([1] * (err.dim() - 1)))
    return (err * weight).mean()


@torch.no_grad()
def sample_weights(module: nn.Module, data: torch.Tensor, settings: ReconSettings, batch_size: int,
                   device: str) -> torch.Tensor | None:
    """Per-image loss weights of the hard-sample weighting (``ReconSettings.hard_weight``), or None."""
    if settings.hard_weight <= 0:
        return None
    logits = _forward_all(module, data, batch_size, device)
    top2 = logits.flatten(1).topk(2, dim=1).values
    w = 1 + settings.hard_weight * torch.exp(-(top2[:, 0] - top2[:, 1]) / settings.hard_tau)
    return w / w.mean()


def _allocate(shape: tuple[int, ...], spill_dir: Path | None) -> torch.Tensor:
    """An empty float32 tensor; larger than :data:`SPILL_BYTES`, a float16 memory-mapped file in
    ``spill_dir`` (read back as float32 batch by batch). Its pages count in the process's resident
    memory once touched, so float16 halves that as well as the disk; its rounding (2^-11 relative) is an
    eighth of an 8-bit grid step."""
    if spill_dir is not None and math.prod(shape) * 4 > SPILL_BYTES:
        fd, name = tempfile.mkstemp(suffix=".npy", dir=spill_dir)
        os.close(fd)
        return torch.from_numpy(np.lib.format.open_memmap(name, mode="w+", dtype=np.float16, shape=shape))
    return torch.empty(shape)


def margin_weights(units: list[Unit], data: torch.Tensor, settings: ReconSettings, batch_size: int,
                   device: str, spill_dir: Path | None = None) -> list[torch.Tensor] | None:
    """Per-element loss weights of every unit's output for the margin-gradient weighting
    (``ReconSettings.margin_grad``), or None. Run with the quantizers off (the FP32 model)."""
    if settings.margin_grad <= 0:
        return None
    out: list[torch.Tensor] = []
    for i in range(0, len(data), batch_size):
        h = data[i:i + batch_size].to(device).requires_grad_(True)
        outputs = []
        with torch.enable_grad():
            for unit in units:
                h = unit.module(h)
                h.retain_grad()
                outputs.append(h)
            if h.dim() != 2 or h.shape[1] < 2:
                raise DeployError("margin-gradient weighting needs a classifier (logits of shape N x classes); "
                                  "leave margin_grad at 0 for this model")
            top2 = h.detach().topk(2, dim=1).indices
            (h.gather(1, top2[:, :1]) - h.gather(1, top2[:, 1:])).sum().backward()
        for k, o in enumerate(outputs):
            if i == 0:
                out.append(_allocate((len(data), *o.shape[1:]), spill_dir))
            out[k][i:i + len(o)] = o.grad.abs().cpu()
    lam = settings.margin_grad
    for w in out:
        mean = float(w.double().mean())
        # a unit whose output never reaches the margin (a dead branch) keeps uniform weights
        w.mul_(lam / mean if mean > 0 else 0.0).add_(1 - lam if mean > 0 else 1.0)
    return out


@torch.no_grad()
def _forward_all(module: nn.Module, x: torch.Tensor, batch_size: int, device: str,
                 spill_dir: Path | None = None) -> torch.Tensor:
    """``module`` applied to all of ``x`` in batches. Outputs larger than :data:`SPILL_BYTES` go to a
    memory-mapped file in ``spill_dir`` (1024 images of a 224x224 stem output are several GB)."""
    first = module(x[:batch_size].to(device, torch.float32)).cpu()  # also gives the output shape
    out = _allocate((len(x), *first.shape[1:]), spill_dir)
    out[:len(first)] = first
    for i in range(batch_size, len(x), batch_size):
        out[i:i + batch_size] = module(x[i:i + batch_size].to(device, torch.float32)).cpu()
    return out


@torch.no_grad()
def _mean_loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str, batch_size: int = 256) -> float:
    """Mean absolute error of ``module(x)`` against ``y``, batch by batch (nothing the size of ``y`` is made)."""
    total = 0.0
    for i in range(0, len(x), batch_size):
        pred = module(x[i:i + batch_size].to(device, torch.float32))
        total += float((pred - y[i:i + batch_size].to(device, torch.float32)).abs().sum())
    return total / y.numel()


def _train_unit(unit: Unit, x_q: torch.Tensor, y_fp: torch.Tensor, settings: ReconSettings,
                batch_size: int, device: str, generator: torch.Generator,
                weights: torch.Tensor | None = None, elements: torch.Tensor | None = None) -> tuple[float, float]:
    """Train one unit; ``weights`` per image, ``elements`` per element of its output (either may be None)."""
    module = unit.module
    before = _mean_loss(module, x_q, y_fp, device)
    params = _unit_params(unit, settings)
    trained = [p for group in params.values() for p in group]
    # each step size with its upper limit (a ReLU6 bound; see ActQuantizer.max_scale)
    limits = {id(m.scale): m.max_scale for m in module.modules() if isinstance(m, ActQuantizer)}
    scales = [(p, limits.get(id(p), math.inf)) for p in params["scales"]]
    if not trained or settings.iters == 0:
        for m in _weight_layers(unit):
            m.bake_adaround()
        return before, before
    for p in trained:
        p.requires_grad_(True)
    lrs = {"scales": settings.lr_scale, "affine": settings.lr_affine, "rounding": settings.lr_round,
           "weights": settings.lr_weight}
    groups = [{"params": ps, "lr": lrs[k]} for k, ps in params.items() if ps]
    for m in module.modules():
        if isinstance(m, ActQuantizer):
            m.drop_prob = settings.qdrop
    module.train()
    start = [p.detach().clone() for p in trained]
    learned = [torch.zeros_like(p) for p in trained]
    for run in range(settings.soup):
        with torch.no_grad():
            for p, p0 in zip(trained, start, strict=True):
                p.copy_(p0)
        label = f"{settings.name} {unit.name}" + (f" ({run + 1}/{settings.soup})" if settings.soup > 1 else "")
        _optimize(unit, x_q, y_fp, settings, params, scales, groups, label, before, batch_size, device,
                  generator, weights, elements)
        with torch.no_grad():
            for total, p in zip(learned, trained, strict=True):
                total += p / settings.soup
    with torch.no_grad():
        for p, mean in zip(trained, learned, strict=True):
            p.copy_(mean)
    module.eval()
    for m in module.modules():
        if isinstance(m, ActQuantizer):
            m.drop_prob = 0.0
    for p in trained:
        p.requires_grad_(False)
    for m in _weight_layers(unit):
        m.bake_adaround()
    after = _mean_loss(module, x_q, y_fp, device)
    return before, after


def _optimize(unit: Unit, x_q: torch.Tensor, y_fp: torch.Tensor, settings: ReconSettings,
              params: dict[str, list[nn.Parameter]], scales: list[tuple[nn.Parameter, float]], groups: list[dict],
              label: str, before: float, batch_size: int, device: str, generator: torch.Generator,
              weights: torch.Tensor | None, elements: torch.Tensor | None) -> None:
    """One run of Adam with cosine decay over the unit's parameters (fresh optimiser state per run)."""
    module = unit.module
    # BRECQ weighs the rounding term against a loss summed over a sample's outputs; ours is a mean
    round_weight = settings.round_weight / y_fp[0].numel()
    opt = torch.optim.Adam([dict(g) for g in groups])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / settings.iters)))
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("loss {task.fields[loss]:.4g}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=settings.iters, loss=before)
        for step in range(settings.iters):
            idx = torch.randint(0, len(x_q), (min(batch_size, len(x_q)),), generator=generator)
            w = None if weights is None else weights[idx].to(device)
            if elements is not None:
                e = elements[idx].to(device, torch.float32)
                w = e if w is None else e * w.view(-1, *([1] * (e.dim() - 1)))
            target = y_fp[idx].to(device, torch.float32)
            loss = _loss(module(x_q[idx].to(device, torch.float32)), target, settings.loss, w)
            penalty = _rounding_penalty(unit, step, settings) if params["rounding"] else None
            total = loss if penalty is None else loss + round_weight * penalty
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for p, most in scales:
                    # positive, and representable in the FP16 graphs TensorRT builds from
                    p.clamp_(min=MIN_SCALE, max=most)
            if step % 10 == 0:
                progress.update(task, completed=step + 1, loss=float(loss.detach()))


def check_settings(settings: ReconSettings) -> None:
    """Refuse option combinations that contradict each other."""
    if settings.gptq and settings.adaround:
        raise ConfigError("`gptq` and `adaround` both choose the weight rounding; use one (`adaround` off)")
    if settings.soup < 1:
        raise ConfigError(f"soup {settings.soup}: the number of runs averaged per unit; use 1 or more")
    if settings.soup > 1 and settings.adaround:
        raise ConfigError("soup averages learned parameters, but AdaRound's rounding is a hard 0/1 choice "
                          "per weight; use soup with `adaround` off")
    if not 0 <= settings.margin_grad <= 1:
        raise ConfigError(f"margin_grad {settings.margin_grad}: a mix between uniform (0) and fully "
                          f"margin-weighted (1) loss; use a value in [0, 1]")


def check_recipe(method: str, overrides: dict) -> None:
    """Refuse reconstruction options (``overrides`` of :class:`ReconSettings` fields) that do not apply
    to ``method`` or contradict each other; cheap, so a build can check before any stage runs."""
    if method not in RECONSTRUCTION:
        if overrides:
            option = {"augment": "calib_augment"}.get(next(iter(overrides)), next(iter(overrides)))
            raise ConfigError(f"`{option}` applies to reconstruction methods "
                              f"({', '.join(RECONSTRUCTION)}), not `method` {method}")
        return
    check_settings(replace(RECONSTRUCTION[method], **overrides))


def reconstruct(qm: FakeQuantModel, data: torch.Tensor, base: ReconSettings, preset: str, batch_size: int,
                device: str, seed: int, overrides: dict | None = None) -> dict:
    """Calibrate ``qm`` on ``data`` with a reconstruction recipe: ``base``, then ``preset``'s effort, then
    ``overrides`` (the recipe's own settings win over the preset); returns details for the report."""
    if preset not in PRESETS:
        raise ConfigError(f"`preset` {preset}: choose one of {', '.join(PRESETS)}")
    settings = replace(base, **{**PRESETS[preset], **(overrides or {})})
    check_settings(settings)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    data = augment(data, settings.augment, seed)
    set_ranges(qm, data, METHODS[settings.init_act], METHODS[settings.init_weight], batch_size, device)
    if settings.affine:
        for layer in qm.weight_layers.values():
            layer.enable_affine()
    gm = qm.module.to(device)
    # only what a unit trains gets gradients (frozen float weights need none: less work per step)
    gm.requires_grad_(False)
    units = split_units(gm, unit_labels(gm, settings.granularity, data[:1].to(device)))
    qm.set_mode("off")
    weights = sample_weights(gm, data, settings, batch_size, device)
    log(f"  {settings.name}: {len(units)} units ({', '.join(u.name for u in units)}), "
        f"{settings.iters} iterations each")
    x_q = data  # input of the current unit under the quantized model
    x_fp = data  # the same under the FP32 model
    per_unit = []
    with tempfile.TemporaryDirectory(prefix="repapq-") as spill:
        elements = margin_weights(units, data, settings, batch_size, device, Path(spill)) or [None] * len(units)
        for unit, unit_elements in zip(units, elements, strict=True):
            qm.set_mode("off")
            y_fp = _forward_all(unit.module, x_fp, batch_size, device, Path(spill))
            qm.set_mode("quant")
            if settings.gptq:
                gptq_unit(unit.module, x_q, batch_size, device)
            before, after = _train_unit(unit, x_q, y_fp, settings, batch_size, device, generator, weights,
                                        unit_elements)
            per_unit.append({"unit": unit.name, "mae_before": before, "mae_after": after})
            x_q = _forward_all(unit.module, x_q, batch_size, device, Path(spill))
            x_fp = y_fp
        del x_q, x_fp, y_fp, elements, unit_elements  # release the memory maps before their files go
    qm.module.cpu()
    if settings.fold:
        qm.fold_affine()
    return {"settings": settings.to_dict(), "preset": preset, "units": per_unit, "samples": len(data),
            "reconstruction_seconds": time.perf_counter() - t0}
