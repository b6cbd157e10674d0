"""Our GPT (dense or MoE) <-> Hugging Face transformers classes: config fields and tensor names.

Only classes whose forward computes exactly what ours does are used; a model that none of
them computes is refused (``HFMappingError``, one line naming the feature).  The choice:

    dense, no qk_norm, full RoPE                 LlamaForCausalLM  (bias: attention_bias + mlp_bias)
    dense, qk_norm, full RoPE, no bias           Qwen3ForCausalLM
    dense, partial RoPE, no bias                 Glm4MoeForCausalLM with every layer dense
    MoE sigmoid router, no bias                  Glm4MoeForCausalLM (e_score_correction_bias = expert_bias)
    MoE softmax, qk_norm, no shared experts      Qwen3MoeForCausalLM (first_k_dense: mlp_only_layers)
    MoE softmax, no qk_norm, renormalised top-k,
      no shared experts, no dense layers         MixtralForCausalLM

Tensors are written in the Hub's per-expert layout (``mlp.experts.{e}.gate_proj.weight``;
Mixtral: ``block_sparse_moe.experts.{e}.w1/w2/w3``) that every reader loads; transformers 5
fuses them on load.  Our fused qkv is grouped by KV head (r = num_heads / num_kv_heads query
heads, then the key head, then the value head, per group): q / k / v are those slices.
"""
from __future__ import annotations

import re

import torch

LLAMA, QWEN3, GLM4_MOE, QWEN3_MOE, MIXTRAL = "llama", "qwen3", "glm4_moe", "qwen3_moe", "mixtral"
ARCHITECTURES = {LLAMA: "LlamaForCausalLM", QWEN3: "Qwen3ForCausalLM", GLM4_MOE: "Glm4MoeForCausalLM",
                 QWEN3_MOE: "Qwen3MoeForCausalLM", MIXTRAL: "MixtralForCausalLM"}
# (our SwiGLU part, HF name) per family; Mixtral's experts use w1 / w3 / w2
_MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_MIXTRAL_EXPERT = {"gate": "w1", "up": "w3", "down": "w2"}


class HFMappingError(ValueError):
    """A model (or an HF checkpoint) that no supported class computes exactly: one line."""


def _get(model: dict, name: str, default):
    return model.get(name, default) if model.get(name) is not None else default


