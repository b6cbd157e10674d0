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
from .parallel_factory import ParallelLinearFactory, attach_placements, build_tensor_parallel_gpt
from .pipeline import build_stage_modules
from .state import ParallelState, state_for_rank


def build_model(cfg, state: ParallelState | None = None, *, device="cpu", backend: str | None = None,
                collect_stats: bool = False) -> list[GPTModel]:
    """The model of a run config (``RunConfig``) as ``state``'s rank holds it: its pipeline
    chunks (one for PP = 1), initialised from ``training.seed`` with SR seeds from
    ``training.sr_seed`` (else ``training.seed``).  ``state`` None: one process, the whole
    model.  ``device="meta"``: shapes only.  ``backend`` overrides ``gemm.backend`` (evaluate
    on another backend than the run trained with).  Training, evaluation, sampling, probes,
    HF export and the tools all build through here."""
    state = state if state is not None else state_for_rank(0, 1)
    recipe, run_backend = cfg.build_recipe()
    factory = ParallelLinearFactory(recipe, cfg.model.num_layers, state, backend=backend or run_backend,
                                    seed=cfg.sr_base_seed(), schedule=cfg.build_schedule(),
                                    collect_stats=collect_stats)
    par = cfg.parallel
    return build_rank_chunks(cfg.model, factory, state, init_seed=cfg.training.seed, device=device,
                             dispatcher=par.expert_dispatcher, first_stage_layers=par.first_stage_layers,
                             last_stage_layers=par.last_stage_layers)


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
        attach_placements(chunk, state)
    return chunks


__all__ = ["build_model", "build_rank_chunks"]
