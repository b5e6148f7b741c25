"""Method choice validated on held-out calibration images (``method="auto"``, the default).

A seeded part of the calibration images is held out. Every candidate is calibrated on the rest and
compared with the FP32 model on the held-out images, image by image (a kept range method is then
refitted on every image). Candidates are
ordered from the simplest (``minmax``) to the most flexible (reconstruction): a more flexible one is
kept only when it is closer to FP32 on the held-out images by more than ``MARGIN_SE`` paired standard
errors, so a method that fits its calibration images without generalising (RepAPQ on a few photos of
a 1000-class network, docs/benchmarks.md "Real pretrained weights") does not win by noise.

Reconstruction is a candidate only with at least ``RECONSTRUCTION_MIN_IMAGES`` calibration images (it
learns from them; with crops of a few photos, held-out crops of the same photos cannot reveal that it
over-fits) and when its estimated time fits the recipe's ``time_budget``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from repapq_deploy.calibrate.equalize_choice import Calibrated, calibrate_under, choose_equalization
from repapq_deploy.calibrate.prepare import quantize_model
from repapq_deploy.calibrate.reconstruct import PRESETS, RECONSTRUCTION
from repapq_deploy.calibrate.registry import calibrate
from repapq_deploy.progress import log
from repapq_deploy.quant.scheme import QuantConfig

AUTO = "auto"
# simplest first: a later candidate must beat the kept one by a clear margin
RANGE_CANDIDATES = ("minmax", "percentile", "mse")
RECONSTRUCTION_CANDIDATE = "repapq"
MARGIN_SE = 2.0
RECONSTRUCTION_MIN_IMAGES = 256
HOLDOUT_MIN_IMAGES = 8
# reconstruction time per iteration relative to one forward+backward pass of the whole fake-quant model
# over one batch (units run one after another; caching each unit's inputs adds the rest)
STEP_COST = 1.3


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, held out) of ``n`` calibration images: a seeded ``fraction`` held out, none when
    that would be fewer than ``HOLDOUT_MIN_IMAGES`` or leave fewer images to fit than to hold out."""
    held = int(round(n * fraction))
    if held < HOLDOUT_MIN_IMAGES or n - held < held:
        return np.arange(n), np.arange(0)
    order = np.random.default_rng(seed + 7919).permutation(n)  # independent of the calibration sample's draw
    return np.sort(order[held:]), np.sort(order[:held])


@dataclass
class Candidate:
    """One calibrated candidate and how close it is to FP32 on the held-out images."""

    method: str
    preset: str | None
    done: Calibrated
    equalize_auto: dict | None = None
    figures: dict = field(default_factory=dict)
    errors: np.ndarray | None = field(default=None, repr=False)  # per held-out image: 1 - logit cosine

    def to_dict(self) -> dict:
        return {"method": self.method, "preset": self.preset, **self.figures,
                "fit_seconds": self.done.result.seconds}


def held_out_figures(quantized: nn.Module, reference: nn.Module, x: torch.Tensor, batch_size: int = 64
                     ) -> tuple[dict, np.ndarray]:
    """Mean logit cosine, top-1 agreement and mean KL(FP32 || quantized) of ``quantized`` against
    ``reference`` on ``x``, and the per-image 1 - cosine."""
    outs, refs = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            outs.append(quantized(x[i:i + batch_size]).double())
            refs.append(reference(x[i:i + batch_size]).double())
    q, r = torch.cat(outs), torch.cat(refs)
    cos = torch.nn.functional.cosine_similarity(q, r, dim=1)
    kl = torch.nn.functional.kl_div(q.log_softmax(1), r.log_softmax(1), log_target=True, reduction="none").sum(1)
    figures = {"images": len(x), "cosine": float(cos.mean()),
               "agreement_top1": float((q.argmax(1) == r.argmax(1)).double().mean() * 100), "kl": float(kl.mean())}
    return figures, (1 - cos).numpy()


def paired_gain(better: np.ndarray, worse: np.ndarray) -> tuple[float, float]:
    """Mean per-image error reduction of ``better`` over ``worse`` and its standard error."""
    d = worse - better
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("inf")


