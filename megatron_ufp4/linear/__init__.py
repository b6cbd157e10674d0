"""Quantized linear layers and the pluggable FP4 GEMM backends they run on."""
from .backends import EmulatedBackend, GemmBackend, Operand, available_backends, get_backend, register_backend
from .gemm import GemmState
from .linear_fn import CollectiveHooks, linear_dtypes, linear_output_dtype
from .expert_linear import ExpertLinear
from .quantized_linear import QuantizedLinear
from .telemetry import precision_table, quant_stats, set_quant_stats
from .step_context import StepContext

__all__ = ["EmulatedBackend", "GemmBackend", "Operand", "available_backends", "get_backend", "register_backend",
           "GemmState", "CollectiveHooks", "linear_dtypes", "linear_output_dtype", "ExpertLinear", "QuantizedLinear",
           "precision_table", "quant_stats", "set_quant_stats", "StepContext"]
