"""Training recipes (arXiv 2606.20381): presets, overrides, high-precision layers, round trip, rejections."""
import re

import pytest

from megatron_ufp4.fp4.recipes import PRESETS, Recipe

pytestmark = pytest.mark.numerical

GEMMS = {"fprop": ("x", "w"), "dgrad": ("dy", "w"), "wgrad": ("dy", "x")}
ALL = {"fprop", "dgrad", "wgrad"}

# arXiv 2606.20381 table, restated by hand
TABLE = {
    "ufp4": dict(grid="int4", scale="fp32", block=16, rht=ALL, rht_size=16, w_2d=False),
    "e2m1_ref": dict(grid="e2m1", scale="fp32", block=16, rht={"wgrad"}, rht_size=16, w_2d=False),
    "nvfp4": dict(grid="e2m1", scale="e4m3", block=16, rht={"wgrad"}, rht_size=16, w_2d=True),
    "mxfp4": dict(grid="e2m1", scale="e8m0", block=32, rht=ALL, rht_size=32, w_2d=False),
    # not a paper row: UFP4's RHT/SR scopes on the INT4 grid with NVFP4's E4M3 + FP32 two-level scales
    "ufp4_nv": dict(grid="int4", scale="e4m3", block=16, rht=ALL, rht_size=16, w_2d=False),
}


def _operands(r):
    for g, roles in GEMMS.items():
        gq = r.gemm(g)
        for role, op in zip(roles, (gq.a, gq.b)):
            yield g, role, op


def test_presets_are_exactly_the_table_rows():
    assert set(PRESETS) == set(TABLE) | {"bf16"}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_preset_matches_table(name):
    t = TABLE[name]
    r = Recipe.preset(name)
    assert r.name == name and r.quantized
    assert r.rht_size == t["rht_size"]
    assert {g for g in GEMMS if r.gemm(g).rht} == t["rht"]
    for g, role, op in _operands(r):
        assert op.quantized, (g, role)
        f = op.fmt
        assert (f.grid, f.scale, f.block) == (t["grid"], t["scale"], t["block"]), (g, role)
        assert f.max_level is None
        assert f.block_2d == (t["w_2d"] and role == "w"), (g, role)  # 16x16 only for NVFP4 weights
        assert op.rounding == ("sr" if role == "dy" else "rtne"), (g, role)  # SR on dY, both uses
        if f.scale == "e8m0":
            assert f.scale_mode == "floor"  # the OCP rule by default


def test_bf16_preset_quantizes_nothing():
    r = Recipe.preset("bf16")
    assert not r.quantized
    for g, role, op in _operands(r):
        assert not op.quantized and op.fmt is None
    assert not any(r.gemm(g).rht for g in GEMMS)
    assert all(r.is_high_precision_layer(i, 4) for i in range(4))
    assert Recipe.from_dict(None) == r and Recipe.from_dict("bf16") == r


def test_nvfp4_keeps_first_2_and_last_8_of_62_layers_in_bf16():
    # NVIDIA 12B: 62 blocks, first two and last eight in BF16 (~16%, mostly the last blocks)
    r = Recipe.preset("nvfp4")
    hp = [i for i in range(62) if r.is_high_precision_layer(i, 62)]
    assert hp == [0, 1] + list(range(54, 62))


@pytest.mark.parametrize("name", ["ufp4", "e2m1_ref", "mxfp4"])
def test_other_presets_keep_no_layer_in_bf16(name):
    r = Recipe.preset(name)
    assert not any(r.is_high_precision_layer(i, 24) for i in range(24))


@pytest.mark.parametrize("name", ["ufp4", "e2m1_ref", "mxfp4"])
def test_unknown_layer_count_does_not_disable_quantization(name):
    # layer index known but num_layers not: a recipe with no BF16 layers must still quantize it
    r = Recipe.preset(name)
    assert not r.is_high_precision_layer(3, None)
    assert not r.is_high_precision_layer(None, None)


# ---------------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rht,expected", [
    (["fprop"], {"fprop"}), (["dgrad", "wgrad"], {"dgrad", "wgrad"}), ("wgrad", {"wgrad"}),
    (True, ALL), (False, set()), ([], set()),
])
def test_override_rht_scope(rht, expected):
    r = Recipe.from_dict({"name": "ufp4", "rht": rht})
    assert {g for g in GEMMS if r.gemm(g).rht} == expected


