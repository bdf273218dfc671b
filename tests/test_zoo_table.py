"""benchmarks/zoo_table.py: the selector table from eval ppl / eval ruler folders and
benchmarks/attention.py results, built here with the writers' own record layouts."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from sketchwalk.config import SketchWalkConfig
from sketchwalk.pipeline.eval.ppl import _aggregate_ppl
from sketchwalk.pipeline.eval.results import RESULT_VERSION, _check_result_file
from sketchwalk.pipeline.eval.ruler import _aggregate_ruler
from sketchwalk.pipeline.eval.runs import build_runs

ROOT = Path(__file__).resolve().parents[1]
MODEL = "Qwen/Qwen2.5-Coder-1.5B-Instruct"
SELECTORS = ["dense", "sketchwalk", "xattention", "minference", "flexprefill"]
TASKS = ["niah_single_1", "niah_multikey_1", "vt"]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def zoo():
    return _load("sketchwalk_zoo_table", ROOT / "benchmarks" / "zoo_table.py")


def _density_fields(run) -> dict:
    """What `_density_summary` records: dense runs have no sparse layers."""
    d = None if run.density is None else run.density + 0.001
    return {
        "layer_density": [1.0, 1.0, d or 1.0],
        "density_all_layers": 1.0,
        "density_sparse_layers": d,
    }


def write_ppl(folder: Path, nll: dict[str, tuple[float, float]], seq_len: int = 2000) -> Path:
    """An eval_ppl.json: two passages of 1000 scored tokens per run; ``nll`` per run name."""
    runs = build_runs(SELECTORS, [0.1], SketchWalkConfig.preset("default"), ["paper:preset=paper"])
    runs = [r for r in runs if r.name in nll]
    items = {}
    for run in runs:
        for i, value in enumerate(nll[run.name]):
            items[f"{run.name}|T{seq_len}|s{i}"] = {
                "run": run.name,
                "sample": i,
                "seq_len": seq_len,
                "input_ids_sha256": "x",
                "nll_sum": value,
                "tokens": 1000,
                "perplexity": math.exp(value / 1000),
                **_density_fields(run),
                "wall_s": 1.0,
                "rank": 0,
            }
    data = {
        "version": RESULT_VERSION,
        "task": "ppl",
        "items": items,
        "settings": {
            "model": MODEL,
            "seq_len": seq_len,
            "num_samples": 2,
            "seed": 0,
            "text_source": "austen",
            "backend": "auto",
            "world_size": 1,
        },
        "runs": {r.name: r.to_dict() for r in runs},
        "results": _aggregate_ppl(runs, items),
    }
    _check_result_file(data, "ppl")
    folder.mkdir(parents=True)
    (folder / "eval_ppl.json").write_text(json.dumps(data))
    return folder


def write_ruler(
    folder: Path, scores: dict[str, dict[str, list[float]]], split: str = "report"
) -> Path:
    """An eval_ruler.json at 2000 tokens: ``scores[run][task]`` per sample."""
    runs = build_runs(
        SELECTORS,
        [0.1],
        SketchWalkConfig.preset("default"),
        decode_modes=("dense", "sketchwalk"),
        decode_all=True,
    )
    runs = [r for r in runs if r.name in scores]
    items = {}
    for run in runs:
        for task, values in scores[run.name].items():
            for s, score in enumerate(values):
                items[f"{run.name}|{task}|after|L2000|s{s}"] = {
                    "run": run.name,
                    "task": task,
                    "variant": "after",
                    "length": 2000,
                    "prompt_tokens": 2000,
                    "sample": s,
                    "refs": ["1"],
                    "info": {},
                    "answer": "1",
                    "answer_tokens": 1,
                    "hit_cap": False,
                    "score": score,
                    **_density_fields(run),
                    "decode_density": None,
                    "wall_s": 1.0,
                    "rank": 0,
                }
    data = {
        "version": RESULT_VERSION,
        "task": "ruler",
        "items": items,
        "settings": {
            "model": MODEL,
            "tasks": TASKS,
            "seq_lens": [2000],
            "num_samples": 4,
            "prompt_variants": ["after"],
            "split": split,
            "seed": 0,
        },
        "runs": {r.name: r.to_dict() for r in runs},
        "results": _aggregate_ruler(runs, items),
    }
    _check_result_file(data, "ruler")
    folder.mkdir(parents=True)
    (folder / "eval_ruler.json").write_text(json.dumps(data))
    return folder


def write_attention(path: Path, gpu: str = "NVIDIA H100 80GB HBM3") -> Path:
    """A benchmarks/attention.py result, its records made by that script's `record`."""
    bench = _load("sketchwalk_attention_bench", ROOT / "benchmarks" / "attention.py")
    records: list = []
    for t, cudnn in ((32768, 10.0), (131072, 160.0)):
        base = {
            "kind": "prefill",
            "shape": "llama",
            "num_q_heads": 32,
            "num_kv_heads": 8,
            "head_dim": 128,
            "seq_len": t,
            "batch": 1,
            "dtype": "bfloat16",
            "block_size": 64,
        }
        bench.record(records, base, "sdpa_cudnn", cudnn, gqa="enable_gqa")
        # the default preset's row (query_rows 2, bfloat16 walk) beside another configuration
        for rows, dtype, ms in ((0, "float32", 5.0), (2, "bfloat16", 0.9 if t == 32768 else 8.0)):
            bench.record(
                records,
                base,
                "sketchwalk_select",
                ms,
                density=0.1,
                actual_density=0.1,
                query_rows=rows,
                walk_dtype=dtype,
                select_backend="auto",
                query_rows_backend="reference",
            )
        if t == 32768:
            bench.record(records, base, "xattention_select", 1.5, density=0.1, actual_density=0.1)
            bench.record(records, base, "minference_select", 2.5, density=0.1, actual_density=0.1)
        else:
            bench.record(
                records,
                base,
                "xattention_select",
                float("nan"),
                density=0.1,
                error="RuntimeError('out of memory')",
            )
    data = {
        "environment": {"gpu": gpu, "torch": "2.11", "triton": "3.6"},
        "settings": {"mode": "prefill"},
        "records": records,
    }
    path.write_text(json.dumps(data, indent=1))
    return path


