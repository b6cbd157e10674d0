"""The paper's three model configs load and have the sizes arXiv 2606.20381 names."""
import dataclasses

import pytest

from megatron_ufp4.config import load_config
from megatron_ufp4.model import num_params


@pytest.mark.parametrize("path,total,active", [
    ("configs/dense_1.5b.yaml", 1.5e9, 1.5e9),
    ("configs/moe_7.9b.yaml", 7.9e9, 1.3e9),
    ("configs/moe_124b.yaml", 124e9, 5.1e9),
])
def test_paper_config_sizes(path, total, active):
    cfg = load_config(path)
    n = num_params(dataclasses.replace(cfg.model, mtp_depth=0))  # the named size: without the training-only MTP
    assert abs(n.total - total) / total < 0.02
    assert abs(n.active - active) / active < 0.05
    assert cfg.recipe["name"] == "ufp4" and cfg.schedule.kind == "wsd"
