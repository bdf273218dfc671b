"""Tensor files: round trips, atomic non-overwriting writes, every validation error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sketchwalk.pipeline.tensorio import (
    REQUIRED_METADATA,
    TensorFileError,
    group_tensor_files,
    load_tensor_file,
    parse_tensor_filename,
    save_tensor_file,
    tensor_filename,
)

TS = "20240219_120000"


def make_record(b=1, hq=4, hkv=2, t=33, d=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "Q": torch.randn(b, hq, t, d, generator=gen).to(dtype),
        "K": torch.randn(b, hkv, t, d, generator=gen).to(dtype),
        "V": torch.randn(b, hkv, t, d, generator=gen).to(dtype),
        "input_ids": torch.randint(0, 100, (b, t), generator=gen),
    }
    meta = {
        "layer_idx": 3,
        "seq_len": t,
        "num_heads": hq,
        "num_kv_heads": hkv,
        "head_dim": d,
        "hidden_size": hq * d,
        "batch_size": b,
        "timestamp": TS,
        "model_path": "tiny",
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "sliding_window": None,
    }
    return tensors, meta


def path_for(tmp_path: Path, fmt: str = "pt", t: int = 33, layer: int = 3) -> Path:
    return tmp_path / tensor_filename(t, layer, 0, TS, fmt)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip(tmp_path, fmt, dtype):
    tensors, meta = make_record(dtype=dtype)
    tensors["Q_pre"] = torch.randn(1, 4, 33, 8).to(dtype)
    tensors["K_pre"] = torch.randn(1, 2, 33, 8).to(dtype)
    tensors["seerattn_scores"] = torch.rand(1, 4, 3, 3)
    tensors["seerattn_mask"] = torch.rand(1, 4, 3, 3) > 0.5
    path = save_tensor_file(path_for(tmp_path, fmt), tensors, meta)
    loaded = load_tensor_file(path)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype
        assert torch.equal(loaded[key], value), key
    assert loaded["metadata"] == meta
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left
    if fmt == "pt":  # plain dict, readable without sketchwalk
        raw = torch.load(path, weights_only=True)
        assert set(raw) >= {"Q", "K", "V", "input_ids", "metadata"}


def test_filename_parse_and_group(tmp_path):
    name = tensor_filename(4096, 12, 3, TS)
    assert name == f"tensors_seq4096_layer12_sample3_{TS}.pt"
    assert parse_tensor_filename(name) == {
        "seq_len": 4096,
        "layer_idx": 12,
        "sample": 3,
        "timestamp": TS,
        "format": "pt",
    }
    with pytest.raises(ValueError, match="not a tensor file name"):
        parse_tensor_filename("summary_seq4096_20240219_120000.json")
    for layer in (10, 2, 0):
        tensors, meta = make_record()
        meta["layer_idx"] = layer
        save_tensor_file(path_for(tmp_path, layer=layer), tensors, meta)
    (tmp_path / "notes.txt").write_text("ignored")
    groups = group_tensor_files(tmp_path)
    assert list(groups) == [(33, 0, TS)]
    assert [parse_tensor_filename(p)["layer_idx"] for p in groups[(33, 0, TS)]] == [0, 2, 10]


def test_never_overwrites(tmp_path):
    tensors, meta = make_record()
    path = save_tensor_file(path_for(tmp_path), tensors, meta)
    before = path.read_bytes()
    tensors2, _ = make_record(seed=1)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_tensor_file(path, tensors2, meta)
    assert path.read_bytes() == before
    save_tensor_file(path, tensors2, meta, overwrite=True)
    assert torch.equal(load_tensor_file(path)["Q"], tensors2["Q"])
    assert len(list(tmp_path.iterdir())) == 1


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    tensors, meta = make_record()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_tensor_file(path_for(tmp_path), tensors, meta)
    assert list(tmp_path.iterdir()) == []


def test_invalid_content_is_not_written(tmp_path):
    tensors, meta = make_record()
    tensors["Q"][0, 0, 0, 0] = float("nan")
    with pytest.raises(TensorFileError, match="NaN"):
        save_tensor_file(path_for(tmp_path), tensors, meta)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match="metadata value"):
        save_tensor_file(path_for(tmp_path), make_record()[0], {**meta, "bad": object()})


def _write_raw(path: Path, record) -> Path:
    torch.save(record, path)
    return path


def _bad_cases():
    def drop(key):
        def f(t, m):
            del t[key]

        return f

    def drop_meta(key):
        def f(t, m):
            del m[key]

        return f

    def setter(key, value):
        def f(t, m):
            t[key] = value

        return f

    def meta_set(key, value):
        def f(t, m):
            m[key] = value

        return f

    return [
        ("missing-Q", drop("Q"), "missing keys"),
        ("missing-input_ids", drop("input_ids"), "missing keys"),
        ("missing-meta-key", drop_meta("model_path"), "metadata is missing"),
        ("rank", setter("Q", torch.zeros(4, 33, 8)), "must be \\(batch, heads, seq, head_dim\\)"),
        ("kv-shapes", setter("V", torch.zeros(1, 2, 33, 4)), "shapes differ"),
        ("seq-mismatch", setter("Q", torch.zeros(1, 4, 30, 8)), "disagree"),
        ("gqa", setter("Q", torch.zeros(1, 3, 33, 8)), "not a multiple"),
        ("ids-shape", setter("input_ids", torch.zeros(1, 32, dtype=torch.long)), "input_ids"),
        ("ids-float", setter("input_ids", torch.zeros(1, 33)), "integer"),
        ("nan", setter("K", torch.full((1, 2, 33, 8), float("nan"))), "NaN"),
        ("inf", setter("V", torch.full((1, 2, 33, 8), float("inf"))), "Inf"),
        ("meta-seq", meta_set("seq_len", 99), "metadata seq_len=99"),
        ("meta-heads", meta_set("num_heads", 8), "num_heads"),
        ("q-pre", setter("Q_pre", torch.zeros(1, 4, 32, 8)), "Q_pre"),
        ("not-tensor", setter("K_pre", [1, 2]), "must be a tensor"),
    ]


@pytest.mark.parametrize("name,mutate,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_validation_errors(tmp_path, name, mutate, match):
    tensors, meta = make_record()
    mutate(tensors, meta)
    path = _write_raw(path_for(tmp_path), {**tensors, "metadata": meta})
    with pytest.raises(TensorFileError, match=match) as err:
        load_tensor_file(path)
    assert str(path) in str(err.value)  # names the file
    assert isinstance(err.value, ValueError)


def test_metadata_must_exist(tmp_path):
    tensors, _ = make_record()
    path = _write_raw(path_for(tmp_path), dict(tensors))
    with pytest.raises(TensorFileError, match="missing keys"):
        load_tensor_file(path)


def test_filename_disagreeing_with_tensors(tmp_path):
    tensors, meta = make_record()
    path = _write_raw(path_for(tmp_path, t=64), {**tensors, "metadata": meta})
    with pytest.raises(TensorFileError, match="file name says seq_len 64"):
        load_tensor_file(path)
    path = _write_raw(path_for(tmp_path, layer=5), {**tensors, "metadata": meta})
    with pytest.raises(TensorFileError, match="file name says layer 5"):
        load_tensor_file(path)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_corrupt_and_truncated(tmp_path, fmt):
    tensors, meta = make_record()
    path = save_tensor_file(path_for(tmp_path, fmt), tensors, meta)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TensorFileError, match="corrupt"):
        load_tensor_file(path)
    path.write_bytes(b"not a tensor file at all")
    with pytest.raises(TensorFileError, match="corrupt"):
        load_tensor_file(path)
    with pytest.raises(TensorFileError, match="file not found"):
        load_tensor_file(tmp_path / "missing.pt")


class Evil:
    """Any non-tensor object: must not be unpickled."""


def test_pickled_objects_refused(tmp_path):
    tensors, meta = make_record()
    path = _write_raw(path_for(tmp_path), {**tensors, "metadata": meta, "x": Evil()})
    with pytest.raises(TensorFileError, match="cannot read"):
        load_tensor_file(path)


def test_safetensors_without_metadata(tmp_path):
    from safetensors.torch import save_file

    tensors, meta = make_record()
    path = path_for(tmp_path, "safetensors")
    save_file(tensors, str(path))
    with pytest.raises(TensorFileError, match="sketchwalk_metadata"):
        load_tensor_file(path)
    save_file(tensors, str(path), metadata={"sketchwalk_metadata": "{broken"})
    with pytest.raises(TensorFileError, match="not valid JSON"):
        load_tensor_file(path)
    save_file(tensors, str(path), metadata={"sketchwalk_metadata": json.dumps(meta)})
    assert load_tensor_file(path)["metadata"]["seq_len"] == 33


def test_required_metadata_matches_seed():
    assert set(REQUIRED_METADATA) == {
        "layer_idx",
        "seq_len",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "hidden_size",
        "batch_size",
        "timestamp",
        "model_path",
    }
