"""`sketchwalk compare --selectors`: the other selectors at SketchWalk's config on the tensors of
`test_compare`, their fields against direct computation, the oracle as the recall ceiling, the
flag's errors, ``--resume`` across selector sets, and the default record unchanged."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_compare import BLOCK, cli, write_files

from sketchwalk.blocks import BlockSelection
from sketchwalk.cli import main
from sketchwalk.config import SketchWalkConfig
from sketchwalk.metrics import attention_recall, true_block_attention
from sketchwalk.pipeline import compare
from sketchwalk.pipeline import seer as seer_side
from sketchwalk.pipeline.tensorio import load_tensor_file, save_tensor_file
from sketchwalk.selection.prefill import SketchWalk
from sketchwalk.selection.selectors import make_selector
from sketchwalk.testing import make_qkv, stderr_lines

SEQ_LEN = 200  # 13 blocks of 16: room for ranked blocks beside the forced ones
# SketchWalk's config for these files: few forced blocks, so the selectors' rankings matter
CONFIG_FLAGS = ("--density", "0.6", "--sink_blocks", "1", "--window_blocks", "1",
                "--dense_layers", "1")  # fmt: skip

# A record's keys without --selectors (the fields before --selectors existed, in their order).
DEFAULT_KEYS = [
    "sample_id", "file", "layer_idx", "seq_len", "sample", "num_heads", "num_kv_heads",
    "seerattn_method", "seerattn_rule", "seerattn_sparsity", "sketchwalk_sparsity",
    "seerattn_density", "sketchwalk_density", "seerattn_blocks_per_row",
    "sketchwalk_blocks_per_row", "total_blocks", "causal_blocks_per_head",
    "sketchwalk_dense_layer", "block_overlap", "jaccard_similarity", "intersection_blocks",
    "attention_correlation", "attention_rank_correlation", "sketchwalk_true_correlation",
    "seerattn_true_correlation", "seerattn_recall", "sketchwalk_recall",
    "sketchwalk_recall_matched", "sketchwalk_density_matched", "seerattn_recall_matched",
    "oracle_recall", "oracle_recall_seerattn_budget", "validation_attention_recall",
    "validation_config_matches", "seconds", "device", "model_path", "config", "file_sha256",
    "inputs_sha256", "run_settings", "rank",
]  # fmt: skip
DEFAULT_SETTINGS = ["device", "dtype", "seerattn_threshold", "seerattn_nz_ratio",
                    "seerattn_dense_last_rows"]  # fmt: skip


def _tensors(folder: Path, scaling: float | None = None, samples: int = 2) -> Path:
    """`test_compare`'s files at SEQ_LEN tokens; ``scaling`` stores a softmax scale in their
    metadata (``attention_scaling``, as `collect` records it)."""
    paths = write_files(folder, seq_len=SEQ_LEN, samples=samples)
    if scaling is not None:
        for path in paths:
            rec = load_tensor_file(path)
            meta = {**rec.pop("metadata"), "attention_scaling": scaling}
            save_tensor_file(path, rec, meta, overwrite=True)
    return folder


def _direct(folder: Path, config: SketchWalkConfig, names: list[str]) -> dict[str, dict]:
    """Each file's selector fields computed without `compare`: fresh selectors per sequence fed
    its layers in order, recall by `attention_recall`, agreement by `mask_agreement`."""
    out: dict[str, dict] = {}
    for sample in (0, 1):
        paths = sorted(folder.glob(f"*_sample{sample}_*.pt"))
        paths.sort(key=lambda p: int(re.search(r"_layer(\d+)_", p.name)[1]))
        walker = SketchWalk(config)
        first = load_tensor_file(paths[0])["metadata"].get("attention_scaling")
        others = {n: make_selector(n, config, **({} if n == "streaming" else {"scale": first}))
                  for n in names}  # fmt: skip
        for path in paths:
            rec = load_tensor_file(path)
            q, k, layer = rec["Q"], rec["K"], rec["metadata"]["layer_idx"]
            scale = rec["metadata"].get("attention_scaling")
            hq, hkv = q.shape[1], k.shape[1]
            sw_mask = walker.select(q, k, layer).head_mask(hq, hkv)
            ba = true_block_attention(q, k, BLOCK, reduce="sum", scale=scale)
            seer = seer_side.oracle_threshold_side(ba, 0.1, None, 2)
            fields = {}
            for name, selector in others.items():
                sel = selector.select(q, k, layer)
                mask = sel.head_mask(hq, hkv)
                w, s = (
                    compare.mask_agreement(mask, sw_mask),
                    compare.mask_agreement(mask, seer.mask),
                )
                fields[name] = {
                    "density": BlockSelection.from_mask(mask.contiguous(), BLOCK, SEQ_LEN).density,
                    "recall": attention_recall(q, k, sel, scale=scale),
                    "overlap_sketchwalk": w["block_overlap"],
                    "jaccard_sketchwalk": w["jaccard_similarity"],
                    "overlap_seerattn": s["block_overlap"],
                    "jaccard_seerattn": s["jaccard_similarity"],
                }
            out[path.stem] = fields
    return out


@pytest.mark.parametrize("scaling", [None, 0.2])
def test_selectors_fields_match_direct_computation(tmp_path, capsys, scaling):
    names = ["xattention", "streaming", "oracle"]
    tensor_dir = _tensors(tmp_path / "t", scaling)
    results, summary, _ = cli(tmp_path, tensor_dir, *CONFIG_FLAGS, "--selectors", *names)
    text = capsys.readouterr().out
    config = SketchWalkConfig.from_dict(results[0]["config"])
    direct = _direct(tensor_dir, config, names)
    assert len(results) == 8
    differs = 0
    for r in results:
        assert r["run_settings"]["selectors"] == names
        recalls = {"sketchwalk": r["sketchwalk_recall"]}
        for name in names:
            got = {m: r[f"selector_{name}_{m}"] for m in compare.SELECTOR_METRICS}
            want = direct[r["sample_id"]][name]
            print(r["layer_idx"], name, got["recall"], want["recall"])
            # the same budget: exactly SketchWalk's realized density
            assert got["density"] == r["sketchwalk_density"] == want["density"]
            assert got["recall"] == pytest.approx(want["recall"], abs=1e-6)
            for metric in compare.SELECTOR_METRICS[2:]:
                assert got[metric] == pytest.approx(want[metric], abs=1e-12), metric
            recalls[name] = got["recall"]
            differs += got["overlap_sketchwalk"] < 1
        # the oracle ranks by the true attention: the best recall at this budget
        assert all(recalls["oracle"] >= v - 1e-9 for v in recalls.values()), recalls
        if r["sketchwalk_dense_layer"]:
            assert all(v == pytest.approx(1.0) for v in recalls.values())
    assert differs > 0  # the rankings do differ on these files (not only forced blocks)
    assert summary["selectors"] == names
    for name in names:
        field = f"selector_{name}_recall"
        means = [r[field] for r in results if not r["sketchwalk_dense_layer"]]
        assert summary["sparse_layers"]["overall"][field]["mean"] == pytest.approx(
            sum(means) / len(means)
        )
        assert field in summary["overall"] and field in summary["by_layer_idx"]["2"]
        assert re.search(rf"│ {name} +│", text), text
    assert "Selectors at W's budget" in text


def test_without_selectors_records_are_unchanged(tmp_path):
    results, summary, _ = cli(tmp_path, _tensors(tmp_path / "t", samples=1), *CONFIG_FLAGS)
    for r in results:
        assert list(r) == DEFAULT_KEYS
        assert list(r["run_settings"]) == DEFAULT_SETTINGS
    assert "selectors" not in summary
    assert not [f for f in summary["overall"] if f.startswith("selector_")]


def test_selectors_flag_errors(tmp_path, capsys):
    tensor_dir = write_files(tmp_path / "t", layers=(0, 1))[0].parent

    def fails(pattern, *extra):
        argv = ["compare", "--tensor_dir", str(tensor_dir), "--output_dir", str(tmp_path / "o"),
                "--device", "cpu", "--block_size", str(BLOCK), *extra]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        print(err)
        assert re.search(pattern, err), err
        assert len(stderr_lines(err)) == 1 and "Traceback" not in err

    fails(r"--selectors.*unknown selector 'bogus'; choose from oracle", "--selectors", "bogus")
    fails(r"--selectors.*'gate' is not compared here: .*SeerAttention side", "--selectors", "gate")
    fails(r"--selectors.*'quest' is not compared here: .*decode", "--selectors", "quest")
    fails(r"--selectors.*'sketchwalk' is not compared here", "--selectors", "sketchwalk")
    fails(r"--selectors: streaming given more than once", "--selectors", "streaming", "streaming")
    # a config the selector refuses stops before any file is compared
    fails(r"--selectors: .*stride 8 must divide the block size 4", "--block_size", "4",
          "--selectors", "xattention")  # fmt: skip
    assert not list((tmp_path / "o").glob("comparison_results_*.json"))


def test_resume_with_other_selectors_is_refused(tmp_path, capsys):
    tensor_dir = _tensors(tmp_path / "t", samples=1)
    first, _, out = cli(tmp_path, tensor_dir, *CONFIG_FLAGS, "--selectors", "streaming")
    for other in (["--selectors", "xattention"], ["--selectors", "oracle", "streaming"], []):
        argv = ["compare", "--tensor_dir", str(tensor_dir), "--output_dir", str(out), "--device",
                "cpu", "--block_size", str(BLOCK), "--density", "0.5", "--dense_last_rows", "1",
                *CONFIG_FLAGS, "--resume", *other]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert re.search(r"--resume: .*comparison_results_.*other settings \(.*selectors", err)
    # the same selectors: every record is reused as it was
    again, _, _ = cli(tmp_path, tensor_dir, *CONFIG_FLAGS, "--selectors", "streaming", "--resume")
    assert again == first
    # records made without --selectors are not continued with them either
    plain_out = tmp_path / "plain"
    argv = ["compare", "--tensor_dir", str(tensor_dir), "--output_dir", str(plain_out),
            "--device", "cpu", "--block_size", str(BLOCK), *CONFIG_FLAGS]  # fmt: skip
    assert main(argv) == 0
    assert main([*argv, "--resume", "--selectors", "streaming"]) == 2
    assert "selectors" in capsys.readouterr().err


def test_compare_layer_without_others_adds_nothing():
    cfg = SketchWalkConfig(block_size=BLOCK, sketch_dim=16, density=0.6, dense_layers=0,
                           sink_blocks=1, window_blocks=1, dense_last_rows=1)  # fmt: skip
    q, k, _ = make_qkv(1, 4, 2, SEQ_LEN, 16, seed=3)
    sel = SketchWalk(cfg).select(q, k, 0)
    ba = true_block_attention(q, k, BLOCK)
    seer = seer_side.oracle_threshold_side(ba, 0.1)
    plain = compare.compare_layer(sel, seer, ba, cfg, 2)
    oracle = make_selector("oracle", cfg).select(q, k, 0)
    more = compare.compare_layer(sel, seer, ba, cfg, 2, {"oracle": oracle})
    assert set(more) - set(plain) == set(compare.selector_fields(["oracle"]))
    assert {key: more[key] for key in plain} == plain
    assert more["selector_oracle_density"] == plain["sketchwalk_density"]
    assert more["selector_oracle_recall"] >= plain["sketchwalk_recall"] - 1e-9


def test_visualize_draws_a_panel_per_selector(tmp_path, monkeypatch):
    """--visualize with --selectors: each heatmap file gets one panel per other selector, with
    that selector's mask, density and recall from the file's record."""
    import sketchwalk.pipeline.compare as compare_module

    drawn = []
    real = compare_module.plot_file

    def recording(path, block_attention, seer, sw, record, others=None):
        drawn.append((record, others))
        real(path, block_attention, seer, sw, record, others)

    monkeypatch.setattr(compare_module, "plot_file", recording)
    names = ["xattention", "streaming"]
    tensor_dir = _tensors(tmp_path / "t", samples=1)
    _, _, out = cli(tmp_path, tensor_dir, *CONFIG_FLAGS, "--selectors", *names, "--visualize",
                    "--max_plots", "2")  # fmt: skip
    assert len(drawn) == 2
    for record, others in drawn:
        assert list(others) == names
        for name, mask in others.items():
            nb = -(-SEQ_LEN // BLOCK)
            assert mask.shape[-2:] == (nb, nb) and mask.dtype == torch.bool
            kept = mask[..., torch.ones(nb, nb, dtype=torch.bool).tril()].float().mean().item()
            assert kept == pytest.approx(record[f"selector_{name}_density"], abs=1e-6)
    pngs = sorted(out.rglob("*.png"))
    assert pngs, "no heatmap written"