def pick(candidates: list[Candidate]) -> tuple[Candidate, str]:
    """The simplest candidate that no later one beats by more than ``MARGIN_SE`` standard errors, and why."""
    kept, verdicts = candidates[0], []
    for c in candidates[1:]:
        gain, se = paired_gain(c.errors, kept.errors)
        if gain > MARGIN_SE * se:
            verdicts.append(f"{c.method} closer to FP32 than {kept.method} by {gain:.2e} ± {se:.2e}")
            kept = c
        else:
            verdicts.append(f"{c.method} not clearly closer than {kept.method} ({gain:+.2e} ± {se:.2e})")
    return kept, (f"kept {kept.method}; mean 1 - cosine on the held-out images, more than {MARGIN_SE:g} standard "
                  "errors needed: " + "; ".join(verdicts))


def estimate_reconstruction(qm_module: nn.Module, x: torch.Tensor, preset: str, overrides: dict,
                            batch_size: int, device: str = "cpu") -> float:
    """Seconds a reconstruction with ``preset`` would take on ``device``, from timing forward+backward
    passes of the calibrated fake-quant module ``qm_module`` there (left as it was, on the CPU)."""
    iters = {**PRESETS[preset], **overrides}.get("iters", PRESETS[preset]["iters"])
    batch = x[:batch_size].to(device)
    params = [p for p in qm_module.parameters()]
    flags = [p.requires_grad for p in params]
    qm_module.to(device)
    for p in params:
        p.requires_grad_(True)

    def step() -> None:
        qm_module(batch).float().abs().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    try:
        step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(2):
            step()
        per_step = (time.perf_counter() - t0) / 2
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.grad = None
            p.requires_grad_(flag)
        qm_module.cpu()
    return iters * per_step * STEP_COST


def _calibrate(method: str, fused: nn.Module, x: torch.Tensor, config: QuantConfig, equalize: str, batch_size: int,
               device: str, preset: str, seed: int, overrides: dict) -> tuple[Calibrated, dict | None]:
    """The calibrated model and, for ``equalize: auto`` over several modes, what that search found."""
    args = (fused, x, config, method, batch_size, device)
    kwargs = {"preset": preset, "seed": seed, "overrides": overrides}
    if equalize != "auto":
        return calibrate_under(equalize, *args, **kwargs), None
    done, tried, seconds = choose_equalization(*args, **kwargs)
    if not tried:
        return done, None
    log(f"  {method}: equalize auto: {done.mode} (relative logit error on the calibration images: "
        + ", ".join(f"{m} {e:.2e}" for m, e in tried.items()) + f"; {seconds:.1f} s)")
    # the search's seconds include the kept mode's calibration (the result's own "seconds")
    return done, {"mode": done.mode, "relative_logit_error": tried, "seconds": seconds}


def validated(fused: nn.Module, data: torch.Tensor, fit_idx: np.ndarray, held_idx: np.ndarray, config: QuantConfig,
              method: str, *, equalize: str, preset: str, overrides: dict, time_budget: float, batch_size: int,
              device: str, seed: int) -> tuple[Candidate, dict]:
    """Calibrate ``method`` (or, for ``auto``, every candidate) on the ``fit_idx`` images of ``data`` and
    compare on the ``held_idx`` ones.

    A kept range method is then refitted on every image (seconds; its statistics only gain from more
    images); a kept reconstruction stays as validated (refitting would double its time). Returns the
    kept candidate and the report section ``choice``: every candidate's held-out figures, the decision
    and why, and the warning for a named method that a range method beats.
    """
    fit, held = data[fit_idx], (data[held_idx] if len(held_idx) else None)
    t0 = time.perf_counter()

    def run(name: str, name_preset: str | None, extra: dict, x: torch.Tensor = fit) -> Candidate:
        done, searched = _calibrate(name, fused, x, config, equalize, batch_size, device, name_preset or preset,
                                    seed, extra)
        c = Candidate(name, name_preset, done, searched)
        if held is not None and x is fit:
            c.figures, c.errors = held_out_figures(done.qm.module, done.fused, held, batch_size)
        return c

    def probe() -> nn.Module:
        """A fake-quant model with min-max ranges from one batch: enough to time its passes."""
        qm = quantize_model(fused, config)
        calibrate(qm, fit[:batch_size], RANGE_CANDIDATES[0], batch_size)
        return qm.module

    kept, section = _decide(run, probe, fit, held, method, preset, overrides, time_budget, len(data), batch_size,
                            device)
    section["final_fit_images"] = len(fit)
    if held is not None and kept.method not in RECONSTRUCTION:
        refit = run(kept.method, kept.preset, {}, data)
        kept = Candidate(kept.method, kept.preset, refit.done, refit.equalize_auto, kept.figures, kept.errors)
        section["final_fit_images"] = len(data)
    section["seconds"] = time.perf_counter() - t0  # every candidate, the comparison and the refit
    return kept, section


