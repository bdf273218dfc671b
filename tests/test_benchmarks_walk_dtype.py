"""benchmarks/walk_dtype_agreement.py on the embedded SmolLM2: it runs end to end and writes
the agreement of the bfloat16 walk's selection with the float32 walk's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "walk_dtype_agreement.py"


def test_agreement_on_the_embedded_model(tmp_path):
    spec = importlib.util.spec_from_file_location("sketchwalk_walk_dtype_agreement", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "agree.json"
    assert module.main(["--seq_len", "1024", "--densities", "0.2", "--text_source", "stdlib",
                        "--out", str(out)]) == 0  # fmt: skip
    data = json.loads(out.read_text())
    res = data["results"]["0.2"]
    assert data["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert len(res["kept_per_layer"]) == 30 - 2  # SmolLM2's layers after the two dense ones
    assert 0.9 <= res["kept_worst_layer"] <= res["kept_mean"] <= 1.0
