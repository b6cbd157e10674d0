"""Hugging Face export: transformers' classes compute our logits, from single-file and sharded
checkpoints; the tokenizer gives our ids; refusals are one line and write nothing.

Tolerance (fp32 on both sides, the same math in a different order): every logit is the end
of a chain of rounded sums -- per layer the norm (h terms), qkv (h), q.k (head_dim), the
softmax normaliser and P.V (T each), the output projection (heads x head_dim), the second
norm (h), gate_up (h), down (f; MoE: router E, the k-term combine, shared n*f), then the
final norm (h) and the head (h); plus the RoPE angle, which transformers forms in fp32 as
pos * inv_freq (relative error <= 2u for angles up to T: counted as 2T).  The first-order
forward-error bound of such a chain is gamma_N * sum_i |h_i||W_vi| at the head, gamma_N =
N u / (1 - N u), u = 2^-24, N the total length; the two implementations may each err by it,
so |ours - theirs| <= 2 gamma_N max_v sum_i |h_i||W_vi| (h: our final-norm output).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from megatron_ufp4.config import config_from_dict  # noqa: E402
from megatron_ufp4.data.tokenizer import Tokenizer  # noqa: E402
from megatron_ufp4.hf import HFMappingError  # noqa: E402
from megatron_ufp4.hf.convert import export_hf  # noqa: E402
from megatron_ufp4.model import GPTModel, LinearFactory  # noqa: E402
from megatron_ufp4.model.placement import named_placements  # noqa: E402
from megatron_ufp4.parallel.optimizer import param_groups  # noqa: E402

try:
    from .conftest import REPO_ROOT, SHAKESPEARE_SAMPLE
except ImportError:
    from conftest import REPO_ROOT, SHAKESPEARE_SAMPLE

pytestmark = pytest.mark.numerical

os.environ.setdefault("HF_HUB_OFFLINE", "1")
T = 24  # tokens per sequence in the comparisons
BASE = dict(vocab_size=512, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
            max_seq_len=32, init_std=0.08, rope_theta=500.0)
SIGMOID = dict(num_experts=6, moe_top_k=2, moe_ffn_hidden_size=32, router_score="sigmoid", num_shared_experts=1,
               first_k_dense=1, router_norm_topk=True)


def make_checkpoint(dirpath: Path, prefix: str, seed: int = 0, **model) -> tuple[Path, GPTModel]:
    """A single-file state.pt (the single-process trainer's format of older versions, still read)
    of a random tiny model (norms, biases and a sigmoid router's expert bias nonzero, so a wrong
    mapping of any of them shows); the model in fp32 eval mode."""
    cfg = config_from_dict({"model": {**BASE, **model}, "recipe": {"name": "bf16"},
                            "data": {"prefix": prefix, "seq_len": 16}})
    torch.manual_seed(seed)
    m = GPTModel(cfg.model, LinearFactory("bf16", cfg.model.num_layers), init_seed=seed)
    with torch.no_grad():
        for k, p in m.state_dict(keep_vars=True).items():
            if isinstance(p, torch.Tensor) and p.is_floating_point():
                if k.endswith("norm.weight"):
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                elif k.endswith(".bias") or (k.endswith("expert_bias") and cfg.model.router_score == "sigmoid"):
                    p.copy_(0.1 * torch.randn_like(p))  # softmax routing: transformers has no selection bias
    matrix = {id(p): named_placements(m)[n].matrix for n, p in m.named_parameters()}  # stacked experts' biases: vectors
    opt = torch.optim.AdamW(param_groups(m.parameters(), 0.1, lambda p: matrix[id(p)]), lr=1e-3, betas=(0.9, 0.95),
                            eps=1e-8, fused=True)
    ckpt = dirpath / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict(), "step": 1, "config": cfg.to_dict(),
                "skipped_total": 0, "consecutive_nonfinite": 0}, ckpt / "state.pt")
    return ckpt, m.eval()


def tolerance(model: GPTModel, tokens: torch.Tensor) -> float:
    c = model.config
    f = c.ffn_hidden_size
    n = 0
    for i in range(c.num_layers):
        mlp = (c.num_experts + c.moe_top_k + c.num_shared_experts * c.expert_ffn_hidden_size
               + c.expert_ffn_hidden_size) if c.is_moe_layer(i) else f
        n += 3 * c.hidden_size + c.head_dim + 2 * tokens.shape[1] + c.num_heads * c.head_dim + mlp
    n += 2 * c.hidden_size + 2 * tokens.shape[1]
    u = 2.0 ** -24
    gamma = n * u / (1 - n * u)
    with torch.no_grad():
        h = model.hidden_states(tokens)  # final-norm output
        s = h.abs() @ model.head.weight.abs().t()  # sum_i |h_i| |W_vi| for every position and vocabulary entry
    return 2 * gamma * float(s.max())


def compare(out: Path, model: GPTModel, arch: str) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    tokens = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    diff, tol = float((ours - theirs).abs().max()), tolerance(model, tokens)
    assert diff <= tol, (diff, tol)
    return diff, tol


@pytest.fixture(scope="module")
def prefix(tmp_path_factory) -> str:
    """A 512-piece sentencepiece model trained by the project's recipe (no dataset needed)."""
    from megatron_ufp4.data.tokenizer import train_sentencepiece

    p = tmp_path_factory.mktemp("tok") / "tok"
    lines = [ln for ln in SHAKESPEARE_SAMPLE.read_text(encoding="utf-8").splitlines() if ln.strip()]
    train_sentencepiece(lines, f"{p}.model", 512)
    return str(p)


CASES = {
    "llama": ({"tie_embeddings": True}, "LlamaForCausalLM"),
    "llama_bias_gqa1": ({"bias": True, "num_kv_heads": 1}, "LlamaForCausalLM"),
    "glm4_moe_sigmoid": ({**SIGMOID, "routed_scaling_factor": 1.5}, "Glm4MoeForCausalLM"),
    "glm4_moe_no_shared": ({**SIGMOID, "num_shared_experts": 0, "router_norm_topk": False}, "Glm4MoeForCausalLM"),
    "mixtral": ({"num_experts": 4, "moe_top_k": 2, "moe_ffn_hidden_size": 32}, "MixtralForCausalLM"),
    "qwen3_moe": ({"num_experts": 4, "moe_top_k": 2, "moe_ffn_hidden_size": 32, "first_k_dense": 1,
                   "router_norm_topk": False, "qk_norm": True}, "Qwen3MoeForCausalLM"),
    "qwen3": ({"qk_norm": True, "head_dim": 24}, "Qwen3ForCausalLM"),
    "glm4_dense_partial_rope": ({"rotary_fraction": 0.5, "qk_norm": True}, "Glm4MoeForCausalLM"),
    "glm4_moe_groups": ({**SIGMOID, "num_experts": 8, "moe_top_k": 2, "router_groups": 4, "router_topk_groups": 2},
                        "Glm4MoeForCausalLM"),
    # every Ling-style option of the MoE presets at once; the MTP module is dropped (training only)
    "glm4_moe_ling": ({**SIGMOID, "num_experts": 8, "moe_top_k": 2, "router_groups": 4, "router_topk_groups": 2,
                       "routed_scaling_factor": 2.5, "qk_norm": True, "rotary_fraction": 0.5, "head_dim": 24,
                       "mtp_depth": 1}, "Glm4MoeForCausalLM"),
}
RESULTS: dict[str, tuple[float, float]] = {}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_logits_match(case, tmp_path, prefix):
    model_kw, arch = CASES[case]
    ckpt, model = make_checkpoint(tmp_path / "run", prefix, **model_kw)
    out = tmp_path / "hf"
    export_hf(tmp_path / "run", out, console=lambda *a: None)  # a run directory: its latest checkpoint
    RESULTS[case] = compare(out, model, arch)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()


def test_sharded_dcp_checkpoint_and_shards(tmp_path, prefix):
    """A DCP checkpoint (to-dcp of the single-file state.pt: fused gate_up saved as .part pieces)
    exports the same tensors as the single file; a tiny --max-shard-size gives an index."""
    import importlib.util

    from safetensors.torch import load_file

    ckpt, model = make_checkpoint(tmp_path / "run", prefix, **SIGMOID)
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO_ROOT / "tools" / "convert_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    dcp_dir = tmp_path / "dcp" / "checkpoints" / "step_00000001"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert tool.main(["to-dcp", str(ckpt / "state.pt"), str(dcp_dir)]) == 0
    assert json.loads((dcp_dir / "partitions.json").read_text())["model"]["layers.0.mlp.gate_up.weight"]["stride"] == 2
    export_hf(ckpt, tmp_path / "single", console=lambda *a: None)
    export_hf(dcp_dir, tmp_path / "sharded", max_shard_size="20KB", console=lambda *a: None)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    single = load_file(str(tmp_path / "single" / "model.safetensors"))
    sharded = {k: v for f in files for k, v in load_file(str(tmp_path / "sharded" / f)).items()}
    assert single.keys() == sharded.keys() == index["weight_map"].keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)
    assert "model.layers.1.mlp.experts.5.gate_proj.weight" in single  # the Hub per-expert layout
    RESULTS["glm4_moe_dcp_sharded"] = compare(tmp_path / "sharded", model, "Glm4MoeForCausalLM")


