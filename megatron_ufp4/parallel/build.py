"""This rank's model, and only it: built on the meta device, cut to the rank's tensor-,
expert- and pipeline-parallel share, then materialised and initialised on its device.

No rank ever allocates parameters it does not hold, and the values are the single-process
model's at the same global positions (layout-independent initialisation, model/init.py).
Needs no process group beyond what ``state`` carries, so a planner can build any rank's
model on one machine (``tools/plan_parallel.py --materialize``).
"""
from __future__ import annotations

import torch

from ..model.gpt import GPTModel
from .expert import build_expert_parallel_model
from .parallel_factory import ParallelLinearFactory, build_tensor_parallel_gpt, mark_sequence_parallel_params
from .pipeline import build_stage_modules
from .state import ParallelState


def build_rank_chunks(config, factory: ParallelLinearFactory, state: ParallelState, *, init_seed: int, device,
                      dispatcher: str = "alltoall", first_stage_layers: int | None = None,
                      last_stage_layers: int | None = None) -> list[GPTModel]:
    """This rank's pipeline chunks (``state.vpp`` of them), materialised on ``device``."""
    with torch.device("meta"):
        model = build_tensor_parallel_gpt(config, factory, init_seed=init_seed)
    if config.num_experts:
        build_expert_parallel_model(model, state, dispatcher, "dp")
    chunks = build_stage_modules(model, state, vpp=state.vpp, first_stage_layers=first_stage_layers,
                                 last_stage_layers=last_stage_layers, device=device)
    for chunk in chunks:
        mark_sequence_parallel_params(chunk, state)
    return chunks


__all__ = ["build_rank_chunks"]
