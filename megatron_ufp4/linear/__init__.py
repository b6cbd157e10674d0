"""Quantized linear layers and the pluggable FP4 GEMM backends they run on."""
from .backends import EmulatedBackend, available_backends, get_backend, register_backend
from .quantized_linear import GemmContext, QuantizedLinear, precision_table

__all__ = ["EmulatedBackend", "available_backends", "get_backend", "register_backend", "GemmContext",
           "QuantizedLinear", "precision_table"]
