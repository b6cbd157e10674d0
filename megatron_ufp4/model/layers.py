"""Building blocks of a Llama-style transformer: RMSNorm, RoPE (full or partial), GQA
attention (optionally with QK-norm), SwiGLU.

Every linear of attention and MLP comes from a ``linear_factory`` (see linear_factory.py);
norms, rotary embeddings, the softmax and the QK^T / PV batched matmuls stay in torch's
own high-precision ops.  The forward code reads the number of heads / hidden units from
the *output of* the fused linears (``view(..., -1, ...)``), so the same code runs on the
local shard a tensor-parallel column linear returns.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .init import KeyedInit


def rms_norm(config: ModelConfig, device=None) -> nn.RMSNorm:
    return nn.RMSNorm(config.hidden_size, eps=config.norm_eps, device=device)


class HeadRMSNorm(nn.RMSNorm):
    """RMSNorm over ``head_dim``, one weight shared by every head (QK-norm).  A tensor-parallel
    rank holds only its heads, so its gradient for the weight is a partial sum over the
    tensor-parallel group (parallel/parallel_factory.py marks and sums it)."""


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, "rotate-half" layout (GPT-NeoX / HF Llama), on the first
    ``rotary_dim`` channels of each head (all of them by default; partial RoPE as in
    GPT-NeoX / Ling: the other channels pass through unrotated).

    Rotated channel i of the first half pairs with channel i of the second half and turns by
    angle pos * theta^(-2i/rotary_dim).  cos/sin are precomputed in float64 and stored as
    non-persistent float32 buffers (max_seq_len, rotary_dim / 2).
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0, device=None,
                 rotary_dim: int | None = None):
        super().__init__()
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if rotary_dim % 2 or not 2 <= rotary_dim <= head_dim:
            raise ValueError(f"rotary embeddings need an even rotary_dim in [2, head_dim={head_dim}] "
                             f"(got {rotary_dim})")
        self.head_dim, self.rotary_dim, self.max_seq_len, self.theta = head_dim, rotary_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, rotary_dim // 2, device=device), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, rotary_dim // 2, device=device), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)compute the tables, e.g. after ``to_empty`` materialised a meta-device model."""
        if self.cos.is_meta:
            return
        inv_freq = self.theta ** (-torch.arange(0, self.rotary_dim, 2, dtype=torch.float64) / self.rotary_dim)
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float64), inv_freq)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate x (..., T, head_dim); positions (T,) default to 0..T-1."""
        t = x.shape[-2]
        if positions is None:
            if t > self.max_seq_len:
                raise ValueError(f"sequence length {t} exceeds max_seq_len={self.max_seq_len}")
            cos, sin = self.cos[:t], self.sin[:t]
        else:
            cos, sin = self.cos[positions], self.sin[positions]
        dtype = torch.promote_types(x.dtype, torch.float32)
        cos, sin = cos.to(dtype), sin.to(dtype)
        rot, rest = x.split([self.rotary_dim, self.head_dim - self.rotary_dim], dim=-1)
        x1, x2 = rot.to(dtype).chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
        return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out

    def extra_repr(self) -> str:
        part = f", rotary_dim={self.rotary_dim}" if self.rotary_dim != self.head_dim else ""
        return f"head_dim={self.head_dim}{part}, max_seq_len={self.max_seq_len}, theta={self.theta}"


class CoreAttention(nn.Module):
    """softmax(Q K^T / sqrt(d)) V, causal, over RoPE'd heads: the part of attention whose saved
    activations grow with T^2 where no fused kernel keeps them out (what selective activation
    recomputation recomputes, as Megatron-LM's ``core_attn``).  No parameters."""

    def __init__(self, grouped_query: bool):
        super().__init__()
        self.grouped_query = grouped_query

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.grouped_query)


class Attention(nn.Module):
    """Causal grouped-query self-attention with a fused qkv projection.

    qkv output layout, grouped by KV head (Megatron's): for each of the num_kv_heads
    groups, its num_heads/num_kv_heads query heads, then its key head, then its value head.
    A contiguous split of that output (a column-parallel shard) holds whole groups.
    Query head h attends with KV head h // (num_heads / num_kv_heads).  ``qk_norm``: every
    query and key head is RMS-normalised over head_dim (one weight for q, one for k) before
    RoPE (OLMo-2 / Qwen3 / Ling).
    """

    def __init__(self, config: ModelConfig, linear_factory, layer_index: int, rope: RotaryEmbedding, device=None):
        super().__init__()
        hd, nh, nkv = config.head_dim, config.num_heads, config.num_kv_heads
        self.head_dim, self.q_per_kv = hd, nh // nkv
        self.qkv = linear_factory(config.hidden_size, (nh + 2 * nkv) * hd, kind="column", layer_index=layer_index,
                                  name="attn.qkv", bias=config.bias)
        self.proj = linear_factory(nh * hd, config.hidden_size, kind="row", layer_index=layer_index,
                                   name="attn.proj", bias=config.bias)
        self.rope = rope  # shared by all layers; non-persistent buffers, so no state-dict keys
        self.q_norm = HeadRMSNorm(hd, eps=config.norm_eps, device=device) if config.qk_norm else None
        self.k_norm = HeadRMSNorm(hd, eps=config.norm_eps, device=device) if config.qk_norm else None
        self.core = CoreAttention(grouped_query=self.q_per_kv > 1)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        r, hd = self.q_per_kv, self.head_dim
        qkv = self.qkv(x)
        b, t = qkv.shape[:2]  # from the output: a sequence-parallel x holds only this rank's T / tp positions
        qkv = qkv.view(b, t, -1, (r + 2) * hd)  # (B, T, kv groups, (r + 2) * hd)
        q, k, v = qkv.split([r * hd, hd, hd], dim=-1)
        q = q.reshape(b, t, -1, hd).transpose(1, 2)  # (B, heads, T, hd)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, kv heads, T, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q, positions), self.rope(k, positions)
        y = self.core(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))

    @torch.no_grad()
    def init_weights(self, init: KeyedInit, std: float, out_std: float) -> None:
        _init_linear(init, self.qkv, std)
        _init_linear(init, self.proj, out_std)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()


class SwiGLU(nn.Module):
    """down(silu(gate) * up) with gate and up fused in one column linear ([gate; up] rows).

    ``name`` prefixes the linears' names ("mlp", "mlp.shared").  gate_up is declared as two
    fused parts, so a tensor-parallel shard holds [gate shard; up shard] (Megatron's layout).
    ``in_moe``: the shared experts of an MoE layer (routed experts: model/experts.py).
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, linear_factory, layer_index: int, name: str = "mlp",
                 bias: bool = False, *, in_moe: bool = False):
        super().__init__()
        self.gate_up = linear_factory(hidden_size, 2 * ffn_hidden_size, kind="column", layer_index=layer_index,
                                      name=f"{name}.gate_up", bias=bias, parts=2, in_moe=in_moe)
        self.down = linear_factory(ffn_hidden_size, hidden_size, kind="row", layer_index=layer_index,
                                   name=f"{name}.down", bias=bias, in_moe=in_moe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

    @torch.no_grad()
    def init_weights(self, init: KeyedInit, std: float, out_std: float) -> None:
        _init_linear(init, self.gate_up, std)
        _init_linear(init, self.down, out_std)


def _init_linear(init: KeyedInit, linear: nn.Module, std: float) -> None:
    init.normal_(linear, "weight", std)
    if getattr(linear, "bias", None) is not None:
        nn.init.zeros_(linear.bias)
