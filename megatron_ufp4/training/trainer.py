"""The single-process training loop: data → model (FP4 linears) → AdamW, with exact resume.

Exactness: the sample order is a pure function of (seed, consumed samples); evaluation
uses a fixed unshuffled order; SR generators, RHT signs, optimizer state and every RNG go
into the checkpoint; so a run stopped after step k and resumed reproduces an uninterrupted
run's losses bit for bit.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import RunConfig, dump_config
from ..data.gpt_dataset import GPTDataset
from ..linear import quant_stats, set_quant_stats
from ..model import GPTModel, LinearFactory
from .checkpoint import (CheckpointError, capture_rng, checkpoint_to_resume, config_differences, describe_differences,
                         init_weights_from, load_checkpoint, restore_rng, save_checkpoint)
from .loop import TrainingAborted, TrainingLoop, flops_per_token  # noqa: F401 (re-exported)
from .metrics import MetricsLogger, measured_peak_flops
from .run_dir import RunDirLock, check_fresh_start, check_init_from, clean_leftovers, discarded_if_refused
from .optim import build_optimizer, clip_grad_norm
from .evaluation import eval_window_count, summarize, window_losses
from .run_info import check_same_tokenizer, write_run_info
from .run_setup import (check_backend_device, local_rank, make_batch,  # noqa: F401
                        select_device, seed_everything, sr_base_seed, train_dataset, validation_dataset)
from .schedule import lr_at


def evaluate_loss(model, ds: GPTDataset, batch_size: int, iters: int, autocast) -> float:
    """Mean next-token loss over the first ``iters`` micro-batches of ``ds``."""
    return summarize(window_losses(model, ds, iters * batch_size, batch_size, autocast))["loss"]


def micro_batch_loss(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A micro-batch's mean next-token loss: head and cross entropy chunked over tokens, so
    the FP32 logits (tokens x vocab) never exist at once (``GPTModel.head_loss``)."""
    return model(tokens, labels=labels)


