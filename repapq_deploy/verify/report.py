"""Accuracy metrics and the human-readable report."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from repapq_deploy.progress import track


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


def render_markdown(report: dict) -> str:
    """``report.md``: the same facts as ``report.json``, for people."""
    acc, eng, lat, cal, fuse, exp = (report[k] for k in
                                     ("accuracy", "engine", "latency_ms", "calibration", "reparam", "export"))
    cfg = report["config"]
    lines = [
        f"# repapq-deploy report: `{cfg['model']}`",
        "",
        f"Profile **{cfg['profile']}**, W{cfg['bits']}A{cfg['bits']} (first/last layer "
        f"{cfg['first_last_bits']}-bit), method **{cal['method']}**, engine backend **{eng['backend']}**.",
        "",
        "## Accuracy",
        "",
        f"Evaluated on {acc['samples']} samples from `{report['data']['eval']}`"
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
        "![accuracy](accuracy.png)",
        "",
        "## Latency (p50, ms per batch)",
        "",
        "| batch | FP32 ONNX | engine | speed-up |",
        "| --- | --- | --- | --- |",
    ]
    for bs in ("bs1", "bs32"):
        f, e = lat["fp32"][bs], lat["engine"][bs]
        lines.append(f"| {bs[2:]} | {f:.3f} | {e:.3f} | {f / e:.2f}x |")
    lines += [
        "",
        f"Measured interleaved in one run on {report['hardware']['cpu']} "
        f"({report['hardware']['cores']} cores); both run in ONNX Runtime "
        f"{report['versions']['onnxruntime']}.",
        "",
        "![latency](latency.png)",
        "",
        "## Engine",
        "",
        f"- integer conv/gemm ops: {eng['integer_ops']} of {eng['integer_ops'] + eng['float_ops']} "
        f"(`int8_op_fraction` = {eng['int8_op_fraction']:.3f})",
    ]
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
        "",
        "## Export check",
        "",
        f"ONNX Runtime (all optimizations off) vs PyTorch fake-quant on {exp['check']['samples']} "
        f"calibration samples: top-1 agreement {exp['check']['agreement_top1']:.2f} %, max abs logit "
        f"difference {exp['check']['max_abs_diff']:.3g}.",
        "",
        "## Calibration",
        "",
        f"{cal['images']} images, {cal['seconds']:.1f} s, {cal['activation_quantizers']} activation and "
        f"{cal['weight_quantizers']} weight quantizers.",
    ]
    if report.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"
