"""Load a trained checkpoint for evaluation or sampling."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import RunConfig, config_from_saved
from ..model import GPTModel, LinearFactory
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from .run_setup import sr_base_seed


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (→ its latest checkpoint)."""
    p = Path(path)
    if (p / "state.pt").is_file():
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
    ckpt = resolve_checkpoint(path)
    state = load_checkpoint(ckpt)
    cfg = config_from_saved(state["config"])
    if backend is not None:
        cfg.gemm.backend = backend
        cfg.validate()
    recipe, backend = cfg.build_recipe()
    factory = LinearFactory(recipe, num_layers=cfg.model.num_layers, backend=backend, seed=sr_base_seed(cfg))
    with torch.device(device):
        model = GPTModel(cfg.model, factory, init_seed=cfg.training.seed)  # overwritten by the checkpoint
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
