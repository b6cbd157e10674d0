"""Config sections beyond the plain dataclass fields: model presets from YAML and the command
line, the GEMM backend section, and configs saved by earlier versions."""
from __future__ import annotations

import pytest
import yaml

try:  # tests/ as a package (with __init__.py) or as a plain directory on sys.path
    from .conftest import CONFIGS
except ImportError:
    from conftest import CONFIGS
from megatron_ufp4.config import ConfigError, dump_config, load_config

DENSE = CONFIGS / "tiny_dense.yaml"


def test_model_preset_from_yaml(tmp_path):
    from megatron_ufp4.model import preset

    path = tmp_path / "p.yaml"
    path.write_text("model:\n  preset: moe-7.9b\ndata:\n  seq_len: 128\n")
    cfg = load_config(path)
    assert cfg.model == preset("moe-7.9b")
    assert cfg.to_dict()["model"] == preset("moe-7.9b").to_dict()  # resolved: every field, no 'preset'
    path.write_text(dump_config(cfg))
    assert load_config(path).to_dict() == cfg.to_dict()


def test_model_preset_with_overrides_in_yaml_and_cli(tmp_path):
    from megatron_ufp4.model import preset

    path = tmp_path / "p.yaml"
    path.write_text("model:\n  preset: moe-124b\n  num_layers: 4\ndata:\n  seq_len: 128\n")
    cfg = load_config(path, ["model.num_experts=16"])
    assert cfg.model == preset("moe-124b", num_layers=4, num_experts=16)
    # a preset given on the command line: the file's model fields go on top of it
    cfg = load_config(DENSE, ["model.preset=dense-1.5b"])
    assert cfg.model == preset("dense-1.5b", **yaml.safe_load(DENSE.read_text())["model"])
    cfg = load_config(None, ["model.preset=dense-1.5b", "data.seq_len=64"])
    assert cfg.model == preset("dense-1.5b")


def test_unknown_model_preset_is_one_line():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.preset=moe_7.9b"])
    assert str(info.value) == ("model.preset: must be one of dense-1.5b, moe-7.9b, moe-124b "
                               "(got 'moe_7.9b'; did you mean 'moe-7.9b'?)")
    with pytest.raises(ConfigError, match=r"^model\.preset: must be one of .*\(got \[1\]\)$"):
        load_config(None, ["model.preset=[1]"])


# -- the GEMM backend: its own section ---------------------------------------------------------------
def test_gemm_backend_section():
    cfg = load_config(DENSE, ["gemm.backend=fused"])
    assert cfg.gemm.backend == "fused" and cfg.to_dict()["gemm"] == {"backend": "fused"}
    recipe, backend = cfg.build_recipe()
    assert (recipe.name, backend) == ("ufp4", "fused")


@pytest.mark.parametrize("override", ["recipe.backend=fused", "recipe.backend=emulated"])
def test_recipe_backend_names_its_new_place(override):
    with pytest.raises(ConfigError) as info:
        load_config(DENSE, [override])
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("recipe.backend: moved to") and "gemm.backend" in msg, msg


def test_old_checkpoint_config_is_read_in_the_new_layout():
    from megatron_ufp4.config import config_from_saved
    from megatron_ufp4.training.checkpoint import config_differences

    cfg = load_config(DENSE, ["gemm.backend=fused"])
    old = cfg.to_dict()
    del old["gemm"]
    old["recipe"] = {**old["recipe"], "backend": "fused"}
    old["parallel"] = {**old["parallel"], "zero1": True}
    assert config_from_saved(old).to_dict() == cfg.to_dict()
    assert config_differences(old, cfg.to_dict()) == []
    other = load_config(DENSE).to_dict()  # emulated
    assert config_differences(old, other) == ["gemm.backend: checkpoint has 'fused', config has 'emulated'"]
    del old["recipe"]["backend"]  # written before the backend was set: the default, emulated
    assert config_differences(old, other) == []
    for broken in (None, "text", {"recipe": "ufp4", "parallel": 3}):  # reported, never a traceback
        assert config_differences(broken, other)


# -- rejections: each a ConfigError whose one-line message names the key -------------------------
