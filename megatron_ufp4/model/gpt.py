"""GPT: embedding -> pre-norm blocks (attention + MLP or MoE) -> final norm -> output head.

    model = GPTModel(config, LinearFactory("ufp4", config.num_layers))
    logits = model(tokens)                  # (B, T, vocab) float32; MoE aux losses ride on autograd
    loss = model(tokens, labels=labels)     # mean CE; head + CE chunked over tokens, no full logits

With ``mtp_depth`` > 0 the model also holds multi-token-prediction modules (``model.mtp``);
in training, ``model(tokens, labels=labels)`` still returns the next-token loss, and the
MTP losses reach the gradient through ``AuxLossScaler`` (as MoE aux losses do), so the
reported loss stays comparable with a model without MTP.

``model.layers`` is an ``nn.ModuleDict`` keyed by the global layer index, so a pipeline
stage is this same class with the parts it does not hold removed (layers deleted, embed /
norm / head set to ``None``; ``forward`` skips them) and keeps the full model's
state-dict keys.  ``model.step_context`` (the factory's) is where the training loop says
which (step, micro-batch) the next forward is and how aux losses are weighted.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..linear import StepContext
from .config import ModelConfig
from .init import KeyedInit
from .layers import Attention, RotaryEmbedding, SwiGLU, rms_norm
from .linear_factory import LinearFactory
from .losses import DEFAULT_CE_CHUNK_TOKENS, chunked_cross_entropy, lm_loss
from .moe import AuxLossScaler, MoE



class Block(nn.Module):
    """x + attn(norm(x)), then h + mlp(norm(h)); ``mlp`` is a SwiGLU or an MoE."""

    def __init__(self, config: ModelConfig, linear_factory, layer_index: int, rope: RotaryEmbedding,
                 step_context: StepContext | None = None, device=None):
        super().__init__()
        self.layer_index = layer_index
        self.attn_norm = rms_norm(config, device)
        self.attn = Attention(config, linear_factory, layer_index, rope, device=device)
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


class MTPModule(nn.Module):
    """Multi-token prediction at depth ``depth`` (DeepSeek-V3): from the previous depth's
    hidden states h (the main model's last layer output for depth 1) and the embedding e of
    the token ``depth`` positions ahead, ``block(proj([hidden_norm(h); embed_norm(e)]))``; its
    ``norm`` then the model's shared head predict the token ``depth + 1`` ahead.  The block is
    the main stack's kind (MoE when the model's later layers are) at layer index
    ``num_layers + depth - 1``, so recipes treat it as a layer after the last one.  ``proj``
    is a high-precision, replicated linear (2 * hidden -> hidden), like the router."""

    def __init__(self, config: ModelConfig, linear_factory, depth: int, rope: RotaryEmbedding,
                 step_context: StepContext | None = None, device=None):
        super().__init__()
        self.depth, self.layer_index = depth, config.num_layers + depth - 1
        self.hidden_norm = rms_norm(config, device)
        self.embed_norm = rms_norm(config, device)
        self.proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False, device=device)
        self.block = Block(config, linear_factory, self.layer_index, rope, step_context, device=device)
        self.norm = rms_norm(config, device)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.block(self.proj(torch.cat([self.hidden_norm(h), self.embed_norm(e)], dim=-1)))

    @torch.no_grad()
    def init_weights(self, init: KeyedInit, std: float, out_std: float) -> None:
        for norm in (self.hidden_norm, self.embed_norm, self.norm):
            norm.reset_parameters()
        init.normal_(self.proj, "weight", std)
        self.block.init_weights(init, std, out_std)


def mtp_targets(labels: torch.Tensor, depth: int, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """(input tokens, targets) of MTP depth ``depth`` from the next-token ``labels`` (B, T):
    position i reads token t[i + depth] = labels[i + depth - 1] and predicts t[i + depth + 1]
    = labels[i + depth]; positions past the end get input 0 and target ``ignore_index`` (by
    causality they cannot reach earlier positions).  Needs only labels, which the last
    pipeline stage has."""
    t = labels.shape[1]
    inputs = labels.new_zeros(labels.shape)
    targets = labels.new_full(labels.shape, ignore_index)
    if depth <= t:
        inputs[:, :t - depth + 1] = labels[:, depth - 1:]
        targets[:, :t - depth] = labels[:, depth:]
    return inputs.masked_fill(inputs < 0, 0), targets


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
            self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta, device=device,
                                        rotary_dim=config.rotary_dim)
            self.layers = nn.ModuleDict({str(i): Block(config, linear_factory, i, self.rope, self.step_context,
                                                       device=device) for i in range(config.num_layers)})
            self.norm = rms_norm(config, device)
            self.head = head_factory(config.hidden_size, config.vocab_size)
            self.mtp = nn.ModuleList([MTPModule(config, linear_factory, d, self.rope, self.step_context, device)
                                      for d in range(1, config.mtp_depth + 1)]) if config.mtp_depth else None
            if config.tie_embeddings:
                self.head.weight = self.embed.weight
        self.last_mtp_losses: torch.Tensor | None = None
        self.init_weights()

    ce_chunk_tokens = DEFAULT_CE_CHUNK_TOKENS  # tokens per chunk of the chunked cross entropy (forward(labels=))

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        """tokens (B, T) int64 -> logits (B, T, vocab) float32; with ``labels`` (B, T): the
        cross entropy instead, through ``head_loss`` (the full logits never exist), reduced
        as ``reduction`` says ("mean"; "none": per-token losses (B, T), what evaluation uses)."""
        h = self.layer_states(tokens)
        if self.norm is None:
            return h
        if labels is not None:
            return self.loss_from_layer_states(h, labels, reduction)
        out = self.norm(h)
        return out if self.head is None else self.head(out).float()

    def loss_from_layer_states(self, h: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Final norm, head and cross entropy from the last layer's output ``h``; in training
        with MTP the MTP losses join the backward (``AuxLossScaler``; the value returned stays
        the next-token loss).  The last pipeline stage's loss function."""
        loss = self.head_loss(self.norm(h), labels, reduction)
        if self.mtp is not None and self.training and reduction == "mean":
            mtp_loss = self.mtp_loss(h, labels)
            if mtp_loss.requires_grad and loss.requires_grad:
                loss = AuxLossScaler.apply(loss, mtp_loss, self.step_context.aux_loss_scale)
        return loss

    def layer_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embedding of token ids and this model's layers (those it holds).  A pipeline
        chunk after the first takes the previous stage's hidden states (floating point) and
        does not embed them, even when it holds an embedding (the last stage's copy for MTP)."""
        h = self.embed(tokens) if self.embed is not None and not tokens.is_floating_point() else tokens
        for layer in self.layers.values():
            h = layer(h)
        return h

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Everything before the head: ``layer_states`` then the final norm (when held)."""
        h = self.layer_states(tokens)
        return self.norm(h) if self.norm is not None else h

    def mtp_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``mtp_loss_coeff / depth * sum_k CE_k``: depth k's cross entropy against the token
        k + 1 ahead (``mtp_targets``), from the last layer's output ``h`` (before the final
        norm).  Keeps the detached per-depth losses (a device tensor: no host sync) in
        ``last_mtp_losses`` for logging."""
        if self.embed is None:
            raise ValueError("multi-token prediction needs the embedding on the stage that holds the head")
        losses = []
        for module in self.mtp:
            inputs, targets = mtp_targets(labels, module.depth)
            h = module(h, self.embed(inputs))
            losses.append(self.head_loss(module.norm(h), targets))
        losses = torch.stack(losses)
        self.last_mtp_losses = losses.detach()
        return losses.sum() * (self.config.mtp_loss_coeff / len(losses))

    def head_loss(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """``lm_loss(self.head(hidden).float(), labels)`` from the final-norm output, chunked
        over tokens (``chunked_cross_entropy``, ``ce_chunk_tokens`` a chunk): a head with a
        ``chunked_loss(hidden, labels, chunk_tokens)`` method (the vocabulary-parallel one)
        computes it itself, a bias-free ``nn.Linear`` through ``chunked_lm_loss``; any other
        head falls back to the full logits."""
        chunked = getattr(self.head, "chunked_loss", None)
        if chunked is not None:
            return chunked(hidden, labels, chunk_tokens=self.ce_chunk_tokens, reduction=reduction)
        if type(self.head) is nn.Linear and self.head.bias is None:
            return chunked_cross_entropy(hidden, self.head.weight, labels, chunk_tokens=self.ce_chunk_tokens,
                                         reduction=reduction)
        return lm_loss(self.head(hidden).float(), labels, reduction)

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
        for module in self.mtp or ():
            module.init_weights(init, std, out_std)
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

    def update_expert_bias(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                           ) -> dict[int, torch.Tensor]:
        """One aux-loss-free balancing step on every MoE layer (call once per optimizer
        step; ``reduce`` sums loads over data-parallel ranks).  Returns the loads used
        (device tensors: the step needs no host sync)."""
        return {m.layer_index: m.update_expert_bias(reduce) for m in self.moe_layers()}

    @torch.no_grad()
    def discard_expert_loads(self) -> None:
        """Forget loads accumulated by a step that is being skipped (non-finite loss)."""
        for m in self.moe_layers():
            m.load_accum.zero_()
