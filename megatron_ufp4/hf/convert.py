"""Export our checkpoints to a Hugging Face directory and import Llama-family ones back.

Every refusal is an ``HFMappingError`` or ``CheckpointError`` (one line) raised before
anything is written; the output directory appears complete or not at all (``atomic_dir``).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from ..model.config import ModelConfig, upgrade_saved_model
from ..model.expert_keys import stack_experts, unstack_experts
from ..model.placement import named_placements
from ..outputs import SyncedWriter, os_error_line
from .files import (DEFAULT_MAX_SHARD, atomic_dir, copy_hf_tokenizer, export_tokenizer, parse_size, read_safetensors,
                    write_json, write_safetensors)
from .mapping import GLM4_MOE, HFMappingError, choose_architecture, from_hf_tensors, hf_config, model_from_hf, \
    to_hf_tensors


def load_source(src: str | Path) -> tuple[dict, dict, Path]:
    """(model state dict, run config dict, checkpoint path) of a run directory (its latest
    checkpoint), a single-process checkpoint (directory or ``state.pt`` / to-single file)
    or a sharded (DCP) checkpoint directory, through the project's safe loaders."""
    from ..training.checkpoint_formats import read_checkpoint
    from ..training.inference import resolve_checkpoint

    p = resolve_checkpoint(src)
    state = read_checkpoint(p)
    return state["model"], state["config"], p


def model_section(config: dict) -> dict:
    """The checkpoint's model section, resolved and validated (head_dim an int)."""
    try:
        return ModelConfig.from_dict(upgrade_saved_model(dict(config.get("model") or {}))).to_dict()
    except (TypeError, ValueError) as e:
        raise HFMappingError(f"the checkpoint's model config is invalid: {str(e).splitlines()[0]}") from None


def export_hf(src, out, max_shard_size=DEFAULT_MAX_SHARD, tokenizer: str | Path | None = None,
              with_tokenizer: bool = True, console=print) -> str:
    """Write ``out`` (config.json, safetensors, generation_config.json, tokenizer); returns
    the architecture written."""
    out = Path(out)
    limit = parse_size(max_shard_size)
    state, config, ckpt = load_source(src)
    m = model_section(config)
    mtp = sorted({k.split(".")[1] for k in state if k.startswith("mtp.")})
    if mtp or int(m.get("mtp_depth", 0) or 0):
        console(f"dropping the {len(mtp) or m.get('mtp_depth')} multi-token-prediction module(s) (mtp.*): "
                "transformers does not run them")
    nonzero = any(bool(v.abs().max() > 0) for k, v in state.items() if k.endswith("router.expert_bias"))
    arch = choose_architecture(m, expert_bias_nonzero=nonzero)
    tensors = to_hf_tensors(unstack_experts(state, _placements(ModelConfig.from_dict(m))), m, arch)
    tok = _run_tokenizer(tokenizer, config.get("data") or {}) if with_tokenizer else None
    with atomic_dir(out) as tmp:
        if tok is None:
            special = {}
        elif tok.kind == "sentencepiece":
            special = export_tokenizer(Path(tok.path), tmp, m["max_seq_len"])
        else:
            special = copy_hf_tokenizer(tok, tmp, m["max_seq_len"])
        write_json(tmp / "config.json", hf_config(m, arch, special))
        if special.get("eos_token_id") is not None:
            write_json(tmp / "generation_config.json", {
                "_from_model_config": True, "bos_token_id": special.get("bos_token_id"),
                "eos_token_id": special["eos_token_id"], "pad_token_id": special.get("pad_token_id")})
        write_safetensors(tmp, tensors, limit)
    console(f"wrote {out} ({arch}, from {ckpt})")
    return arch


# -- import ---------------------------------------------------------------------------------------------------
def _run_tokenizer(given, data: dict):
    """``given`` (--tokenizer), else the run's (``data.tokenizer``, else the one stored with its
    ``data.prefix`` dataset); one line when there is none."""
    from ..data.tokenizer import configured_tokenizer, load_tokenizer

    try:
        tok = load_tokenizer(given) if given else configured_tokenizer(
            data.get("tokenizer"), str(data.get("prefix", "")) if data.get("path") is None else None)
    except (FileNotFoundError, ValueError) as e:
        raise HFMappingError(f"{e}: pass --tokenizer PATH or --no-tokenizer") from None
    if tok is None:
        raise HFMappingError("the run trained on data.path corpora without data.tokenizer: pass --tokenizer PATH "
                             "or --no-tokenizer")
    return tok


def _placements(mcfg: ModelConfig) -> dict:
    """Where our one-process model of ``mcfg`` keeps each parameter (its stacked experts)."""
    from ..model import GPTModel

    with torch.device("meta"):
        return named_placements(GPTModel(mcfg, init_seed=0))