PPL = {  # per run: summed NLL of two passages of 1000 tokens
    "dense": (2000.0, 2200.0),
    "sketchwalk@0.1": (2010.0, 2210.0),
    "xattention@0.1": (2008.0, 2210.0),
    "minference@0.1": (2030.0, 2230.0),
    "paper@0.1": (2050.0, 2250.0),
}
RULER = {
    "dense": {t: [1.0] * 4 for t in TASKS},
    "sketchwalk@0.1+decode": {
        "niah_single_1": [1, 1, 1, 0],
        "niah_multikey_1": [1, 0, 0, 0],
        "vt": [1, 0.8, 0.6, 1],
    },
    "sketchwalk@0.1": {t: [0.0] * 4 for t in TASKS},  # prefill-only: not the row's
    "xattention@0.1+decode": {
        "niah_single_1": [1, 1, 0, 0],
        "niah_multikey_1": [0, 0, 0, 0],
        "vt": [1, 1, 1, 1],
    },
    "minference@0.1+decode": {
        "niah_single_1": [1, 1, 1, 1],
        "niah_multikey_1": [1, 0, 0, 0],
        "vt": [1, 0.6, 0.6, 0.6],
    },
    "flexprefill@0.1": {t: [0.0] * 4 for t in TASKS},  # decodes densely
}


@pytest.fixture
def sources(tmp_path):
    return {
        "ppl": write_ppl(tmp_path / "ppl", PPL),
        "ruler": write_ruler(tmp_path / "ruler", RULER),
        "attention": write_attention(tmp_path / "attention.json"),
    }


def _run(zoo, sources, tmp_path, *extra):
    out = tmp_path / "out" / "zoo"
    argv = [
        "--ppl",
        str(sources["ppl"]),
        "--ruler",
        str(sources["ruler"]),
        "--attention",
        str(sources["attention"]),
        "--out",
        str(out),
        *extra,
    ]
    assert zoo.main(argv) == 0
    md = (tmp_path / "out" / "zoo.md").read_text()
    table = json.loads((tmp_path / "out" / "zoo.json").read_text())
    cells = [
        [c.strip() for c in ln.strip()[1:-1].split("|")]
        for ln in md.splitlines()
        if ln.startswith("| ") and not ln.startswith("| run ")
    ]
    rows = {c[0]: c for c in cells}
    return md, table, rows


