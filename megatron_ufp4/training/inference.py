"""Load a trained checkpoint for evaluation or sampling."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import RunConfig, config_from_saved
from ..model import GPTModel
from ..parallel.build import build_model
from .checkpoint import CheckpointError, latest_checkpoint
from .checkpoint_formats import read_checkpoint, state_file_of
from .dist_checkpoint import is_distributed_checkpoint


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint (``step_*`` directory of either format, or a single file), or a run
    directory (→ its latest checkpoint)."""
    p = Path(path)
    if is_distributed_checkpoint(p) or state_file_of(p) is not None:
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(f"no checkpoint found at {p} (expected a step_* directory or a run directory)")
    return latest


def load_trained_model(path: str | Path, device: str | torch.device = "cpu",
                       backend: str | None = None) -> tuple[GPTModel, RunConfig, int]:
    """The checkpoint's model in eval mode, its config and step.  ``backend`` runs its FP4
    GEMMs on another registered backend than the one it trained with (``cfg.gemm.backend``
    is set to it)."""
    state = read_checkpoint(resolve_checkpoint(path))
    cfg = config_from_saved(state["config"])
    if backend is not None:
        cfg.gemm.backend = backend
        cfg.validate()
    [model] = build_model(cfg, device=device)  # initial values overwritten by the checkpoint
    model.load_state_dict(state["model"])
    model.eval()
    return model, cfg, int(state["step"])


@torch.no_grad()
def generate(model: GPTModel, prompt_ids: list[int], max_new_tokens: int, max_seq_len: int,
             temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None,
             eos_id: int | None = None, vocab_limit: int | None = None) -> list[int]:
    """Autoregressive sampling (full recompute per token: simple, fine for small models).
    ``vocab_limit``: only ids below it are drawn (the tokenizer's vocabulary when the model's
    is padded beyond it, as Megatron pads for tensor parallelism)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        logits = model(ids[:, -max_seq_len:])[:, -1, :vocab_limit].float()
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            # drawn on the CPU with a CPU generator: one small copy per token (the eos check
            # syncs anyway), and a seed gives the same draws on every device
            probs = torch.softmax(logits, -1).cpu()
            nxt = torch.multinomial(probs, 1, generator=generator).to(device)
        ids = torch.cat([ids, nxt], dim=1)
        if eos_id is not None and int(nxt) == eos_id:
            break
    return ids[0, len(prompt_ids):].tolist()
