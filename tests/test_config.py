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
    ],
)
def test_invalid_fields_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SketchWalkConfig\.{field} must be"):
        SketchWalkConfig(**{field: value})


def test_budget_precedence():
    assert SketchWalkConfig(top_k_blocks=4).budget == "top_k_blocks"
    assert SketchWalkConfig(top_k_blocks=4, density=0.2).budget == "density"
    assert SketchWalkConfig(density=0.2).budget == "density"


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