def _check_layout(sd: dict, mcfg: ModelConfig) -> None:
    """Our model of ``mcfg`` has exactly these weights, shape for shape (else one line naming the key)."""
    from ..model import GPTModel

    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in GPTModel(mcfg, init_seed=0).state_dict().items()
                if not k.endswith("_extra_state")}
    for k, shape in want.items():
        if k not in sd:
            raise HFMappingError(f"the imported weights lack {k!r}, which our model of this config has")
        if tuple(sd[k].shape) != shape:
            raise HFMappingError(f"{k}: HF shape {tuple(sd[k].shape)}, our model's {shape}")
    extra = sorted(set(sd) - set(want))
    if extra:
        raise HFMappingError(f"{extra[0]!r} has no place in our model of this config (a model feature this "
                             "version lacks)")


def import_hf(hf_dir, out, console=print) -> Path:
    """Write ``out/state.pt`` (weights, config, step 0), ``out/config.yaml`` (a full run
    config whose ``training.init_from`` is that file) and ``out/tokenizer.model`` when the HF
    directory has a sentencepiece one."""
    from ..config import ConfigError, config_from_dict, dump_config

    hf_dir, out = Path(hf_dir), Path(out)
    try:
        c = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HFMappingError(f"cannot read {hf_dir / 'config.json'}: {str(e).splitlines()[0]}") from None
    if not isinstance(c, dict):
        raise HFMappingError(f"{hf_dir / 'config.json'}: expected a JSON object (got a {type(c).__name__})")
    try:
        m, arch = model_from_hf(c)
    except KeyError as e:
        raise HFMappingError(f"{hf_dir / 'config.json'} lacks {e}") from None
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    if set(m) - fields:
        raise HFMappingError(f"this model needs ModelConfig.{sorted(set(m) - fields)[0]}, which this version lacks")
    try:
        mcfg = ModelConfig.from_dict(m)
    except ValueError as e:
        raise HFMappingError(f"{hf_dir / 'config.json'}: {str(e).splitlines()[0]}") from None
    tensors = read_safetensors(hf_dir)
    n = mcfg.num_layers
    mtp = {k for k in tensors if (g := re.match(r"model\.layers\.(\d+)\.", k)) and int(g.group(1)) >= n}
    if mtp:  # Glm4Moe keeps its MTP layers after the last decoder layer
        console(f"dropping {len(mtp)} tensors of layers >= {n} (multi-token prediction): not imported")
        tensors = {k: v for k, v in tensors.items() if k not in mtp}
    md = mcfg.to_dict()
    sd = {k: v.float() if v.is_floating_point() else v for k, v in from_hf_tensors(tensors, md, arch).items()}
    sd = stack_experts(sd)  # the Hub's experts one by one -> our stacked experts
    if md["tie_embeddings"]:
        sd["head.weight"] = sd["embed.weight"]
    if arch != GLM4_MOE:  # no selection bias in Mixtral / Qwen3Moe: ours is zero
        sd.update({f"layers.{i}.mlp.router.expert_bias": torch.zeros(mcfg.num_experts) for i in range(n)
                   if mcfg.is_moe_layer(i)})
    _check_layout(sd, mcfg)
    state_file = out / "state.pt"
    try:
        run = config_from_dict({"model": md, "data": {"seq_len": min(256, mcfg.max_seq_len)},
                                "training": {"init_from": str(state_file)}})
    except ConfigError as e:
        raise HFMappingError(str(e)) from None
    tok = hf_dir / "tokenizer.model"
    with atomic_dir(out) as tmp:
        with SyncedWriter(tmp / "state.pt") as f:  # a full disk: the real errno, not torch's "unexpected pos"
            torch.save({"model": sd, "config": run.to_dict(), "step": 0}, f)
        (tmp / "config.yaml").write_text(dump_config(run), encoding="utf-8")
        if tok.is_file():
            from ..data.tokenizer import Tokenizer

            Tokenizer(str(tok))  # a sentencepiece model, or one line
            (tmp / "tokenizer.model").write_bytes(tok.read_bytes())
    console(f"wrote {out} ({arch} -> state.pt, config.yaml" + (", tokenizer.model)" if tok.is_file() else ")"))
    if not tok.is_file():
        console(f"{hf_dir} has no sentencepiece tokenizer.model: prepare the data with a sentencepiece tokenizer "
                "whose ids match this model's vocabulary (only sentencepiece models are imported)")
    return out


def run_tool(name: str, fn) -> int:
    """A tool's ``main``: run ``fn()``; a refusal or I/O error is one stderr line, exit status 2."""
    import sys

    try:
        fn()
    except OSError as e:  # a full disk, a read-only directory: what and where
        print(f"{name}: error: {os_error_line(e, name)} (nothing was written)", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as e:  # HFMappingError / CheckpointError are ValueErrors
        print(f"{name}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__} (nothing was written)",
              file=sys.stderr)
        return 2
    except Exception as e:  # safetensors' own error type (not an OSError), e.g. on a full disk
        if type(e).__name__ != "SafetensorError":
            raise
        print(f"{name}: error: safetensors: {str(e).splitlines()[0] if str(e) else 'write failed'} "
              "(nothing was written)", file=sys.stderr)
        return 2
    return 0