def head_dim_of(m: dict) -> int:
    return int(_get(m, "head_dim", m["hidden_size"] // m["num_heads"]))


def choose_architecture(m: dict, expert_bias_nonzero: bool = False) -> str:
    """The model_type that computes the model ``m`` (a ModelConfig dict) exactly, or a refusal."""
    qk_norm, bias = bool(_get(m, "qk_norm", False)), bool(m.get("bias", False))
    partial = float(_get(m, "rotary_fraction", 1.0)) != 1.0
    if int(m.get("num_experts", 0)) == 0:
        if partial:
            if bias:
                raise HFMappingError("model.bias with model.rotary_fraction < 1: the one class with partial "
                                     "RoPE (Glm4Moe) has biases on q/k/v only")
            return GLM4_MOE
        if qk_norm:
            if bias:
                raise HFMappingError("model.bias with model.qk_norm: Qwen3 (the qk-norm class) has no MLP biases")
            return QWEN3
        return LLAMA
    if bias:
        raise HFMappingError("model.bias on an MoE model: no transformers MoE class has biases on the attention "
                             "output, MLP and experts")
    if m.get("router_score", "softmax") == "sigmoid":
        if int(m["num_experts"]) // int(_get(m, "router_groups", 1)) < 2:
            raise HFMappingError("model.num_experts: Glm4Moe scores each expert group by its 2 best experts, "
                                 "so it needs >= 2 experts per group")
        return GLM4_MOE
    for name, default, why in (
            ("num_shared_experts", 0, "softmax routing with shared experts (Qwen2Moe gates its shared expert)"),
            ("router_groups", 1, "softmax routing with group-limited routing"),
            ("routed_scaling_factor", 1.0, "softmax routing with routed_scaling_factor != 1"),
            ("rotary_fraction", 1.0, "softmax routing with partial RoPE")):
        if _get(m, name, default) != default:
            raise HFMappingError(f"model.{name}: no transformers class computes {why}")
    if expert_bias_nonzero:
        raise HFMappingError("router expert_bias is nonzero: no transformers softmax-routing class has a "
                             "selection bias (Glm4Moe has one, for sigmoid routing)")
    if qk_norm:
        return QWEN3_MOE
    if not m.get("router_norm_topk", True):
        raise HFMappingError("model.router_norm_topk=false with softmax routing and no qk_norm: Mixtral always "
                             "renormalises the top-k weights")
    if int(m.get("first_k_dense", 0)):
        raise HFMappingError("model.first_k_dense with softmax routing and no qk_norm: Mixtral has no dense layers")
    return MIXTRAL


def hf_config(m: dict, arch: str, special: dict | None = None) -> dict:
    """config.json for the model ``m`` as ``arch``; top-level ``rope_theta`` (and
    ``partial_rotary_factor``) are what transformers 4 reads and 5 converts."""
    hd, n = head_dim_of(m), int(m["num_layers"])
    c = {"architectures": [ARCHITECTURES[arch]], "model_type": arch, "vocab_size": m["vocab_size"],
         "hidden_size": m["hidden_size"], "intermediate_size": m["ffn_hidden_size"], "num_hidden_layers": n,
         "num_attention_heads": m["num_heads"], "num_key_value_heads": m["num_kv_heads"], "head_dim": hd,
         "hidden_act": "silu", "max_position_embeddings": m["max_seq_len"], "rms_norm_eps": m["norm_eps"],
         "rope_theta": m["rope_theta"], "rope_scaling": None, "tie_word_embeddings": bool(m["tie_embeddings"]),
         "initializer_range": m["init_std"], "attention_dropout": 0.0, "use_cache": True, "torch_dtype": "float32"}
    c.update({"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **(special or {})})
    moe = {"num_experts_per_tok": m.get("moe_top_k"), "moe_intermediate_size":
           _get(m, "moe_ffn_hidden_size", m["ffn_hidden_size"])}
    if arch == LLAMA:
        c.update(attention_bias=bool(m["bias"]), mlp_bias=bool(m["bias"]), pretraining_tp=1)
    elif arch in (QWEN3, QWEN3_MOE):
        c.update(attention_bias=False, use_sliding_window=False, sliding_window=None, max_window_layers=n,
                 layer_types=["full_attention"] * n)
        if arch == QWEN3_MOE:
            c.update(moe, num_experts=m["num_experts"], norm_topk_prob=bool(m["router_norm_topk"]),
                     decoder_sparse_step=1, mlp_only_layers=list(range(int(m["first_k_dense"]))),
                     router_aux_loss_coef=m["aux_loss_coeff"], output_router_logits=False)
    elif arch == MIXTRAL:
        c.update(moe, num_local_experts=m["num_experts"], sliding_window=None, router_jitter_noise=0.0,
                 router_aux_loss_coef=m["aux_loss_coeff"], output_router_logits=False)
        del c["moe_intermediate_size"]
        c["intermediate_size"] = moe["moe_intermediate_size"]  # Mixtral's experts' width
    else:  # GLM4_MOE
        dense = int(m.get("num_experts", 0)) == 0
        c.update(attention_bias=False, use_qk_norm=bool(_get(m, "qk_norm", False)),
                 partial_rotary_factor=float(_get(m, "rotary_fraction", 1.0)), num_nextn_predict_layers=0,
                 n_routed_experts=1 if dense else m["num_experts"], num_experts_per_tok=1 if dense else m["moe_top_k"],
                 moe_intermediate_size=moe["moe_intermediate_size"],
                 n_shared_experts=0 if dense else m["num_shared_experts"],
                 first_k_dense_replace=n if dense else m["first_k_dense"],
                 norm_topk_prob=bool(m.get("router_norm_topk", True)),
                 routed_scaling_factor=float(_get(m, "routed_scaling_factor", 1.0)),
                 n_group=int(_get(m, "router_groups", 1)), topk_group=int(_get(m, "router_topk_groups", 1)))
    return c


# -- tensors -------------------------------------------------------------------------------------------
def _qkv_split(w: torch.Tensor, m: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hd, nkv = head_dim_of(m), int(m["num_kv_heads"])
    r = int(m["num_heads"]) // nkv
    g = w.reshape(nkv, r + 2, hd, *w.shape[1:])
    return (g[:, :r].reshape(-1, *w.shape[1:]), g[:, r].reshape(-1, *w.shape[1:]),
            g[:, r + 1].reshape(-1, *w.shape[1:]))


def _qkv_join(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: dict) -> torch.Tensor:
    hd, nkv = head_dim_of(m), int(m["num_kv_heads"])
    rest = q.shape[1:]
    g = torch.cat([q.reshape(nkv, -1, hd, *rest), k.reshape(nkv, 1, hd, *rest), v.reshape(nkv, 1, hd, *rest)], 1)
    return g.reshape(-1, *rest)


def _mlp_prefix(arch: str, layer: int, moe: bool) -> str:
    return f"model.layers.{layer}.{'block_sparse_moe' if arch == MIXTRAL and moe else 'mlp'}"


def name_pairs(m: dict, arch: str) -> list[tuple[str, list[str], str]]:
    """(our key, HF keys, how) for every weight: how = "same" | "qkv" (3 HF keys) | "gate_up" (2)."""
    bias = bool(m.get("bias", False))
    out = [("embed.weight", ["model.embed_tokens.weight"], "same"), ("norm.weight", ["model.norm.weight"], "same")]
    if not m["tie_embeddings"]:
        out.append(("head.weight", ["lm_head.weight"], "same"))
    suffixes = ("weight", "bias") if bias else ("weight",)
    for i in range(int(m["num_layers"])):
        ours, hf = f"layers.{i}", f"model.layers.{i}"
        out += [(f"{ours}.attn_norm.weight", [f"{hf}.input_layernorm.weight"], "same"),
                (f"{ours}.mlp_norm.weight", [f"{hf}.post_attention_layernorm.weight"], "same")]
        for s in suffixes:
            out += [(f"{ours}.attn.qkv.{s}", [f"{hf}.self_attn.{p}_proj.{s}" for p in "qkv"], "qkv"),
                    (f"{ours}.attn.proj.{s}", [f"{hf}.self_attn.o_proj.{s}"], "same")]
        if _get(m, "qk_norm", False):
            out += [(f"{ours}.attn.{p}_norm.weight", [f"{hf}.self_attn.{p}_norm.weight"], "same") for p in "qk"]
        moe = int(m.get("num_experts", 0)) > 0 and i >= int(m.get("first_k_dense", 0))
        mlp = _mlp_prefix(arch, i, moe)
        if not moe:
            out += _swiglu(f"{ours}.mlp", mlp, _MLP, suffixes)
            continue
        out.append((f"{ours}.mlp.router.linear.weight", [f"{mlp}.gate.weight"], "same"))
        if arch == GLM4_MOE:
            out.append((f"{ours}.mlp.router.expert_bias", [f"{mlp}.gate.e_score_correction_bias"], "same"))
        names = _MIXTRAL_EXPERT if arch == MIXTRAL else _MLP
        for e in range(int(m["num_experts"])):
            out += _swiglu(f"{ours}.mlp.experts.{e}", f"{mlp}.experts.{e}", names, suffixes)
        if int(m.get("num_shared_experts", 0)):
            out += _swiglu(f"{ours}.mlp.shared", f"{mlp}.shared_experts", _MLP, suffixes)
    return out


def _swiglu(ours: str, hf: str, names: dict, suffixes) -> list:
    return [x for s in suffixes for x in ((f"{ours}.gate_up.{s}", [f"{hf}.{names['gate']}.{s}",
                                                                    f"{hf}.{names['up']}.{s}"], "gate_up"),
                                          (f"{ours}.down.{s}", [f"{hf}.{names['down']}.{s}"], "same"))]


IGNORED = re.compile(r"(^|\.)_extra_state$")  # SR generators and RHT signs of the FP4 linears: not weights


def to_hf_tensors(state: dict, m: dict, arch: str) -> dict[str, torch.Tensor]:
    """Our model state dict -> HF tensors (contiguous copies).  A key the mapping does not
    know (a feature added to the model since) is refused, never silently dropped;
    ``mtp.*`` (multi-token prediction) is the caller's to drop."""
    pairs = name_pairs(m, arch)
    known = {ours for ours, _, _ in pairs} | ({"head.weight"} if m["tie_embeddings"] else set())
    if arch != GLM4_MOE:  # a softmax router's selection bias: zero (choose_architecture refuses any other)
        known |= {k for k in state if k.endswith(".mlp.router.expert_bias")}
    for k in state:
        if k not in known and not IGNORED.search(k) and not k.startswith("mtp."):
            raise HFMappingError(f"checkpoint key {k!r} has no Hugging Face counterpart in this export")
    out = {}
    for ours, hf, how in pairs:
        if ours not in state:
            raise HFMappingError(f"checkpoint lacks {ours!r} (its config says the model has it)")
        t = state[ours].detach()
        parts = _qkv_split(t, m) if how == "qkv" else t.chunk(2, 0) if how == "gate_up" else (t,)
        out.update({name: p.contiguous().clone() for name, p in zip(hf, parts)})
    return out


def from_hf_tensors(tensors: dict, m: dict, arch: str) -> dict[str, torch.Tensor]:
    """HF tensors -> our model state dict (weights only; a tied head shares the embedding)."""
    pairs = name_pairs(m, arch)
    used = {h for _, hf, _ in pairs for h in hf}
    extra = sorted(k for k in tensors if k not in used and not (m["tie_embeddings"] and k == "lm_head.weight"))
    if extra:
        raise HFMappingError(f"HF checkpoint tensor {extra[0]!r} has no counterpart in our model")
    out = {}
    for ours, hf, how in pairs:
        missing = [h for h in hf if h not in tensors]
        if missing:
            raise HFMappingError(f"HF checkpoint lacks {missing[0]!r}")
        ts = [tensors[h] for h in hf]
        out[ours] = _qkv_join(*ts, m) if how == "qkv" else torch.cat(ts, 0) if how == "gate_up" else ts[0]
    if m["tie_embeddings"]:
        out["head.weight"] = out["embed.weight"]
    return out


# -- an HF config -> our model section ---------------------------------------------------------------------
def _rope(c: dict) -> tuple[float, float]:
    """(theta, partial rotary factor) of plain RoPE; scaled variants are refused."""
    rp = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    kind = rp.get("rope_type", rp.get("type")) or scaling.get("rope_type", scaling.get("type")) or "default"
    if kind != "default":
        raise HFMappingError(f"rope type {kind!r}: only plain RoPE is supported")
    theta = rp.get("rope_theta", c.get("rope_theta", 10000.0))
    return float(theta), float(rp.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)))


def model_from_hf(c: dict) -> tuple[dict, str]:
    """(our ModelConfig fields, model_type) for an HF config.json of a supported class."""
    arch = c.get("model_type")
    if arch not in ARCHITECTURES:
        raise HFMappingError(f"config.json: model_type {arch!r} is not supported (supported: "
                             f"{', '.join(ARCHITECTURES)})")
    if c.get("hidden_act", "silu") != "silu":
        raise HFMappingError(f"config.json: hidden_act {c['hidden_act']!r}; our MLP is SwiGLU (silu)")
    theta, partial = _rope(c)
    if arch == GLM4_MOE and "partial_rotary_factor" not in c and "partial_rotary_factor" not in (
            c.get("rope_parameters") or {}):
        partial = 0.5  # Glm4Moe's default
    n = int(c["num_hidden_layers"])
    m = {"vocab_size": c["vocab_size"], "hidden_size": c["hidden_size"], "num_layers": n,
         "num_heads": c["num_attention_heads"],
         "num_kv_heads": c.get("num_key_value_heads") or c["num_attention_heads"],
         "ffn_hidden_size": c["intermediate_size"], "max_seq_len": c["max_position_embeddings"],
         "rope_theta": theta, "norm_eps": c["rms_norm_eps"], "tie_embeddings": bool(c.get("tie_word_embeddings")),
         "init_std": c.get("initializer_range", 0.02),
         "head_dim": c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]}
    if partial != 1.0:
        if arch != GLM4_MOE:
            raise HFMappingError(f"config.json: partial_rotary_factor={partial} is not read by {arch}")
        m["rotary_fraction"] = partial
    if c.get("sliding_window") is not None and (arch == MIXTRAL or c.get("use_sliding_window")):
        raise HFMappingError("config.json: sliding-window attention is not supported (ours is full causal)")
    if arch == LLAMA:
        if bool(c.get("attention_bias")) != bool(c.get("mlp_bias")):
            raise HFMappingError("config.json: attention_bias != mlp_bias; our model.bias covers both")
        m["bias"] = bool(c.get("attention_bias"))
        return m, arch
    if c.get("attention_bias"):
        raise HFMappingError(f"config.json: attention_bias=true in {arch}; ours has no attention-only biases")
    if arch in (QWEN3, QWEN3_MOE) or (arch == GLM4_MOE and c.get("use_qk_norm")):
        m["qk_norm"] = True
    if arch == QWEN3:
        return m, arch
    if arch == MIXTRAL:
        m.update(num_experts=c["num_local_experts"], moe_top_k=c["num_experts_per_tok"],
                 moe_ffn_hidden_size=c["intermediate_size"], router_score="softmax", router_norm_topk=True,
                 aux_loss_coeff=c.get("router_aux_loss_coef", 0.01))
        return m, arch
    if arch == QWEN3_MOE:
        dense = list(c.get("mlp_only_layers") or [])
        if int(c.get("decoder_sparse_step", 1)) != 1 or dense != list(range(len(dense))):
            raise HFMappingError("config.json: Qwen3Moe dense layers other than the first k (decoder_sparse_step, "
                                 "mlp_only_layers) are not supported")
        m.update(num_experts=c["num_experts"], moe_top_k=c["num_experts_per_tok"],
                 moe_ffn_hidden_size=c["moe_intermediate_size"], first_k_dense=len(dense), router_score="softmax",
                 router_norm_topk=bool(c.get("norm_topk_prob")), aux_loss_coeff=c.get("router_aux_loss_coef", 0.01))
        return m, arch
    k = int(c.get("first_k_dense_replace", 1))
    if k >= n:  # every layer dense
        return m, arch
    m.update(num_experts=c["n_routed_experts"], moe_top_k=c["num_experts_per_tok"],
             moe_ffn_hidden_size=c["moe_intermediate_size"], num_shared_experts=int(c.get("n_shared_experts", 1)),
             first_k_dense=k, router_score="sigmoid", router_norm_topk=bool(c.get("norm_topk_prob", True)),
             routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)), router_groups=int(c.get("n_group", 1)),
             router_topk_groups=int(c.get("topk_group", 1)))
    return m, arch
