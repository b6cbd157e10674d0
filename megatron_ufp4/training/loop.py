"""The outer training loop shared by the single-process and multi-process trainers.

A trainer provides ``cfg``, ``step``, ``skipped_total``, ``consecutive_nonfinite``,
``console``, ``logger`` (None on ranks that do not log), ``flops_per_token``, ``peak_flops``
and the methods ``train_step() -> record``, ``evaluate() -> {"loss", "windows"[, "se"]}``,
``moe_stats() -> dict``, ``mtp_losses() -> list`` (with ``model.mtp_depth``),
``save() -> path`` and ``agree_to_stop(local: bool) -> bool`` (every rank's answer is True
if any rank's ``local`` is), and ``precision_schedule`` (fp4/schedule.py).

Precision phases: at every step boundary ``enter_precision_phase`` sets the phase of the
step about to run (index ``self.step``, 0-based: the steps done so far) on every
``StepContext`` of the model; evaluation runs the phase of the last step trained.  Under a
schedule, each record carries ``precision_phase`` and ``precision_recipe`` (the phase's label).

Preemption (``checkpoint.save_on_signal``): SIGTERM (what SLURM and Kubernetes send) or
SIGINT only sets a flag; at the next step boundary the ranks agree to stop, save a
checkpoint and raise ``Preempted``.  The bound on the time to exit is the rest of the
current step plus one save.  A second SIGINT (more than 2 s after the first) interrupts at once.
"""
from __future__ import annotations

import math
import signal
import threading
import time

import torch

