"""`sketchwalk eval ruler`: RULER's task prompts (what they hide, where, in which split), the
scoring, the Wilson interval, and the evaluation end to end on a tiny model and on the
embedded SmolLM2."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest
import torch

pytest.importorskip("transformers")

from test_models import tiny_config, tiny_tokenizer

from sketchwalk.cli import main
from sketchwalk.config import SketchWalkConfig
from sketchwalk.pipeline.eval import EvalInputError, evaluate_ruler
from sketchwalk.pipeline.eval import ruler_tasks as rt
from sketchwalk.pipeline.eval.ruler import wilson

BASE = SketchWalkConfig(block_size=16, dense_layers=1, dense_last_rows=0, sink_blocks=1,
                        window_blocks=2, granularity="kv_group")  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def pool(tok):
    return rt.TextPool(tok, "stdlib", max_tokens=400_000)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("qwen2", max_position_embeddings=4096, num_hidden_layers=3)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def test_score_answer_is_rulers_share_of_values():
    assert rt.score_answer("the numbers are 12 and 34", ["12", "34"]) == 1.0
    assert rt.score_answer("only 12", ["12", "34", "56", "78"]) == 0.25
    assert rt.score_answer("ABC-def", ["abc-DEF"]) == 1.0
    assert rt.score_answer("", ["1"]) == 0.0
    with pytest.raises(ValueError):
        rt.score_answer("x", [])


def test_wilson_interval():
    lo, hi = wilson(0.5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson(1.0, 24)
    assert lo == pytest.approx(24 / (24 + 1.959964**2), abs=1e-6) and hi == 1.0
    assert wilson(0.0, 24)[0] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        wilson(0.5, 0)


def _text(tok, ids):
    return tok.decode(ids)


@pytest.mark.parametrize("task", rt.TASKS)
def test_every_task_hides_what_it_asks_for(tok, pool, task):
    length = 3000
    s = rt.build_sample(task, tok, pool, length, random.Random(task), "report", "after")
    assert s.task == task and s.refs and s.max_new_tokens >= 1
    assert len(s.input_ids) <= length
    if task in ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue",
                "niah_multiquery"):  # fmt: skip
        assert len(s.input_ids) == length  # real-text filler: exactly the length asked
    else:
        assert len(s.input_ids) > length - 150  # units of noise, needles or words: nearly
    text = _text(tok, s.input_ids)
    if task.startswith("niah"):
        for needle, pos in zip(s.info["needles"], s.info["needle_positions"], strict=True):
            sentence = f"for {needle['key']} is: {needle['value']}."
            assert sentence in _text(tok, s.input_ids[pos : pos + 200])
        asked = set(s.info["asked"])
        assert sorted(s.refs) == sorted(n["value"] for n in s.info["needles"] if n["key"] in asked)
        for key in asked:
            assert text.count(f"for {key} is:") == (4 if task == "niah_multivalue" else 1)
            assert key in text[text.rindex("What") :]  # the question names it
        if task in ("niah_multikey_2", "niah_multikey_3"):
            assert text.count("One of the special magic") > 20  # a haystack of needles
        if task == "niah_single_1":
            assert text.count(rt.NOISE) > 10
    elif task == "vt":
        chain = s.info["chain"]
        assert chain[0] == f"VAR {s.refs[0]} = {s.info['value']}"
        positions = [text.index(line + ".") for line in chain]
        assert positions == sorted(positions)  # the chain in order
        assert f"assigned the value {s.info['value']}" in text
    elif task == "cwe":
        words = Counter(re.findall(r"^\d+\. (\S+)$", text, flags=re.M))
        top = {w for w, _ in words.most_common(rt.CWE_COMMON)}
        assert top == set(s.refs)
        assert min(words[w] for w in s.refs) > max(c for w, c in words.items() if w not in top)
    else:  # fwe
        counts = Counter(text.split())
        ranked = [w for w, _ in counts.most_common(rt.FWE_TOP)]
        assert ranked == s.refs


def test_prompt_variants_and_splits(tok, pool):
    def make(variant, split="report", seed="x"):
        return rt.build_sample("niah_single_2", tok, pool, 2000, random.Random(seed), split,
                               variant)  # fmt: skip

    after, both, prefix = make("after"), make("both"), make("both_prefix")
    q = "What is the special magic number for"
    assert _text(tok, after.input_ids).count(q) == 1
    assert _text(tok, both.input_ids).count(q) == 2
    assert _text(tok, prefix.input_ids).rstrip().endswith("mentioned in the provided text is")
    assert after.refs == both.refs == prefix.refs  # the variants of a sample hide the same value
    # the splits draw their filler from the two halves of the stream: no shared passage
    half = len(pool.stream) // 2
    rng_t, rng_r = random.Random(1), random.Random(1)
    tune, report = pool.filler("tune", 500, rng_t), pool.filler("report", 500, rng_r)
    assert _contains(pool.stream[:half], tune) and _contains(pool.stream[half:], report)


def test_length_jitter_shortens_each_round_by_its_own_draw(tok):
    from sketchwalk.pipeline.eval.ruler import ROUND, ruler_prompts

    # real-text filler: prompts of exactly the length asked, so the draw alone shortens them
    args = (tok, ["niah_single_2", "niah_multikey_1"], [900], 6 * ROUND, ["after", "both"],
            "tune", "stdlib")  # fmt: skip
    _, plain = ruler_prompts(*args)
    _, again = ruler_prompts(*args, length_jitter=0)
    assert {k: v.input_ids for k, v in plain.items()} == {k: v.input_ids for k, v in again.items()}
    _, cut = ruler_prompts(*args, length_jitter=63)
    assert cut.keys() == plain.keys()
    for key, sample in cut.items():
        n = len(sample.input_ids)
        assert 900 - 63 <= n <= 900, (key, n)
        assert sample.refs == plain[key].refs  # the same values hidden, in a shorter context
    # one draw per round, shared by the round's tasks and samples (no padding in a batch)
    per_round = {}
    for (_, variant, _, s), sample in cut.items():
        if variant == "after":
            per_round.setdefault(s // ROUND, set()).add(len(sample.input_ids))
    assert all(len(v) == 1 for v in per_round.values())
    assert len({n for v in per_round.values() for n in v}) > 3  # the rounds' draws differ
    assert sum(len(cut[k].input_ids) % 16 != 0 for k in cut) > len(cut) // 2  # mid-block ends


def _contains(hay: list[int], needle: list[int]) -> bool:
    """needle is a contiguous run of hay, possibly wrapping from the end to the start."""
    doubled = hay + hay[: len(needle)]
    first = needle[0]
    return any(doubled[i : i + len(needle)] == needle for i, v in enumerate(doubled) if v == first)


def test_bad_inputs(tok, pool, tiny):
    with pytest.raises(rt.RulerInputError, match="unknown task"):
        rt.build_sample("qa_1", tok, pool, 1000, random.Random(0))
    with pytest.raises(rt.RulerInputError, match="too short"):
        rt.build_sample("niah_single_2", tok, pool, 120, random.Random(0))
    with pytest.raises(EvalInputError, match="--tasks"):
        evaluate_ruler(model=tiny, tokenizer=tok, tasks=["nope"], base_config=BASE)
    with pytest.raises(EvalInputError, match="--prompts"):
        evaluate_ruler(model=tiny, tokenizer=tok, prompt_variants=["middle"], base_config=BASE)
    with pytest.raises(EvalInputError, match="--split"):
        evaluate_ruler(model=tiny, tokenizer=tok, split="train", base_config=BASE)
    with pytest.raises(EvalInputError, match="--length_jitter"):
        evaluate_ruler(model=tiny, tokenizer=tok, seq_lens=[700], length_jitter=400,
                       base_config=BASE)  # fmt: skip


def test_evaluate_ruler_end_to_end_and_resume(tiny, tok, tmp_path, monkeypatch):
    kwargs = dict(
        model=tiny,
        tokenizer=tok,
        seq_lens=[700],
        tasks=["niah_single_2", "vt"],
        num_samples=2,
        prompt_variants=["after", "both_prefix"],
        selectors=["dense", "sketchwalk", "streaming"],
        variants=["rows:query_rows=2"],
        decode=["sketchwalk"],
        max_new_tokens=3,
        base_config=BASE,
        text_source="stdlib",
        backend="reference",
        output_dir=tmp_path,
        progress=False,
    )
    data = evaluate_ruler(densities=[0.3], **kwargs)
    names = set(data["results"])
    assert names == {"dense", "sketchwalk@0.3+decode", "streaming@0.3+decode", "rows@0.3+decode"}
    saved = json.loads((tmp_path / "eval_ruler.json").read_text())
    assert len(saved["items"]) == 4 * 2 * 2 * 2
    for item in saved["items"].values():
        assert item["score"] == rt.score_answer(item["answer"], item["refs"])
        assert item["hit_cap"] == (item["answer_tokens"] >= 3)
        if item["run"] != "dense":
            assert item["density_sparse_layers"] < 1
    res = saved["results"]["sketchwalk@0.3+decode"]
    stats = res["scores"]["vt"]["700"]
    assert stats["n"] == 4 and stats["lo"] <= stats["mean"] <= stats["hi"]
    assert set(saved["separation"]) == {"niah_single_2|700", "vt|700"}
    md = (tmp_path / "eval_ruler.md").read_text()
    assert "## 700 tokens" in md and "| streaming@0.3+decode |" in md and "separates" in md
    assert (tmp_path / "eval_ruler.png").is_file()
    # the same sample under the two prompt variants hides the same values
    a = saved["items"]["dense|vt|after|L700|s1"]
    b = saved["items"]["dense|vt|both_prefix|L700|s1"]
    assert a["refs"] == b["refs"] and a["prompt_sha256"] != b["prompt_sha256"]

    with pytest.raises(EvalInputError, match="--resume"):
        evaluate_ruler(densities=[0.3], **kwargs)
    calls = []
    real_generate = tiny.generate

    def counting_generate(*args, **kw):
        calls.append(1)
        return real_generate(*args, **kw)

    monkeypatch.setattr(tiny, "generate", counting_generate)
    again = evaluate_ruler(densities=[0.3, 0.5], resume=True, **kwargs)
    assert len(calls) == 3 * 8  # only the new density's three runs
    assert again["items"]["dense|vt|after|L700|s0"] == saved["items"]["dense|vt|after|L700|s0"]
    with pytest.raises(EvalInputError, match="different settings"):
        evaluate_ruler(densities=[0.3], resume=True, **{**kwargs, "split": "tune"})


def test_cli_ruler_on_the_embedded_model(tmp_path, capsys):
    """The command as a user runs it, on the real SmolLM2 weights the package installs."""
    out = tmp_path / "ruler"
    rc = main(["eval", "ruler", "--model_path", "smollm2-135m", "--device", "cpu",
               "--seq_lens", "640", "--tasks", "niah_single_1", "fwe", "--num_samples", "1",
               "--selectors", "dense", "sketchwalk", "--densities", "0.3", "--block_size", "32",
               "--text_source", "stdlib", "--max_new_tokens", "6", "--output_dir", str(out),
               "--length_jitter", "31", "--no_progress", "--no_plots"])  # fmt: skip
    assert rc == 0
    data = json.loads((out / "eval_ruler.json").read_text())
    assert len(data["items"]) == 2 * 2
    assert data["settings"]["length_jitter"] == 31
    assert all(it["prompt_tokens"] <= 640 for it in data["items"].values())
    assert data["settings"]["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "# RULER tasks" in capsys.readouterr().out
    rc = main(["eval", "ruler", "--model_path", "smollm2-135m", "--tasks", "nope",
               "--output_dir", str(out)])  # fmt: skip
    assert rc == 2


def test_until_eos_cuts_each_row_at_its_own_end():
    from sketchwalk.pipeline.eval.ruler import _until_eos

    assert _until_eos([5, 6, 2, 0, 0], {2}) == [5, 6, 2]
    assert _until_eos([5, 6, 7], {2}) == [5, 6, 7]  # no end: the cap stopped it
    assert _until_eos([3, 9], {9, 3}) == [3]


def test_batched_generation_matches_one_at_a_time(tiny, tok, tmp_path, monkeypatch):
    """--batch_size groups prompts of one run, round and cap into one left-padded
    generate() call; every answer, score and prompt equals the one-at-a-time run's."""
    kwargs = dict(
        model=tiny,
        tokenizer=tok,
        seq_lens=[700],
        tasks=["niah_single_2", "niah_multikey_1", "vt"],
        num_samples=4,
        selectors=["dense", "sketchwalk"],
        densities=[0.3],
        decode=["sketchwalk"],
        max_new_tokens=4,
        base_config=BASE,
        text_source="stdlib",
        backend="reference",
        progress=False,
        plots=False,
    )
    one = evaluate_ruler(output_dir=tmp_path / "one", **kwargs)
    shapes = []
    real_generate = tiny.generate

    def recording_generate(*args, **kw):
        shapes.append(tuple(kw["input_ids"].shape))
        return real_generate(*args, **kw)

    monkeypatch.setattr(tiny, "generate", recording_generate)
    batched = evaluate_ruler(output_dir=tmp_path / "batched", batch_size=3, **kwargs)
    # per run: 3 tasks x 4 samples in one round, one cap: four batches of 3, left-padded to
    # the longest prompt (the vt prompts are a few tokens shorter than 700)
    assert [b for b, _ in shapes] == [3] * 8
    lengths = {k: it["prompt_tokens"] for k, it in one["items"].items()}
    assert max(lengths.values()) == 700 and min(lengths.values()) < 700
    assert set(batched["items"]) == set(one["items"])
    for key, item in one["items"].items():
        other = batched["items"][key]
        assert other["batch"] == 3 and "batch" not in item
        for field in ("answer", "answer_tokens", "score", "hit_cap", "prompt_sha256", "refs",
                      "prompt_tokens"):  # fmt: skip
            assert other[field] == item[field], (key, field)

    # an item records its batch's mean density: over equal batches the means agree
    def mean_density(data):
        vals = [it["density_sparse_layers"] for it in data["items"].values()
                if it["run"] == "sketchwalk@0.3+decode"]  # fmt: skip
        return sum(vals) / len(vals)

    assert mean_density(batched) == pytest.approx(mean_density(one), rel=1e-4)
    with pytest.raises(EvalInputError, match="--batch_size"):
        evaluate_ruler(batch_size=0, **kwargs)


