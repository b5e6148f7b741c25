"""Accuracy metrics and the human-readable report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from repapq_deploy.artifacts import write_json, write_text
from repapq_deploy.progress import track
from repapq_deploy.verify.plots import ACCURACY_PNG, LATENCY_PNG, plot_accuracy, plot_latency

REPORT_JSON, REPORT_MD = "report.json", "report.md"
REPORT_FILES = (REPORT_JSON, REPORT_MD, LATENCY_PNG, ACCURACY_PNG)


def predict(fn: Callable[[np.ndarray], np.ndarray], x: torch.Tensor, description: str,
            batch_size: int = 64) -> np.ndarray:
    """Logits of ``fn`` on ``x`` in batches, with a progress bar."""
    batches = range(0, len(x), batch_size)
    return np.concatenate([fn(x[i:i + batch_size].numpy()) for i in track(batches, description, len(batches))])


def _top1(logits: np.ndarray, labels: np.ndarray | None) -> float | None:
    return None if labels is None else float((logits.argmax(1) == labels).mean() * 100)


def paired_drop(fp32: np.ndarray, engine: np.ndarray, labels: np.ndarray) -> dict:
    """The engine's top-1 drop against FP32 on the same images, with its standard error.

    The drop is (lost - gained) / n, where ``lost`` images FP32 got right and the engine got wrong and
    ``gained`` the reverse; only those images carry information, so the paired standard error
    sqrt(lost + gained - (lost - gained)^2 / n) / n says which drops are distinguishable from zero.
    """
    right_fp32, right_engine = fp32.argmax(1) == labels, engine.argmax(1) == labels
    lost, gained, n = int((right_fp32 & ~right_engine).sum()), int((~right_fp32 & right_engine).sum()), len(labels)
    se = np.sqrt(max(lost + gained - (lost - gained) ** 2 / n, 0.0)) / n
    return {"lost": lost, "gained": gained, "drop_pp": (lost - gained) / n * 100, "drop_se_pp": float(se * 100)}


def accuracy_metrics(fp32: np.ndarray, fake_quant: np.ndarray, engine: np.ndarray,
                     labels: np.ndarray | None) -> dict:
    """Top-1 of the three models, the engine's paired drop, engine-vs-FP32 agreement and mean logit cosine."""
    a = fp32.astype(np.float64)
    b = engine.astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {
        "fp32": {"top1": _top1(fp32, labels)},
        "fake_quant": {"top1": _top1(fake_quant, labels),
                       "agreement_top1": float((fp32.argmax(1) == fake_quant.argmax(1)).mean() * 100)},
        "engine": {"top1": _top1(engine, labels)},
        "drop": None if labels is None else paired_drop(fp32, engine, labels),
        "agreement_top1": float((fp32.argmax(1) == engine.argmax(1)).mean() * 100),
        "fake_quant_engine_agreement_top1": float((fake_quant.argmax(1) == engine.argmax(1)).mean() * 100),
        "cosine": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "samples": int(len(fp32)),
        "labelled": labels is not None,
    }


def _fmt(v, suffix: str = "", digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}{suffix}"


REFERENCE_LABELS = {"onnxruntime-fp32": "FP32 ONNX (ONNX Runtime)", "tensorrt-fp16": "FP16 engine (TensorRT)"}


def slower_note(speedup: dict, flops: int | None) -> str | None:
    """Why an engine slower than its float reference is expected on a tiny model, or None."""
    if not speedup or min(speedup.values()) >= 1.0:
        return None
    size = f" ({flops / 1e6:.1f} MFLOPs per image)" if flops else ""
    return (f"the engine is slower than its float reference here: on a model this small{size} the cost of "
            "quantizing and dequantizing activations outweighs the faster integer arithmetic; INT8 pays on "
            "larger models and inputs (docs/benchmarks.md, speed)")


