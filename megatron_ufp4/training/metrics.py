"""Run logging: a progress line per interval, metrics.jsonl, optional wandb/TensorBoard."""
from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path

import torch


@functools.cache
def measured_peak_flops(device: torch.device) -> float:
    """Achievable dense-matmul FLOP/s on this device (the MFU denominator): a 0.25 s matmul
    loop, measured once per process and device."""
    n = 1024 if device.type == "cpu" else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a = torch.ones(n, n, device=device, dtype=dtype)  # no RNG use: training draws stay untouched
    a @ a
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.25:
        a @ a
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def flat_quant_scalars(quant: dict) -> dict:
    """``quant/<module>/<gemm>/<operand>/<stat>`` scalars of a step's operand statistics (wandb, TensorBoard)."""
    out = {}
    for module, gemms in quant.items():
        for gemm, row in gemms.items():
            for role, st in row.items():
                if isinstance(st, dict) and role != "ran":
                    for k, v in st.items():
                        if isinstance(v, (int, float)) and v is not None:
                            out[f"quant/{module}/{gemm}/{role}/{k}"] = v
    return out


def format_count(n: float) -> str:
    """1234 -> 1.23k, 5.6e9 -> 5.60G: token counts in a progress line."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    def __init__(self, run_dir: Path, config: dict, wandb_on: bool, wandb_project: str, wandb_mode: str,
                 tensorboard: bool, resume_step: int, console=print):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.console = console
        self._truncate_after(resume_step)
        self.wandb = self.tb = None
        if wandb_on:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("logging.wandb is on but wandb is not installed: "
                                   "pip install -e '.[wandb]'") from None
            self.wandb = wandb.init(project=wandb_project, mode=wandb_mode, dir=str(run_dir), config=config,
                                    resume="allow")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("logging.tensorboard is on but tensorboard is not installed: "
                                   "pip install -e '.[tensorboard]'") from None
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records a crashed run wrote after the checkpoint we resume from."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a crash mid-append
                continue
            if record.get("step", 0) <= step:
                keep.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")  # atomic: a kill mid-rewrite keeps the old file
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")  # strict JSON (the loop writes NaN as null)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        scalars.update(flat_quant_scalars(record.get("quant", {})))
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])

    def progress(self, r: dict, total_steps: int, eta_s: float) -> None:
        mfu = f" | MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
        skipped = f" | skipped {r['skipped_total']}" if r.get("skipped_total") else ""
        if r.get("clipped_since"):
            skipped += f" | clipped {r['clipped_since']}/{r['steps_since']}"
        corpora = ""
        if r.get("tokens_by_corpus"):
            corpora = " | tokens " + " ".join(f"{k} {format_count(v)}" for k, v in r["tokens_by_corpus"].items())
        self.console(f"step {r['step']:>6}/{total_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
                     f"grad {r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s{mfu} | "
                     f"ETA {format_eta(eta_s)}{skipped}{corpora}")

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()
