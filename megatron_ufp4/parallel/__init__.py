"""Parallel primitives: process groups, tensor/sequence, pipeline, expert and data parallelism."""
from .state import ParallelState, build_parallel_state, init_distributed, rank_of, validate_layout

__all__ = ["ParallelState", "build_parallel_state", "init_distributed", "rank_of", "validate_layout"]
