"""Process groups for tensor, pipeline, data and expert parallelism.

Rank layout (tensor innermost, pipeline outermost)::

    rank = tp_rank + TP * (dp_rank + DP * pp_rank)

so a tensor-parallel group is TP consecutive ranks (one node's fast links), a pipeline
group strides by TP*DP.  Expert parallelism is carved out of data parallelism, as in
Megatron-Core: dense layers are replicated over the DP ranks, routed experts are sharded
over groups of EP consecutive DP ranks and replicated over the remaining DP/EP ("expert
data parallel"):

    ep_rank = dp_rank % EP,   edp_rank = dp_rank // EP

Example, 8 ranks, TP=2 PP=2 DP=2 EP=2: tp groups [0,1] [2,3] [4,5] [6,7]; dp groups [0,2]
[1,3] [4,6] [5,7]; pp groups [0,4] [1,5] [2,6] [3,7]; ep groups = dp groups; edp groups are
single ranks.

Specification: docs/parallel.md.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class ParallelState:
    world_size: int = 1
    rank: int = 0
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    vpp: int = 1
    sequence_parallel: bool = False
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    ep_rank: int = 0
    edp_rank: int = 0
    groups: dict = field(default_factory=dict)  # name -> ProcessGroup (None when single process)
    ranks: dict = field(default_factory=dict)  # name -> global ranks of this rank's group
    meshes: dict = field(default_factory=dict, repr=False)  # (group name, device type) -> DeviceMesh, made on use

    def group(self, name: str):
        return self.groups.get(name)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp} pp {self.pp_rank}/{self.pp} "
                f"dp {self.dp_rank}/{self.dp} ep {self.ep_rank}/{self.ep}")


def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    return tp_rank + tp * (dp_rank + dp * pp_rank)


def validate_layout(world_size: int, tp: int, pp: int, dp: int, ep: int, vpp: int, model_cfg=None) -> None:
    """One-line ValueError naming the offending size for a layout that cannot work."""
    for name, v in (("tensor", tp), ("pipeline", pp), ("data", dp), ("expert", ep), ("virtual_pipeline", vpp)):
        if v < 1:
            raise ValueError(f"parallel.{name} must be >= 1 (got {v})")
    if tp * pp * dp != world_size:
        raise ValueError(f"parallel.tensor x pipeline x data = {tp}x{pp}x{dp} = {tp * pp * dp} "
                         f"but the world size is {world_size}")
    if dp % ep:
        raise ValueError(f"parallel.expert={ep} must divide parallel.data={dp} (experts are sharded over DP ranks)")
    if model_cfg is None:
        return
    m = model_cfg
    if m.num_heads % tp:
        raise ValueError(f"parallel.tensor={tp} must divide model.num_heads={m.num_heads}")
    if m.num_kv_heads % tp:
        raise ValueError(f"parallel.tensor={tp} must divide model.num_kv_heads={m.num_kv_heads}")
    if m.vocab_size % tp:
        raise ValueError(f"parallel.tensor={tp} must divide model.vocab_size={m.vocab_size}")
    if m.num_layers < pp * vpp:
        raise ValueError(f"model.num_layers={m.num_layers} is fewer than pipeline x virtual stages = {pp * vpp}")
    if ep > 1 and not m.num_experts:
        raise ValueError(f"parallel.expert={ep} needs an MoE model (model.num_experts > 0)")
    if m.num_experts and m.num_experts % ep:
        raise ValueError(f"parallel.expert={ep} must divide model.num_experts={m.num_experts}")


def init_distributed(timeout_s: float = 300.0, device: torch.device | str = "cpu") -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment: NCCL for a CUDA ``device``
    (made this process's current GPU first, so NCCL and object collectives use it), gloo
    for CPU."""
    device = torch.device(device)
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            return 0, 1
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(process_group_backend(device), timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def process_group_backend(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def expert_range(num_experts: int, ep_size: int, ep_rank: int) -> range:
    """Global indices of the routed experts EP rank ``ep_rank`` holds: ``[r E/EP, (r+1) E/EP)``."""
    if num_experts % ep_size:
        raise ValueError(f"expert parallel size {ep_size} must divide num_experts={num_experts}")
    n = num_experts // ep_size
    return range(ep_rank * n, (ep_rank + 1) * n)


def state_for_rank(rank: int, world: int, tp: int = 1, pp: int = 1, dp: int = 1, ep: int = 1, vpp: int = 1,
                   sequence_parallel: bool = False, model_cfg=None) -> ParallelState:
    """The coordinates rank ``rank`` has in this layout, without process groups (every group
    is None): what a planner needs to build that rank's model on one machine."""
    validate_layout(world, tp, pp, dp, ep, vpp, model_cfg)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside the world of {world} ranks")
    tp_rank, rest = rank % tp, rank // tp
    dp_rank, pp_rank = rest % dp, rest // dp
    return ParallelState(world, rank, tp, pp, dp, ep, vpp, sequence_parallel, tp_rank, pp_rank, dp_rank,
                         dp_rank % ep, dp_rank // ep)


def group_layouts(tp: int, pp: int, dp: int, ep: int) -> dict[str, list[list[int]]]:
    """Every process group of a layout, by name: lists of global ranks (pure arithmetic)."""
    return {
        "tp": [[rank_of(t, d, p, tp, dp) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[rank_of(t, d, p, tp, dp) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": [[rank_of(t, d, p, tp, dp) for p in range(pp)] for d in range(dp) for t in range(tp)],
        "ep": [[rank_of(t, g * ep + e, p, tp, dp) for e in range(ep)]
               for p in range(pp) for t in range(tp) for g in range(dp // ep)],
        "edp": [[rank_of(t, g * ep + e, p, tp, dp) for g in range(dp // ep)]
                for p in range(pp) for t in range(tp) for e in range(ep)],
        # tensor x data: the ranks one pipeline stage spans (for stage-wide reductions)
        "tp_dp": [[rank_of(t, d, p, tp, dp) for d in range(dp) for t in range(tp)] for p in range(pp)],
    }


def build_parallel_state(tp: int = 1, pp: int = 1, dp: int | None = None, ep: int = 1, vpp: int = 1,
                         sequence_parallel: bool = False, model_cfg=None,
                         timeout_s: float | None = None) -> ParallelState:
    """Create every process group (collectively: all ranks must call this in the same order).

    ``timeout_s`` bounds every collective on every group: a peer that hangs makes the
    others fail after that long instead of torch's default 30 minutes.  None: the default
    group's timeout.
    """
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else 1
    rank = dist.get_rank() if initialized else 0
    if dp is None:
        if tp < 1 or pp < 1 or world % (tp * pp):
            raise ValueError(f"parallel.tensor x parallel.pipeline = {tp}x{pp} does not divide the world size {world}")
        dp = world // (tp * pp)
    st = state_for_rank(rank, world, tp, pp, dp, ep, vpp, sequence_parallel, model_cfg)
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s is not None else None
    for name, groups in group_layouts(tp, pp, dp, ep).items():
        for ranks in groups:
            # new_group is collective over the whole world: every rank creates every group
            g = dist.new_group(ranks, timeout=timeout) if initialized and world > 1 else None
            if rank in ranks:
                st.groups[name], st.ranks[name] = g, ranks
    st.groups["world"] = dist.group.WORLD if initialized else None
    st.ranks["world"] = list(range(world))
    return st
