import dataclasses

import pytest

from sketchwalk import SketchWalkConfig


def test_defaults_match_the_documented_api():
    c = SketchWalkConfig()
    assert (c.block_size, c.sketch_dim, c.exact, c.granularity) == (64, 128, False, "layer")
    assert (c.walk, c.degree, c.damping) == (True, 3, 0.25)
    assert (c.kblocks_frac, c.top_k_blocks, c.density) == (0.125, None, None)
    assert (c.sink, c.window, c.dense_layers, c.dense_last_rows) == (0.025, 0.05, 2, 4)
    assert (c.parity, c.seed, c.sparsity_exponent) == (False, 0, 1.0)
    assert c.budget == "kblocks_frac"
    assert (c.mass, c.allocation, c.sink_blocks, c.window_blocks) == (None, "row", None, None)
    assert c.decode_rule == "walk"


@pytest.mark.parametrize(
    "field, value",
    [
        ("block_size", 0),
        ("block_size", 64.0),
        ("sketch_dim", -1),
        ("temperature", 0.0),
        ("temperature", float("nan")),
        ("sparsity_exponent", -2),
        ("granularity", "token"),
        ("degree", 0),
        ("damping", 1.5),
        ("kblocks_frac", -0.1),
        ("top_k_blocks", -3),
        ("density", 0.0),
        ("density", 1.2),
        ("sink", 2.0),
        ("window", -0.5),
        ("dense_layers", -1),
        ("dense_last_rows", 1.5),
        ("parity", "yes"),
        ("walk", 1),
        ("mass", 0.0),
        ("mass", 1.5),
        ("mass", float("inf")),
        ("allocation", "layer"),
        ("allocation", "global"),  # needs a density budget
        ("sink_blocks", -1),
        ("sink_blocks", 1.0),
        ("window_blocks", 0),
        ("window_blocks", True),
        ("decode_rule", "seer"),
    ],
)
def test_invalid_fields_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SketchWalkConfig\.{field} must be"):
        SketchWalkConfig(**{field: value})


def test_budget_precedence():
    assert SketchWalkConfig(top_k_blocks=4).budget == "top_k_blocks"
    assert SketchWalkConfig(top_k_blocks=4, density=0.2).budget == "density"
    assert SketchWalkConfig(density=0.2).budget == "density"
    assert SketchWalkConfig(mass=0.9).budget == "mass"
    assert SketchWalkConfig(mass=0.9, top_k_blocks=4).budget == "mass"
    assert SketchWalkConfig(mass=0.9, density=0.2).budget == "density"
    assert SketchWalkConfig(density=0.2, allocation="global").allocation == "global"
    with pytest.raises(ValueError, match=r"allocation must be 'row' unless .*budget here: mass"):
        SketchWalkConfig(mass=0.9, allocation="global")


def test_presets():
    paper = SketchWalkConfig.preset("paper")
    assert paper.sketch_dim == 128 and paper.kblocks_frac == 0.125 and not paper.causal_sketch
    seed = SketchWalkConfig.preset("seed")
    assert (seed.block_size, seed.sketch_dim, seed.top_k_blocks, seed.sparsity_exponent) == (
        64,
        64,
        16,
        8.0,
    )
    assert SketchWalkConfig.preset("seed", top_k_blocks=4).top_k_blocks == 4
    with pytest.raises(ValueError, match="unknown preset"):
        SketchWalkConfig.preset("nope")


def test_dict_round_trip():
    c = SketchWalkConfig(density=0.3, granularity="head", seed=7)
    assert SketchWalkConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown fields"):
        SketchWalkConfig.from_dict({**c.to_dict(), "bogus": 1})