def test_tokenizer_gives_our_ids(tmp_path, prefix):
    from transformers import AutoTokenizer

    ckpt, _ = make_checkpoint(tmp_path / "run", prefix)
    export_hf(ckpt, tmp_path / "hf", console=lambda *a: None)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = Tokenizer(prefix + ".model")
    text = SHAKESPEARE_SAMPLE.read_text(encoding="utf-8")
    samples = [text[:4000], text[-3000:], "  two  spaces\n\n\ttab", "émoji 🤖 漢字 3.14", "<s> literal </s>"]
    for s in samples:
        assert tok(s)["input_ids"] == ours.encode(s)
        assert tok.decode(ours.encode(s)) == s
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (ours.bos_id, ours.eos_id) == (tok.bos_token_id,
                                                                                         tok.eos_token_id)


def test_hugging_face_tokenizer_is_exported_as_it_is(tmp_path, prefix):
    """A run that trained on data prepared with a tokenizer.json exports that tokenizer: transformers
    loads it, encodes to our ids and names the end-of-document token the data was prepared with."""
    from tokenizers import Tokenizer as HFLib
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer

    from megatron_ufp4.data.tokenizer import load_tokenizer

    lib = HFLib(models.BPE())
    lib.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    lib.decoder = decoders.ByteLevel()
    lines = SHAKESPEARE_SAMPLE.read_text(encoding="utf-8").splitlines()[:400]
    lib.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|endoftext|>"],
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # a template that adds BOS (as Llama-3's does): the model never saw it, the export must not add it
    lib.post_processor = processors.TemplateProcessing(single="<unk> $A", special_tokens=[("<unk>", 0)])
    lib.save(str(tmp_path / "tokenizer.json"))
    ckpt, _ = make_checkpoint(tmp_path / "run", prefix)
    export_hf(ckpt, tmp_path / "hf", tokenizer=tmp_path / "tokenizer.json", console=lambda *a: None)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    for text in [lines[10], "\n".join(lines[50:90]), "  two  spaces\n\ttab", "émoji 🤖 3.14"]:
        assert tok(text)["input_ids"] == ours.encode(text)
        assert tok.decode(ours.encode(text)) == text
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ours.eos_id == tok.eos_token_id == lib.token_to_id("<|endoftext|>")


