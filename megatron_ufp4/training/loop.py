"""The outer training loop shared by the single-process and multi-process trainers.

A trainer provides ``cfg``, ``step``, ``console``, ``logger`` (None on ranks that do not
log), ``flops_per_token``, ``peak_flops`` and the methods ``train_step() -> record``,
``evaluate() -> loss``, ``moe_stats() -> dict`` and ``save() -> path``.
"""
from __future__ import annotations

import math
import time

from ..model import num_params


def flops_per_token(cfg) -> float:
    """Training FLOPs per token: 6 per active non-embedding parameter plus causal attention."""
    m = cfg.model
    embeddings = m.vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2)
    return 6 * (num_params(m).active - embeddings) + 6 * m.num_layers * m.hidden_size * cfg.data.seq_len


class TrainingLoop:
    def train(self, exit_after: int | None = None) -> dict:
        """Train to ``training.train_steps`` (or stop, with a checkpoint, after ``exit_after``)."""
        t, cfg = self.cfg.training, self.cfg
        tokens_per_step = t.global_batch_size * cfg.data.seq_len
        result = {"step": self.step}
        t_last, steps_since = time.perf_counter(), 0
        t_start, start_step = t_last, self.step
        while self.step < t.train_steps:
            rec = self.train_step()
            steps_since += 1
            now = time.perf_counter()
            rec["tokens_per_s"] = tokens_per_step * steps_since / max(now - t_last, 1e-9)
            rec["mfu"] = rec["tokens_per_s"] * self.flops_per_token / self.peak_flops
            log_now = self.step % cfg.logging.interval == 0 or self.step == t.train_steps
            if log_now and cfg.model.num_experts:
                rec["moe"] = {str(k): v for k, v in self.moe_stats().items()}  # syncs: log steps only
            if log_now:
                if self.logger is not None:
                    eta = (now - t_start) / (self.step - start_step) * (t.train_steps - self.step)
                    self.logger.progress(rec, t.train_steps, eta)
                t_last, steps_since = now, 0
            if t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.train_steps):
                rec["val_loss"] = self.evaluate()
                rec["val_ppl"] = math.exp(min(rec["val_loss"], 50))
                self.console(f"step {self.step:>6} | validation loss {rec['val_loss']:.4f} | "
                             f"perplexity {rec['val_ppl']:.2f}")
            if self.logger is not None:
                self.logger.log(rec)
            result = rec
            done = self.step == t.train_steps or (exit_after is not None and self.step >= exit_after)
            interval = cfg.checkpoint.interval
            if (interval and self.step % interval == 0) or (done and cfg.checkpoint.save_final):
                self.console(f"saved checkpoint {self.save()}")
            if done:
                break
        if self.logger is not None:
            self.logger.close()
        return result
