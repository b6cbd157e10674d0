"""megatron_ufp4: Megatron-style LLM pretraining with pluggable FP4 GEMMs (UFP4 recipe)."""
__version__ = "0.1.0"