def test_override_rht_per_gemm_wins_over_list():
    r = Recipe.from_dict({"name": "e2m1_ref", "rht": ["wgrad"], "fprop": {"rht": True}, "wgrad": {"rht": False}})
    assert {g for g in GEMMS if r.gemm(g).rht} == {"fprop"}


@pytest.mark.parametrize("sr,roles", [(["x", "dy"], {"x", "dy"}), ([], set()), ("w", {"w"}),
                                      (["x", "w", "dy"], {"x", "w", "dy"})])
def test_override_sr_roles(sr, roles):
    r = Recipe.from_dict({"name": "ufp4", "sr": sr})
    for g, role, op in _operands(r):
        assert op.rounding == ("sr" if role in roles else "rtne"), (g, role)


@pytest.mark.parametrize("fmt,grid,scale,block", [
    ("e2m1", "e2m1", "fp32", 16), ("int4", "int4", "fp32", 16),
    ("nvfp4", "e2m1", "e4m3", 16), ("mxfp4", "e2m1", "e8m0", 32),
])
def test_override_format(fmt, grid, scale, block):
    r = Recipe.from_dict({"name": "ufp4", "format": fmt})
    assert {g for g in GEMMS if r.gemm(g).rht} == ALL  # the rest of the preset stays
    for g, role, op in _operands(r):
        assert (op.fmt.grid, op.fmt.scale, op.fmt.block) == (grid, scale, block)
        assert op.rounding == ("sr" if role == "dy" else "rtne")


@pytest.mark.parametrize("fmt", ["bf16", None, "none"])
def test_override_format_to_high_precision(fmt):
    r = Recipe.from_dict({"name": "ufp4", "format": fmt})
    assert not r.quantized
    assert not any(r.gemm(g).rht for g in GEMMS)  # rotation is meaningless without a quantizer


@pytest.mark.parametrize("max_level", [2, 3, 4])
def test_override_max_level(max_level):
    r = Recipe.from_dict({"name": "e2m1_ref", "max_level": max_level})
    for g, role, op in _operands(r):
        assert op.fmt.max_level == max_level
        assert op.fmt.grid_obj.max == max_level
        assert max(op.fmt.grid_obj.levels) == max_level


def test_override_per_role():
    r = Recipe.from_dict({"name": "ufp4", "w": {"format": "e2m1"}, "dy": {"rounding": "rtne"}})
    for g, role, op in _operands(r):
        assert op.fmt.grid == ("e2m1" if role == "w" else "int4"), (g, role)
        assert op.rounding == "rtne"


def test_override_per_gemm_is_most_specific():
    r = Recipe.from_dict({
        "name": "ufp4",
        "x": {"block": 32},
        "fprop": {"x": {"block": 16}, "w": {"format": "e2m1"}},
        "wgrad": {"rht": False, "dy": {"rounding": "rtne"}},
    })
    assert r.fprop.a.fmt.block == 16  # fprop.x beats x
    assert r.wgrad.b.fmt.block == 32  # wgrad.x gets the role-level value
    assert r.fprop.b.fmt.grid == "e2m1" and r.dgrad.b.fmt.grid == "int4"  # only fprop's w changed
    assert r.wgrad.a.rounding == "rtne" and r.dgrad.a.rounding == "sr"  # only wgrad's dy changed
    assert not r.wgrad.rht and r.fprop.rht and r.dgrad.rht


def test_override_scale_mode_and_rht_settings():
    r = Recipe.from_dict({"name": "mxfp4", "scale_mode": "rceil", "rht_size": 64, "rht_seed": 1234})
    assert all(op.fmt.scale_mode == "rceil" for _, _, op in _operands(r))
    assert r.rht_size == 64 and r.rht_seed == 1234


def test_custom_recipe_without_name():
    r = Recipe.from_dict({"format": "int4", "rht": True, "sr": ["dy"]})
    assert r.quantized and all(r.gemm(g).rht for g in GEMMS)
    assert r.rht_size == 16


