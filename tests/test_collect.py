"""`sketchwalk collect`: statistics, files, resume, refusals, gate hook, real SmolLM2 run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from test_models import tiny_model_dir

from sketchwalk.cli import main as cli_main
from sketchwalk.metrics import true_block_attention
from sketchwalk.pipeline.collect import CollectError, TensorCollector, attention_statistics
from sketchwalk.pipeline.tensorio import group_tensor_files, load_tensor_file, parse_tensor_filename

REPO = Path(__file__).resolve().parents[1]


def brute_force_stats(q, k, block_size):
    """O(T^2) reference of attention_statistics, written the plain way."""
    b, hq, t, d = q.shape
    g = hq // k.shape[1]
    kk = k.repeat_interleave(g, dim=1).double()
    logits = q.double() @ kk.transpose(-1, -2) / math.sqrt(d)
    logits = logits.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
    p = logits.softmax(-1)
    nb = -(-t // block_size)
    mass = torch.zeros(b, hq, nb, nb, dtype=torch.float64)
    for i in range(nb):
        rows = p[:, :, i * block_size : (i + 1) * block_size]
        for j in range(nb):
            mass[:, :, i, j] = rows[..., j * block_size : (j + 1) * block_size].sum(-1).mean(-1)
    ent = -(p * p.clamp_min(1e-300).log()).sum(-1)
    out = {"sink_mass": mass[:, :, 1:, 0].mean().item(), "entropy": ent.mean().item()}
    norm = ent[..., 1:] / torch.arange(2, t + 1).double().log()
    out["normalized_entropy"] = norm.mean().item()
    for pct, name in ((0.9, "90"), (0.95, "95")):
        counts = []
        for bi in range(b):
            for h in range(hq):
                for i in range(nb):
                    row = sorted(mass[bi, h, i, : i + 1].tolist(), reverse=True)
                    total, n = 0.0, 0
                    while total < pct - 1e-6 and n < len(row):
                        total += row[n]
                        n += 1
                    counts.append(n)
        out[f"blocks_for_{name}"] = sum(counts) / len(counts)
    return out, mass


@pytest.mark.parametrize("t,block,hq,hkv", [(100, 16, 4, 2), (40, 64, 2, 2), (129, 32, 8, 1)])
def test_attention_statistics_exact(t, block, hq, hkv):
    gen = torch.Generator().manual_seed(t)
    q = torch.randn(2, hq, t, 8, generator=gen) * 2
    k = torch.randn(2, hkv, t, 8, generator=gen) * 2
    got = attention_statistics(q, k, block, max_elements=4096)  # forces many chunks
    want, mass = brute_force_stats(q, k, block)
    for key, value in want.items():
        if key == "sink_mass" and mass.shape[-1] == 1:
            continue
        print(f"{key}: got {got[key]:.6f} want {value:.6f}")
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    ref = true_block_attention(q, k, block, reduce="sum")
    torch.testing.assert_close(ref.double(), mass, rtol=1e-4, atol=1e-5)


def _collect_args(model_dir, out, *extra):
    return [
        "collect",
        "--model_path",
        str(model_dir),
        "--output_dir",
        str(out),
        "--sequence_lengths",
        "80",
        "--num_samples",
        "2",
        "--device",
        "cpu",
        "--text_source",
        "stdlib",
        "--no_progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def test_cli_collect_files_summary_and_resume(tiny_dir, tmp_path, capsys):
    out = tmp_path / "tensor_data"
    assert cli_main(_collect_args(tiny_dir, out, "--save_pre_rope", "--layers", "0", "2")) == 0
    groups = group_tensor_files(out)
    assert len(groups) == 2  # 2 samples, one timestamp
    (seq, sample, ts), files = next(iter(groups.items()))
    assert sample == 0
    assert seq == 80 and [parse_tensor_filename(f)["layer_idx"] for f in files] == [0, 2]
    rec = load_tensor_file(files[0])
    assert rec["Q"].shape == (1, 4, 80, 16) and rec["K"].shape == (1, 2, 80, 16)
    assert rec["Q"].dtype == torch.bfloat16 and rec["Q_pre"].shape == (1, 4, 80, 16)
    meta = rec["metadata"]
    for key in (
        "model_id",
        "dtype",
        "rope_parameters",
        "text_source",
        "text_offset",
        "input_ids_sha256",
        "sketchwalk_version",
        "hidden_size",
        "model_path",
    ):
        assert key in meta, key
    assert meta["text_source"] == "stdlib" and meta["dtype"] == "bfloat16"
    raw = torch.load(files[0], weights_only=True)  # the seed's way of reading a file
    assert torch.equal(raw["input_ids"], rec["input_ids"])
    summary_path = out / f"summary_seq80_{ts}.json"
    summary = json.loads(summary_path.read_text())
    assert [layer["layer_idx"] for layer in summary["layers"]] == [0, 2]
    assert len(summary["samples"]) == 2
    assert summary["samples"][0]["input_ids_sha256"] != summary["samples"][1]["input_ids_sha256"]
    first = summary["layers"][0]
    assert 0 < first["sink_mass"] <= 1 and 1 <= first["blocks_for_90"] <= first["blocks_for_95"]
    assert "layer   0" in capsys.readouterr().out

    # --resume: nothing new is written, statistics come from the files on disk
    before = sorted(p.name for p in out.iterdir() if p.name.startswith("tensors_"))
    # a different timestamp is needed for the new summary name: wait for the clock
    import time

    time.sleep(1.1)
    args = _collect_args(tiny_dir, out, "--resume", "--layers", "0", "2", "--save_pre_rope")
    assert cli_main(args) == 0
    after = sorted(p.name for p in out.iterdir() if p.name.startswith("tensors_"))
    assert after == before
    summaries = sorted(out.glob("summary_seq80_*.json"))
    assert len(summaries) == 2
    resumed = json.loads(summaries[-1].read_text())
    assert len(resumed["samples"]) == 2
    assert all(s["resumed"] for s in resumed["samples"])
    assert resumed["layers"][0]["sink_mass"] == pytest.approx(first["sink_mass"])


def test_resume_refuses_other_passages(tiny_dir, tmp_path, capsys):
    out = tmp_path / "td"
    assert cli_main(_collect_args(tiny_dir, out, "--layers", "1")) == 0
    args = _collect_args(tiny_dir, out, "--layers", "1", "--resume", "--seed", "7")
    assert cli_main(args) == 1
    assert "different passage" in capsys.readouterr().err


def test_safetensors_format_and_all_layers(tiny_dir, tmp_path):
    out = tmp_path / "st"
    args = _collect_args(tiny_dir, out, "--format", "safetensors", "--dtype", "float32")
    args[args.index("--num_samples") + 1] = "1"
    assert cli_main(args) == 0
    files = sorted(out.glob("*.safetensors"))
    assert len(files) == 3
    rec = load_tensor_file(files[0])
    assert rec["Q"].dtype == torch.float32 and "Q_pre" not in rec


def test_lengths_beyond_positions_refused(tiny_dir, tmp_path, capsys):
    args = _collect_args(tiny_dir, tmp_path / "long", "--layers", "0")
    args[args.index("--sequence_lengths") + 1] = "300"  # max_position_embeddings is 256
    args[args.index("--num_samples") + 1] = "1"
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert "exceeds the model's 256 positions" in err and "--allow_long" in err
    assert not (tmp_path / "long").exists() or not list((tmp_path / "long").iterdir())
    assert cli_main([*args, "--allow_long"]) == 0


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert cli_main(_collect_args(tmp_path / "nowhere", tmp_path / "o")) == 1
    assert "Tried" in capsys.readouterr().err


def test_out_of_memory_becomes_clear_error(tiny_dir, tmp_path, monkeypatch):
    collector = TensorCollector(tiny_dir, tmp_path / "o", device="cpu", progress=False)
    collector.load_model()

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4 GiB")

    monkeypatch.setattr(collector.model.model, "forward", oom)
    with pytest.raises(CollectError, match="Lower --sequence_lengths"):
        collector.forward(torch.zeros(1, 16, dtype=torch.long))


def test_python_api_and_no_overwrite(tiny_dir, tmp_path):
    collector = TensorCollector(model_path=tiny_dir, output_dir=tmp_path / "api", device="cpu")
    model, tokenizer = collector.load_model()
    assert collector.model is model and collector.tokenizer is tokenizer
    ids = torch.tensor([tokenizer("def f(x):\n    return x * 2\n")["input_ids"]])
    with torch.no_grad():
        model(ids)  # the seed's custom forward: runs under the collector's capture
    assert sorted(collector.capture.layers) == [0, 1, 2]
    paths = collector.save_captured(ids, sample_idx=0, timestamp="20240101_000000")
    assert len(paths) == 3 and load_tensor_file(paths[0])["input_ids"].shape == ids.shape
    with pytest.raises(FileExistsError):
        collector.save_captured(ids, sample_idx=0, timestamp="20240101_000000")
    collector.close()
    assert model.config._attn_implementation == "sdpa"


def test_seed_script_delegates(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    sys.modules.pop("collect_seerattn_tensors", None)
    import collect_seerattn_tensors as script

    assert script.TensorCollector is TensorCollector
    argv = _collect_args(tiny_dir, tmp_path / "seed", "--layers", "1")[1:]
    assert script.main(argv) == 0
    assert len(list((tmp_path / "seed").glob("tensors_seq80_layer1_sample*_*.pt"))) == 2


def test_seerattn_checkpoint_stores_gate_scores(tiny_dir, tmp_path):
    from sketchwalk.gate import checkpoint as gate_mod

    cfg = gate_mod.GateConfig(
        base_model=str(tiny_dir),
        num_layers=3,
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=16,
        block_size=16,
        hidden_size=16,
    )
    folder = gate_mod.GateSet(cfg).save(tmp_path / "gate")
    out = tmp_path / "g"
    assert cli_main(_collect_args(folder, out, "--layers", "2")) == 0
    rec = load_tensor_file(next(out.glob("tensors_*.pt")))
    scores, mask = rec["seerattn_scores"], rec["seerattn_mask"]
    assert scores.shape == (1, 4, 5, 5) and mask.dtype == torch.bool  # ceil(80 / 16) = 5
    assert "Q_pre" in rec and rec["metadata"]["gate_dir"] == str(folder)
    torch.testing.assert_close(scores.sum(-1), torch.ones(1, 4, 5))


@pytest.mark.slow
def test_real_smollm2_alias(tmp_path):
    """Real SmolLM2-135M weights through the default alias (converts once into the cache)."""
    collector = TensorCollector(
        output_dir=tmp_path / "smol",
        device="cpu",
        layers=[0, 29],
        dtype="float32",
        text_source="stdlib",
        progress=False,
    )
    collector.load_model()
    assert collector.resolved.kind == "alias"
    assert collector.model.config.num_hidden_layers == 30
    summaries = collector.collect([256], num_samples=1)
    files = sorted((tmp_path / "smol").glob("tensors_seq256_*.pt"))
    assert len(files) == 2 and len(summaries) == 1
    rec = load_tensor_file(files[0])
    assert rec["Q"].shape == (1, 9, 256, 64) and rec["K"].shape == (1, 3, 256, 64)
    meta = rec["metadata"]
    assert meta["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["rope_parameters"]["rope_theta"] == 100000.0
    # the layer-0 queries are the model's own post-RoPE projections of the embedded text
    model = collector.model
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(rec["input_ids"]))
        q = model.model.layers[0].self_attn.q_proj(h).view(1, 256, 9, 64).transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, torch.arange(256)[None])
        q = q * cos[:, None] + torch.cat((-q[..., 32:], q[..., :32]), -1) * sin[:, None]
    err = (rec["Q"] - q).abs().max().item()
    print(f"SmolLM2 layer 0 Q max abs err {err:.3e}")
    assert err < 1e-4
    summary = json.loads(summaries[0].read_text())
    assert summary["layers"][1]["sink_mass"] > 0.05  # real models park mass on the first block