def test_wilson_interval_of_an_average(zoo):
    # two tasks of four items, 4/4 and 2/4: the average 0.75 is the pooled 6/8, whose 95%
    # Wilson interval is [0.4093, 0.9285] (z = 1.96: centre 0.6689, half-width 0.2596)
    items = [{"task": "a", "score": 1.0}] * 4 + [{"task": "b", "score": s} for s in (1, 1, 0, 0)]
    got = zoo.task_average(items)
    print(got)
    assert got["mean"] == pytest.approx(0.75) and got["n"] == 8
    assert got["lo"] == pytest.approx(0.4093, abs=1e-4)
    assert got["hi"] == pytest.approx(0.9285, abs=1e-4)
    # unequal items (a stopped run): the mean of the task means (0.5, not the pooled 4/6) over
    # all 6 items: centre 0.5, half-width 1.96 * sqrt(0.25/6 + 1.96^2/144) / (1 + 1.96^2/6)
    items = [{"task": "a", "score": 1.0}] * 4 + [{"task": "b", "score": 0.0}] * 2
    got = zoo.task_average(items)
    print(got)
    assert got["mean"] == pytest.approx(0.5) and got["n"] == 6
    assert got["lo"] == pytest.approx(0.1876, abs=1e-4)
    assert got["hi"] == pytest.approx(0.8124, abs=1e-4)
    assert zoo.task_average([]) is None


def test_table_numbers_match_hand_computation(zoo, sources, tmp_path):
    md, table, rows = _run(zoo, sources, tmp_path)
    print(md)
    order = [r["run"] for r in table["rows"]]
    assert order == [
        "dense",
        "sketchwalk@0.1",
        "paper@0.1",
        "xattention@0.1",
        "minference@0.1",
        "flexprefill@0.1",
    ]
    # perplexity over both passages: exp(4220 / 2000); vs dense exp(4200 / 2000): +1.005%
    sw = rows["sketchwalk@0.1"]
    assert sw[2] == f"{math.exp(2.11):.3f}" and sw[3] == "+1.01%"
    # task average of the +decode run: (0.75 + 0.25 + 0.85) / 3 over 12 items; needles: 0.75
    # of 4 items (Wilson [0.3006, 0.9544])
    avg = (0.75 + 0.25 + 0.85) / 3
    lo, hi = zoo.wilson(avg, 12)
    assert sw[4] == f"{100 * avg:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
    assert sw[5] == "12/12" and sw[6] == "sketchwalk"
    assert sw[7] == "75.0 [30.1, 95.4]"
    # realized density of the sparse layers (0.101 in both files)
    assert sw[8] == "0.101" and sw[9] == "0.101"
    # the default preset's timing (query_rows 2, bfloat16 walk), not the other configuration
    assert sw[10] == "0.90 (9.0%)" and sw[11] == "8.00 (5.0%)"
    row = table["rows"][1]
    assert row["perplexity"]["perplexity"] == pytest.approx(math.exp(2.11))
    assert row["perplexity"]["delta_vs_dense_pct"] == pytest.approx(100 * (math.exp(0.01) - 1))
    assert row["ruler"]["task_average"]["mean"] == pytest.approx(avg)
    assert row["select_ms"]["32768"]["ms"] == 0.9
    head = table["header"]
    assert head["model"] == MODEL and head["ruler"]["split"] == "report"
    assert head["ruler"]["prompts_per_cell"] == [4] and head["ppl"]["length"] == 2000
    assert head["attention"]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert "NVIDIA H100 80GB HBM3" in md and "report split" in md and "Wilson" in md


def test_task_average_agrees_with_the_eval_writer(zoo, sources, tmp_path):
    _, table, _ = _run(zoo, sources, tmp_path)
    saved = json.loads((sources["ruler"] / "eval_ruler.json").read_text())["results"]
    ppl = json.loads((sources["ppl"] / "eval_ppl.json").read_text())["results"]
    for row in table["rows"]:
        if row["ruler"] is not None:  # complete runs: every task has as many items
            want = saved[row["ruler"]["run"]]["task_average"]
            assert row["ruler"]["task_average"]["mean"] == pytest.approx(want)
        if row["perplexity"] is not None:
            want = ppl[row["run"]]
            assert row["perplexity"]["perplexity"] == pytest.approx(want["perplexity"])
            assert row["perplexity"]["delta_vs_dense_pct"] == pytest.approx(
                want["delta_vs_dense_pct"]
            )


