import json
import subprocess
import sys
from pathlib import Path

import pytest

from sketchwalk.cli import main
from sketchwalk.testing import stderr_lines, write_tensor_dir

SEED_FIELDS = {
    "sample_id",
    "layer_idx",
    "seq_len",
    "num_heads",
    "actual_sparsity",
    "target_sparsity",
    "block_sparsity",
    "cosine_similarity",
    "mse",
    "max_error",
    "num_blocks_selected",
    "total_blocks",
    "block_selection_ratio",
    "dense_time_ms",
    "sparse_time_ms",
    "speedup",
}


def _run(tmp_path, *extra):
    out = tmp_path / "out"
    rc = main(
        [
            "validate",
            "--tensor_dir",
            str(tmp_path / "t"),
            "--output_dir",
            str(out),
            "--device",
            "cpu",
            *extra,
        ]
    )
    assert rc == 0
    results = json.loads(next(out.glob("validation_results_*.json")).read_text())
    summary = json.loads(next(out.glob("validation_summary_*.json")).read_text())
    return out, results, summary


def test_validate_writes_seed_fields_and_summary(tmp_path):
    write_tensor_dir(tmp_path / "t", seq_len=700, num_layers=4, samples=2)
    _out, results, summary = _run(tmp_path, "--density", "0.3", "--dense_layers", "1")
    assert len(results) == 8
    for r in results:
        assert set(r) >= SEED_FIELDS, SEED_FIELDS - set(r)
        assert {"relative_l2_error", "attention_recall", "density", "config", "backend"} <= set(r)
        assert r["backend"] == "reference"
        assert r["config"]["density"] == 0.3 and r["config"]["top_k_blocks"] is None
        assert r["total_blocks"] == 11
        assert r["actual_sparsity"] == pytest.approx(1 - r["density"])
        assert r["block_selection_ratio"] == pytest.approx(r["num_blocks_selected"] / 11)
        if r["layer_idx"] == 0:
            assert r["density"] == 1.0 and r["cosine_similarity"] == pytest.approx(1.0)
            assert r["attention_recall"] == pytest.approx(1.0)
        else:
            assert r["density"] < 1.0 and 0 < r["attention_recall"] < 1
            assert r["cosine_similarity"] < 1.0
    assert summary["overall"]["count"] == 8
    assert set(summary["by_layer_idx"]) == {"0", "1", "2", "3"}
    assert set(summary["by_seq_len"]) == {"700"}
    assert "reference-vs-reference" in summary["timing"]
    assert summary["warnings"] == []


def test_validate_feeds_layers_in_order_across_the_walk(tmp_path):
    """With a walk of damping 1 the previous layer dominates: results must differ from a run
    with the walk switched off, proving the layers were fed as one sequence."""
    write_tensor_dir(tmp_path / "t", seq_len=640, num_layers=3)
    common = [
        "--density",
        "0.3",
        "--dense_layers",
        "0",
        "--damping",
        "0.9",
        "--no_timing",
        "--block_size",
        "16",
        "--dense_last_rows",
        "0",
        "--sink",
        "0.01",
        "--window",
        "0.01",
    ]
    _, walk, _ = _run(tmp_path, *common)
    (tmp_path / "out").rename(tmp_path / "out_walk")
    _, nowalk, _ = _run(tmp_path, *common, "--no-walk")
    assert walk[0]["attention_recall"] == pytest.approx(nowalk[0]["attention_recall"])
    assert any(
        abs(a["attention_recall"] - b["attention_recall"]) > 1e-9
        for a, b in zip(walk[1:], nowalk[1:], strict=True)
    )


def test_missing_layers_are_reported(tmp_path, capsys):
    write_tensor_dir(tmp_path / "t", seq_len=200, layers=[0, 1, 3])
    _, results, summary = _run(tmp_path, "--no_timing")
    assert [r["layer_idx"] for r in results] == [0, 1, 3]
    assert "missing layers [2]" in summary["warnings"][0]
    printed = capsys.readouterr()
    assert "missing layers [2]" in printed.out + printed.err


def test_save_masks(tmp_path):
    from safetensors.torch import load_file

    write_tensor_dir(tmp_path / "t", seq_len=300, num_layers=3)
    out, results, _ = _run(tmp_path, "--save_masks", "--no_timing", "--dense_layers", "0")
    masks = load_file(str(next(out.glob("validation_masks_*.safetensors"))))
    assert set(masks) == {r["sample_id"] for r in results}
    m = masks[results[1]["sample_id"]]
    assert m.shape == (1, 1, 5, 5) and m.dtype.is_floating_point is False


def _run_rc(tmp_path, capsys):
    argv = ["validate", "--tensor_dir", str(tmp_path / "t"), "--output_dir", str(tmp_path / "o")]
    rc = main([*argv, "--device", "cpu"])
    err = capsys.readouterr().err
    return rc, err


def test_errors_name_the_problem(tmp_path, capsys):
    # user errors end with one stderr line and exit code 1 (data), no traceback
    (tmp_path / "t").mkdir()
    rc, err = _run_rc(tmp_path, capsys)
    assert rc == 1 and "no tensor files" in err and len(stderr_lines(err)) == 1
    bad = tmp_path / "t" / "tensors_seq64_layer0_sample0_20260101_000000.pt"
    bad.write_bytes(b"not a zip")
    rc, err = _run_rc(tmp_path, capsys)
    assert rc == 1 and bad.name in err and "Traceback" not in err
    assert len(stderr_lines(err)) == 1


def test_seed_script_runs_verbatim(tmp_path):
    write_tensor_dir(tmp_path / "tensor_data", seq_len=256, num_layers=3)
    root = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        str(root / "validate_sketchwalk_tensors.py"),
        "--tensor_dir",
        "./tensor_data",
        "--output_dir",
        "./validation_results",
        "--block_size",
        "64",
        "--sketch_dim",
        "64",
        "--top_k_blocks",
        "16",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((tmp_path / "validation_results").glob("validation_summary_*.json"))


def test_validate_with_the_mass_budget(tmp_path):
    """The cumulative-mass budget has no target density before the scores are seen: validate
    records None there and still measures the realized density."""
    tensors = tmp_path / "t"
    write_tensor_dir(tensors, seq_len=256, num_layers=3, seed=3)
    out = tmp_path / "v"
    rc = main(
        ["validate", "--tensor_dir", str(tensors), "--output_dir", str(out), "--device", "cpu",
         "--no_timing", "--preset", "default", "--mass", "0.9", "--dense_layers", "1"]
    )  # fmt: skip
    assert rc == 0
    (results,) = out.glob("validation_results_*.json")
    records = json.loads(results.read_text())
    records = records["results"] if isinstance(records, dict) else records
    sparse = [r for r in records if r["layer_idx"] >= 1]
    assert len(sparse) == 2
    for r in sparse:
        assert r["target_sparsity"] is None and 0.0 < r["density"] <= 1.0
