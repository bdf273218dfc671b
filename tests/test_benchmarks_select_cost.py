"""benchmarks/select_cost_table.py: the selection-cost table from attention benchmark JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "select_cost_table.py"


def _module():
    spec = importlib.util.spec_from_file_location("sketchwalk_select_cost_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rec(method, t, ms, **extra):
    return {"kind": "prefill", "shape": "llama", "seq_len": t, "method": method, "ms": ms, **extra}


def test_table_shares_growth_and_end_to_end(tmp_path, capsys):
    records = []
    for t, cudnn, sel32, sel16 in ((1024, 100.0, 8.0, 4.0), (2048, 400.0, 30.0, 10.0)):
        records.append(_rec("sdpa_cudnn", t, cudnn))
        for dtype, ms in (("float32", sel32), ("bfloat16", sel16)):
            records.append(_rec("sketchwalk_select", t, ms, density=0.1, query_rows=2,
                                walk_dtype=dtype))  # fmt: skip
        records.append(_rec("end_to_end", t, sel16 + 20.0, density=0.1))
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"environment": {"gpu": "G"}, "records": records}))
    assert _module().main([str(path)]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| llama")]
    assert (
        rows[0] == "| llama | 1024 | 0.1 | 100.00 | 8.00 (8.0%) | 4.00 (4.0%) |  | 24.00 (4.17x) |"
    )
    # growth follows the last column (the bfloat16 walk): 10 / 4
    assert (
        rows[1]
        == "| llama | 2048 | 0.1 | 400.00 | 30.00 (7.5%) | 10.00 (2.5%) | 2.50x | 30.00 (13.33x) |"
    )
    assert "query_rows 2, float32 ms" in out and "query_rows 2, bfloat16 ms" in out


def test_bad_file_names_the_file(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match=r"x\.json: not a benchmarks/attention\.py result"):
        _module().main([str(bad)])
