"""Stage 6, verify: accuracy and latency parity of the engine against the FP32 model."""

from repapq_deploy.verify.report import accuracy_metrics, predict, render_markdown

__all__ = ["accuracy_metrics", "predict", "render_markdown"]
