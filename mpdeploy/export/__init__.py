"""torch → ONNX: a dense graph with a dynamic batch dimension, simplified and checked."""

from mpdeploy.export.onnx import INPUT_NAME, OPSET, OUTPUT_NAME, ExportRecord, export_onnx

__all__ = ["INPUT_NAME", "OPSET", "OUTPUT_NAME", "ExportRecord", "export_onnx"]
