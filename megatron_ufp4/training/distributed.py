"""The multi-process training loop (launched by torchrun): TP x PP x DP (x EP) on the same
models, recipes and data as the single-process ``Trainer``.

Per step: this data-parallel rank takes its contiguous slice of the global batch, the
pipeline runner runs its micro-batches (forward + backward, gradients scaled like the
single-process trainer's), gradients are all-reduced over data-parallel replicas (expert
parameters over their expert-data-parallel replicas), sequence-parallel gradients summed
over TP, the global norm clipped, and ZeRO-1 AdamW updates each parameter on its owner
and broadcasts it.  Checkpoints are sharded DCP directories that load into other layouts.

Hung or dead ranks: every process group is created with ``parallel.timeout_s``, so a
collective whose peer stopped responding fails after that long.  The trainer records which
phase of the step it was in and raises ``CollectiveFailure``: one line for the whole job
(printed by ``errors.print_error``: the first rank to fail claims it through the
rendezvous store) naming the phase and the last good checkpoint.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import RunConfig, dump_config
from ..data.gpt_dataset import GPTDataset
from ..linear import quant_stats, set_quant_stats
from ..parallel.data_parallel import DataParallel
from ..parallel.expert import reduced_moe_stats, update_expert_bias
from ..parallel.optimizer import DistributedOptimizer
from ..parallel.parallel_factory import ParallelLinearFactory, sync_sequence_parallel_grads
from ..parallel.build import build_rank_chunks
from ..parallel.pipeline import unique_parameters
from ..parallel.pipeline_schedule import PipelineRunner
from ..parallel.state import build_parallel_state, init_distributed
from . import dist_checkpoint as dcpk
from .checkpoint import CheckpointError, checkpoint_to_resume, latest_checkpoint
from .loop import TrainingLoop, flops_per_token
from .metrics import MetricsLogger, measured_peak_flops
from .schedule import lr_at
from .errors import is_comm_failure
from .run_dir import RunDirLock, check_fresh_start, clean_leftovers, make_run_dir
from .evaluation import eval_window_count
from .run_info import check_same_tokenizer, write_run_info
from .run_setup import (check_backend_device, local_rank, make_batch, select_device,
                        seed_everything, sr_base_seed, train_dataset, validation_dataset)


class CollectiveFailure(RuntimeError):
    """A collective did not complete (a rank hung or died)."""


def guarded(phase: str):
    """Turn a collective failure inside the method into ``CollectiveFailure`` naming where it was."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(self, *args, **kwargs):
            try:
                return fn(self, *args, **kwargs)
            except (CollectiveFailure, CheckpointError):
                raise
            except Exception as e:
                if not is_comm_failure(e):
                    raise
                where = getattr(self, "phase", phase)
                latest = latest_checkpoint(self.run_dir)
                raise CollectiveFailure(
                    f"rank {self.state.rank}: {where} did not complete within parallel.timeout_s="
                    f"{self.cfg.parallel.timeout_s:g} s (a rank hung or died); last good checkpoint: "
                    f"{latest or 'none'}" + (" (continue with training.resume=auto)" if latest else "")) from None
        return run
    return wrap