class Trainer(TrainingLoop):
    def __init__(self, cfg: RunConfig, console=print):
        self.cfg, self.console = cfg, console
        t = cfg.training
        if any(v > 1 for v in (cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.expert, cfg.parallel.data,
                               cfg.parallel.virtual_pipeline)):
            raise ValueError("parallel: sizes > 1 need a torchrun launch (scripts/pretrain.sh)")
        self.device = select_device(t.device, local_rank())
        check_backend_device(cfg.gemm.backend, self.device)  # before anything is created
        check_init_from(t.init_from)
        with discarded_if_refused(t.run_dir) as self.run_dir:  # a start refused below leaves no new directory
            self._set_up(cfg, console)

    def _set_up(self, cfg: RunConfig, console) -> None:
        t = cfg.training
        self.lock = RunDirLock(self.run_dir).acquire()  # held until close() or process exit
        clean_leftovers(self.run_dir, console)  # first: it may restore an interrupted re-save
        resume_from = checkpoint_to_resume(self.run_dir, t.resume)
        check_fresh_start(self.run_dir, t.resume, resume_from, t.overwrite, console)
        seed_everything(t.seed)
        self.recipe, backend = cfg.build_recipe()
        self.precision_schedule = cfg.build_schedule()
        factory = LinearFactory(self.recipe, num_layers=cfg.model.num_layers, backend=backend,
                                seed=sr_base_seed(cfg), schedule=self.precision_schedule)
        with torch.device(self.device):
            self.model = GPTModel(cfg.model, factory, init_seed=t.seed)
        self.optimizer = build_optimizer(self.model, cfg.optimizer.lr, cfg.optimizer.weight_decay,
                                         (cfg.optimizer.beta1, cfg.optimizer.beta2), cfg.optimizer.eps)
        self.accum = t.global_batch_size // t.micro_batch_size
        self.model.step_context.aux_loss_scale = 1.0 / self.accum  # the LM loss is averaged over micro-batches
        self._build_data()
        self.step = 0  # optimizer iterations done (skipped non-finite steps included)
        self.skipped_total = 0
        self.consecutive_nonfinite = 0
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.dtype == "bf16")
        self._resume(resume_from)
        if resume_from is not None:
            check_same_tokenizer(self.run_dir, cfg.data.prefix)
        if resume_from is None and t.init_from:  # a fresh start from given weights (a resume continues the run)
            init_weights_from(self.model, t.init_from)
            console(f"initialised the model weights from {t.init_from}")
        if self.step == 0:  # the initial weights and the data order, for a study to compare its arms
            write_run_info(self.run_dir, cfg, self.precision_schedule, self.model.named_parameters(), self.train_ds,
                           torch.get_num_threads())
        c = cfg.logging
        self.logger = MetricsLogger(self.run_dir, cfg.to_dict(), c.wandb, c.wandb_project, c.wandb_mode,
                                    c.tensorboard, self.step, console)
        self.flops_per_token = flops_per_token(cfg)
        self.peak_flops = c.peak_tflops * 1e12 if c.peak_tflops else measured_peak_flops(self.device)

    # -- data ---------------------------------------------------------------------------
    def _build_data(self) -> None:
        self.train_ds = train_dataset(self.cfg)
        self.val_ds = validation_dataset(self.cfg)

    # -- one step -------------------------------------------------------------------------
    loss_fn = staticmethod(micro_batch_loss)  # (model, tokens, labels): an attribute so tests can inject failures

    def train_step(self) -> dict:
        t, o = self.cfg.training, self.cfg.optimizer
        lr = lr_at(self.step, t.train_steps, o.lr, self.cfg.schedule.kind, self.cfg.schedule.warmup_steps,
                   self.cfg.schedule.min_lr_ratio, self.cfg.schedule.decay_fraction)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        self.enter_precision_phase([self.model.step_context])
        stats_due = self.quant_stats_due()
        set_quant_stats(self.model, stats_due)
        start = self.step * t.global_batch_size
        loss_sum = torch.zeros((), device=self.device)
        for m in range(self.accum):
            idx = range(start + m * t.micro_batch_size, start + (m + 1) * t.micro_batch_size)
            tokens, labels = make_batch(self.train_ds, idx, self.device)
            self.model.step_context.at(self.step, m)  # SR keys from (step, micro-batch): layout-independent
            with self.autocast:
                loss = self.loss_fn(self.model, tokens, labels) / self.accum
            loss.backward()
            loss_sum += loss.detach()
        self.model.step_context.at(None)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = clip_grad_norm(params, o.grad_clip)
        def apply_update():
            self.optimizer.step()
            self.model.update_expert_bias()

        rec = self.finish_step(loss_sum, grad_norm, lr, apply_update, self.model.discard_expert_loads,
                               lambda: self.optimizer.zero_grad(set_to_none=True))
        if stats_due:
            rec["quant"] = quant_stats(self.model)
            set_quant_stats(self.model, False)
        return rec

    def evaluate(self) -> dict:
        """``{"loss", "se", "windows"}`` over the fixed validation windows (``evaluation.py``)."""
        n = eval_window_count(self.cfg, len(self.val_ds))
        return summarize(window_losses(self.model, self.val_ds, n, self.cfg.training.micro_batch_size,
                                       self.autocast))

    # -- checkpoints ----------------------------------------------------------------------
    def moe_stats(self) -> dict:
        return self.model.moe_stats()

    def mtp_losses(self) -> list:
        losses = self.model.last_mtp_losses
        return [] if losses is None else [float(x) for x in losses]

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "consumed_samples": self.step * self.cfg.training.global_batch_size,
                "skipped_total": self.skipped_total, "consecutive_nonfinite": self.consecutive_nonfinite,
                "rng": capture_rng(), "config": self.cfg.to_dict()}

    def save(self, _before_rename=None) -> Path:
        path = save_checkpoint(self.run_dir, self.step, self.state_dict(), dump_config(self.cfg),
                               self.cfg.checkpoint.keep_last, _before_rename)
        return path

    def agree_to_stop(self, local: bool) -> bool:
        return local

    def close(self) -> None:
        """Release the run-dir lock (also released when the process ends)."""
        self.lock.release()

    def _resume(self, path: Path | None) -> None:
        if path is None:
            return
        state = load_checkpoint(path)
        diffs = config_differences(state.get("config", {}), self.cfg.to_dict())
        if diffs:
            raise CheckpointError(f"checkpoint {path} is from an incompatible config: {describe_differences(diffs)}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.skipped_total = int(state["step"]), int(state["skipped_total"])
        self.consecutive_nonfinite = int(state["consecutive_nonfinite"])
        restore_rng(state["rng"])
        self.enter_precision_phase([self.model.step_context], max(self.step - 1, 0))  # the last step's, for evaluation
        self.console(f"resumed from {path} at step {self.step}")