def test_missing_cells_are_dashes_with_a_reason(zoo, sources, tmp_path):
    md, table, rows = _run(zoo, sources, tmp_path)
    # paper: ppl only; not timed by attention.py
    assert rows["paper@0.1"][4:8] == ["-", "-", "-", "-"] and rows["paper@0.1"][2] != "-"
    assert rows["paper@0.1"][10] == "-"
    # flexprefill: RULER only, prefill-only decoding (no needle cell), never timed
    flex = rows["flexprefill@0.1"]
    assert flex[2] == "-" and flex[3] == "-" and flex[6] == "dense" and flex[7] == "-"
    assert flex[10] == "-"
    # xattention's 128K timing failed; minference has none at 128K
    assert rows["xattention@0.1"][10] == "1.50 (15.0%)" and rows["xattention@0.1"][11] == "-"
    assert rows["minference@0.1"][11] == "-"
    notes = "\n".join(table["footnotes"])
    assert "xattention@0.1: its selection timing at 131072 tokens failed" in notes
    assert "minference@0.1: no minference_select timing at 131072 tokens" in notes
    assert "flexprefill@0.1: no flexprefill_select timing at 32768" in notes
    assert "not timed there: paper" in notes
    assert "flexprefill@0.1+decode" not in md  # the run is prefill-only
    assert "flexprefill@0.1: RULER run flexprefill@0.1 decodes densely" in notes
    # a run with items missing says so
    scores = {"dense": RULER["dense"], "sketchwalk@0.1+decode": {"vt": [1.0, 1.0]}}
    ruler = write_ruler(tmp_path / "short", scores)
    assert zoo.main(["--ruler", str(ruler), "--out", str(tmp_path / "s")]) == 0
    short = json.loads((tmp_path / "s.json").read_text())
    assert short["rows"][1]["ruler"]["items"] == 2
    assert "holds 2 of its 12 items" in "\n".join(short["footnotes"])
    assert short["rows"][1]["ruler"]["needle"] is None  # no niah_single_* task present


def test_best_peer_and_sketchwalk_verdict(zoo, sources, tmp_path):
    md, table, rows = _run(zoo, sources, tmp_path)
    entry = table["comparisons"]["0.1"]
    # minference 0.65 > sketchwalk 0.6167 > xattention 0.5; flexprefill's run decodes densely
    # (sketchwalk's sparsely): not compared
    assert entry["best_peer_task_average"] == {"selectors": ["minference"], "mean": 0.65}
    assert entry["other_decode"] == {"decode": "sketchwalk", "peers": ["flexprefill"]}
    sw = entry["sketchwalk_task_average"]
    assert sw["at_least_as_good_as_every_peer"] is False
    assert sw["versus"]["xattention"]["at_least_as_good"] is True
    assert sw["versus"]["xattention"]["ties_within_interval"] is True
    assert sw["versus"]["minference"]["ties_within_interval"] is True
    assert sw["missing_peers"] == ["flexprefill"]
    # perplexity: xattention exp(2.109) is the best peer; sketchwalk +0.100% is within 0.2%
    assert entry["best_peer_perplexity"]["selectors"] == ["xattention"]
    ppl = entry["sketchwalk_perplexity"]
    assert ppl["vs_best_peer_pct"] == pytest.approx(100 * (math.exp(0.001) - 1))
    assert ppl["within_tolerance"] is True and ppl["missing_peers"] == ["flexprefill"]
    assert "†" in rows["minference@0.1"][4] and "‡" in rows["xattention@0.1"][2]
    assert "†" not in rows["sketchwalk@0.1"][4] and "‡" not in rows["sketchwalk@0.1"][2]
    line = next(ln for ln in md.splitlines() if ln.startswith("- density 0.1:"))
    print(line)
    assert "at least as good as every peer on task average: no (below minference)" in line
    assert "ties within interval with xattention, minference" in line
    assert "within 0.2%: yes" in line
    assert "compared among runs with sketchwalk decoding only (not flexprefill)" in line
    # a clear win (intervals apart) is no tie; a perplexity 1% above the best peer is not within
    ruler = dict(
        RULER,
        **{
            "sketchwalk@0.1+decode": {t: [1.0] * 4 for t in TASKS},
            "minference@0.1+decode": {t: [0.0] * 4 for t in TASKS},
        },
    )
    write_ruler(tmp_path / "win", ruler)
    write_ppl(tmp_path / "worse", {**PPL, "sketchwalk@0.1": (2030.0, 2210.0)})
    argv = [
        "--ruler",
        str(tmp_path / "win"),
        "--ppl",
        str(tmp_path / "worse"),
        "--out",
        str(tmp_path / "w"),
    ]
    assert zoo.main(argv) == 0
    entry = json.loads((tmp_path / "w.json").read_text())["comparisons"]["0.1"]
    sw = entry["sketchwalk_task_average"]
    assert sw["at_least_as_good_as_every_peer"] is True
    assert sw["versus"]["minference"]["ties_within_interval"] is False
    assert entry["best_peer_task_average"]["selectors"] == ["xattention"]
    # sketchwalk exp(2.12) against xattention exp(2.109): +1.1%
    assert entry["sketchwalk_perplexity"]["vs_best_peer_pct"] == pytest.approx(
        100 * (math.exp(0.011) - 1)
    )
    assert entry["sketchwalk_perplexity"]["within_tolerance"] is False


