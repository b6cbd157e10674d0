"""Parameter counts of a model config (analytic) and of a built module."""
from __future__ import annotations

from typing import NamedTuple

from torch import nn

from .config import ModelConfig
from .moe import MoE


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