def _decide(run, probe, fit: torch.Tensor, held: torch.Tensor | None, method: str, preset: str, overrides: dict,
            time_budget: float, images: int, batch_size: int, device: str) -> tuple[Candidate, dict]:
    """The candidate :func:`validated` keeps, calibrated on ``fit``, and the report section."""

    ranges = [run(m, None, {}) for m in RANGE_CANDIDATES] if method == AUTO or (
        method in RECONSTRUCTION and held is not None) else []
    section: dict = {"method": method, "fit_images": len(fit), "held_out_images": 0 if held is None else len(held)}
    notes: list[str] = []
    if method != AUTO:
        if method in RECONSTRUCTION:
            seconds = estimate_reconstruction(probe(), fit, preset, overrides, batch_size, device)
            log(f"  {method} ({preset}): about {seconds / 60:.1f} min here (estimated)")
        named = run(method, preset if method in RECONSTRUCTION else None, overrides if method in RECONSTRUCTION
                    else {})
        section["candidates"] = [c.to_dict() for c in [*ranges, named] if c.figures]
        if ranges:
            best_range, _ = pick(ranges)
            gain, se = paired_gain(best_range.errors, named.errors)
            if gain > MARGIN_SE * se:
                notes.append(f"method {method} is further from FP32 on the {len(held)} held-out calibration images "
                             f"than {best_range.method} (mean cosine {named.figures['cosine']:.4f} against "
                             f"{best_range.figures['cosine']:.4f}); consider method {best_range.method} or auto")
        section.update(chosen=method, reason="named by the user", warnings=notes)
        return named, section
    candidates = list(ranges)
    if images < RECONSTRUCTION_MIN_IMAGES:
        section["reconstruction"] = (f"not tried: {images} calibration images, fewer than the "
                                     f"{RECONSTRUCTION_MIN_IMAGES} it needs not to fit them")
    elif held is None:
        section["reconstruction"] = "not tried: too few images to hold any out for validating it"
    else:
        tried = _budgeted_preset(candidates[0], fit, preset, overrides, time_budget, batch_size, device)
        section["reconstruction"] = tried[1]
        if tried[0] is not None:
            candidates.append(run(RECONSTRUCTION_CANDIDATE, tried[0], overrides))
    kept, why = pick(candidates) if held is not None else (candidates[0], "minmax: no held-out images to validate "
                                                                          "a more flexible method on")
    section["candidates"] = [c.to_dict() for c in candidates if c.figures]
    section.update(chosen=kept.method, preset=kept.preset, reason=why, warnings=notes)
    log(f"  method auto: {kept.method} ({why})")
    return kept, section


def _budgeted_preset(calibrated: Candidate, fit: torch.Tensor, preset: str, overrides: dict, budget: float,
                     batch_size: int, device: str) -> tuple[str | None, str]:
    """The reconstruction preset that fits ``budget`` seconds (the recipe's, else ``fast``), and a note."""
    module = calibrated.done.qm.module
    for name in dict.fromkeys((preset, "fast")):
        seconds = estimate_reconstruction(module, fit, name, overrides, batch_size, device)
        if seconds <= budget:
            return name, f"tried with preset {name} (estimated {seconds:.0f} s, budget {budget:.0f} s)"
    return None, (f"not tried: estimated {seconds:.0f} s even with preset fast, over the time budget of "
                  f"{budget:.0f} s (recipe key time_budget)")
