"""`sketchwalk eval` (sketchwalk.pipeline.eval) and the baseline selectors at matched density
(sketchwalk.selection.baselines), on tiny randomly initialised models and real text."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from test_models import tiny_config, tiny_model_dir, tiny_tokenizer

from sketchwalk.cli import main
from sketchwalk.config import SketchWalkConfig
from sketchwalk.gate.checkpoint import GateConfig, GateSet
from sketchwalk.hf.capture import attention_modules, capture_attention
from sketchwalk.hf.integration import enable_selector
from sketchwalk.hf.text import make_passages
from sketchwalk.metrics import attention_recall
from sketchwalk.pipeline.eval import (
    EvalInputError,
    build_niah_prompt,
    build_runs,
    evaluate_niah,
    evaluate_ppl,
    forced_density,
    forced_warnings,
    parse_variant,
)
from sketchwalk.selection.baselines import (
    ForcedOnlySelector,
    GateSelector,
    OracleSelector,
    StreamingSelector,
)
from sketchwalk.selection.prefill import SketchWalk

CONTEXT = 2048
# Small forced budget so that ranked blocks exist at low densities on short sequences.
BASE = SketchWalkConfig(block_size=16, dense_layers=1, dense_last_rows=1, sink=0.03, window=0.03)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("qwen2", max_position_embeddings=CONTEXT, num_hidden_layers=3)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    # Larger q/k weights make the random model's attention peaked, as trained models' is (an
    # almost uniform attention would make every selection's recall equal to its density).
    with torch.no_grad():
        for module in attention_modules(model).values():
            module.q_proj.weight.mul_(12.0)
            module.k_proj.weight.mul_(12.0)
    return model, tiny_tokenizer()


def _gates(num_layers: int = 3, hidden: int = 32) -> GateSet:
    torch.manual_seed(3)
    cfg = GateConfig(
        base_model="tiny",
        num_layers=num_layers,
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=16,
        block_size=16,
        hidden_size=hidden,
        sparsity_method="nz_ratio",
        nz_ratio=0.5,
    )
    return GateSet(cfg, init_std=0.2)


@pytest.mark.parametrize("granularity", ["layer", "kv_group"])
def test_oracle_recall_bounds_every_selector_at_equal_density(tiny, granularity):
    """Same forced blocks and per-row counts: the realized densities are equal, and ranking by
    the true block mass gives the highest attention recall."""
    model, tok = tiny
    ids = make_passages(tok, 512, 1, "stdlib", seed=2)[0].input_ids[None]
    with torch.no_grad(), capture_attention(model, pre_rope=True) as cap:
        model(ids)
    cfg = BASE.replace(density=0.25, granularity=granularity)
    gate = GateSelector(_gates(), cfg)
    selectors = {
        "sketchwalk": SketchWalk(cfg, backend="torch"),
        "oracle": OracleSelector(cfg, chunk_elements=1 << 14),  # several query chunks
        "streaming": StreamingSelector(cfg),
        "gate": gate,
        "forced": ForcedOnlySelector(cfg),
    }
    for layer in (1, 2):
        rec = cap.layers[layer]
        q, k = rec["Q"], rec["K"]
        gate.feed(layer, rec["Q_pre"], rec["K_pre"])
        sel = {name: s.select(q, k, layer) for name, s in selectors.items()}
        recall = {name: attention_recall(q, k, s) for name, s in sel.items()}
        density = {name: s.density for name, s in sel.items()}
        print(f"layer {layer} {granularity}: recall {recall}\n  density {density}")
        matched = {density[n] for n in ("sketchwalk", "oracle", "streaming", "gate")}
        assert len(matched) == 1, density
        assert density["forced"] < density["oracle"] < 0.35
        for name in ("sketchwalk", "streaming", "gate", "forced"):
            assert recall["oracle"] >= recall[name] - 1e-6, (name, recall)
        assert recall["oracle"] > recall["streaming"] + 1e-4  # the oracle is not recency
        # every selection keeps the forced blocks
        forced = sel["forced"].block_mask
        for name, s in sel.items():
            assert bool((s.block_mask | ~forced).all()), name
    # dense layers stay dense for every selector
    for name, s in selectors.items():
        s.reset()
        assert s.select(cap.layers[0]["Q"], cap.layers[0]["K"], 0).density == 1.0, name


def test_gate_selector_runs_inside_the_model_with_prerope_hooks(tiny):
    model, _ = tiny
    cfg = BASE.replace(density=0.3)
    gate = GateSelector(_gates(), cfg).attach(attention_modules(model))
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad(), enable_selector(model, gate, backend="reference") as sw:
            logits = model(ids).logits
    finally:
        gate.detach()
    assert torch.isfinite(logits).all()
    assert [sw.layers[i].mode for i in range(3)] == ["dense", "sparse", "sparse"]
    with pytest.raises(ValueError, match="block_size"):
        GateSelector(_gates(), BASE.replace(block_size=32))


def test_ppl_matched_densities_and_dense_config_is_exact(tiny, tmp_path):
    model, tok = tiny
    data = evaluate_ppl(
        model=model,
        tokenizer=tok,
        seq_len=384,
        num_samples=2,
        densities=[0.3, 1.0],
        selectors=["dense", "sketchwalk", "oracle", "streaming", "forced"],
        variants=["paper:preset=paper,block_size=16,dense_layers=1,dense_last_rows=1"],
        base_config=BASE,
        text_source="stdlib",
        backend="reference",
        output_dir=tmp_path,
        progress=False,
    )
    res = data["results"]
    print({k: (round(v["perplexity"], 4), v["density_sparse_layers"]) for k, v in res.items()})
    dense = res["dense"]
    # density 1.0 keeps every block: the stock kernel runs, bit-identical perplexity
    for name in ("sketchwalk@1", "oracle@1", "streaming@1", "paper@1"):
        assert res[name]["perplexity"] == dense["perplexity"], name
        assert res[name]["density_sparse_layers"] == 1.0
    # at 0.3 every ranked selector realizes exactly the same density, layer by layer
    layers = {n: res[n]["layer_density"] for n in ("sketchwalk@0.3", "oracle@0.3",
                                                   "streaming@0.3", "paper@0.3")}  # fmt: skip
    assert len({tuple(v) for v in layers.values()}) == 1, layers
    got = res["sketchwalk@0.3"]
    assert got["layer_density"][0] == 1.0 and 0.25 < got["density_sparse_layers"] < 0.35
    assert res["forced@0.3"]["density_sparse_layers"] < got["density_sparse_layers"]
    assert res["sketchwalk@0.3"]["perplexity"] != dense["perplexity"]
    assert res["oracle@0.3"]["delta_vs_dense_pct"] == pytest.approx(
        100 * (res["oracle@0.3"]["perplexity"] / dense["perplexity"] - 1)
    )
    # files: JSON with configs, hashes, environment; table; plot
    saved = json.loads((tmp_path / "eval_ppl.json").read_text())
    assert saved["runs"]["paper@0.3"]["config"]["causal_sketch"] is False
    assert saved["runs"]["oracle@0.3"]["config"]["density"] == 0.3
    assert len(saved["settings"]["passages_sha256"]) == 2
    assert saved["environment"]["torch"] == torch.__version__
    assert len(saved["items"]) == len(res) * 2
    assert "| oracle@0.3 |" in (tmp_path / "eval_ppl.md").read_text()
    assert (tmp_path / "eval_ppl.png").stat().st_size > 0


def test_niah_end_to_end_saves_answers_and_resume_skips_finished(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    kwargs = dict(
        model=model,
        tokenizer=tok,
        seq_lens=[700],
        depths=[0, 100],
        task="multikey",
        num_needles=3,
        max_new_tokens=3,
        selectors=["dense", "sketchwalk", "streaming"],
        decode=["dense", "sketchwalk"],
        base_config=BASE,
        text_source="stdlib",
        backend="reference",
        output_dir=tmp_path,
        progress=False,
        timing=True,
        timing_decode_tokens=2,
    )
    data = evaluate_niah(densities=[0.3], **kwargs)
    names = set(data["results"])
    assert names == {"dense", "sketchwalk@0.3", "sketchwalk@0.3+decode", "streaming@0.3"}
    saved = json.loads((tmp_path / "eval_niah.json").read_text())
    assert len(saved["items"]) == 4 * 2
    for item in saved["items"].values():
        assert isinstance(item["answer"], str) and len(item["answer_ids"]) == 3
        assert item["correct"] == (str(item["value"]) in item["answer"])
    decode = [it for it in saved["items"].values() if it["run"] == "sketchwalk@0.3+decode"]
    assert all(it["decode_density"] is not None and it["decode_density"] < 1 for it in decode)
    prefill_only = [it for it in saved["items"].values() if it["run"] == "sketchwalk@0.3"]
    assert all(it["decode_density"] is None for it in prefill_only)
    assert set(saved["timing"]["runs"]) == {"dense", "sketchwalk@0.3", "sketchwalk@0.3+decode"}
    assert (tmp_path / "eval_niah_heatmap.png").is_file()
    assert "### sketchwalk@0.3+decode" in (tmp_path / "eval_niah.md").read_text()

    with pytest.raises(EvalInputError, match="--resume"):
        evaluate_niah(densities=[0.3], **kwargs)
    changed = {**kwargs, "base_config": BASE.replace(walk=False), "timing": False}
    with pytest.raises(EvalInputError, match="saved with another configuration"):
        evaluate_niah(densities=[0.3], resume=True, **changed)

    calls = []
    real_generate = model.generate

    def counting_generate(*args, **kw):
        calls.append(1)
        return real_generate(*args, **kw)

    monkeypatch.setattr(model, "generate", counting_generate)
    kwargs["timing"] = False
    again = evaluate_niah(densities=[0.3, 0.5], resume=True, **kwargs)
    assert len(calls) == 3 * 2  # only the new density's 3 runs x 2 depths ran
    assert len(again["items"]) == 7 * 2
    assert again["items"]["dense|L700|d0|s0"] == saved["items"]["dense|L700|d0|s0"]


def test_niah_prompt_hides_needles_where_it_says(tiny):
    import random

    _, tok = tiny
    filler = make_passages(tok, 900, 1, "stdlib", seed=5)[0].input_ids.tolist()
    for depth in (0.0, 50.0, 100.0):
        p = build_niah_prompt(tok, filler, 800, depth, random.Random(1), num_needles=3)
        ids = p["input_ids"].tolist()
        assert len(ids) == 800
        text = tok.decode(ids)
        for needle, pos in zip(p["needles"], p["needle_positions"], strict=True):
            sentence = f"The special magic number for {needle['key']} is {needle['value']}."
            assert tok.decode(ids[pos:]).lstrip().startswith(sentence)
        assert f"special magic number for {p['key']} mentioned" in text  # the question
    with pytest.raises(EvalInputError, match="too short"):
        build_niah_prompt(tok, filler, 100, 50.0, random.Random(1))


def test_runs_and_variants():
    runs = build_runs(["dense", "sketchwalk", "oracle"], [0.1, 0.2], BASE,
                      ["paper:preset=paper,walk=false"], ["dense", "sketchwalk"])  # fmt: skip
    names = [r.name for r in runs]
    assert names[0] == "dense" and "sketchwalk@0.1+decode" in names and "paper@0.2" in names
    paper = next(r for r in runs if r.name == "paper@0.2")
    assert paper.config.causal_sketch is False and paper.config.walk is False
    assert paper.config.density == 0.2 and paper.config.top_k_blocks is None
    # a cumulative-mass variant keeps its budget: one run (per decode mode), not one per density
    mass_runs = [r for r in build_runs(["sketchwalk"], [0.1, 0.2], BASE, ["m:mass=0.9"]) if
                 r.kind == "variant"]  # fmt: skip
    assert [r.name for r in mass_runs] == ["m@mass0.9"]
    assert mass_runs[0].config.mass == 0.9 and mass_runs[0].config.budget == "mass"
    # a variant valid only with a density budget is built at each swept density
    (glob,) = build_runs([], [0.2], SketchWalkConfig(), ["g:allocation=global"])
    assert glob.config.allocation == "global" and glob.config.density == 0.2
    assert parse_variant("x:top_k_blocks=none,degree=2") == ("x", {"top_k_blocks": None,
                                                                   "degree": 2})  # fmt: skip
    for bad, match in (
        ("novalue", "NAME:key=value"),
        ("x:nosuch=1", "unknown SketchWalkConfig field"),
        ("x:degree=two", "bad value"),
        ("oracle:walk=false", "bad name"),
    ):
        with pytest.raises(EvalInputError, match=match):
            parse_variant(bad)
    # at 1024 tokens the default forced blocks alone keep 0.596 of the blocks: a warning
    assert forced_density(SketchWalkConfig(), 1024) == pytest.approx(81 / 136)
    default_runs = build_runs(["sketchwalk"], [0.3], SketchWalkConfig())
    warnings = forced_warnings(default_runs, [1024, 16384])
    assert len(warnings) == 1 and "sketchwalk@0.3 at 1024 tokens" in warnings[0]
    with pytest.raises(EvalInputError, match="unknown selector"):
        build_runs(["dense", "magic"], [0.2])
    with pytest.raises(EvalInputError, match=r"in \(0, 1\]"):
        build_runs(["sketchwalk"], [0.0])


def test_cli_bad_inputs_give_one_clear_error(tmp_path, capsys):
    folder = tiny_model_dir(tmp_path / "m", "qwen2", max_position_embeddings=512)
    common = ["--model_path", str(folder), "--output_dir", str(tmp_path / "o"), "--no_progress"]
    capsys.readouterr()  # drop what saving the tiny model printed

    assert main(["eval", "ppl", *common, "--densities", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "sketchwalk eval: error: --densities: each must be in (0, 1], got 1.5"

    assert main(["eval", "ppl", *common, "--seq_len", "4096", "--text_source", "stdlib"]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert errors == [
        "sketchwalk eval: error: --seq_len 4096 is longer than the model's context of 512 tokens "
        "(m)"
    ]

    assert main(["eval", "niah", *common, "--selectors", "gate", "--seq_lens", "300"]) == 2
    assert "needs --gate_path" in capsys.readouterr().err

    assert main(["eval", "ppl", *common, "--selectors", "magic"]) == 2
    assert "invalid choice: 'magic'" in capsys.readouterr().err

    # a real (tiny) CLI run with a gate checkpoint, through the alias-free folder path
    gate_dir = _gates().save(tmp_path / "gate")
    rc = main(["eval", "ppl", *common, "--seq_len", "256", "--num_samples", "1",
               "--text_source", "stdlib", "--selectors", "dense", "gate", "sketchwalk",
               "--densities", "0.3", "--block_size", "16", "--dense_layers", "1",
               "--gate_path", str(gate_dir), "--backend", "reference", "--no_plots"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err
    saved = json.loads((tmp_path / "o" / "eval_ppl.json").read_text())
    res = saved["results"]
    assert res["gate@0.3"]["layer_density"] == res["sketchwalk@0.3"]["layer_density"]
    assert saved["runs"]["sketchwalk@0.3"]["config"]["block_size"] == 16


def test_no_progress_silences_transformers_loading_bars():
    """--no_progress also turns off transformers' own bars ("Loading weights") while the model
    loads, and turns them back on afterwards."""
    from transformers.utils import logging as hf_logging

    from sketchwalk.pipeline.eval import _transformers_progress

    assert hf_logging.is_progress_bar_enabled()
    with _transformers_progress(False):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
    with _transformers_progress(True):
        assert hf_logging.is_progress_bar_enabled()
