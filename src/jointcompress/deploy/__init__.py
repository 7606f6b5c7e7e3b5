"""Deployment: ONNX export and int8 CPU inference, each followed by a parity check; the fastest
ONNX Runtime fp32 deployment per batch size (deploy_fp32)."""
from .int8 import DEFAULT_BACKEND, Int8Model, int8_parity, quantize_int8
from .onnx_export import export_and_check, export_onnx
from .ort_deploy import OrtDeployment, deploy_fp32
from .parity import ParityReport, compare

__all__ = ["DEFAULT_BACKEND", "Int8Model", "OrtDeployment", "ParityReport", "compare", "deploy_fp32", "export_and_check",
           "export_onnx", "int8_parity", "quantize_int8"]