REFUSALS = [
    ({"bias": True, **SIGMOID}, "model.bias"),
    ({"num_experts": 4, "moe_top_k": 2, "num_shared_experts": 1}, "model.num_shared_experts"),
    ({"num_experts": 4, "moe_top_k": 2, "first_k_dense": 1}, "model.first_k_dense"),
    ({"num_experts": 4, "moe_top_k": 2, "router_norm_topk": False}, "model.router_norm_topk"),
    ({"num_experts": 4, "moe_top_k": 2}, "expert_bias"),  # nonzero selection bias with softmax routing
]


@pytest.mark.parametrize("model_kw,needle", REFUSALS)
def test_refusals_are_one_line_and_write_nothing(model_kw, needle, tmp_path, prefix, capsys):
    import importlib.util

    ckpt, _ = make_checkpoint(tmp_path / "run", prefix, **model_kw)
    if needle == "expert_bias":  # a softmax router whose selection bias moved (aux-loss-free balancing)
        state = torch.load(ckpt / "state.pt", weights_only=True)
        state["model"]["layers.1.mlp.router.expert_bias"][0] = 0.01
        torch.save(state, ckpt / "state.pt")
    spec = importlib.util.spec_from_file_location("export_hf", REPO_ROOT / "tools" / "export_hf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "hf"
    assert tool.main([str(ckpt), str(out)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists() and not any(p.name.startswith(".hf") for p in tmp_path.iterdir())


def test_missing_tokenizer_is_refused(tmp_path, prefix):
    ckpt, _ = make_checkpoint(tmp_path / "run", prefix + "-missing")
    with pytest.raises(HFMappingError, match="--no-tokenizer"):
        export_hf(ckpt, tmp_path / "hf", console=lambda *a: None)
    assert not (tmp_path / "hf").exists()
    export_hf(ckpt, tmp_path / "hf", with_tokenizer=False, console=lambda *a: None)
    assert not (tmp_path / "hf" / "tokenizer.json").exists()


def test_report_differences():
    """The measured max |logit difference| against the derived bound of every comparison (-s to see)."""
    for case, (diff, tol) in RESULTS.items():
        print(f"{case:28s} max |diff| {diff:.2e}  bound {tol:.2e}")