def test_config_is_frozen_and_hashable():
    cfg = SketchWalkConfig(density=0.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.density = 0.3  # type: ignore[misc]
    assert hash(cfg) == hash(SketchWalkConfig(density=0.2))
    assert cfg == SketchWalkConfig(density=0.2) and cfg != SketchWalkConfig(density=0.3)
    assert len({cfg, SketchWalkConfig(density=0.2), SketchWalkConfig()}) == 2
    assert isinstance(SketchWalkConfig(temperature=1).temperature, float)


@pytest.mark.parametrize(
    ("base", "given", "budget", "expected"),
    [
        (dict(top_k_blocks=16), dict(density=0.2), "density", dict(top_k_blocks=None)),
        (dict(top_k_blocks=16), dict(kblocks_frac=0.3), "kblocks_frac", dict(top_k_blocks=None)),
        (dict(density=0.2), dict(top_k_blocks=8), "top_k_blocks", dict(density=None)),
        (dict(density=0.2), dict(kblocks_frac=0.1), "kblocks_frac", dict(density=None)),
        (dict(density=0.2, top_k_blocks=4), dict(sink=0.01), "density", dict(top_k_blocks=4)),
        (dict(density=0.2), dict(mass=0.9), "mass", dict(density=None)),
        (dict(top_k_blocks=16), dict(mass=0.9), "mass", dict(top_k_blocks=None)),
        (dict(mass=0.9), dict(density=0.2), "density", dict(mass=None)),
        (dict(mass=0.9), dict(top_k_blocks=3), "top_k_blocks", dict(mass=None)),
        (dict(mass=0.9), dict(sink_blocks=2), "mass", dict(mass=0.9)),
        (
            dict(density=0.2, allocation="global"),
            dict(mass=0.9),
            "mass",
            dict(density=None, allocation="row"),
        ),
        (
            dict(density=0.2, allocation="global"),
            dict(density=0.3),
            "density",
            dict(allocation="global"),
        ),
        (dict(top_k_blocks=4), dict(density=0.3, allocation="global"), "density", {}),
    ],
)
def test_with_overrides_explicit_budget_wins(base, given, budget, expected):
    cfg = SketchWalkConfig(**base).with_overrides(**given)
    assert cfg.budget == budget
    for name, value in {**given, **expected}.items():
        assert getattr(cfg, name) == value


def test_cli_has_a_flag_per_new_field():
    import argparse

    from sketchwalk.config import BUDGET_FIELDS, add_config_arguments, config_from_args

    assert BUDGET_FIELDS == ("density", "mass", "top_k_blocks", "kblocks_frac")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(
        ["--mass", "0.9", "--sink_blocks", "0", "--window_blocks", "2", "--decode_rule", "quest"]
    )
    cfg = config_from_args(args)
    assert (cfg.budget, cfg.mass, cfg.top_k_blocks) == ("mass", 0.9, None)
    assert (cfg.sink_blocks, cfg.window_blocks, cfg.decode_rule) == (0, 2, "quest")
    cfg = config_from_args(parser.parse_args(["--density", "0.2", "--allocation", "global"]))
    assert (cfg.budget, cfg.allocation) == ("density", "global")
    with pytest.raises(SystemExit):
        parser.parse_args(["--allocation", "layer"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--decode_rule", "seer"])


def test_cli_and_compare_resolve_budgets_the_same_way():
    """config_from_args (validate) and compare's resolve_config share one rule."""
    import argparse

    from sketchwalk.config import add_config_arguments, config_from_args
    from sketchwalk.pipeline.compare import resolve_config

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    for flags in (
        ["--kblocks_frac", "0.2"],
        ["--density", "0.3"],
        ["--top_k_blocks", "5"],
        ["--mass", "0.95"],
        ["--density", "0.2", "--allocation", "global"],
        [],
    ):
        args = parser.parse_args(flags)
        seed = SketchWalkConfig.preset("seed")
        assert config_from_args(args) == resolve_config(args, seed.to_dict())


def test_default_preset_is_the_evidence_chosen_configuration():
    """The `default` preset (README, "Evidence for the defaults"): per-KV-group masks, forced
    blocks sized in blocks, no dense last rows, query-aware decode selection, half the released
    block-logit temperature, the last two query-block rows ranked by their exact attention,
    bfloat16 walk products; everything else as `SketchWalkConfig()`. The paper preset keeps the
    released fractions."""
    d = SketchWalkConfig.preset("default")
    assert (d.granularity, d.sink_blocks, d.window_blocks) == ("kv_group", 1, 2)
    assert (d.dense_last_rows, d.decode_rule, d.query_rows, d.query_tokens) == (0, "quest", 2, 128)
    assert d.temperature == SketchWalkConfig().temperature / 2 == 0.390625
    assert d.walk_dtype == "bfloat16"
    changed = {
        "granularity", "sink_blocks", "window_blocks", "dense_last_rows", "decode_rule",
        "temperature", "query_rows", "query_tokens", "walk_dtype",
    }  # fmt: skip
    base = SketchWalkConfig()
    for f in dataclasses.fields(SketchWalkConfig):
        if f.name not in changed:
            assert getattr(d, f.name) == getattr(base, f.name), f.name
    paper = SketchWalkConfig.preset("paper")
    assert (paper.sink_blocks, paper.window_blocks, paper.granularity) == (None, None, "layer")
