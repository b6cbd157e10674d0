"""Data-parallel gradient synchronisation: bucketed all-reduce overlapped with backward.

    dp = DataParallel(model, pstate)        # after build_expert_parallel_model, before the optimizer
    dp.broadcast_params()                   # optional: make replicas identical (dp / edp rank 0's copy)
    for micro-batch in all but the last:
        with dp.no_sync(): loss.backward()  # accumulate locally
    loss.backward()                         # hooks launch async all-reduces as buckets fill
    dp.finish_grad_sync()                   # launch the rest, wait, write averaged grads to p.grad

With a pipeline schedule (which runs the micro-batches' backwards itself), run the whole
schedule inside ``no_sync()`` -- or build with ``overlap=False`` -- and call
``finish_grad_sync()`` afterwards (after the tied-embedding reduction); with sequence
parallelism call ``sync_sequence_parallel_grads`` *after* ``finish_grad_sync`` (both are
sums, so they commute, but ``finish_grad_sync`` overwrites ``p.grad``).

Two kinds of parameters, each bucketed and reduced over its own group:

* dense (everything but routed experts): replicated over the data-parallel group "dp";
* routed experts (their ``Placement`` names the expert, see ``expert_param_names``): sharded over EP,
  replicated over the expert-data-parallel group "edp" (dp_rank // EP).

Scaling (Megatron DDP's): every gradient is multiplied by 1 / DP (the *full* data-parallel
size, also for experts) and summed over its group.  Each rank's loss is the mean over its
own micro-batch, so dense gradients become the mean over the global batch; an expert's
gradient already holds contributions from all EP ranks' tokens (the all-to-all backward
brings them), so summing over the DP/EP "edp" replicas and dividing by DP gives the same mean.

Buckets: per kind (and dtype), parameters in reverse registration order (roughly the order
backward produces them) are packed into buckets of at most ``bucket_numel`` elements.  A
``register_post_accumulate_grad_hook`` marks a parameter ready; when a bucket is complete
*and every earlier bucket of its group has been launched*, its flattened gradients go out
with an async ``all_reduce``.  Launching strictly in bucket order keeps the sequence of
collectives identical on every rank even when ranks produce gradients in different orders
or not at all (an expert with no tokens on one replica); ``finish_grad_sync`` launches
whatever is left in the same order and waits.

Missing gradients: a parameter whose ``grad`` is None on this rank (a routed expert that
got no tokens) contributes zeros.  Each bucket also carries one "has a gradient" flag per
parameter; a parameter that has no gradient on *any* rank of its group keeps
``grad = None``, so AdamW skips it exactly as one process would.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from ..model.placement import named_placements
from .mappings import group_size

__all__ = ["DataParallel", "expert_param_names", "named_parameters", "param_kind", "replica_group"]

def _modules(model) -> list[nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def expert_param_names(model) -> set[str]:
    """Names of the routed-expert parameters of a model or of pipeline chunks: those whose
    ``Placement`` names an expert.  Shared experts and routers are dense."""
    return {n for n, p in named_placements(_modules(model)).items() if p.experts is not None}


def param_kind(name: str, experts: set[str]) -> str:
    """"edp" for routed experts (replicated over the expert-data-parallel group), else "dp"."""
    return "edp" if name in experts else "dp"


def named_parameters(model) -> list[tuple[str, nn.Parameter]]:
    """Trainable (fqn, param) of a model or of a list of pipeline chunks (whose names are
    global), each parameter once."""
    out, seen = [], set()
    for m in _modules(model):
        for n, p in m.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append((n, p))
    return out


def replica_group(pstate, kind: str):
    """(process group, group size, this rank's index in it) for a parameter kind."""
    g = pstate.group(kind)
    return g, group_size(g), (pstate.edp_rank if kind == "edp" else pstate.dp_rank)


def _persistent(model: nn.Module, name: str) -> bool:
    mod_name, _, buf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    return buf not in mod._non_persistent_buffers_set


class _Bucket:
    __slots__ = ("kind", "params", "names", "offsets", "numel", "ready", "buffer", "work", "launched")

    def __init__(self, kind, named):
        self.kind = kind
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.offsets, off = [], 0
        for p in self.params:
            self.offsets.append(off)
            off += p.numel()
        self.numel = off
        self.ready: set[int] = set()
        self.buffer = None
        self.work = None
        self.launched = False


class DataParallel:
    """Gradient synchronisation for a (possibly expert-parallel) model; see module doc.

    Not a module wrapper: call the model directly, then ``finish_grad_sync()`` after the
    last backward of the step.  ``overlap=False`` does every all-reduce in
    ``finish_grad_sync`` (no hooks).
    """

    def __init__(self, model, pstate, *, bucket_numel: int = 10_000_000, overlap: bool = True):
        self.model, self.pstate = model, pstate  # a module, or a list of pipeline chunks
        self.bucket_numel = int(bucket_numel)
        self.overlap = overlap
        self.dp_size = pstate.dp
        self._sync = True
        named = named_parameters(model)
        self.experts = expert_param_names(model)
        self.buckets: dict[str, list[_Bucket]] = {"dp": [], "edp": []}
        for kind in ("dp", "edp"):
            group = [(n, p) for n, p in reversed(named) if param_kind(n, self.experts) == kind]
            cur, cur_numel = [], 0
            for n, p in group:
                if cur and (cur_numel + p.numel() > self.bucket_numel or p.dtype != cur[0][1].dtype):
                    self.buckets[kind].append(_Bucket(kind, cur))
                    cur, cur_numel = [], 0
                cur.append((n, p))
                cur_numel += p.numel()
            if cur:
                self.buckets[kind].append(_Bucket(kind, cur))
        self._next = {"dp": 0, "edp": 0}  # first bucket of each kind not yet launched
        self._where: dict[int, tuple[_Bucket, int]] = {}
        for kind, bs in self.buckets.items():
            for b in bs:
                for i, p in enumerate(b.params):
                    self._where[id(p)] = (b, i)
        self._hooks = []
        if overlap:
            for _, p in named:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    # -- hooks and launching ----------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate gradients locally (earlier micro-batches)."""
        before, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = before

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._sync:
            return
        b, i = self._where[id(p)]
        if b.launched:
            raise RuntimeError(f"gradient of {b.names[i]} accumulated after its bucket was all-reduced: run the "
                               "backward passes of earlier micro-batches inside DataParallel.no_sync()")
        b.ready.add(i)
        self._launch_ready(b.kind)

    def _launch_ready(self, kind: str, force: bool = False) -> None:
        bs = self.buckets[kind]
        while self._next[kind] < len(bs):
            b = bs[self._next[kind]]
            if not force and len(b.ready) < len(b.params):
                return
            self._launch(b)
            self._next[kind] += 1

    def _launch(self, b: _Bucket) -> None:
        group, size, _ = replica_group(self.pstate, b.kind)
        n = len(b.params)
        if b.buffer is None:
            b.buffer = torch.empty(b.numel + n, dtype=b.params[0].dtype, device=b.params[0].device)
        buf = b.buffer
        for p, off in zip(b.params, b.offsets):
            dst = buf[off:off + p.numel()]
            if p.grad is None:
                dst.zero_()
            else:
                dst.copy_(p.grad.reshape(-1))
        buf[b.numel:] = torch.tensor([p.grad is not None for p in b.params], dtype=buf.dtype)
        buf[:b.numel].mul_(1.0 / self.dp_size)
        b.work = dist.all_reduce(buf, group=group, async_op=True) if size > 1 else None
        b.launched = True

    # -- the step ---------------------------------------------------------------------------------
    def start_grad_sync(self) -> None:
        """Launch every bucket now (in order), whether or not its hooks fired."""
        for kind in self.buckets:
            self._launch_ready(kind, force=True)

    def finish_grad_sync(self) -> None:
        """Launch the remaining buckets, wait for all, and write the averaged gradients
        into ``p.grad`` (None stays None only where no rank of the group had a gradient)."""
        self.start_grad_sync()
        buckets = [b for bs in self.buckets.values() for b in bs]
        for b in buckets:
            if b.work is not None:
                b.work.wait()
        # which parameters had a gradient on some replica decides grad None vs a tensor, so the
        # flags come to the host: one copy for all buckets, the step's only sync here
        flags = torch.cat([b.buffer[b.numel:] for b in buckets]).tolist() if buckets else []
        at = 0
        for b in buckets:
            buf = b.buffer
            for i, (p, off) in enumerate(zip(b.params, b.offsets)):
                if flags[at + i] == 0:
                    p.grad = None
                    continue
                g = buf[off:off + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            at += len(b.params)
            b.work, b.launched = None, False
            b.ready.clear()
        self._next = {"dp": 0, "edp": 0}

    # -- replicas ----------------------------------------------------------------------------------
    @torch.no_grad()
    def broadcast_params(self) -> None:
        """Copy dp-rank-0's dense parameters and persistent buffers over "dp", and
        edp-rank-0's expert parameters over "edp" (run once after building the model)."""
        for m in _modules(self.model):
            named = list(m.named_parameters()) + [(n, b) for n, b in m.named_buffers() if _persistent(m, n)]
            for name, t in named:
                kind = param_kind(name, self.experts)
                group, size, _ = replica_group(self.pstate, kind)
                if size > 1:
                    dist.broadcast(t.data, src=self.pstate.ranks[kind][0], group=group)

    def __repr__(self) -> str:
        return (f"DataParallel(dp={self.pstate.dp}, ep={self.pstate.ep}, buckets: "
                f"dense {len(self.buckets['dp'])}, expert {len(self.buckets['edp'])}, overlap={self.overlap})")