def render_markdown(report: dict) -> str:
    """``report.md``: the same facts as ``report.json``, for people (also for reports of the Python API,
    which carry no file names or hardware)."""
    acc, eng, lat, cal, fuse = (report[k] for k in ("accuracy", "engine", "latency_ms", "calibration", "reparam"))
    exp, cfg, data = report.get("export"), report.get("config", {}), report.get("data") or {}
    bits, flb = cfg.get("bits"), cfg.get("first_last_bits")
    reference = REFERENCE_LABELS.get(lat.get("reference"), "FP32 ONNX (ONNX Runtime)")
    lines = [
        f"# repapq-deploy report: `{cfg.get('model', 'in-memory model')}`",
        "",
        f"Profile **{cfg.get('profile')}**, W{bits}A{bits} (first/last layer {flb}-bit), method "
        f"**{cal['method']}**, engine backend **{eng['backend']}**.",
        "",
        "## Accuracy",
        "",
        f"Evaluated on {acc['samples']} samples" + (f" from `{data['eval']}`" if data.get("eval") else "")
        + ("" if acc["labelled"] else " (no labels: agreement only)") + ".",
        "",
        "| model | top-1 % |",
        "| --- | --- |",
        f"| FP32 PyTorch | {_fmt(acc['fp32']['top1'])} |",
        f"| fake-quant PyTorch | {_fmt(acc['fake_quant']['top1'])} |",
        f"| engine ({eng['backend']}) | {_fmt(acc['engine']['top1'])} |",
        "",
        *([f"Engine vs FP32 on the same images: {acc['drop']['drop_pp']:+.2f} pp drop "
           f"(± {acc['drop']['drop_se_pp']:.2f} pp standard error; {acc['drop']['lost']} images lost, "
           f"{acc['drop']['gained']} gained).", ""] if acc.get("drop") else []),
        f"Top-1 agreement engine vs FP32: **{_fmt(acc['agreement_top1'])} %**; mean logit cosine "
        f"{acc['cosine']:.5f} (min {acc['cosine_min']:.5f}).",
        "",
        *(["![accuracy](accuracy.png)", ""] if data else []),
        "## Latency (p50, ms per batch)",
        "",
        f"| batch | {reference} | engine | speed-up |",
        "| --- | --- | --- | --- |",
    ]
    for bs in lat["engine"]:
        lines.append(f"| {bs[2:]} | {lat['fp32'][bs]:.3f} | {lat['engine'][bs]:.3f} | {lat['speedup'][bs]:.2f}x |")
    hw = report.get("hardware")
    lines += ["", "The two are timed interleaved in one run; the speed-up is the median of their per-iteration "
              "time ratios" + (f", on {hw['gpu'] or hw['cpu']} ({hw['cores']} CPU cores)." if hw else ".")]
    note = slower_note(lat["speedup"], fuse.get("flops_after"))
    if note:
        lines += ["", f"Note: {note}."]
    lines += [*(["", "![latency](latency.png)"] if data else []), "", "## Engine", ""]
    if eng.get("int8_op_fraction") is not None:
        lines.append(f"- conv/gemm ops running as integer kernels: {eng['integer_ops']} of "
                     f"{eng['integer_ops'] + eng['float_ops']} (`int8_op_fraction` = {eng['int8_op_fraction']:.3f})")
    else:
        lines.append(f"- reference execution (float kernels between Q/DQ pairs): no integer kernels to count; "
                     f"conv/gemm ops with quantized inputs: `qdq_coverage` = {eng.get('qdq_coverage') or 0:.3f}")
    lines += [f"- note: {n}" for n in eng.get("notes", [])]
    lines += [
        "",
        "## Reparameterization",
        "",
        f"- blocks fused: {fuse['blocks_fused'] or 'none'}; BatchNorm folded: {fuse['bn_folded']}; "
        f"branches merged on the graph: {fuse['branches_merged']}",
        f"- parameters {fuse['params_before']:,} -> {fuse['params_after']:,}; FLOPs/image "
        f"{fuse['flops_before']:,} -> {fuse['flops_after']:,} (2 x MACs of convs and linears)",
        f"- exactness on {fuse['samples']} samples: max relative error {fuse['max_rel_error']:.2e} "
        f"(limit 1e-4)",
    ]
    if exp:
        lines += [
            "",
            "## Export check",
            "",
            f"ONNX Runtime (all optimizations off) vs PyTorch fake-quant on {exp['check']['samples']} "
            f"calibration samples: top-1 agreement {exp['check']['agreement_top1']:.2f} %, max abs logit "
            f"difference {exp['check']['max_abs_diff']:.3g}.",
        ]
    lines += [
        "",
        "## Calibration",
        "",
        f"{cal['images']} images, {cal['seconds']:.1f} s, {cal['activation_quantizers']} activation and "
        f"{cal['weight_quantizers']} weight quantizers.",
        *_choice_lines(cal.get("choice")),
    ]
    lines += _budget_lines(report.get("budget"))
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def _budget_lines(budget: dict | None) -> list[str]:
    """report.md's account of the accuracy budget and the precision fallback steps."""
    if not budget:
        return []
    lines = ["", "## Accuracy budget", "",
             f"`max_drop` {budget['max_drop']:g} on {budget['metric']}: **{'met' if budget['met'] else 'NOT met'}** "
             f"with {budget['raised']} quantized tensor(s) raised one precision step."]
    if budget["raised_layers"]:
        lines.append(f"Raised layers: {', '.join(f'`{n}`' for n in budget['raised_layers'])}.")
    if len(budget["steps"]) > 1:
        lines += ["", "| tensors raised | shortfall | engine top-1 % | agreement % | speed-up bs1 | speed-up bs32 |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for s in sorted(budget["steps"], key=lambda s: s["raised"]):
            top1 = "n/a" if s["engine_top1"] is None else f"{s['engine_top1']:.2f}"
            speed = s["speedup"]
            lines.append(f"| {s['raised']} | {s['shortfall']:.2f} | {top1} | {s['agreement_top1']:.2f} | "
                         f"{speed.get('bs1', float('nan')):.2f}x | {speed.get('bs32', float('nan')):.2f}x |")
        lines += ["", "![budget](budget.png)"]
    return lines


def _choice_lines(choice: dict | None) -> list[str]:
    """report.md's account of the method choice on held-out calibration images."""
    if not choice:
        return []
    lines = ["", f"Method `{choice['method']}`: candidates fitted on {choice['fit_images']} calibration images, "
             f"{choice['held_out_images']} held out to compare with FP32; the kept one is fitted on "
             f"{choice.get('final_fit_images', choice['fit_images'])}."]
    if choice.get("candidates"):
        lines += ["", "| candidate | held-out cosine | agreement % | KL | fit s |", "| --- | --- | --- | --- | --- |"]
        for c in choice["candidates"]:
            name = c["method"] + (f" ({c['preset']})" if c.get("preset") else "")
            lines.append(f"| {name} | {c['cosine']:.5f} | {c['agreement_top1']:.1f} | {c['kl']:.2e} | "
                         f"{c['fit_seconds']:.1f} |")
    took = f" ({choice['seconds']:.0f} s for every candidate)" if "seconds" in choice else ""
    lines += ["", f"Chosen: **{choice['chosen']}**{took}: {choice['reason']}."]
    if choice.get("reconstruction"):
        lines.append(f"Reconstruction: {choice['reconstruction']}.")
    return lines


def write_report(report: dict, engine_name: str, out: Path) -> None:
    """Write ``report.json``, ``report.md`` and the two plots into ``out`` (each atomically)."""
    plot_latency(report["latency_ms"], engine_name, out / LATENCY_PNG)
    plot_accuracy(report["accuracy"], out / ACCURACY_PNG)
    write_json(out / REPORT_JSON, report)
    write_text(out / REPORT_MD, render_markdown(report))
