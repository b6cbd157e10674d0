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
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..linear import CollectiveHooks, StepContext, linear_dtypes
from ..linear.linear_fn import high_precision_gemm
from .config import ModelConfig
from .init import KeyedInit
from .layers import Attention, RotaryEmbedding, SwiGLU, rms_norm
from .linear_factory import LinearFactory
from .moe import AuxLossScaler, MoE

DEFAULT_CE_CHUNK_TOKENS = 1024  # tokens per chunk of the chunked cross entropy


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


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross entropy of one micro-batch in FP32 (labels -100 ignored): the mean,
    or with ``reduction="none"`` the per-token losses (B, T).  Needs the full logits;
    ``chunked_lm_loss`` computes the same from the hidden states and the head weight without them."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction=reduction)
    return loss.view(labels.shape) if reduction == "none" else loss


# -- chunked cross entropy: head GEMM + softmax cross entropy, a chunk of tokens at a time ----
class VocabShard(CollectiveHooks):
    """How a head weight relates to the full vocabulary, for ``chunked_cross_entropy``: it
    holds rows [start, start + rows) and its logits are combined over ranks with
    ``all_max`` / ``all_sum`` (plus the column-parallel ``gather_input`` /
    ``reduce_input_grad`` of ``CollectiveHooks``).  The identity here: one process holds the
    whole vocabulary.  parallel/vocab_parallel.py passes the TP collectives."""

    start = 0

    def all_max(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        return x


WHOLE_VOCAB = VocabShard()


def _acc_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """The loss dtype: FP32, or wider for a wider head (float64 references in tests)."""
    return torch.promote_types(out_dtype, torch.float32)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, out_dtype, hp_dtype) -> torch.Tensor:
    """FP32 logits of one chunk, rounded exactly as the high-precision head's output
    (linear_fn's ``finish``: to the GEMM dtype, then the output dtype) and then ``.float()``,
    as the unchunked path (``head(h).float()``) computes them."""
    z = high_precision_gemm(h, weight, hp_dtype)
    acc = _acc_dtype(out_dtype)
    if z.dtype != acc or hp_dtype != acc or out_dtype != acc:
        z = z.to(hp_dtype).to(out_dtype).to(acc)
    return z