def test_a_batch_out_of_device_memory_runs_again_in_halves(tiny, tok, tmp_path, monkeypatch,
                                                          capsys):  # fmt: skip
    """A generate() call that runs out of device memory is retried as two halves, down to
    what fits: the items equal those of a run at the size that fits, each records the batch it
    ran in; a single prompt that does not fit stops the run with the error."""
    kwargs = dict(
        model=tiny, tokenizer=tok, seq_lens=[700], tasks=["niah_single_2", "niah_multikey_1"],
        num_samples=4, selectors=["dense", "sketchwalk"], densities=[0.3],
        decode=["sketchwalk"], max_new_tokens=4, base_config=BASE, text_source="stdlib",
        backend="reference", progress=False, plots=False,
    )  # fmt: skip
    fits = evaluate_ruler(output_dir=tmp_path / "fits", batch_size=2, **kwargs)
    real_generate = tiny.generate
    shapes = []

    def small_device(*args, **kw):
        shapes.append(kw["input_ids"].shape[0])
        if kw["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("stand-in: no room for this batch")
        return real_generate(*args, **kw)

    monkeypatch.setattr(tiny, "generate", small_device)
    split = evaluate_ruler(output_dir=tmp_path / "split", batch_size=8, **kwargs)
    assert shapes == [8, 4, 2, 2, 4, 2, 2] * 2  # per run: 8 prompts, halved twice
    assert "running it as 4 + 4" in capsys.readouterr().err
    assert set(split["items"]) == set(fits["items"])
    for key, item in fits["items"].items():
        other = split["items"][key]
        assert other["batch"] == 2
        for field in ("answer", "score", "prompt_sha256"):
            assert other[field] == item[field], (key, field)

    def never_fits(*args, **kw):
        raise torch.OutOfMemoryError("stand-in: nothing fits")

    monkeypatch.setattr(tiny, "generate", never_fits)
    with pytest.raises(torch.OutOfMemoryError):
        evaluate_ruler(output_dir=tmp_path / "none", batch_size=2, **kwargs)


def test_batched_generation_matches_for_every_selector(tiny, tok, tmp_path):
    """Left-padded batches give each selector's one-at-a-time answers: the integration runs
    each row with its own selector state (oracle, streaming, the learned gate, the peers)."""
    from test_eval import _gates

    gate_dir = _gates(hidden=64).save(tmp_path / "gate")
    kwargs = dict(
        model=tiny,
        tokenizer=tok,
        seq_lens=[700],
        tasks=["niah_multikey_2", "vt"],  # prompts of different lengths in one batch
        num_samples=2,
        selectors=["oracle", "streaming", "gate", "xattention", "minference", "flexprefill"],
        densities=[0.3],
        decode=["sketchwalk"],
        max_new_tokens=3,
        base_config=BASE,
        text_source="stdlib",
        backend="reference",
        gate_path=str(gate_dir),
        progress=False,
        plots=False,
    )
    one = evaluate_ruler(output_dir=tmp_path / "one", **kwargs)
    batched = evaluate_ruler(output_dir=tmp_path / "batched", batch_size=4, **kwargs)
    assert len({it["prompt_tokens"] for it in one["items"].values()}) > 1
    assert {it["batch"] for it in batched["items"].values()} == {4}
    for key, item in one["items"].items():
        for field in ("answer", "answer_tokens", "score"):
            assert batched["items"][key][field] == item[field], (key, field)
