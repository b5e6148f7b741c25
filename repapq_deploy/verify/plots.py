"""PNG charts for the report: latency by batch size and the accuracy table as bars."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402

from repapq_deploy.artifacts import atomic_path  # noqa: E402

LATENCY_PNG, ACCURACY_PNG = "latency.png", "accuracy.png"


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)


def plot_latency(latency: dict, engine_name: str, path: Path) -> None:
    """Grouped bars: p50 latency of the float reference vs the engine per batch size, paired speed-up."""
    batches = sorted(latency["fp32"], key=lambda b: int(b[2:]))
    fig, axes = plt.subplots(1, len(batches), figsize=(3.2 * len(batches), 3.2))
    for ax, bs in zip(axes if len(batches) > 1 else [axes], batches, strict=True):
        values = [latency["fp32"][bs], latency["engine"][bs]]
        reference = "FP16 TensorRT" if latency.get("reference") == "tensorrt-fp16" else "FP32 ONNX"
        bars = ax.bar([reference, engine_name], values, color=["#8c8c8c", "#2a7ab9"])
        ax.bar_label(bars, fmt="%.3g ms", fontsize=8)
        ax.set_title(f"batch {bs[2:]}: {latency['speedup'][bs]:.2f}x", fontsize=9)
        ax.set_ylabel("p50 latency (ms)")
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_accuracy(accuracy: dict, path: Path) -> None:
    """Bars: top-1 of FP32, fake-quant and engine (or agreement when the data had no labels)."""
    labels = ["FP32", "fake-quant", "engine"]
    if accuracy["labelled"]:
        values = [accuracy[k]["top1"] for k in ("fp32", "fake_quant", "engine")]
        ylabel = "top-1 (%)"
    else:
        values = [100.0, accuracy["fake_quant"]["agreement_top1"], accuracy["agreement_top1"]]
        ylabel = "top-1 agreement with FP32 (%)"
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    bars = ax.bar(labels, values, color=["#8c8c8c", "#9cc3e0", "#2a7ab9"])
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    low = min(values)
    ax.set_ylim(max(0.0, low - max(2.0, (100 - low) * 0.5)), 100.0)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    _save(fig, path)
