"""benchmarks/select_scaling.py at a tiny length: it runs every configuration (dense and causal
walk, per KV group and per layer) and writes its table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "select_scaling.py"


def test_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("sketchwalk_select_scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--seq-lens", "1024", "--repeats", "1", "--out-dir", str(tmp_path)]) == 0
    md = (tmp_path / "select_scaling.md").read_text()
    assert "| 1024 | dense (before) |" in md and "| 1024 | causal tiles |" in md
    assert json.loads((tmp_path / "select_scaling.json").read_text())