@pytest.mark.parametrize("first,last,n,expected", [
    (2, 1, 10, [0, 1, 9]),
    (0, 3, 10, [7, 8, 9]),
    (0.1, 0.2, 10, [0, 8, 9]),
    (0.25, 0, 8, [0, 1]),
    (0, 0, 10, []),
])
def test_bf16_first_last(first, last, n, expected):
    r = Recipe.from_dict({"name": "ufp4", "bf16_first": first, "bf16_last": last})
    assert [i for i in range(n) if r.is_high_precision_layer(i, n)] == expected


def test_bf16_layers_explicit():
    r = Recipe.from_dict({"name": "ufp4", "bf16_layers": [3, 5]})
    assert [i for i in range(8) if r.is_high_precision_layer(i, 8)] == [3, 5]
    assert r.is_high_precision_layer(5, None)
    assert not r.is_high_precision_layer(None, 8)  # not a transformer layer: follows the recipe


def test_preset_bf16_layers_can_be_turned_off():
    r = Recipe.from_dict({"name": "nvfp4", "bf16_first": 0, "bf16_last": 0})
    assert not any(r.is_high_precision_layer(i, 62) for i in range(62))


# ---------------------------------------------------------------------------------------------
# to_dict round trip and the printed table
# ---------------------------------------------------------------------------------------------

ROUND_TRIP = [
    {"name": n} for n in sorted(PRESETS)
] + [
    {"name": "ufp4", "rht": ["fprop"], "sr": ["x", "dy"], "bf16_layers": [1]},
    {"name": "nvfp4", "fprop": {"w": {"block_2d": False}}, "bf16_last": 3, "rht_seed": 9},
    {"name": "mxfp4", "scale_mode": "rceil", "wgrad": {"rht": False}},
    {"name": "e2m1_ref", "max_level": 4, "dy": {"rounding": "rtne"}},
    {"format": "int4", "rht": True, "sr": ["dy"]},  # no preset name
]


@pytest.mark.parametrize("d", ROUND_TRIP, ids=lambda d: "-".join(f"{k}" for k in d))
def test_to_dict_round_trip(d):
    r = Recipe.from_dict(d)
    out = r.to_dict()
    assert isinstance(out, dict)
    r2 = Recipe.from_dict(out)
    assert r2 == r
    assert str(r2) == str(r)
    out["rht"] = "mutated"  # to_dict returns a copy
    assert r.to_dict() != out


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_str_has_a_row_per_gemm_operand(name):
    r = Recipe.preset(name)
    text = str(r)
    assert name in text
    for g, role, op in _operands(r):
        rows = [ln for ln in text.splitlines() if re.match(rf"\s*{g}\s+{role}\s", ln)]
        assert len(rows) == 1, (g, role, text)
        row = rows[0]
        if op.quantized:
            assert op.rounding in row
            assert op.fmt.scale in row
        else:
            assert "high precision" in row


def test_str_shows_nvfp4_details():
    rows = {tuple(ln.split()[:2]): ln for ln in str(Recipe.preset("nvfp4")).splitlines()[2:]}
    assert "16x16" in rows[("fprop", "w")] and "16x16" in rows[("dgrad", "w")]
    assert "1x16" in rows[("fprop", "x")]
    assert " sr " in rows[("dgrad", "dy")] and " sr " in rows[("wgrad", "dy")]
    assert rows[("wgrad", "x")].rstrip().endswith("yes") and rows[("fprop", "x")].rstrip().endswith("no")


