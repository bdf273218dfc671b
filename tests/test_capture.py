"""Captured Q/K/V are exactly what attention consumes (sketchwalk.hf.capture)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_models import ARCHS, tiny_config

from sketchwalk.hf.capture import attention_modules, capture_attention


def _model(arch: str, attn: str = "sdpa", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    return model.eval()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _independent_qkv(model, input_ids: torch.Tensor, layer_idx: int):
    """Post-RoPE q/k, v and pre-RoPE q/k of one layer, recomputed from the layer's own modules."""
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True)
        layer = model.model.layers[layer_idx]
        attn = layer.self_attn
        h = layer.input_layernorm(out.hidden_states[layer_idx])  # input of layer layer_idx
        b, t, _ = h.shape
        d = attn.head_dim
        q = attn.q_proj(h).view(b, t, -1, d)
        k = attn.k_proj(h).view(b, t, -1, d)
        v = attn.v_proj(h).view(b, t, -1, d).transpose(1, 2)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q_pre, k_pre = q.transpose(1, 2), k.transpose(1, 2)
        positions = torch.arange(t)[None].expand(b, t)
        cos, sin = model.model.rotary_emb(h, positions)
        cos, sin = cos[:, None], sin[:, None]
        q_rot = q_pre * cos + _rotate_half(q_pre) * sin
        k_rot = k_pre * cos + _rotate_half(k_pre) * sin
    return q_rot, k_rot, v, q_pre, k_pre


def _report(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got.float() - want.float()).abs()
    print(f"{name}: max abs err {err.max().item():.3e}, mean {err.mean().item():.3e}")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_captured_qk_equal_independent_post_rope(arch, attn):
    model = _model(arch, attn)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 256, (2, 45), generator=gen)  # batch 2, not a block multiple
    with torch.no_grad():
        reference = model(input_ids).logits
        with capture_attention(model, pre_rope=True) as cap:
            assert model.config._attn_implementation == f"sketchwalk_capture+{attn}"
            captured = model(input_ids).logits
    assert model.config._attn_implementation == attn  # restored
    _report("logits", captured, reference)
    assert torch.equal(captured, reference), "capture changed the model's output"
    assert sorted(cap.layers) == [0, 1, 2]
    for layer_idx in range(3):
        q, k, v, q_pre, k_pre = _independent_qkv(model, input_ids, layer_idx)
        rec = cap.layers[layer_idx]
        assert rec["Q"].shape == (2, 4, 45, 16) and rec["K"].shape == (2, 2, 45, 16)
        for name, want in (("Q", q), ("K", k), ("V", v), ("Q_pre", q_pre), ("K_pre", k_pre)):
            _report(f"{arch}/{attn} layer {layer_idx} {name}", rec[name], want)
            torch.testing.assert_close(rec[name], want, rtol=1e-5, atol=1e-5)
        # sanity: RoPE really was applied (pre and post differ away from position 0)
        assert not torch.allclose(rec["Q"][..., 1:, :], rec["Q_pre"][..., 1:, :])


def test_layer_subset_dtype_and_hooks_removed():
    model = _model("qwen3")
    ids = torch.randint(0, 256, (1, 20))
    with capture_attention(model, layers=[2, 0], dtype=torch.bfloat16) as cap, torch.no_grad():
        model(ids)
    assert sorted(cap.layers) == [0, 2]
    assert all(
        t.dtype == torch.bfloat16 and t.device.type == "cpu"
        for rec in cap.layers.values()
        for t in rec.values()
    )
    assert "Q_pre" not in cap.layers[0]
    with torch.no_grad():
        model(ids)  # after the context nothing is recorded any more
    assert sorted(cap.layers) == [0, 2]
    modules = attention_modules(model)
    assert sorted(modules) == [0, 1, 2]
    for module in modules.values():
        assert not module.q_proj._forward_hooks and not module.k_norm._forward_hooks


def test_bad_layers_and_double_capture():
    model = _model("llama")
    with pytest.raises(ValueError, match="do not exist"):
        capture_attention(model, layers=[7])
    with capture_attention(model, layers=[0]), pytest.raises(RuntimeError, match="already"):
        capture_attention(model, layers=[0]).__enter__()
    with pytest.raises(ValueError, match="no attention modules"):
        attention_modules(torch.nn.Linear(2, 2))


@pytest.mark.gpu
def test_capture_on_cuda_offloads():
    model = _model("llama").cuda()
    ids = torch.randint(0, 256, (1, 33), device="cuda")
    with capture_attention(model, offload=True) as cap, torch.no_grad():
        model(ids)
    assert cap.layers[0]["Q"].device.type == "cpu"
