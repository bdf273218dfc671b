"""SketchWalk as a drop-in transformers attention implementation (sketchwalk.integration)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_models import ARCHS, tiny_config

from sketchwalk.attention import dense_attention, sparse_attention
from sketchwalk.capture import attention_modules, capture_attention
from sketchwalk.config import SketchWalkConfig
from sketchwalk.core import SketchWalk
from sketchwalk.integration import (
    SketchWalkAttention,
    disable_sketchwalk,
    enable_sketchwalk,
    sketchwalk_attention,
)

SEQ = 100  # 7 blocks of 16, the last one partial
SPARSE = SketchWalkConfig(block_size=16, density=0.3, dense_layers=1, dense_last_rows=1)


def _model(arch: str, attn: str = "sdpa", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    if arch == "mistral":
        overrides.setdefault("sliding_window", None)  # a sliding window makes every layer dense
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(arch, **overrides), attn_implementation=attn
    )
    return model.eval()


def _ids(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _report(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    err = (got.float() - want.float()).abs()
    print(f"{name}: max abs err {err.max().item():.3e}, mean {err.mean().item():.3e}")
    return err.max().item()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dense_equivalent_config_gives_identical_logits(arch, attn):
    model = _model(arch, attn)
    ids = _ids()
    with torch.no_grad():
        stock = model(ids).logits
        for cfg in (
            SketchWalkConfig(block_size=16, dense_layers=999),
            SketchWalkConfig(block_size=16, density=1.0, dense_layers=0),
        ):
            with enable_sketchwalk(model, cfg, backend="reference") as sw:
                assert model.config._attn_implementation == f"sketchwalk+{attn}"
                got = model(ids).logits
            _report(f"{arch}/{attn} {cfg.dense_layers=} {cfg.density=}", got, stock)
            assert torch.equal(got, stock)
            summary = sw.summary()
            assert summary["prefill_calls"] == 3 and summary["mean_density"] == 1.0
        # The same full selection through the sparse reference kernel: equal up to rounding.
        cfg = SketchWalkConfig(block_size=16, dense_layers=999)
        with enable_sketchwalk(model, cfg, backend="reference", dense_when_full=False) as sw:
            got = model(ids).logits
        assert sw.summary()["backends"] == {"reference": 3}
        assert _report(f"{arch}/{attn} full selection, reference", got, stock) < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_logits_equal_manual_recomputation(arch):
    model = _model(arch)
    ids = _ids()
    modules = attention_modules(model)
    outputs: dict[int, torch.Tensor] = {}

    def hook(layer_idx):
        def fn(_module, inputs):
            outputs[layer_idx] = inputs[0].detach().clone()  # (B, S, Hq * D), attention output

        return fn

    handles = [m.o_proj.register_forward_pre_hook(hook(i)) for i, m in modules.items()]
    try:
        with torch.no_grad():
            stock = model(ids).logits
            with (
                enable_sketchwalk(model, SPARSE, backend="reference") as sw,
                capture_attention(model) as cap,
            ):
                logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    assert torch.isfinite(logits).all()
    diff = _report(f"{arch} sparse vs dense logits", logits, stock)
    assert diff > 1e-3, "a 30%-density selection should change the logits"
    modes = {i: sw.layers[i].mode for i in modules}
    assert modes == {0: "dense", 1: "sparse", 2: "sparse"}, modes

    manual = SketchWalk(SPARSE, backend="torch")
    for i, module in modules.items():
        q, k, v = (cap.layers[i][name] for name in ("Q", "K", "V"))
        selection = manual.select(q, k, i)
        if i < SPARSE.dense_layers:
            assert selection.density == 1.0
            want = dense_attention(q, k, v, scale=module.scaling)
        else:
            assert selection.density < 1.0
            assert selection.density == pytest.approx(sw.layers[i].density)
            want = sparse_attention(q, k, v, selection, backend="reference", scale=module.scaling)
        b, hq, t, d = want.shape
        got = outputs[i].view(b, t, hq, d).transpose(1, 2)
        err = _report(f"{arch} layer {i} attention output", got, want)
        assert err < 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_generate_with_kv_cache_decodes_dense(arch):
    model = _model(arch)
    prompt = _ids(batch=1, seq=80)
    new_tokens = 4
    with torch.no_grad():
        sw = enable_sketchwalk(model, SPARSE, backend="reference")
        try:
            sparse_next = model(prompt).logits[0, -1].argmax()
            sw.clear()
            out = model.generate(
                prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens
            )
        finally:
            disable_sketchwalk(model)
    assert out.shape == (1, 80 + new_tokens)
    assert out[0, 80] == sparse_next, "the first token comes from the sparse prefill"
    prefill = [c for c in sw.calls if c.prefill]
    decode = [c for c in sw.calls if not c.prefill]
    assert [c.mode for c in prefill] == ["dense", "sparse", "sparse"]
    assert len(decode) == 3 * (new_tokens - 1)
    assert all(c.mode == "dense" and c.q_len == 1 and "decode" in c.reason for c in decode)
    assert {c.kv_len for c in decode} == {81, 82, 83}


def test_disable_restores_and_reenables():
    model = _model("llama")
    ids = _ids()
    with torch.no_grad():
        stock = model(ids).logits
        sw = enable_sketchwalk(model, SPARSE, backend="reference")
        assert sketchwalk_attention(model) is sw
        sparse = model(ids).logits
        assert disable_sketchwalk(model) is True
        assert disable_sketchwalk(model) is False
        assert model.config._attn_implementation == "sdpa"
        assert sketchwalk_attention(model) is None
        assert torch.equal(model(ids).logits, stock)
        with SketchWalkAttention(model, SPARSE, backend="reference"):
            again_logits = model(ids).logits
        assert model.config._attn_implementation == "sdpa"
    assert torch.equal(again_logits, sparse)


def test_new_forward_pass_resets_the_walk():
    model = _model("qwen2")
    with torch.no_grad(), enable_sketchwalk(model, SPARSE, backend="reference") as sw:
        first = model(_ids()).logits
        other = model(_ids(batch=1, seq=70, seed=5)).logits  # another shape in between
        second = model(_ids()).logits
    assert torch.isfinite(other).all()
    assert sw.forward_passes == 3
    assert torch.equal(first, second)


def test_layers_subset_and_short_sequences_stay_dense():
    model = _model("llama")
    with torch.no_grad(), enable_sketchwalk(model, SPARSE, backend="reference", layers=[2]) as sw:
        model(_ids())
        assert {i: c.mode for i, c in sw.layers.items()} == {0: "dense", 1: "dense", 2: "sparse"}
        assert sw.layers[1].reason == "layer not selected for SketchWalk"
        sw.clear()
        model(_ids(seq=16))  # one block
        assert all(c.mode == "dense" for c in sw.calls)
        assert "one block" in sw.layers[2].reason


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_batch_runs_dense_or_raises(attn):
    model = _model("llama", attn)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :9] = 0  # left padding in the first row
    with torch.no_grad():
        stock = model(ids, attention_mask=mask).logits
        with enable_sketchwalk(model, SPARSE, backend="reference") as sw:
            got = model(ids, attention_mask=mask).logits
            unpadded = model(ids, attention_mask=torch.ones_like(ids)).logits
        assert torch.equal(got, stock)
        reasons = [c.reason for c in sw.calls[:3]]
        assert all("not plain causal" in r for r in reasons), reasons
        # an all-ones mask is plain causal: it runs sparse, like no mask at all
        assert [c.mode for c in sw.calls[3:]] == ["dense", "sparse", "sparse"]
        assert not torch.equal(unpadded, model(ids).logits)
        with (
            enable_sketchwalk(model, SPARSE, backend="reference", on_padding="raise"),
            pytest.raises(ValueError, match="padded batches"),
        ):
            model(ids, attention_mask=mask)
    assert model.config._attn_implementation == attn


def test_sliding_window_layers_run_dense():
    model = _model("mistral", sliding_window=24)
    ids = _ids()
    with torch.no_grad():
        stock = model(ids).logits
        with enable_sketchwalk(model, SPARSE, backend="reference") as sw:
            got = model(ids).logits
    assert torch.equal(got, stock)
    assert all("sliding-window" in c.reason for c in sw.calls)


def test_bad_arguments_raise_clear_errors():
    model = _model("llama")
    with pytest.raises(ValueError, match="backend must be one of"):
        enable_sketchwalk(model, SPARSE, backend="cuda")
    with pytest.raises(TypeError, match="SketchWalkConfig"):
        enable_sketchwalk(model, {"density": 0.2})
    with pytest.raises(ValueError, match=r"layers \[7\] do not exist"):
        enable_sketchwalk(model, SPARSE, layers=[7])
    with pytest.raises(ValueError, match="on_padding"):
        enable_sketchwalk(model, SPARSE, on_padding="ignore")
    with pytest.raises(ValueError, match="selection_backend"):
        enable_sketchwalk(model, SPARSE, selection_backend="cuda")
    with pytest.raises(ValueError, match="density"):
        SketchWalkConfig(density=1.5)
    assert model.config._attn_implementation == "sdpa"
    with enable_sketchwalk(model, SPARSE), pytest.raises(RuntimeError, match="already enabled"):
        enable_sketchwalk(model, SPARSE)
    # An explicit backend that cannot run here raises; it never falls back silently.
    with (
        torch.no_grad(),
        enable_sketchwalk(model, SPARSE, backend="triton"),
        pytest.raises(RuntimeError, match="triton"),
    ):
        model(_ids())
    assert model.config._attn_implementation == "sdpa"
