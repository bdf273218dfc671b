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
