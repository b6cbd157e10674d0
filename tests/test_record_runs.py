"""tools/record_runs.py compare: bit-identical recordings pass, any changed step is named (exit 1)."""
from __future__ import annotations

import importlib.util
import json

from conftest import REPO_ROOT


def _tool():
    spec = importlib.util.spec_from_file_location("record_runs", REPO_ROOT / "tools" / "record_runs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_names_the_first_differing_step(tmp_path, capsys):
    tool = _tool()
    steps = [{"step": i, "loss": float(5.5 - i / 7).hex(), "grad_norm": float(1 / (i + 3)).hex()} for i in (1, 2, 3)]
    a = {"commit": "a", "steps": 3, "runs": {"tiny_dense_ufp4": {"steps": steps}, "dp2_zero1": {"steps": steps}}}
    b = json.loads(json.dumps(a))
    x = float.fromhex(b["runs"]["dp2_zero1"]["steps"][1]["loss"])
    b["runs"]["dp2_zero1"]["steps"][1]["loss"] = (x + x * 2.0 ** -52).hex()  # one ulp
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert tool.main(["compare", str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 0
    assert "every run bit-identical" in capsys.readouterr().out
    assert tool.main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    assert capsys.readouterr().out.strip() == "dp2_zero1: differs from step 2 (3 vs 3 steps)"
    assert set(tool.RUNS) >= {"tiny_dense_ufp4", "tp2_pp2_ufp4", "ep2_moe_ufp4", "tp2_sp_nvfp4", "dp2_zero1"}
