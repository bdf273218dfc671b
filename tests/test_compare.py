"""`sketchwalk compare`: metric arithmetic against brute force, both SeerAttention sides, the
matched-density ordering, the CLI end to end (with plots), the root script and bad input."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sketchwalk.blocks import BlockSelection
from sketchwalk.cli import main
from sketchwalk.config import SketchWalkConfig
from sketchwalk.metrics import attention_recall, block_mask_recall, true_block_attention
from sketchwalk.pipeline import compare
from sketchwalk.pipeline import seer as seer_side
from sketchwalk.pipeline.tensorio import save_tensor_file, tensor_filename
from sketchwalk.selection.prefill import SketchWalk
from sketchwalk.testing import make_qkv, stderr_lines

REPO = Path(__file__).resolve().parents[1]
TS = "20240219_120000"
BLOCK = 16


def write_files(
    folder: Path,
    seq_len: int = 96,
    layers: tuple[int, ...] = (0, 1, 2, 3),
    samples: int = 1,
    hq: int = 4,
    hkv: int = 2,
    d: int = 16,
    gate: bool = False,
    gate_mask: bool = True,
) -> list[Path]:
    """Tensor files as `collect` writes them (seed metadata); ``gate`` adds SeerAttention gate
    tensors (``seerattn_scores`` softmax rows over causal blocks, ``seerattn_mask``)."""
    paths = []
    nb = -(-seq_len // BLOCK)
    for sample in range(samples):
        for layer in layers:
            q, k, v = make_qkv(1, hq, hkv, seq_len, d, seed=100 * sample + layer)
            ids = torch.randint(0, 1000, (1, seq_len), generator=torch.Generator().manual_seed(1))
            tensors = {"Q": q, "K": k, "V": v, "input_ids": ids}
            if gate:
                gen = torch.Generator().manual_seed(7 + layer)
                logits = torch.randn(1, hq, nb, nb, generator=gen) * 2
                causal = torch.ones(nb, nb, dtype=torch.bool).tril()
                scores = torch.softmax(logits.masked_fill(~causal, -1e30), dim=-1)
                tensors["seerattn_scores"] = scores
                if gate_mask:
                    tensors["seerattn_mask"] = (scores > 0.2) & causal
            meta = {
                "layer_idx": layer,
                "seq_len": seq_len,
                "num_heads": hq,
                "num_kv_heads": hkv,
                "head_dim": d,
                "hidden_size": hq * d,
                "batch_size": 1,
                "timestamp": TS,
                "sample": sample,
                "model_path": "synthetic",
                "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
                "sliding_window": None,
            }
            path = folder / tensor_filename(seq_len, layer, sample, TS)
            paths.append(save_tensor_file(path, tensors, meta))
    return paths


def _args(tensor_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["compare", "--tensor_dir", str(tensor_dir), "--output_dir", str(out), *extra]


def cli(tmp_path: Path, tensor_dir: Path, *extra: str) -> tuple[list[dict], dict, Path]:
    out = tmp_path / "out"
    rc = main(
        [
            "compare",
            "--tensor_dir",
            str(tensor_dir),
            "--output_dir",
            str(out),
            "--device",
            "cpu",
            "--block_size",
            str(BLOCK),
            "--density",
            "0.5",
            "--dense_last_rows",
            "1",
            *extra,
        ]
    )
    assert rc == 0
    (results,) = out.glob("comparison_results_*.json")
    (summary,) = out.glob("comparison_summary_*.json")
    return json.loads(results.read_text()), json.loads(summary.read_text()), out


# ---- metric arithmetic ------------------------------------------------------------------------


def _brute_sets(mask: torch.Tensor) -> set[tuple[int, ...]]:
    return {
        idx
        for idx in itertools.product(*(range(s) for s in mask.shape))
        if idx[-1] <= idx[-2] and bool(mask[idx])
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overlap_and_jaccard_match_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(2, 3, 6, 6, generator=gen) < 0.5
    b = torch.rand(2, 3, 6, 6, generator=gen) < 0.3
    got = compare.mask_agreement(a, b)
    sa, sb = _brute_sets(a), _brute_sets(b)  # causal tiles only; the upper part is ignored
    overlap = len(sa & sb) / min(len(sa), len(sb))
    jaccard = len(sa & sb) / len(sa | sb)
    print(f"overlap {got['block_overlap']} vs {overlap}, jaccard {got['jaccard_similarity']}")
    assert got["block_overlap"] == pytest.approx(overlap, abs=1e-12)
    assert got["jaccard_similarity"] == pytest.approx(jaccard, abs=1e-12)
    assert got["intersection_blocks"] == len(sa & sb)


def test_agreement_by_hand():
    a = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    b = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    a[0, 0, [0, 1, 2, 3], [0, 0, 2, 3]] = True  # 4 tiles
    b[0, 0, [0, 1], [0, 1]] = True  # 2 tiles, 1 shared
    b[0, 0, 0, 3] = True  # above the diagonal: not a causal tile, ignored
    got = compare.mask_agreement(a, b)
    assert got["block_overlap"] == pytest.approx(1 / 2)
    assert got["jaccard_similarity"] == pytest.approx(1 / 5)
    empty = torch.zeros_like(a)
    assert compare.mask_agreement(a, empty)["block_overlap"] is None
    assert compare.mask_agreement(empty, empty)["jaccard_similarity"] is None


def test_correlations_match_brute_force():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(1, 4, 7, 7, generator=gen)
    y = torch.rand(1, 2, 7, 7, generator=gen)
    tx, ty = compare.causal_tiles(x), compare.causal_tiles(y)
    # brute force: mean over heads, then the (i, j) tiles with j <= i, in any fixed order
    xm, ym = x.double().mean(dim=(0, 1)), y.double().mean(dim=(0, 1))
    xs = [float(xm[i, j]) for i in range(7) for j in range(i + 1)]
    ys = [float(ym[i, j]) for i in range(7) for j in range(i + 1)]
    assert len(xs) == tx.numel() == 28
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True))
    vx = sum((a - mx) ** 2 for a in xs)
    vy = sum((b - my) ** 2 for b in ys)
    want = cov / math.sqrt(vx * vy)
    got = compare.pearson(tx, ty)
    print(f"pearson {got} vs brute force {want}")
    assert got == pytest.approx(want, abs=1e-12)
    # Spearman = Pearson of ranks; with ties the average rank
    ties = torch.tensor([1.0, 2.0, 2.0, 5.0])
    other = torch.tensor([1.0, 3.0, 2.0, 4.0])
    ranks = [1.0, 2.5, 2.5, 4.0]
    want_s = compare.pearson(torch.tensor(ranks), torch.tensor([1.0, 3.0, 2.0, 4.0]))
    assert compare.spearman(ties, other) == pytest.approx(want_s, abs=1e-12)
    assert compare.pearson(torch.ones(5), torch.arange(5.0)) is None


@pytest.mark.parametrize("seq_len", [40, 64, 7])
def test_block_mask_recall_equals_attention_recall(seq_len):
    q, k, _ = make_qkv(2, 4, 2, seq_len, 8, seed=seq_len)
    ba = true_block_attention(q, k, BLOCK)
    nb = ba.shape[-1]
    mask = torch.rand(2, 4, nb, nb, generator=torch.Generator().manual_seed(0)) < 0.5
    mask |= torch.eye(nb, dtype=torch.bool)
    sel = BlockSelection.from_mask(mask, BLOCK, seq_len)
    want = attention_recall(q, k, sel)
    got = block_mask_recall(ba, sel.block_mask, seq_len, BLOCK)
    print(f"recall {got} vs attention_recall {want}, diff {abs(got - want):.2e}")
    assert got == pytest.approx(want, abs=1e-6)


# ---- the SeerAttention side --------------------------------------------------------------------


def test_oracle_threshold_rule():
    q, k, _ = make_qkv(1, 4, 2, 128, 16, seed=5)
    ba = true_block_attention(q, k, BLOCK)
    side = seer_side.oracle_threshold_side(ba, threshold=0.1, dense_last_rows=2)
    nb = ba.shape[-1]
    i = torch.arange(nb)[:, None]
    j = torch.arange(nb)[None, :]
    want = ((ba > 0.1) | (i == j) | (i >= nb - 2)) & (j <= i)
    assert side.method == "oracle-threshold" == seer_side.ORACLE_THRESHOLD
    assert torch.equal(side.mask, want)
    assert "true block attention" in side.rule and "diagonal kept" in side.rule
    assert side.scores is ba
    # nz_ratio: SeerAttention's top-k count per row (plus forced rows and diagonal)
    nz = seer_side.oracle_threshold_side(ba, nz_ratio=0.5, dense_last_rows=0)
    topk = max(1, int((1 - math.sqrt(0.5)) * nb))
    assert int(nz.mask[0, 0, -3].sum()) <= topk + 1
    assert "nz_ratio=0.5" in nz.rule


def test_gate_side_stored_mask_and_rethreshold(tmp_path):
    (path,) = write_files(tmp_path, layers=(2,), gate=True)
    from sketchwalk.pipeline.tensorio import load_tensor_file

    rec = load_tensor_file(path)
    stored = seer_side.gate_side(rec, path, BLOCK)
    assert stored.method == "seerattention-gate"
    assert torch.equal(stored.mask, rec["seerattn_mask"])
    assert "stored seerattn_mask" in stored.rule
    again = seer_side.gate_side(rec, path, BLOCK, threshold=0.05, dense_last_rows=2)
    nb = rec["seerattn_scores"].shape[-1]
    want = (rec["seerattn_scores"] > 0.05) | (torch.arange(nb) >= nb - 2)[:, None]
    want &= torch.ones(nb, nb, dtype=torch.bool).tril()
    assert torch.equal(again.mask, want)
    with pytest.raises(seer_side.CompareInputError, match=re.escape(path.name)):
        seer_side.gate_side(rec, path, 32)


# ---- matched density ---------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["layer", "kv_group", "head"])
def test_matched_density_recall_ordering(granularity):
    cfg = SketchWalkConfig(
        block_size=BLOCK,
        sketch_dim=16,
        density=0.4,
        dense_layers=1,
        dense_last_rows=1,
        granularity=granularity,
    )
    walker = SketchWalk(cfg)
    for layer in range(3):
        q, k, _ = make_qkv(1, 4, 2, 160, 16, seed=layer)
        sel = walker.select(q, k, layer)
        ba = true_block_attention(q, k, BLOCK)
        seer = seer_side.oracle_threshold_side(ba, threshold=0.05)
        out = compare.compare_layer(sel, seer, ba, cfg, 2)
        print({key: out[key] for key in out if "recall" in key})
        tol = 1e-9
        assert out["oracle_recall"] >= out["sketchwalk_recall"] - tol
        assert out["oracle_recall"] >= out["seerattn_recall_matched"] - tol
        assert out["oracle_recall_seerattn_budget"] >= out["seerattn_recall"] - tol
        assert out["seerattn_method"] == "oracle-threshold"
        assert out["seerattn_sparsity"] == pytest.approx(1 - out["seerattn_density"])
        if layer < cfg.dense_layers:
            assert out["sketchwalk_dense_layer"] and out["sketchwalk_recall"] == pytest.approx(1)
            assert out["attention_correlation"] is None
            assert out["sketchwalk_recall_matched"] is None
        else:
            assert -1 <= out["attention_correlation"] <= 1
            # the matched re-selection lands within a block per row of the target when the
            # target is above the forced blocks
            assert out["sketchwalk_density_matched"] >= out["seerattn_density"] - 0.2


# ---- CLI ---------------------------------------------------------------------------------------


def test_cli_end_to_end_oracle_threshold_with_plots(tmp_path, capsys):
    tensor_dir = tmp_path / "t"
    write_files(tensor_dir, samples=2)
    results, summary, out = cli(tmp_path, tensor_dir, "--visualize", "--max_plots", "3")
    text = capsys.readouterr().out
    assert len(results) == 8
    assert "oracle-threshold" in text and "no --validation_dir" in text
    assert summary["seerattn_method"] == "oracle-threshold"
    for r in results:
        assert r["seerattn_method"] == "oracle-threshold"
        for key in (
            "seerattn_sparsity",
            "sketchwalk_sparsity",
            "block_overlap",
            "jaccard_similarity",
            "attention_correlation",
            "seerattn_recall",
            "sketchwalk_recall",
            "sketchwalk_recall_matched",
            "seerattn_recall_matched",
            "oracle_recall",
            "layer_idx",
            "seq_len",
            "sample_id",
            "config",
        ):
            assert key in r
        assert r["config"]["density"] == 0.5 and r["config"]["block_size"] == BLOCK
    assert [r["layer_idx"] for r in results] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert set(summary) >= {"overall", "by_seq_len", "by_layer_idx", "sparse_layers"}
    assert summary["by_layer_idx"]["3"]["count"] == 2
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 4 and any(n.startswith("comparison_summary_") for n in pngs)
    assert "comparison_tensors_seq96_layer0_sample0_20240219_120000.png" in pngs
    assert all((out / n).read_bytes()[:4] == b"\x89PNG" for n in pngs)


def test_cli_gate_files_and_validation_dir(tmp_path, capsys):
    tensor_dir = tmp_path / "t"
    write_files(tensor_dir, gate=True)
    val = tmp_path / "val"
    val.mkdir()
    cfg = SketchWalkConfig(block_size=BLOCK, sketch_dim=16, top_k_blocks=2, dense_layers=1)
    (val / "validation_summary_20240219_130000.json").write_text(
        json.dumps({"config": cfg.to_dict()})
    )
    stem = tensor_filename(96, 2, 0, TS).removesuffix(".pt")
    (val / "validation_results_20240219_130000.json").write_text(
        json.dumps([{"sample_id": stem, "attention_recall": 0.75, "config": cfg.to_dict()}])
    )
    out = tmp_path / "out"
    rc = main(
        _args(tensor_dir, out, "--validation_dir", str(val), "--device", "cpu"),
    )
    assert rc == 0
    results = json.loads(next(out.glob("comparison_results_*.json")).read_text())
    summary = json.loads(next(out.glob("comparison_summary_*.json")).read_text())
    assert {r["seerattn_method"] for r in results} == {"seerattention-gate"}
    assert "oracle-threshold" not in json.dumps(results)
    assert summary["seerattn_method"] == "seerattention-gate"
    # the validation config is the default: top_k_blocks=2 and dense_layers=1 came from it
    assert results[0]["config"] == cfg.to_dict()
    layer2 = next(r for r in results if r["layer_idx"] == 2)
    assert layer2["validation_attention_recall"] == 0.75
    assert layer2["validation_config_matches"] is True
    assert "stored seerattn_mask" in layer2["seerattn_rule"]
    # an explicit flag wins over the validation config, and clears its budget form
    rc = main(
        _args(
            tensor_dir,
            tmp_path / "o2",
            *("--validation_dir", str(val), "--device", "cpu", "--density", "0.6"),
            *("--seerattn_threshold", "0.05"),
        )
    )
    assert rc == 0
    res2 = json.loads(next((tmp_path / "o2").glob("comparison_results_*.json")).read_text())
    assert res2[0]["config"]["density"] == 0.6 and res2[0]["config"]["top_k_blocks"] is None
    assert res2[0]["config"]["dense_layers"] == 1
    assert "gate scores score > 0.05" in res2[0]["seerattn_rule"]
    assert res2[2]["validation_config_matches"] is False


def test_gate_scores_without_mask_use_threshold(tmp_path):
    tensor_dir = tmp_path / "t"
    write_files(tensor_dir, layers=(0, 1, 2), gate=True, gate_mask=False)
    results, _, _ = cli(tmp_path, tensor_dir)
    assert [r["layer_idx"] for r in results] == [0, 1, 2]  # one result per file
    assert all(r["seerattn_method"] == "seerattention-gate" for r in results)
    assert all("score > 0.1" in r["seerattn_rule"] for r in results)


def test_missing_layer_is_reported(tmp_path, capsys):
    tensor_dir = tmp_path / "t"
    write_files(tensor_dir, layers=(0, 1, 3))
    _, summary, _ = cli(tmp_path, tensor_dir)
    assert any("missing layers [2]" in w for w in summary["warnings"])


# ---- bad input ---------------------------------------------------------------------------------


def test_errors_name_the_problem(tmp_path, capsys):
    # user errors end with one stderr line naming the problem: exit 1 (data) or 2 (usage)
    def fails(argv, code, pattern):
        assert main(argv) == code
        err = capsys.readouterr().err
        assert re.search(pattern, err), err
        assert len(stderr_lines(err)) == 1 and "Traceback" not in err

    empty = tmp_path / "empty"
    empty.mkdir()
    fails(_args(empty, tmp_path / "o"), 1, r"no tensor files .* in .*empty")
    fails(_args(tmp_path / "nowhere", tmp_path / "o"), 1, r"nowhere: tensor folder not found")

    bad = tmp_path / "bad"
    (good,) = write_files(bad, layers=(0,))
    corrupt = bad / tensor_filename(96, 1, 0, TS)
    corrupt.write_bytes(b"not a tensor file")
    fails(
        _args(bad, tmp_path / "o", "--device", "cpu"), 1, re.escape(corrupt.name) + ".*cannot read"
    )

    meta_dir = tmp_path / "meta"
    q, k, v = make_qkv(1, 2, 2, 32, 8)
    ids = torch.zeros(1, 32, dtype=torch.long)
    path = meta_dir / tensor_filename(32, 0, 0, TS)
    path.parent.mkdir()
    torch.save({"Q": q, "K": k, "V": v, "input_ids": ids, "metadata": {"seq_len": 32}}, path)
    fails(
        _args(meta_dir, tmp_path / "o", "--device", "cpu"),
        1,
        re.escape(path.name) + ".*metadata is missing",
    )

    gate_dir = tmp_path / "gate"
    write_files(gate_dir, layers=(0,), gate=True)
    fails(
        _args(gate_dir, tmp_path / "o", "--device", "cpu", "--block_size", "32"),
        1,
        "seerattn_scores has 6x6 blocks but --block_size 32",
    )
    fails(
        _args(
            good.parent,
            tmp_path / "o",
            "--seerattn_threshold",
            "0.1",
            "--seerattn_nz_ratio",
            "0.5",
        ),
        2,
        "at most one of --seerattn_threshold",
    )


def test_validation_dir_absent_or_empty_or_corrupt(tmp_path, capsys):
    info = compare.load_validation(str(tmp_path / "nowhere"))
    assert info["config"] is None and "not found" in info["notes"][0]
    (tmp_path / "v").mkdir()
    info = compare.load_validation(str(tmp_path / "v"))
    assert info["config"] is None and "no validation_summary" in info["notes"][0]
    (tmp_path / "v" / "validation_summary_20240101_000000.json").write_text("{broken")
    info = compare.load_validation(str(tmp_path / "v"))
    assert info["config"] is None and "unreadable" in info["notes"][0]


def test_resolve_config_precedence():
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    base = SketchWalkConfig(density=0.3, sketch_dim=32).to_dict()
    args = parser.parse_args(["--tensor_dir", "x", "--top_k_blocks", "16"])
    cfg = compare.resolve_config(args, base)
    assert cfg.top_k_blocks == 16 and cfg.density is None and cfg.sketch_dim == 32
    assert cfg.budget == "top_k_blocks"
    cfg = compare.resolve_config(parser.parse_args(["--tensor_dir", "x"]), base)
    assert cfg.to_dict() == base
    cfg = compare.resolve_config(parser.parse_args(["--tensor_dir", "x"]), None)
    assert cfg == SketchWalkConfig.preset("seed")


def test_root_script_help():
    proc = subprocess.run(
        [sys.executable, str(REPO / "compare_sparsity_patterns.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    for flag in (
        "--tensor_dir",
        "--validation_dir",
        "--output_dir",
        "--block_size",
        "--sketch_dim",
        "--top_k_blocks",
        "--seerattn_threshold",
        "--device",
        "--visualize",
        "oracle-threshold",
    ):
        assert flag in proc.stdout
