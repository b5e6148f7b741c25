"""The accuracy budget (``max_drop``): raise the fewest quantized tensors to a higher precision until it holds.

The shortfall is the engine's top-1 drop against FP32 in pp on labelled evaluation data, otherwise
100 - its top-1 agreement with FP32 in %. When a build misses ``max_drop``, its quantized tensors are
ranked on held-out calibration images (``calibrate.fallback.rank``) and the first k are raised one
precision step; k doubles until the budget holds, then a bisection finds the fewest that hold. Every
step re-exports, rebuilds and verifies the engine; the report lists each step's raised layers,
accuracy and speed, with a plot of the trade-off. A budget that even every raised tensor cannot meet
ends in an error, with the closest build kept in the folder.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from repapq_deploy.calibrate.choice import holdout_split  # noqa: E402
from repapq_deploy.calibrate.fallback import rank, with_fallback  # noqa: E402
from repapq_deploy.calibrate.run import save_qstate  # noqa: E402
from repapq_deploy.errors import DeployError  # noqa: E402
from repapq_deploy.progress import log  # noqa: E402
from repapq_deploy.verify.report import write_report  # noqa: E402

BUDGET_PNG = "budget.png"


def shortfall(report: dict) -> float:
    """The engine's top-1 drop against FP32 (pp) with labels, else 100 - its agreement with FP32 (%)."""
    acc = report["accuracy"]
    return acc["drop"]["drop_pp"] if acc.get("drop") else 100.0 - acc["agreement_top1"]


def _step(k: int, names: list[str], layers: list[str], report: dict) -> dict:
    acc, lat = report["accuracy"], report["latency_ms"]
    return {"raised": k, "quantizers": names, "layers": layers, "shortfall": shortfall(report),
            "engine_top1": acc["engine"]["top1"], "agreement_top1": acc["agreement_top1"],
            "speedup": dict(lat["speedup"])}


def meet_budget(build, report: dict) -> dict:
    """Raise quantized tensors of ``build`` (a finished ``pipeline.Build``) until its report meets
    ``max_drop``; returns the final report (also written to the build folder)."""
    from repapq_deploy.pipeline import FALLBACK_QSTATE

    limit, metric = build.opts.max_drop, "top-1 drop (pp)" if report["accuracy"].get("drop") else \
        "100 - agreement with FP32 (%)"
    steps = [_step(0, [], [], report)]
    if steps[0]["shortfall"] <= limit:
        return _finish(build, report, limit, metric, steps, 0, [], met=True)
    base = build.qmodel
    x = build.calib_data.x
    held = holdout_split(len(x), build.recipe.holdout, build.opts.seed)[1]
    ranked = rank(base, build.fused, x[held] if len(held) else x, build.recipe.batch_size)
    names = [r["quantizer"] for r in ranked]
    log(f"budget: {metric} {steps[0]['shortfall']:.2f} > {limit:g}; {len(names)} quantizers ranked")
    results: dict[int, dict] = {}

    def attempt(k: int) -> dict:
        build._qm = with_fallback(base, names[:k])
        save_qstate(build._qm, report["calibration"]["method"], build.out / FALLBACK_QSTATE)
        build.fallback_active = True
        for stage in ("export", "engine", "verify"):
            result = getattr(build, stage)()
        layers = sorted({layer for r in ranked[:k] for layer in r["layers"]})
        results[k] = _step(k, names[:k], layers, result)
        log(f"budget: {k} raised -> {metric} {results[k]['shortfall']:.2f}")
        return result

    k, met = 1, None
    while k <= len(names):
        attempt(k)
        if results[k]["shortfall"] <= limit:
            met = k
            break
        if k == len(names):
            break
        k = min(2 * k, len(names))
    if met is not None:
        lo = max(r for r in results if r < met) if any(r < met for r in results) else 0
        while met - lo > 1:  # the fewest that hold
            mid = (lo + met) // 2
            attempt(mid)
            met, lo = (mid, lo) if results[mid]["shortfall"] <= limit else (met, mid)
    if not results:  # nothing left to raise
        _finish(build, report, limit, metric, steps, 0, [], met=False)
        raise DeployError(f"accuracy budget `max_drop` {limit:g} not met: {metric} {steps[0]['shortfall']:.2f} and "
                          f"no quantized tensor left to raise; the build is kept in {build.out}")
    keep = met if met is not None else min(results, key=lambda r: results[r]["shortfall"])
    # the folder holds the last attempt: rebuild the kept one unless it was the last
    final = build.results["verify"] if build._qm.config.fallback == tuple(names[:keep]) else attempt(keep)
    steps += [results[k] for k in sorted(results)]
    report = _finish(build, final, limit, metric, steps, keep, ranked[:keep], met=met is not None)
    if met is None:
        raise DeployError(f"accuracy budget `max_drop` {limit:g} not met: {metric} {results[keep]['shortfall']:.2f} "
                          f"at best, with {keep} of {len(names)} quantized tensors raised; that build is kept "
                          f"in {build.out} (report.md lists every step); loosen the budget or calibrate with "
                          f"more or better images")
    return report


def _finish(build, report: dict, limit: float, metric: str, steps: list[dict], keep: int, raised: list[dict],
            met: bool) -> dict:
    report["budget"] = {"max_drop": limit, "metric": metric, "met": met, "raised": keep,
                        "raised_quantizers": [r["quantizer"] for r in raised],
                        "raised_layers": sorted({layer for r in raised for layer in r["layers"]}),
                        "steps": steps}
    if len(steps) > 1:
        _plot(steps, limit, metric, build.out / BUDGET_PNG)
    write_report(report, build.backend.name, build.out)
    return report


def _plot(steps: list[dict], limit: float, metric: str, path: Path) -> None:
    """The trade-off: shortfall and batch-32 speed-up against the number of raised tensors."""
    from repapq_deploy.verify.plots import _save

    steps = sorted(steps, key=lambda s: s["raised"])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([s["raised"] for s in steps], [s["shortfall"] for s in steps], "o-", color="#2a7ab9")
    ax.axhline(limit, color="#c0392b", linestyle="--", linewidth=1)
    ax.set_xlabel("quantized tensors raised")
    ax.set_ylabel(metric, color="#2a7ab9")
    twin = ax.twinx()
    twin.plot([s["raised"] for s in steps], [s["speedup"].get("bs32", float("nan")) for s in steps], "s:",
              color="#8c8c8c")
    twin.set_ylabel("speed-up vs float, batch 32", color="#8c8c8c")
    fig.tight_layout()
    _save(fig, path)