# ---------------------------------------------------------------------------------------------
# rejections: ValueError naming the offending key / value
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d,pattern", [
    ({"name": "ufp4", "rht_sz": 32}, r"rht_sz"),
    ({"name": "ufp4", "x": {"blok": 16}}, r"x\.blok"),
    ({"name": "ufp4", "fprop": {"dy": {}}}, r"fprop\.dy"),
    ({"name": "ufp4", "wgrad": {"w": {"format": "e2m1"}}}, r"wgrad\.w"),
    ({"name": "ufp4", "dgrad": {"dy": {"rnd": "sr"}}}, r"dgrad\.dy\.rnd"),
    ({"name": "fp8"}, r"unknown recipe 'fp8'"),
    ({"name": "ufp4", "w": {"format": "bf16"}}, r"fprop.*both operands"),
    ({"name": "ufp4", "dgrad": {"dy": {"format": "bf16"}}}, r"dgrad.*both operands"),
    ({"name": "nvfp4", "x": {"block_2d": True}}, r"x: 2D blocks are for weights only"),
    ({"name": "nvfp4", "dy": {"block_2d": True}}, r"dy: 2D blocks are for weights only"),
    ({"name": "ufp4", "rht_size": 24}, r"rht_size.*24"),
    ({"name": "ufp4", "rht_size": 256}, r"rht_size.*256"),
    ({"name": "e2m1_ref", "max_level": 5}, r"max_level.*5"),
    ({"name": "ufp4", "max_level": 4}, r"max_level"),  # int4 has no range restriction
    ({"name": "ufp4", "sr": ["dw"]}, r"sr.*'dw'"),
    ({"name": "ufp4", "sr": "grad"}, r"sr.*'grad'"),
    ({"name": "ufp4", "rht": ["fwd"]}, r"rht.*'fwd'"),
    ({"name": "ufp4", "dy": {"rounding": "stochastic"}}, r"rounding.*'stochastic'"),
    ({"name": "ufp4", "fprop": {"rht": "yes"}}, r"fprop\.rht"),
    ({"name": "ufp4", "format": "fp8"}, r"'fp8'"),
    ({"name": "ufp4", "block": 64}, r"block.*64"),
    ({"name": "mxfp4", "scale_mode": "even"}, r"scale_mode.*'even'"),
    ({"name": "ufp4", "bf16_last": 1.5}, r"bf16_last.*1\.5"),
    ({"name": "ufp4", "bf16_last": 1.0}, r"bf16_last"),
    ({"name": "ufp4", "bf16_first": -0.1}, r"bf16_first.*-0\.1"),
    ({"name": "ufp4", "bf16_first": -2}, r"bf16_first"),
    ({"name": "ufp4", "bf16_first": True}, r"bf16_first"),
    ({"name": "ufp4", "bf16_first": float("nan")}, r"^recipe\.bf16_first: must be a finite number.*\(got nan\)$"),
    ({"name": "ufp4", "bf16_last": float("inf")}, r"^recipe\.bf16_last: .*\(got inf\)$"),
    ({"name": "ufp4", "rht_size": 16.0}, r"rht_size.*16\.0"),  # a float size breaks the Hadamard build
    ({"name": "ufp4", "rht_seed": 2 ** 64}, r"rht_seed"),  # outside torch's seed range
    ({"name": "ufp4", "bf16_last": "10%"}, r"bf16_last.*10%"),
    ({"name": "ufp4", "bf16_layers": [-1]}, r"bf16_layers"),
    ({"name": "ufp4", "bf16_layers": "3"}, r"bf16_layers"),
    ({"name": "ufp4", "rht_seed": "abc"}, r"rht_seed"),
    ({"name": "ufp4", "x": "int4"}, r"recipe\.x"),
    ({"name": "ufp4", "fprop": True}, r"recipe\.fprop"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_rejections(d, pattern):
    with pytest.raises(ValueError, match=pattern):
        Recipe.from_dict(d)


def test_rejects_non_mapping():
    with pytest.raises(ValueError, match="mapping"):
        Recipe.from_dict(["ufp4"])


def test_label_names_what_runs_whatever_the_spelling():
    from megatron_ufp4.fp4.recipes import Recipe

    a = Recipe.from_dict({"name": "ufp4", "rht": [], "sr": []}).label()
    assert a == Recipe.from_dict({"name": "ufp4", "rht": False, "sr": None}).label() == "ufp4[rht=none; sr=none]"
    # a no-op key beside a real change, and a key set to its default, are not listed
    assert Recipe.from_dict({"name": "ufp4", "format": "e2m1", "rht": ["wgrad", "fprop", "dgrad"],
                             "rht_size": 16}).label() == "ufp4[format=e2m1]"
    assert Recipe.from_dict({"name": "e2m1_ref", "rht": True}).label() == "e2m1_ref[rht=dgrad,fprop,wgrad]"