def _accumulate_wgrad(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, hp_dtype) -> None:
    """``acc += high_precision_gemm(a, b, hp_dtype)`` (inputs rounded to ``hp_dtype``, FP32 or
    wider products) without a temporary the size of ``acc``, the whole [V_local, H] weight
    gradient: an in-place addmm (bf16 / fp16 inputs widened first, their products are exact
    in FP32); a CUDA half GEMM with an FP32 result goes through row blocks of <= 2^24 elements."""
    a, b = a.to(hp_dtype), b.to(hp_dtype)
    if hp_dtype in (torch.bfloat16, torch.float16) and a.is_cuda:
        rows = max(1, (1 << 24) // max(1, b.shape[0]))
        for r in range(0, a.shape[0], rows):
            acc[r:r + rows] += high_precision_gemm(a[r:r + rows], b, hp_dtype)
        return
    if a.dtype != acc.dtype:
        a, b = a.to(acc.dtype), b.to(acc.dtype)
    acc.addmm_(a, b.t())


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy of ``hidden @ weight.T`` without the full logits.

    Forward, per chunk of ``chunk`` tokens: the chunk's FP32 logits z [c, V_local], the row
    maximum m (all-reduced MAX over the shard group), s = sum exp(z - m) and the target's
    z_y - m (one stacked SUM all-reduce), loss = log s - (z_y - m); only m and s (2 floats per
    token) are kept.  Backward recomputes each chunk's logits (one more head GEMM), forms
    dz = (exp(z - m) / s - onehot(y)) g, rounds it to the head's output dtype (what the
    unchunked ``.float()`` backward hands the head) and accumulates dH = dz W and
    dW += dz^T h in FP32; dH is reduced over the group (column-parallel input gradient),
    both are rounded once at the end like linear_fn's.  Peak: a few [c, V_local] FP32
    buffers instead of [N, V_local] ones.  The rounding points are the unchunked head +
    cross entropy's; what differs is FP32 summation order (dW over tokens in chunk partial
    sums, the reductions of the mean) -- see tests/test_chunked_ce.py for the bound."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, shard, chunk, ignore_index, out_dtype, hp_dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            x = shard.gather_input(hidden)
            x2, y = x.reshape(-1, x.shape[-1]), labels.reshape(-1)
            if x2.shape[0] != y.shape[0]:
                raise ValueError(f"hidden {tuple(x.shape)} and labels {tuple(labels.shape)} disagree on the tokens")
            v_local = weight.shape[0]
            n = y.shape[0]
            loss = torch.empty(n, dtype=_acc_dtype(out_dtype), device=hidden.device)
            m_all = torch.empty_like(loss)
            s_all = torch.empty_like(loss)
            for a in range(0, n, chunk):
                b = min(a + chunk, n)
                z = _chunk_logits(x2[a:b], weight, out_dtype, hp_dtype)
                yc = y[a:b]
                m = shard.all_max(z.amax(dim=-1))
                z.sub_(m.unsqueeze(-1))
                outside = (yc < shard.start) | (yc >= shard.start + v_local)
                local = (yc - shard.start).masked_fill(outside, 0)
                picked = z.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
                both = shard.all_sum(torch.stack([picked, z.exp_().sum(dim=-1)]))
                del z
                loss[a:b] = both[1].log() - both[0]
                m_all[a:b], s_all[a:b] = m, both[1]
            ignored = y == ignore_index
            loss.masked_fill_(ignored, 0.0)
        ctx.save_for_backward(hidden, weight, labels, m_all, s_all)
        ctx.shard, ctx.chunk, ctx.ignore_index, ctx.dtypes = shard, chunk, ignore_index, (out_dtype, hp_dtype)
        return loss.view(labels.shape)

    @staticmethod
    def backward(ctx, g):
        hidden, weight, labels, m_all, s_all = ctx.saved_tensors
        shard, chunk = ctx.shard, ctx.chunk
        out_dtype, hp_dtype = ctx.dtypes
        with torch.autocast(hidden.device.type, enabled=False):
            x = shard.gather_input(hidden)
            x2, y = x.reshape(-1, x.shape[-1]), labels.reshape(-1)
            g = g.reshape(-1).to(m_all.dtype).masked_fill(y == ctx.ignore_index, 0.0)
            v_local, n = weight.shape[0], y.shape[0]
            need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            acc = m_all.dtype
            dx = torch.empty(x2.shape, dtype=acc, device=x2.device) if need_x else None
            dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
            for a in range(0, n, chunk):
                b = min(a + chunk, n)
                z = _chunk_logits(x2[a:b], weight, out_dtype, hp_dtype)
                yc = y[a:b]
                p = z.sub_(m_all[a:b].unsqueeze(-1)).exp_().div_(s_all[a:b].unsqueeze(-1))
                inside = (yc >= shard.start) & (yc < shard.start + v_local)
                rows = inside.nonzero().squeeze(-1)
                p[rows, yc[rows] - shard.start] -= 1.0
                dz = p.mul_(g[a:b].unsqueeze(-1)).to(out_dtype)
                del z, p
                if need_x:
                    dx[a:b] = high_precision_gemm(dz, weight.t(), hp_dtype)
                if need_w:
                    _accumulate_wgrad(dw, dz.t(), x2[a:b].t(), hp_dtype)
                del dz
            dh = dw_out = None
            if need_x:
                dh = shard.reduce_input_grad(dx.view(*x.shape))
                dh = (dh.to(hp_dtype) if hp_dtype is not None else dh).to(hidden.dtype)
            if need_w:
                dw_out = dw.to(hp_dtype).to(weight.dtype)
        return dh, dw_out, None, None, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          shard: VocabShard = WHOLE_VOCAB, chunk_tokens: int = DEFAULT_CE_CHUNK_TOKENS,
                          ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of the high-precision head ``hidden @ weight.T`` (no bias) against
    ``labels``, ``chunk_tokens`` tokens at a time, so the FP32 logits [tokens, vocab] never
    exist at once, in forward or backward.  ``hidden`` [B, T, H] (T local under sequence
    parallelism, see ``shard``), ``labels`` [B, T_full].  Same semantics as
    ``F.cross_entropy(head(hidden).float(), labels)``: ``ignore_index``, reductions "mean"
    (over non-ignored labels), "sum", "none"; same dtype rule as the head's linear (autocast:
    GEMM inputs in the autocast dtype, FP32 products, logits rounded to the output dtype)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none' (got {reduction!r})")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer (got {chunk_tokens!r})")
    if hidden.dim() != 3 or labels.dim() != 2:
        raise ValueError(f"hidden must be [B, T, H] and labels [B, T] (got {tuple(hidden.shape)}, "
                         f"{tuple(labels.shape)})")
    out_dtype, hp_dtype = linear_dtypes(hidden, weight, quantized=False)
    loss = _ChunkedCrossEntropy.apply(hidden, weight, labels, shard, chunk_tokens, ignore_index, out_dtype,
                                      hp_dtype)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (labels != ignore_index).sum().clamp_min(1)


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    chunk_tokens: int = DEFAULT_CE_CHUNK_TOKENS) -> torch.Tensor:
    """``lm_loss(head(hidden).float(), labels)`` for a bias-free high-precision head of
    weight ``weight`` [V, H], without materialising the logits (``chunked_cross_entropy``)."""
    return chunked_cross_entropy(hidden, weight, labels, chunk_tokens=chunk_tokens)