class DistributedTrainer(TrainingLoop):
    def __init__(self, cfg: RunConfig, console=print):
        self.cfg = cfg
        par, t = cfg.parallel, cfg.training
        if t.init_from:
            raise CheckpointError("training.init_from: weights-only starts are supported by the single-process "
                                  "trainer only (a parallel run resumes from a sharded checkpoint)")
        # one GPU per rank (cuda:LOCAL_RANK) with NCCL, or CPU with gloo: chosen before any collective
        self.device = select_device(t.device, local_rank())
        check_backend_device(cfg.gemm.backend, self.device)  # before anything is created
        init_distributed(par.timeout_s, self.device)
        self.state = st = build_parallel_state(tp=par.tensor, pp=par.pipeline, dp=par.data or None, ep=par.expert,
                                               vpp=par.virtual_pipeline, sequence_parallel=par.sequence_parallel,
                                               model_cfg=cfg.model, timeout_s=par.timeout_s)
        self.console = console if st.rank == 0 else (lambda *a, **k: None)
        self.run_dir = Path(t.run_dir)
        self.lock = None
        resume_from = self._on_rank0(lambda: self._prepare_run_dir(console))
        local_batch, rem = divmod(t.global_batch_size, st.dp)
        if rem or local_batch % t.micro_batch_size:
            raise ValueError(f"training.global_batch_size={t.global_batch_size} must be a multiple of "
                             f"micro_batch_size x data-parallel size = {t.micro_batch_size * st.dp}")
        self.local_batch, self.num_micro = local_batch, local_batch // t.micro_batch_size

        seed_everything(t.seed)
        self.recipe, backend = cfg.build_recipe()
        self.precision_schedule = cfg.build_schedule()
        factory = ParallelLinearFactory(self.recipe, cfg.model.num_layers, st, backend=backend,
                                        seed=sr_base_seed(cfg), schedule=self.precision_schedule)
        # only this rank's shard is ever allocated; values equal the single-process init
        self.stages = build_rank_chunks(cfg.model, factory, st, init_seed=t.seed, device=self.device,
                                        dispatcher=par.expert_dispatcher, first_stage_layers=par.first_stage_layers,
                                        last_stage_layers=par.last_stage_layers)
        seq = cfg.data.seq_len
        shape = (t.micro_batch_size, seq // st.tp if st.sequence_parallel else seq, cfg.model.hidden_size)
        autocast = torch.bfloat16 if t.dtype == "bf16" else None
        self.runner = PipelineRunner(self.stages, st, schedule=par.pipeline_schedule, num_microbatches=self.num_micro,
                                     micro_batch_size=t.micro_batch_size, seq_len=seq,  # loss: chunked head_loss
                                     activation_shape=shape, autocast_dtype=autocast)
        self.ddp = DataParallel(self.stages, st, overlap=self.num_micro == 1)
        o = cfg.optimizer
        self.optimizer = DistributedOptimizer(self.stages, st, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps)
        self.norm_params = unique_parameters(self.stages, st)

        self.train_ds = train_dataset(cfg)
        self.val_ds = validation_dataset(cfg)
        self.step, self.skipped_total, self.consecutive_nonfinite = 0, 0, 0
        self._resume(resume_from)
        if self.step == 0 and st.rank == 0:
            # rank 0 holds every parameter (global names) only without TP/PP/EP sharding; else
            # only the data order is fingerprinted
            whole = st.tp == st.pp == st.ep == 1 and len(self.stages) == 1
            write_run_info(self.run_dir, cfg, self.precision_schedule,
                           self.stages[0].named_parameters() if whole else None,
                           self.train_ds, torch.get_num_threads())
        c = cfg.logging
        self.logger = MetricsLogger(self.run_dir, cfg.to_dict(), c.wandb and st.rank == 0, c.wandb_project,
                                    c.wandb_mode, c.tensorboard and st.rank == 0, self.step, self.console) \
            if st.rank == 0 else None
        peak = c.peak_tflops * 1e12 if c.peak_tflops else measured_peak_flops(self.device)
        self.peak_flops = peak * st.world_size
        self.flops_per_token = flops_per_token(cfg)
        self.console(f"{st.world_size} ranks: tensor {st.tp} x pipeline {st.pp} (virtual {st.vpp}) x data {st.dp} "
                     f"(expert {st.ep}); {self.num_micro} micro-batches of {t.micro_batch_size} per rank per step")

    # -- run directory (rank 0) --------------------------------------------------------------
    def _prepare_run_dir(self, console) -> Path | None:
        t = self.cfg.training
        self.run_dir = make_run_dir(t.run_dir)
        self.lock = RunDirLock(self.run_dir).acquire()  # rank 0 holds it for the job
        clean_leftovers(self.run_dir, console)  # first: it may restore an interrupted re-save
        resume_from = checkpoint_to_resume(self.run_dir, t.resume)
        check_fresh_start(self.run_dir, t.resume, resume_from, t.overwrite, console)
        return resume_from

    def _on_rank0(self, fn):
        """Run ``fn`` on rank 0; every rank returns its result or raises its one-line error."""
        out, failure = [None, None], None
        if self.state.rank == 0:
            try:
                out = [fn(), None]
            except (CheckpointError, ValueError, OSError) as e:
                out = [None, str(e)]
            except Exception as e:  # a bug: rank 0 shows the traceback, the others must not wait for it
                failure, out = e, [None, f"rank 0 failed preparing the run directory: {type(e).__name__}: {e}"]
        dist.broadcast_object_list(out, src=0)
        if failure is not None:
            raise failure
        if out[1] is not None:
            raise CheckpointError(out[1])
        return out[0]

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()

    @guarded("the stop-signal agreement")
    def agree_to_stop(self, local: bool) -> bool:
        self.phase = "the stop-signal agreement (all-reduce over all ranks)"
        flag = torch.tensor(float(local), device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    # -- one step -------------------------------------------------------------------------
    def _local_batch(self, base: int, ds: GPTDataset):
        first = base + self.state.dp_rank * self.local_batch
        return make_batch(ds, range(first, first + self.local_batch), self.device)

    def _dp_mean(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().clone().float()
        if self.state.dp > 1:
            dist.all_reduce(x, group=self.state.group("dp"))
            x /= self.state.dp
        return x

    @guarded("a training step")
    def train_step(self) -> dict:
        t, o, s, st = self.cfg.training, self.cfg.optimizer, self.cfg.schedule, self.state
        self.phase = f"step {self.step + 1}: the pipeline forward/backward (stage send/recv, TP and EP collectives)"
        lr = lr_at(self.step, t.train_steps, o.lr, s.kind, s.warmup_steps, s.min_lr_ratio, s.decay_fraction)
        self.optimizer.set_lr(lr)
        tokens, labels = self._local_batch(self.step * t.global_batch_size, self.train_ds)
        self.enter_precision_phase([stage.step_context for stage in self.stages])
        stats_due = self.quant_stats_due()
        set_quant_stats(self.stages, stats_due)
        self.runner.train()
        sync_ctx = self.ddp.no_sync() if self.num_micro > 1 else contextlib.nullcontext()
        with sync_ctx:
            # SR positions count micro-batches over the global batch, as the single-process trainer does
            loss = self.runner.step(tokens if st.is_first_stage else None, labels if st.is_last_stage else None,
                                    sr_step=self.step, sr_micro_base=st.dp_rank * self.num_micro)
        self.phase = f"step {self.step + 1}: the data-parallel gradient all-reduce"
        self.ddp.finish_grad_sync()
        for stage in self.stages:
            sync_sequence_parallel_grads(stage, st)
        self.phase = f"step {self.step + 1}: the gradient-norm all-reduce"
        grad_norm = self.optimizer.clip_grad_norm(o.grad_clip, norm_params=self.norm_params)
        loss = self._dp_mean(loss)

        def apply_update():
            self.phase = f"step {self.step + 1}: the ZeRO-1 optimizer step (parameter broadcast)"
            self.optimizer.step()
            for stage in self.stages:
                update_expert_bias(stage, st.group("dp"))

        def discard_update():
            for stage in self.stages:
                stage.discard_expert_loads()

        rec = self.finish_step(loss, grad_norm, lr, apply_update, discard_update, self.optimizer.zero_grad)
        if stats_due:
            rec["quant"] = self._gathered_quant_stats()
            set_quant_stats(self.stages, False)
        return rec

    @guarded("the operand-statistics gather")
    def _gathered_quant_stats(self) -> dict:
        """Every pipeline stage's operand statistics on rank 0, from data-parallel rank 0
        (the other replicas see other tokens); a tensor-parallel shard's names end in @tp<r>."""
        st = self.state
        mine = quant_stats(self.stages) if st.dp_rank == 0 else {}
        if st.tp > 1:
            mine = {f"{k}@tp{st.tp_rank}": v for k, v in mine.items()}
        everyone = [None] * st.world_size
        dist.all_gather_object(everyone, mine)
        return {k: v for part in everyone for k, v in sorted(part.items())}

    @guarded("evaluation")
    @torch.no_grad()
    def evaluate(self) -> dict:
        """``{"loss", "windows"}``: the mean over whole rounds of the first validation windows
        (every round evaluates one local batch on each data-parallel rank).  No per-window
        standard error here (each rank sees batch means); ``megatron_ufp4.eval`` gives it."""
        self.phase = f"evaluation after step {self.step}"
        per_round = self.local_batch * self.state.dp
        n = max(1, eval_window_count(self.cfg, len(self.val_ds)) // per_round)
        self.runner.eval()
        total = torch.zeros((), device=self.device)
        for i in range(n):
            tokens, labels = self._local_batch(i * self.local_batch * self.state.dp, self.val_ds)
            total += self.runner.evaluate(tokens if self.state.is_first_stage else None,
                                          labels if self.state.is_last_stage else None)
        self.runner.train()
        return {"loss": float(self._dp_mean(total / n)), "windows": n * per_round}

    @guarded("the MoE load all-reduce")
    def moe_stats(self) -> dict:
        self.phase = f"the MoE load all-reduce after step {self.step}"
        stats = {}
        for stage in self.stages:
            stats.update(reduced_moe_stats(stage, self.state.group("dp")))
        return stats

    @guarded("the MTP loss reduction")
    def mtp_losses(self) -> list:
        """The last micro-batch's MTP losses per depth, averaged over data-parallel ranks and
        sent from the last pipeline stage (which runs the MTP modules) to every rank."""
        self.phase = f"the MTP loss reduction after step {self.step}"
        last = self.stages[-1]
        held = self.state.is_last_stage and last.mtp is not None and last.last_mtp_losses is not None
        x = last.last_mtp_losses if held else torch.zeros(self.cfg.model.mtp_depth)
        x = self._dp_mean(x.to(self.device))
        if self.state.pp > 1:
            dist.broadcast(x, src=self.state.ranks["pp"][-1], group=self.state.group("pp"))
        return [float(v) for v in x]

    def _counters(self) -> dict:
        return {k: getattr(self, k) for k in dcpk.COUNTERS}

    @guarded("checkpoint save")
    def save(self) -> Path:
        self.phase = f"the checkpoint save at step {self.step}"
        return dcpk.save_trainer(self.run_dir, self.stages, self.optimizer, self.state, self._counters(),
                                 self.cfg.to_dict(), dump_config(self.cfg), self.cfg.checkpoint.keep_last)

    def _resume(self, path: Path | None) -> None:
        if path is None:
            return
        check_same_tokenizer(self.run_dir, self.cfg.data.prefix)
        for k, v in dcpk.load_trainer(path, self.stages, self.optimizer, self.state, self.cfg.to_dict()).items():
            setattr(self, k, v)
        self.enter_precision_phase([stage.step_context for stage in self.stages], max(self.step - 1, 0))
        self.console(f"resumed from {path} at step {self.step}")
