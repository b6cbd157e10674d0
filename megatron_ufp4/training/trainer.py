"""The trainer: one class for every layout, one process being the trivial one.

    python -m megatron_ufp4.train CONFIG.yaml                       # one process: TP = PP = DP = 1
    torchrun --nproc-per-node 8 -m megatron_ufp4.train CONFIG.yaml parallel.tensor=2 parallel.pipeline=2

Per step: this data-parallel rank takes its contiguous slice of the global batch, the
pipeline runner runs its micro-batches (forward + backward, each micro-batch's loss divided
by their number), gradients are all-reduced over data-parallel replicas (expert parameters
over their expert-data-parallel replicas), sequence-parallel gradients summed over TP, the
global norm clipped, and AdamW (ZeRO-1 sharded over DP) updates each parameter.  In one
process every collective is skipped and the arithmetic is exactly a plain loop over
micro-batches with torch's AdamW.

Exactness: the sample order is a pure function of (seed, consumed samples); SR keys derive
from (module seed, step, global micro-batch), so every layout draws the same noise;
evaluation uses fixed unshuffled windows; SR generators, RHT signs, optimizer state and the
counters go into the checkpoint, so a run stopped after step k and resumed reproduces an
uninterrupted run's losses bit for bit.  Checkpoints are sharded DCP directories
(``dist_checkpoint.py``) that load into any other layout; a single-file ``state.pt`` of
older versions is read through ``checkpoint_formats.py``.

Hung or dead ranks: every process group is created with ``parallel.timeout_s``, so a
collective whose peer stopped responding fails after that long; the trainer raises
``CollectiveFailure``: one line for the whole job naming what it was doing and the last
good checkpoint.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import RunConfig, dump_config
from ..data.blend import BlendedSamples
from ..data.gpt_dataset import GPTDataset
from ..linear import quant_stats, set_quant_stats
from ..parallel.build import build_model
from ..parallel.data_parallel import DataParallel
from ..parallel.expert import reduced_moe_stats, update_expert_bias
from ..parallel.optimizer import DistributedOptimizer
from ..parallel.parallel_factory import sync_sequence_parallel_grads
from ..parallel.pipeline import unique_parameters
from ..parallel.pipeline_schedule import PipelineRunner
from ..parallel.state import build_parallel_state, init_distributed
from . import dist_checkpoint as dcpk
from .checkpoint import CheckpointError, checkpoint_to_resume, latest_checkpoint
from .checkpoint_formats import as_sharded_checkpoint, load_weights_into
from .errors import is_comm_failure
from .evaluation import eval_window_count, summarize
from .loop import TrainingAborted, TrainingLoop, flops_per_token  # noqa: F401 (re-exported)
from .metrics import MetricsLogger, measured_peak_flops
from .run_dir import RunDirLock, check_fresh_start, check_init_from, clean_leftovers, discarded_if_refused
from .recompute import apply_recompute
from .run_info import check_same_tokenizer, write_run_info
from .run_setup import (check_backend_device, launched_by_torchrun, local_rank, make_batch,
                        select_device, seed_everything, train_dataset, validation_dataset)
from .schedule import lr_at


class CollectiveFailure(RuntimeError):
    """A collective did not complete (a rank hung or died)."""


def reports_hangs(what: str):
    """Turn a collective failure inside the method into ``CollectiveFailure`` naming what the
    trainer was doing (``self.doing``, set as the method goes, else ``what``)."""
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
                where = getattr(self, "doing", what)
                latest = latest_checkpoint(self.run_dir)
                raise CollectiveFailure(
                    f"rank {self.state.rank}: {where} did not complete within parallel.timeout_s="
                    f"{self.cfg.parallel.timeout_s:g} s (a rank hung or died); last good checkpoint: "
                    f"{latest or 'none'}" + (" (continue with training.resume=auto)" if latest else "")) from None
        return run
    return wrap


def _silent(*args, **kwargs):
    pass


class Trainer(TrainingLoop):
    def __init__(self, cfg: RunConfig, console=print):
        self.cfg, par, t = cfg, cfg.parallel, cfg.training
        if not launched_by_torchrun() and any(v > 1 for v in (par.tensor, par.pipeline, par.expert, par.data,
                                                                par.virtual_pipeline)):
            raise ValueError("parallel: sizes > 1 need a torchrun launch (scripts/pretrain.sh)")
        # one GPU per rank (cuda:LOCAL_RANK) with NCCL, or CPU with gloo: chosen before any collective
        self.device = select_device(t.device, local_rank())
        check_backend_device(cfg.gemm.backend, self.device)  # before anything is created
        check_init_from(t.init_from)
        init_distributed(par.timeout_s, self.device)  # one process without torchrun: no process group
        self.state = st = build_parallel_state(tp=par.tensor, pp=par.pipeline, dp=par.data or None, ep=par.expert,
                                               vpp=par.virtual_pipeline, sequence_parallel=par.sequence_parallel,
                                               model_cfg=cfg.model, timeout_s=par.timeout_s)
        self.console = console if st.rank == 0 else _silent
        self.run_dir, self.lock, self.logger = Path(t.run_dir), None, None
        # rank 0 owns the run directory: a start refused anywhere below leaves no new directory
        with discarded_if_refused(t.run_dir) if st.rank == 0 else contextlib.nullcontext():
            self._set_up(cfg, console)

    def _set_up(self, cfg: RunConfig, console) -> None:
        t, par, st = cfg.training, cfg.parallel, self.state
        resume_from = self._on_rank0(lambda: self._prepare_run_dir(console))
        local_batch, rem = divmod(t.global_batch_size, st.dp)
        if rem or local_batch % t.micro_batch_size:
            raise ValueError(f"training.global_batch_size={t.global_batch_size} must be a multiple of "
                             f"micro_batch_size x data-parallel size = {t.micro_batch_size * st.dp}")
        self.local_batch, self.num_micro = local_batch, local_batch // t.micro_batch_size

        seed_everything(t.seed)
        self.recipe, _ = cfg.build_recipe()
        self.precision_schedule = cfg.build_schedule()
        # only this rank's shard is ever allocated; values equal the single-process init
        self.stages = build_model(cfg, st, device=self.device)
        apply_recompute(self.stages, t.recompute_granularity, t.recompute_method, t.recompute_num_layers)
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
        # built at the first evaluation: a run that never evaluates needs no validation set
        self._val_ds = None
        self.step, self.skipped_total, self.consecutive_nonfinite = 0, 0, 0
        self._resume(resume_from)
        if resume_from is None and t.init_from:  # a fresh start from given weights (a resume continues the run)
            with self._sharded(Path(t.init_from), "training.init_from") as path:
                load_weights_into(self.stages, path, st, cfg, field="training.init_from", shown_as=Path(t.init_from))
            self.console(f"initialised the model weights from {t.init_from}")
        if self.step == 0 and st.rank == 0:
            # rank 0 holds every parameter (global names) only without TP/PP/EP sharding; else
            # only the data order is fingerprinted
            whole = st.tp == st.pp == st.ep == 1 and len(self.stages) == 1
            write_run_info(self.run_dir, cfg, self.precision_schedule,
                           self.stages[0].named_parameters() if whole else None,
                           self.train_ds, torch.get_num_threads())
        c = cfg.logging
        if st.rank == 0:
            self.logger = MetricsLogger(self.run_dir, cfg.to_dict(), c.wandb, c.wandb_project, c.wandb_mode,
                                        c.tensorboard, self.step, self.console)
        peak = c.peak_tflops * 1e12 if c.peak_tflops else measured_peak_flops(self.device)
        self.peak_flops = peak * st.world_size
        self.flops_per_token = flops_per_token(cfg)
        if isinstance(self.train_ds, BlendedSamples):
            self.console(f"data: {self.train_ds!r}")
        if st.world_size > 1:
            self.console(f"{st.world_size} ranks: tensor {st.tp} x pipeline {st.pp} (virtual {st.vpp}) x data "
                         f"{st.dp} (expert {st.ep}); {self.num_micro} micro-batches of {t.micro_batch_size} per "
                         "rank per step")

    @property
    def val_ds(self):
        if self._val_ds is None:
            self._val_ds = validation_dataset(self.cfg)
        return self._val_ds

    @property
    def model(self):
        """The model, when this rank holds all of it in one chunk (one process, or pure DP)."""
        if len(self.stages) != 1 or self.state.pp != 1:
            raise AttributeError("this rank holds pipeline chunks (Trainer.stages), not one whole model")
        return self.stages[0]

    # -- run directory (rank 0) --------------------------------------------------------------
    def _prepare_run_dir(self, console) -> Path | None:
        t = self.cfg.training
        self.lock = RunDirLock(self.run_dir).acquire()  # rank 0 holds it until close() or process exit
        clean_leftovers(self.run_dir, console)  # first: it may restore an interrupted re-save
        resume_from = checkpoint_to_resume(self.run_dir, t.resume)
        check_fresh_start(self.run_dir, t.resume, resume_from, t.overwrite, console)
        return resume_from

    def _on_rank0(self, fn):
        """Run ``fn`` on rank 0; every rank returns its result or raises its one-line error."""
        if self.state.world_size == 1:
            return fn()
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

    @contextlib.contextmanager
    def _sharded(self, path: Path, field: str):
        """``path`` as a sharded checkpoint every rank can load: a single file (``state.pt`` of
        older versions, a to-single file) is converted once by rank 0 into a temporary sharded
        directory beside the run's checkpoints, removed afterwards."""
        staged = self._on_rank0(lambda: as_sharded_checkpoint(path, self.run_dir, field))
        try:
            yield staged.path
        finally:
            if self.state.world_size > 1:
                dist.barrier()
            if self.state.rank == 0:
                staged.remove()

    def close(self) -> None:
        """Release the run-dir lock (also released when the process ends)."""
        if self.lock is not None:
            self.lock.release()

    @reports_hangs("the stop-signal agreement")
    def agree_to_stop(self, local: bool) -> bool:
        if self.state.world_size == 1:
            return local
        self.doing = "the stop-signal agreement (all-reduce over all ranks)"
        flag = torch.tensor(float(local), device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    # -- one step -------------------------------------------------------------------------
    def _local_rows(self, base: int, ds: GPTDataset, rows: int | None = None, limit: int | None = None):
        """This data-parallel rank's ``rows`` consecutive samples of the round starting at ``base``
        (indices clamped below ``limit``: a last, partial evaluation round repeats its last window)."""
        rows = rows or self.local_batch
        first = base + self.state.dp_rank * rows
        idx = range(first, first + rows) if limit is None else [min(i, limit - 1) for i in range(first, first + rows)]
        return make_batch(ds, idx, self.device)

    def _dp_mean(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().clone().float()
        if self.state.dp > 1:
            dist.all_reduce(x, group=self.state.group("dp"))
            x /= self.state.dp
        return x

    @reports_hangs("a training step")
    def train_step(self) -> dict:
        t, o, s, st = self.cfg.training, self.cfg.optimizer, self.cfg.schedule, self.state
        self.doing = f"step {self.step + 1}: the pipeline forward/backward (stage send/recv, TP and EP collectives)"
        lr = lr_at(self.step, t.train_steps, o.lr, s.kind, s.warmup_steps, s.min_lr_ratio, s.decay_fraction)
        self.optimizer.set_lr(lr)
        tokens, labels = self._local_rows(self.step * t.global_batch_size, self.train_ds)
        self.enter_precision_phase([stage.step_context for stage in self.stages])
        stats_due = self.quant_stats_due()
        set_quant_stats(self.stages, stats_due)
        self.runner.train()
        sync_ctx = self.ddp.no_sync() if self.num_micro > 1 else contextlib.nullcontext()
        with sync_ctx:
            # SR positions count micro-batches over the global batch: the same on every layout
            loss = self.runner.step(tokens if st.is_first_stage else None, labels if st.is_last_stage else None,
                                    sr_step=self.step, sr_micro_base=st.dp_rank * self.num_micro)
        self.doing = f"step {self.step + 1}: the data-parallel gradient all-reduce"
        self.ddp.finish_grad_sync()
        for stage in self.stages:
            sync_sequence_parallel_grads(stage, st)
        self.doing = f"step {self.step + 1}: the gradient-norm all-reduce"
        grad_norm = self.optimizer.clip_grad_norm(o.grad_clip, norm_params=self.norm_params)
        loss = self._dp_mean(loss)

        def apply_update():
            self.doing = f"step {self.step + 1}: the optimizer step (ZeRO-1 parameter broadcast)"
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

    @reports_hangs("the operand-statistics gather")
    def _gathered_quant_stats(self) -> dict:
        """Every pipeline stage's operand statistics on rank 0, from data-parallel rank 0
        (the other replicas see other tokens); a tensor-parallel shard's names end in @tp<r>."""
        st = self.state
        mine = quant_stats(self.stages) if st.dp_rank == 0 else {}
        if st.world_size == 1:
            return mine
        if st.tp > 1:
            mine = {f"{k}@tp{st.tp_rank}": v for k, v in mine.items()}
        everyone = [None] * st.world_size
        dist.all_gather_object(everyone, mine)
        return {k: v for part in everyone for k, v in sorted(part.items())}

    @reports_hangs("evaluation")
    @torch.no_grad()
    def evaluate(self) -> dict:
        """``{"loss", "se", "windows"}`` over the first validation windows (``evaluation.py``),
        the same windows on every layout: rounds of one local batch per data-parallel rank, a
        last partial round padded with its last window and the padding dropped."""
        self.doing = f"evaluation after step {self.step}"
        n = eval_window_count(self.cfg, len(self.val_ds))
        st, rows = self.state, self.local_batch
        per_round = rows * st.dp
        self.runner.eval()
        losses = []
        for base in range(0, n, per_round):
            if st.dp == 1 and st.pp == 1:  # no padding needed: a short last batch as it is
                rows = min(self.local_batch, n - base)
            tokens, labels = self._local_rows(base, self.val_ds, rows, limit=n)
            mine = self.runner.window_losses(tokens if st.is_first_stage else None,
                                             labels if st.is_last_stage else None)
            if st.dp > 1:
                parts = [torch.empty_like(mine) for _ in range(st.dp)]
                dist.all_gather(parts, mine, group=st.group("dp"))
                mine = torch.cat(parts)
            losses.append(mine.cpu()[:n - base])
        self.runner.train()
        return summarize(torch.cat(losses))

    @reports_hangs("the MoE load all-reduce")
    def moe_stats(self) -> dict:
        self.doing = f"the MoE load all-reduce after step {self.step}"
        stats = {}
        for stage in self.stages:
            stats.update(reduced_moe_stats(stage, self.state.group("dp")))
        return stats

    @reports_hangs("the MTP loss reduction")
    def mtp_losses(self) -> list:
        """The last micro-batch's MTP losses per depth, averaged over data-parallel ranks and
        sent from the last pipeline stage (which runs the MTP modules) to every rank."""
        self.doing = f"the MTP loss reduction after step {self.step}"
        last = self.stages[-1]
        held = self.state.is_last_stage and last.mtp is not None and last.last_mtp_losses is not None
        x = last.last_mtp_losses if held else torch.zeros(self.cfg.model.mtp_depth)
        x = self._dp_mean(x.to(self.device))
        if self.state.pp > 1:
            dist.broadcast(x, src=self.state.ranks["pp"][-1], group=self.state.group("pp"))
        return [float(v) for v in x]

    # -- checkpoints ----------------------------------------------------------------------
    def _counters(self) -> dict:
        return {k: getattr(self, k) for k in dcpk.COUNTERS}

    @reports_hangs("checkpoint save")
    def save(self, _before_rename=None) -> Path:
        self.doing = f"the checkpoint save at step {self.step}"
        return dcpk.save_trainer(self.run_dir, self.stages, self.optimizer, self.state, self._counters(),
                                 self.cfg.to_dict(), dump_config(self.cfg), self.cfg.checkpoint.keep_last,
                                 _before_rename=_before_rename)

    def _resume(self, path: Path | None) -> None:
        if path is None:
            return
        check_same_tokenizer(self.run_dir, self.cfg)
        with self._sharded(path, "training.resume") as sharded:
            counters = dcpk.load_trainer(sharded, self.stages, self.optimizer, self.state, self.cfg.to_dict(),
                                         shown_as=path)
        for k, v in counters.items():
            setattr(self, k, v)
        self.enter_precision_phase([stage.step_context for stage in self.stages], max(self.step - 1, 0))
        self.console(f"resumed from {path} at step {self.step}")