# -- parameter counts ------------------------------------------------------------------------
class ParamCount(NamedTuple):
    total: int
    active: int  # parameters one token uses: routed experts counted top_k times of num_experts


def _swiglu_params(h: int, f: int, bias: bool) -> int:
    return 3 * h * f + ((2 * f + h) if bias else 0)


def num_params(config: ModelConfig) -> ParamCount:
    """Total / active parameter counts from the config alone (embedding, head when untied,
    norms, routers and MTP modules included; RoPE has none)."""
    c = config.validate()
    h = c.hidden_size
    total = active = c.vocab_size * h * (1 if c.tie_embeddings else 2) + h  # embed, head, final norm
    for i in range(c.num_layers + c.mtp_depth):
        layer, inactive = _layer_params(c, i)
        if i >= c.num_layers:  # an MTP module: its two input norms, output norm and 2h -> h projection
            layer += 3 * h + 2 * h * h
        total, active = total + layer, active + layer - inactive
    return ParamCount(total, active)


def _layer_params(c: ModelConfig, i: int) -> tuple[int, int]:
    """Parameters of transformer block ``i`` (MTP blocks continue the numbering), and how
    many of them a token does not use (the routed experts it is not sent to)."""
    h, hd = c.hidden_size, c.head_dim
    qkv_out = (c.num_heads + 2 * c.num_kv_heads) * hd
    layer = h * qkv_out + c.num_heads * hd * h + ((qkv_out + h) if c.bias else 0) + 2 * h
    layer += 2 * hd if c.qk_norm else 0
    if not c.is_moe_layer(i):
        return layer + _swiglu_params(h, c.ffn_hidden_size, c.bias), 0
    expert = _swiglu_params(h, c.expert_ffn_hidden_size, c.bias)
    shared = _swiglu_params(h, c.num_shared_experts * c.expert_ffn_hidden_size, c.bias) \
        if c.num_shared_experts else 0
    return layer + c.num_experts * h + c.num_experts * expert + shared, (c.num_experts - c.moe_top_k) * expert


def count_params(model: nn.Module) -> ParamCount:
    """Total / active parameters of a built model (tied weights counted once); works on
    meta-device models and on pipeline stages (counts what the module holds)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = sum((m.num_experts - m.top_k) * m.expert_params() for m in model.modules() if isinstance(m, MoE))
    return ParamCount(total, total - inactive)