def test_corrupt_or_missing_files_name_the_file(zoo, sources, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "eval_ppl.json").write_text('{"version": 1, "task": "ppl", "items": {')
    assert zoo.main(["--ppl", str(bad), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert f"{bad / 'eval_ppl.json'}: not a readable eval_ppl.json" in err
    assert zoo.main(["--ruler", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 1
    assert "nowhere/eval_ruler.json: no such file" in capsys.readouterr().err
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"environment": {}, "records": [{"kind": "prefill"}]}))
    argv = ["--ppl", str(sources["ppl"]), "--attention", str(wrong), "--out", str(tmp_path / "o")]
    assert zoo.main(argv) == 1
    assert "wrong.json: not a benchmarks/attention.py result" in capsys.readouterr().err
    # an item without its fields is not an eval result
    data = json.loads((sources["ppl"] / "eval_ppl.json").read_text())
    next(iter(data["items"].values())).pop("tokens")
    (bad / "eval_ppl.json").write_text(json.dumps(data))
    assert zoo.main(["--ppl", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert "bad or missing 'tokens'" in capsys.readouterr().err
    assert not (tmp_path / "o.md").exists() and not (tmp_path / "o.json").exists()


def test_sources_that_do_not_fit_together(zoo, sources, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    # the same run at the same length in two files
    twice = write_ppl(tmp_path / "ppl2", {"dense": (1.0, 1.0)})
    assert zoo.main(["--ppl", str(sources["ppl"]), str(twice), *out]) == 1
    assert "both hold ppl run 'dense' at 2000 tokens" in capsys.readouterr().err
    # two lengths: the flag chooses, and a file at the other length is named in the notes
    other = write_ppl(tmp_path / "ppl4k", {"dense": (1.0, 1.0)}, seq_len=4000)
    assert zoo.main(["--ppl", str(sources["ppl"]), str(other), *out]) == 2
    assert "--ppl-length: the files hold several lengths (2000, 4000)" in capsys.readouterr().err
    assert zoo.main(["--ppl", str(sources["ppl"]), str(other), "--ppl-length", "2000", *out]) == 0
    notes = json.loads((tmp_path / "o.json").read_text())["footnotes"]
    assert any(str(other) in n and "not in the table" in n for n in notes)
    # RULER splits and attention GPUs must agree
    tune = write_ruler(tmp_path / "tune", {"dense": RULER["dense"]}, split="tune")
    assert zoo.main(["--ruler", str(sources["ruler"]), str(tune), *out]) == 1
    assert "different RULER splits" in capsys.readouterr().err
    h200 = write_attention(tmp_path / "h200.json", gpu="NVIDIA H200")
    argv = ["--ppl", str(sources["ppl"]), "--attention", str(sources["attention"]), str(h200)]
    assert zoo.main([*argv, *out]) == 1
    assert "different GPUs" in capsys.readouterr().err
    assert (
        zoo.main(
            [
                "--ppl",
                str(sources["ppl"]),
                "--shape",
                "smollm2",
                "--attention",
                str(sources["attention"]),
                *out,
            ]
        )
        == 2
    )
    assert "--shape smollm2: the files hold ['llama']" in capsys.readouterr().err
