"""benchmarks/generate.py on the CPU: the tiny shape, every mode, the records it writes, resume,
and the out-of-memory / memory-estimate skips (run in-process, a few seconds)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "generate.py"
SMOKE = "--shape tiny --device cpu --contexts 256 --batches 1 2 --decode_tokens 4 --repeats 1"


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("sketchwalk_benchmark_generate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _argv(flags: str, out: Path) -> list[str]:
    return [*flags.split(), "--output", str(out)]


def _records(path: Path) -> dict[tuple, dict]:
    data = json.loads(path.read_text())
    return {(r["context"], r["batch"], r["mode"], r["density"]): r for r in data["records"]}


def test_smoke_command_records_every_configuration(gen, tmp_path):
    out = tmp_path / "gen.json"
    assert gen.main(_argv(SMOKE, out)) == 0
    recs = _records(out)
    want = {(256, b, m, d) for b in (1, 2) for m, d in (("dense", None), ("prefill", 0.2),
                                                        ("decode", 0.2))}  # fmt: skip
    assert set(recs) == want
    for key, r in recs.items():
        assert r["status"] == "ok", (key, r.get("reason"))
        assert r["ttft_ms"] > 0 and r["decode_tokens_per_s"] > 0
        assert len(r["tokens"]) == key[1] and all(len(row) == 5 for row in r["tokens"])
        assert r["warnings"] == []
        if r["mode"] == "dense":
            assert r["calls"] is None and "vs_dense" not in r
            continue
        assert r["vs_dense"]["ttft_speedup"] > 0 and r["vs_dense"]["same_session"]
        calls = r["calls"]
        assert calls["prefill"]["sparse"] > 0  # layers 2, 3 of the 4 (2 dense layers)
        if r["mode"] == "decode":
            # 4 steps x 2 sparse layers; the 2 dense layers of the preset stay dense
            assert calls["decode"]["sparse"] == 8
            assert calls["decode"]["dense_reasons"] == {"dense layer (config.dense_layers)": 8}
        else:
            assert calls["decode"]["sparse"] == 0
            assert set(calls["decode"]["dense_reasons"]) == {"decode step (one new token): dense"}
    md = out.with_suffix(".md").read_text()
    assert md.count("| tiny | 4 | 256 |") == 6


def test_density_one_decode_matches_dense_and_resume(gen, tmp_path):
    out = tmp_path / "gen.json"
    flags = (
        "--shape tiny --device cpu --contexts 256 --batches 2 --decode_tokens 4 --repeats 1 "
        "--densities 1.0 --dtype float32 --modes dense decode --breakdown"
    )
    argv = _argv(flags, out)
    assert gen.main(argv) == 0
    r = _records(out)[(256, 2, "decode", 1.0)]
    # density 1: the prefill keeps every block (dense by design, no warning), the decode steps
    # run the sparse path over every block and reproduce the dense greedy tokens
    assert r["warnings"] == [] and r["calls"]["prefill"]["sparse"] == 0
    assert r["calls"]["decode"]["sparse"] == 8 and r["calls"]["decode"]["mean_sparse_density"] == 1
    assert r["vs_dense"]["tokens_equal_dense"]
    shares = r["breakdown"]["shares"]
    assert shares["selection"] > 0 and shares["decode_state"] > 0
    assert abs(sum(shares.values()) - 1.0) < 1e-6
    before = json.loads(out.read_text())["records"]
    assert gen.main([*argv, "--resume"]) == 0
    data = json.loads(out.read_text())
    assert data["records"] == before and len(data["sessions"]) == 2


def test_out_of_memory_and_estimate_skips(gen, tmp_path, monkeypatch):
    out = tmp_path / "gen.json"
    info = gen.model_info(gen.build_model("tiny", None, 600, torch.float32, torch.device("cpu")))
    big = gen.memory_estimate(info, 2, 512, 0, torch.float32)["total"]
    monkeypatch.setattr(gen, "device_memory", lambda device: big - 1)
    real = gen.measure

    def measure(model, args, device, context, batch, mode, density):
        if mode == "dense":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        if mode == "decode":
            raise ValueError("boom")
        return real(model, args, device, context, batch, mode, density)

    monkeypatch.setattr(gen, "measure", measure)
    flags = (
        "--shape tiny --device cpu --contexts 256 512 --batches 1 2 --decode_tokens 0 "
        "--repeats 1 --dtype float32"
    )
    argv = _argv(flags, out)
    assert gen.main(argv) == 0
    recs = _records(out)
    assert len(recs) == 12
    assert recs[(256, 1, "dense", None)]["status"] == "oom"
    assert recs[(512, 1, "dense", None)]["reason"] == "out of memory at the smaller context 256"
    assert recs[(512, 2, "prefill", 0.2)]["status"] == "skipped"
    assert recs[(512, 2, "prefill", 0.2)]["reason"].startswith("memory estimate")
    assert recs[(256, 1, "decode", 0.2)]["status"] == "error"
    assert "boom" in recs[(256, 1, "decode", 0.2)]["reason"]
    ok = recs[(256, 1, "prefill", 0.2)]
    assert ok["status"] == "ok" and ok["decode_tokens_per_s"] is None and ok["vs_dense"] is None
    # resume: the measured and out-of-memory ones stay, errors are retried
    monkeypatch.setattr(gen, "measure", real)
    assert gen.main([*argv, "--resume"]) == 0
    again = _records(out)
    assert again[(256, 1, "decode", 0.2)]["status"] == "ok"
    assert again[(256, 1, "dense", None)]["status"] == "oom"
    assert again[(256, 1, "prefill", 0.2)]["session"] == 0
    assert gen.classify_error(RuntimeError("CUDA error: an illegal memory access")) == "fatal"
    assert gen.classify_error(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED out of memory")) == "oom"
