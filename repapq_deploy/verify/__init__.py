"""Stage 6, verify: accuracy and latency parity of the engine against the FP32 model."""

from repapq_deploy.verify.plots import ACCURACY_PNG, LATENCY_PNG, plot_accuracy, plot_latency
from repapq_deploy.verify.report import accuracy_metrics, predict, render_markdown

__all__ = ["ACCURACY_PNG", "LATENCY_PNG", "accuracy_metrics", "plot_accuracy", "plot_latency", "predict",
           "render_markdown"]
