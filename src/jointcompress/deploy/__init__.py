"""Deployment: ONNX export and int8 CPU inference, each followed by a parity check."""
from .int8 import DEFAULT_BACKEND, Int8Model, int8_parity, quantize_int8
from .onnx_export import export_and_check, export_onnx
from .parity import ParityReport, compare

__all__ = ["DEFAULT_BACKEND", "Int8Model", "ParityReport", "compare", "export_and_check", "export_onnx",
           "int8_parity", "quantize_int8"]
