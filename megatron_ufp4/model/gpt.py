"""GPT: embedding -> pre-norm blocks (attention + MLP or MoE) -> final norm -> output head.

    model = GPTModel(config, LinearFactory("ufp4", config.num_layers))
    logits = model(tokens)                  # (B, T, vocab) float32; MoE aux losses ride on autograd

``model.layers`` is an ``nn.ModuleDict`` keyed by the global layer index, so a pipeline
stage is this same class with the parts it does not hold removed (layers deleted, embed /
norm / head set to ``None``; ``forward`` skips them) and keeps the full model's
state-dict keys.  ``model.step_context`` (the factory's) is where the training loop says
which (step, micro-batch) the next forward is and how aux losses are weighted.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..linear import StepContext
from .config import ModelConfig
from .init import KeyedInit
from .layers import Attention, RotaryEmbedding, SwiGLU, rms_norm
from .linear_factory import LinearFactory
from .moe import MoE


class Block(nn.Module):
    """x + attn(norm(x)), then h + mlp(norm(h)); ``mlp`` is a SwiGLU or an MoE."""

    def __init__(self, config: ModelConfig, linear_factory, layer_index: int, rope: RotaryEmbedding,
                 step_context: StepContext | None = None, device=None):
        super().__init__()
        self.layer_index = layer_index
        self.attn_norm = rms_norm(config, device)
        self.attn = Attention(config, linear_factory, layer_index, rope)
        self.mlp_norm = rms_norm(config, device)
        if config.is_moe_layer(layer_index):
            self.mlp = MoE(config, linear_factory, layer_index, step_context, device=device)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.ffn_hidden_size, linear_factory, layer_index, name="mlp",
                              bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))

    @torch.no_grad()
    def init_weights(self, init: KeyedInit, std: float, out_std: float) -> None:
        self.attn_norm.reset_parameters()
        self.mlp_norm.reset_parameters()
        self.attn.init_weights(init, std, out_std)
        self.mlp.init_weights(init, std, out_std)


class GPTModel(nn.Module):
    """Decoder-only transformer; see module docstring.  ``linear_factory`` makes every
    attention / MLP / expert linear (default: high-precision ``LinearFactory("bf16")``);
    ``embedding_factory(vocab, hidden)`` / ``head_factory(hidden, vocab)`` make the embedding and
    the output head (default: ``nn.Embedding`` / bias-free ``nn.Linear``; tensor parallelism
    passes vocabulary-parallel ones, see parallel/parallel_factory.py).  ``init_seed``: the
    seed of the layout-independent initialisation (model/init.py); None draws one from
    torch's global generator (the only draw building a model makes from it), so
    ``torch.manual_seed`` still decides it."""

    def __init__(self, config: ModelConfig, linear_factory=None, *, embedding_factory=None, head_factory=None,
                 init_seed: int | None = None, device=None):
        super().__init__()
        self.init_seed = int(torch.randint(0, 2 ** 62, (1,), device="cpu")) if init_seed is None else int(init_seed)
        config.validate()
        if linear_factory is None:
            linear_factory = LinearFactory("bf16", config.num_layers, device=device)
        n = getattr(linear_factory, "num_layers", None)
        if n is not None and n != config.num_layers:
            raise ValueError(f"linear_factory.num_layers={n} but config.num_layers={config.num_layers}; the recipe's "
                             "high-precision first/last layers are placed using the factory's count")
        self.config = config
        self.step_context = getattr(linear_factory, "step_context", None) or StepContext()
        # submodule constructors draw their own default inits (overwritten below): keep them off
        # the global generator, so building any layout advances it the same (by the seed draw)
        with torch.random.fork_rng(devices=[]):
            embedding_factory = embedding_factory or (lambda n, d: nn.Embedding(n, d, device=device))
            head_factory = head_factory or (lambda i, o: nn.Linear(i, o, bias=False, device=device))
            self.embed = embedding_factory(config.vocab_size, config.hidden_size)
            self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta, device=device)
            self.layers = nn.ModuleDict({str(i): Block(config, linear_factory, i, self.rope, self.step_context,
                                                       device=device) for i in range(config.num_layers)})
            self.norm = rms_norm(config, device)
            self.head = head_factory(config.hidden_size, config.vocab_size)
            if config.tie_embeddings:
                self.head.weight = self.embed.weight
        self.init_weights()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64 -> logits (B, T, vocab) float32."""
        h = self.embed(tokens) if self.embed is not None else tokens
        for layer in self.layers.values():
            h = layer(h)
        if self.norm is not None:
            h = self.norm(h)
        return self.head(h).float() if self.head is not None else h

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, init_std) weights, output projections (attention out, MLP / expert down)
        with std / sqrt(2 * num_layers), zero biases, unit norms, zero expert biases.  Each
        weight element is a function of (``init_seed``, global name, global index) only, so
        a pipeline chunk, a tensor- or expert-parallel shard initialises to the matching
        slice of the single-process model (model/init.py).  Also recomputes the RoPE tables
        and re-ties a tied head (call after ``to_empty`` on a model built on the meta device)."""
        self.rope.reset_parameters()
        if any(p.is_meta for p in self.parameters()):
            return  # nothing to fill on the meta device; re-run after to_empty
        init = KeyedInit(self, self.init_seed)
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.num_layers)
        tied = self.config.tie_embeddings
        if self.embed is not None:
            init.normal_(self.embed, "weight", std)
            if tied and self.head is not None:
                self.head.weight = self.embed.weight  # to_empty gives each module its own tensor
        for layer in self.layers.values():
            layer.init_weights(init, std, out_std)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.head is not None and (not tied or self.embed is None):  # a pipeline stage's copy of a tied weight
            init.normal_(self.head, "weight", std, name="embed.weight" if tied else None)

    # -- MoE helpers ------------------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def moe_stats(self) -> dict[int, dict]:
        """Per MoE layer (by global layer index) after the last forward: ``load`` (tokens
        routed to each expert, a list), ``aux_loss`` (float) and ``dropped`` (slots over
        capacity).  Synchronises with the device; call at logging time."""
        stats = {}
        for m in self.moe_layers():
            if m.last_load is not None:
                stats[m.layer_index] = {"load": m.last_load.tolist(), "aux_loss": float(m.last_aux_loss),
                                        "dropped": int(m.last_dropped)}
        return stats

    def update_expert_bias(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[int, list]:
        """One aux-loss-free balancing step on every MoE layer (call once per optimizer
        step; ``reduce`` sums loads over data-parallel ranks).  Returns the loads used."""
        return {m.layer_index: m.update_expert_bias(reduce).tolist() for m in self.moe_layers()}

    @torch.no_grad()
    def discard_expert_loads(self) -> None:
        """Forget loads accumulated by a step that is being skipped (non-finite loss)."""
        for m in self.moe_layers():
            m.load_accum.zero_()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of one micro-batch, in FP32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


# -- parameter counts ------------------------------------------------------------------------
class ParamCount(NamedTuple):
    total: int
    active: int  # parameters one token uses: routed experts counted top_k times of num_experts


def _swiglu_params(h: int, f: int, bias: bool) -> int:
    return 3 * h * f + ((2 * f + h) if bias else 0)


def num_params(config: ModelConfig) -> ParamCount:
    """Total / active parameter counts from the config alone (embedding, head when untied,
    norms and routers included; RoPE has none)."""
    c = config.validate()
    h, hd = c.hidden_size, c.head_dim
    qkv_out = (c.num_heads + 2 * c.num_kv_heads) * hd
    attn = h * qkv_out + c.num_heads * hd * h + ((qkv_out + h) if c.bias else 0)
    total = active = c.vocab_size * h * (1 if c.tie_embeddings else 2) + h  # embed, head, final norm
    for i in range(c.num_layers):
        layer = attn + 2 * h
        if c.is_moe_layer(i):
            expert = _swiglu_params(h, c.expert_ffn_hidden_size, c.bias)
            shared = _swiglu_params(h, c.num_shared_experts * c.expert_ffn_hidden_size, c.bias) \
                if c.num_shared_experts else 0
            layer += c.num_experts * h + c.num_experts * expert + shared
            active += layer - (c.num_experts - c.moe_top_k) * expert
        else:
            layer += _swiglu_params(h, c.ffn_hidden_size, c.bias)
            active += layer
        total += layer
    return ParamCount(total, active)


def count_params(model: nn.Module) -> ParamCount:
    """Total / active parameters of a built model (tied weights counted once); works on
    meta-device models and on pipeline stages (counts what the module holds)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = sum((m.num_experts - m.top_k) * m.expert_params() for m in model.modules() if isinstance(m, MoE))
    return ParamCount(total, total - inactive)
