"""Hugging Face import: export -> import -> export is bitwise (tensors and config.json), the
imported state.pt starts a run (training.init_from: weights only, step 0), refusals are one line."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from megatron_ufp4.hf import HFMappingError  # noqa: E402
from megatron_ufp4.hf.convert import export_hf, import_hf  # noqa: E402

try:
    from .conftest import quiet
    from .test_hf_export import SIGMOID, make_checkpoint, prefix  # noqa: F401 (fixture)
except ImportError:
    from conftest import quiet
    from test_hf_export import SIGMOID, make_checkpoint, prefix  # noqa: F401

pytestmark = pytest.mark.numerical


def _tensors(d):
    from safetensors.torch import load_file
    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("model_kw", [{"tie_embeddings": True, "bias": True}, SIGMOID,
                                      {"num_experts": 4, "moe_top_k": 2, "moe_ffn_hidden_size": 32}],
                         ids=["llama", "glm4_moe", "mixtral"])
def test_import_export_round_trip_is_bitwise(model_kw, tmp_path, prefix):  # noqa: F811
    ckpt, _ = make_checkpoint(tmp_path / "run", prefix, **model_kw)
    export_hf(ckpt, tmp_path / "hf1", max_shard_size="30KB", console=quiet)
    import_hf(tmp_path / "hf1", tmp_path / "ours", console=quiet)
    assert (tmp_path / "ours" / "tokenizer.model").read_bytes() == (tmp_path / "hf1" / "tokenizer.model").read_bytes()
    export_hf(tmp_path / "ours" / "state.pt", tmp_path / "hf2", max_shard_size="30KB",
              tokenizer=tmp_path / "ours" / "tokenizer.model", console=quiet)
    a, b = _tensors(tmp_path / "hf1"), _tensors(tmp_path / "hf2")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    for name in ("config.json", "model.safetensors.index.json", "tokenizer.json", "generation_config.json"):
        assert json.loads((tmp_path / "hf1" / name).read_text()) == json.loads((tmp_path / "hf2" / name).read_text())


def test_a_run_starts_from_the_imported_weights(tmp_path, prefix, tiny_cfg):  # noqa: F811
    """training.init_from: the trainer's model holds the imported weights at step 0; a shape
    mismatch is one line naming the key."""
    from megatron_ufp4.config import load_config
    from megatron_ufp4.training.checkpoint import CheckpointError
    from megatron_ufp4.training.trainer import Trainer

    base = tiny_cfg("tiny_dense", tmp_path / "ref")
    model = {k: v for k, v in base.model.to_dict().items()}
    ckpt, ref = make_checkpoint(tmp_path / "run", prefix, **{k: model[k] for k in (
        "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size", "max_seq_len",
        "init_std", "rope_theta")})
    export_hf(ckpt, tmp_path / "hf", console=quiet)
    import_hf(tmp_path / "hf", tmp_path / "ours", console=quiet)
    cfg = load_config(tmp_path / "ours" / "config.yaml", [f"data.prefix={base.data.prefix}", "data.seq_len=64",
                                                          f"training.run_dir={tmp_path / 'train'}"])
    trainer = Trainer(cfg, console=quiet)
    try:
        assert trainer.step == 0
        got = trainer.model.state_dict()
        for k, v in ref.state_dict().items():
            if not k.endswith("_extra_state"):
                assert torch.equal(got[k], v), k
    finally:
        trainer.close()
    bad = load_config(tmp_path / "ours" / "config.yaml", [f"data.prefix={base.data.prefix}", "data.seq_len=64",
                                                          "model.ffn_hidden_size=64",
                                                          f"training.run_dir={tmp_path / 'bad'}"])
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.gate_up\.weight has shape"):
        Trainer(bad, console=quiet).close()


def test_import_refusals_write_nothing(tmp_path, prefix, capsys):  # noqa: F811
    import importlib.util

    try:
        from .conftest import REPO_ROOT
    except ImportError:
        from conftest import REPO_ROOT
    ckpt, _ = make_checkpoint(tmp_path / "run", prefix)
    export_hf(ckpt, tmp_path / "hf", console=quiet)
    spec = importlib.util.spec_from_file_location("import_hf", REPO_ROOT / "tools" / "import_hf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for change, needle in ((dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn'"),
                           (dict(model_type="gpt2"), "model_type 'gpt2'"),
                           (dict(hidden_act="gelu"), "hidden_act"),
                           (dict(attention_bias=True, mlp_bias=False), "attention_bias != mlp_bias")):
        d = tmp_path / "edited"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(tmp_path / "hf", d)
        c = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**c, **change}))
        assert tool.main([str(d), str(tmp_path / "out")]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and needle in err[0], err
        assert not (tmp_path / "out").exists()
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(HFMappingError, match="model.safetensors"):
        import_hf(tmp_path / "hf", tmp_path / "out", console=quiet)
    assert not (tmp_path / "out").exists()