from ..data.blend import BlendedSamples
from ..model import num_params


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (e.g. too many non-finite steps in a row)."""


class Preempted(RuntimeError):
    """Stopped by a signal after saving a checkpoint; ``signum`` is the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """Context manager: while active, SIGTERM and SIGINT set ``received`` instead of killing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, enabled: bool):
        # handlers can only be installed from the main thread (not from a test's worker thread)
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: int | None = None
        self._at = 0.0
        self._previous: dict = {}

    # torchrun forwards the SIGINT that the terminal also sent its workers: a second SIGINT
    # within this many seconds is that echo, not a second Ctrl-C
    ECHO_S = 2.0

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.received is not None and signum == signal.SIGINT and now - self._at > self.ECHO_S:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.received is None:
            self.received, self._at = signum, now

    def __enter__(self) -> "StopSignals":
        if self.enabled:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()


def flops_per_token(cfg) -> float:
    """Training FLOPs per token: 6 per active non-embedding parameter plus causal attention
    (QK^T and PV over num_heads x head_dim, in every layer and MTP block)."""
    m = cfg.model
    embeddings = m.vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2)
    attention = 6 * (m.num_layers + m.mtp_depth) * m.num_heads * m.head_dim * cfg.data.seq_len
    return 6 * (num_params(m).active - embeddings) + attention


def _json_safe(value):
    """NaN/Inf → None: metrics.jsonl stays strict JSON (a skipped step's loss is NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class TrainingLoop:
    precision_phase = 0  # the phase the model's StepContexts hold

    def enter_precision_phase(self, contexts, step: int | None = None) -> int:
        """Set the precision phase of step ``step`` (default: the step about to run) on every
        StepContext in ``contexts``; returns its index."""
        self.precision_phase = self.precision_schedule.phase_at(self.step if step is None else step)
        for c in contexts:
            c.phase = self.precision_phase
        return self.precision_phase

    def quant_stats_due(self) -> bool:
        """Whether the step about to run collects operand statistics (``logging.quant_stats_interval``)."""
        n = self.cfg.logging.quant_stats_interval
        return n > 0 and (self.step + 1) % n == 0

    def finish_step(self, loss, grad_norm, lr: float, apply_update, discard_update, zero_grad) -> dict:
        """The end of every step, for both trainers: a finite loss and gradient norm apply the
        update (``apply_update``: optimizer step, expert-bias step), anything else skips it
        (``discard_update``: forget the step's expert loads) and counts towards the
        abort after ``max_consecutive_nonfinite``; then gradients are cleared and the step
        counts (skipped steps too, so the data position moves on)."""
        # the step's one necessary host sync: whether to apply the update depends on the values
        # (one copy of both numbers, which the log line needs too)
        loss = loss.detach().float().reshape(())
        loss_v, norm_v = torch.stack([loss, grad_norm.detach().float().reshape(()).to(loss.device)]).cpu().tolist()
        finite = math.isfinite(loss_v) and math.isfinite(norm_v)
        if finite:
            apply_update()
            self.consecutive_nonfinite = 0
        else:
            discard_update()
            self.skipped_total += 1
            self.consecutive_nonfinite += 1
        zero_grad()
        self.step += 1
        rec = {"step": self.step, "loss": loss_v, "lr": lr, "grad_norm": norm_v,
               "skipped": int(not finite), "skipped_total": self.skipped_total}
        if self.precision_schedule.scheduled:
            rec["precision_phase"] = self.precision_phase
            rec["precision_recipe"] = self.precision_schedule.phases[self.precision_phase].recipe.label()
        return rec

    def train(self, exit_after: int | None = None) -> dict:
        """Train to ``training.train_steps`` (or stop, with a checkpoint, after ``exit_after``)."""
        with StopSignals(self.cfg.checkpoint.save_on_signal) as signals:
            try:
                return self._train(exit_after, signals)
            finally:
                if self.logger is not None:
                    self.logger.close()

    def _train(self, exit_after: int | None, signals: StopSignals) -> dict:
        t, cfg = self.cfg.training, self.cfg
        tokens_per_step = t.global_batch_size * cfg.data.seq_len
        clip = cfg.optimizer.grad_clip
        result = {"step": self.step}
        t_last, steps_since, clipped_since = time.perf_counter(), 0, 0
        t_start, start_step = t_last, self.step
        skipped_before = self.skipped_total
        while self.step < t.train_steps:
            t_step = time.perf_counter()
            rec = self.train_step()
            steps_since += 1
            now = time.perf_counter()
            # this step's own rate (the finite check synced the device): a study takes medians of
            # these; the progress line shows the mean since the previous line
            rec["step_time_s"] = now - t_step
            rec["tokens_per_s"] = tokens_per_step / max(now - t_step, 1e-9)
            rec["mfu"] = rec["tokens_per_s"] * self.flops_per_token / self.peak_flops
            rec["clipped"] = int(clip > 0 and math.isfinite(rec["grad_norm"]) and rec["grad_norm"] > clip)
            clipped_since += rec["clipped"]
            aborting = self.consecutive_nonfinite >= t.max_consecutive_nonfinite
            log_now = self.step % cfg.logging.interval == 0 or self.step == t.train_steps or aborting
            if log_now and cfg.model.num_experts:
                rec["moe"] = {str(k): v for k, v in self.moe_stats().items()}  # syncs: log steps only
            if log_now and isinstance(self.train_ds, BlendedSamples):  # tokens each data.path corpus gave so far
                rec["tokens_by_corpus"] = {name: n * cfg.data.seq_len for name, n in
                                           self.train_ds.samples_by_corpus(self.step * t.global_batch_size).items()}
            if log_now and cfg.model.mtp_depth:
                rec["mtp_loss"] = self.mtp_losses()  # per depth, the step's last micro-batch
            if log_now:
                if self.logger is not None:
                    eta = (now - t_start) / (self.step - start_step) * (t.train_steps - self.step)
                    rate = tokens_per_step * steps_since / max(now - t_last, 1e-9)
                    self.logger.progress({**rec, "tokens_per_s": rate, "mfu": rate * self.flops_per_token /
                                          self.peak_flops, "clipped_since": clipped_since, "steps_since": steps_since},
                                         t.train_steps, eta)
                t_last, steps_since, clipped_since = now, 0, 0
            if aborting:  # the record of the step that triggers the stop is kept
                if self.logger is not None:
                    self.logger.log(_json_safe(rec))
                raise TrainingAborted(f"loss or gradients were NaN/Inf for {self.consecutive_nonfinite} steps in a "
                                      f"row (last: step {self.step}); stopping. Lower optimizer.lr or try another "
                                      "recipe")
            if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.train_steps):
                val = self.evaluate()
                rec["val_loss"], rec["val_windows"] = val["loss"], val["windows"]
                if "se" in val:
                    rec["val_loss_se"] = val["se"]
                rec["val_ppl"] = math.exp(min(rec["val_loss"], 50))
                se = f" ± {val['se']:.4f}" if math.isfinite(val.get("se", math.nan)) else ""
                self.console(f"step {self.step:>6} | validation loss {rec['val_loss']:.4f}{se} "
                             f"({val['windows']} windows) | perplexity {rec['val_ppl']:.2f}")
            if self.logger is not None:
                self.logger.log(_json_safe(rec))
            result = rec
            done = self.step == t.train_steps or (exit_after is not None and self.step >= exit_after)
            interval = cfg.checkpoint.interval
            saved = None
            if (interval and self.step % interval == 0) or (done and cfg.checkpoint.save_final):
                saved = self.save()
                self.console(f"saved checkpoint {saved}")
            if signals.enabled and not done and self.agree_to_stop(signals.received is not None):
                saved = saved or self.save()
                name = signal.Signals(signals.received).name if signals.received else "a signal on another rank"
                raise Preempted(f"stopped by {name} at step {self.step}: saved checkpoint {saved}; "
                                "continue with training.resume=auto", signals.received or signal.SIGTERM)
            if done:
                break
        ran = self.step - start_step
        if ran and self.skipped_total - skipped_before == ran:
            raise TrainingAborted(f"every step of this run ({ran}) was skipped: loss or gradients were NaN/Inf. "
                                  "Lower optimizer.lr or try another recipe")
        return result
