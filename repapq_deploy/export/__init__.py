"""Stage 4, export: QDQ ONNX from the calibrated model, an FP32 reference, and their check."""

from repapq_deploy.export.fp16 import convert_to_fp16, fp16_report
from repapq_deploy.export.onnx import ExportCheck, check_against_torch, export_fp32, export_qdq, graph_summary

__all__ = ["ExportCheck", "check_against_torch", "convert_to_fp16", "export_fp32", "export_qdq", "fp16_report",
           "graph_summary"]
