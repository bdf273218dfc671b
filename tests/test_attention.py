import math

import pytest
import torch
import torch.nn.functional as F

from sketchwalk import BlockSelection, dense_attention, sparse_attention
from sketchwalk.attention.reference import sparse_attention_reference
from sketchwalk.testing import make_qkv, random_selection

SHAPES = [  # (B, Hq, Hkv, T, D, block)
    (1, 4, 4, 128, 32, 64),
    (2, 6, 2, 200, 16, 64),  # T not a multiple of the block, GQA 3
    (1, 8, 2, 37, 64, 64),  # T < block, GQA 4
    (2, 8, 1, 300, 32, 32),  # GQA 8, batch 2
]


def _sdpa(q, k, v, mask=None, causal=True):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    is_causal = causal and mask is None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk", [None, 7])
def test_dense_attention_matches_sdpa(shape, chunk):
    b, hq, hkv, t, d, _ = shape
    q, k, v = make_qkv(b, hq, hkv, t, d, dtype=torch.float64, seed=t)
    got = dense_attention(q, k, v, chunk_size=chunk)
    want = _sdpa(q, k, v)
    print(f"max err {(got - want).abs().max():.2e}")
    torch.testing.assert_close(got, want)
    non_causal = dense_attention(q, k, v, causal=False)
    torch.testing.assert_close(non_causal, _sdpa(q, k, v, causal=False))


def test_dense_attention_aligns_queries_to_the_end_of_keys():
    q, k, v = make_qkv(1, 4, 2, 50, 16, dtype=torch.float64)
    qd = q[:, :, -3:]
    got = dense_attention(qd, k, v)
    want = dense_attention(q, k, v)[:, :, -3:]
    torch.testing.assert_close(got, want)


def test_dense_attention_keeps_dtype_and_accumulates_in_fp32():
    q, k, v = make_qkv(1, 4, 2, 300, 64, dtype=torch.bfloat16, seed=3)
    got = dense_attention(q, k, v)
    assert got.dtype == torch.bfloat16
    want = _sdpa(q.double(), k.double(), v.double())
    err = (got.double() - want).abs().max()
    print(f"bf16 max err {err:.2e}")
    assert err < 2e-2


@pytest.mark.parametrize("shape", SHAPES)
def test_full_selection_equals_dense(shape):
    b, hq, hkv, t, d, bs = shape
    q, k, v = make_qkv(b, hq, hkv, t, d, dtype=torch.float64, seed=1)
    sel = BlockSelection.full(b, 1, t, bs)
    torch.testing.assert_close(sparse_attention(q, k, v, sel), dense_attention(q, k, v))


def _token_mask(sel: BlockSelection, hq, hkv, t):
    bs = sel.block_size
    hm = sel.head_mask(hq, hkv)
    idx = torch.arange(t) // bs
    tok = hm[:, :, idx][:, :, :, idx]
    return tok & torch.ones(t, t, dtype=torch.bool).tril()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("granularity", ["layer", "kv_group", "head"])
@pytest.mark.parametrize("density", [0.1, 0.5])
def test_sparse_equals_masked_dense_softmax(shape, granularity, density):
    b, hq, hkv, t, d, bs = shape
    q, k, v = make_qkv(b, hq, hkv, t, d, dtype=torch.float64, seed=2)
    groups = {"layer": 1, "kv_group": hkv, "head": hq}[granularity]
    sel = random_selection(b, groups, t, bs, density, seed=5)
    got = sparse_attention(q, k, v, sel)
    mask = _token_mask(sel, hq, hkv, t)
    want = _sdpa(q, k, v, mask=mask)
    print(f"max err {(got - want).abs().max():.2e}")
    torch.testing.assert_close(got, want)
    # chunking does not change the result
    torch.testing.assert_close(sparse_attention_reference(q, k, v, sel, chunk_size=bs), got)


def test_rows_without_visible_keys_give_zeros():
    q, k, v = make_qkv(1, 2, 2, 128, 16, dtype=torch.float64)
    mask = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    mask[0, 0, 0, 0] = True
    sel = BlockSelection.from_mask(mask, 64, 128)
    out = sparse_attention(q, k, v, sel)
    assert torch.isfinite(out).all()
    assert (out[:, :, 64:] == 0).all()


def test_custom_scale():
    q, k, v = make_qkv(1, 2, 1, 70, 8, dtype=torch.float64)
    sel = BlockSelection.full(1, 1, 70, 64)
    got = sparse_attention(q, k, v, sel, scale=0.3)
    want = _sdpa(q * 0.3 * math.sqrt(8), k, v)
    torch.testing.assert_close(got, want)


def test_bad_inputs():
    q, k, v = make_qkv(1, 4, 2, 128, 16)
    sel = BlockSelection.full(1, 1, 128, 64)
    with pytest.raises(ValueError, match="v must have k's shape"):
        sparse_attention(q, k, v[:, :, :64], sel)
    with pytest.raises(ValueError, match="selection is for seq_len=128"):
        sparse_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], sel)
    with pytest.raises(ValueError, match="mask groups"):
        sparse_attention(q, k, v, BlockSelection.full(1, 3, 128, 64))
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse_attention(q, k, v, sel, backend="cuda")
    with pytest.raises(ValueError, match="must be a BlockSelection"):
        sparse_attention(q, k, v, sel.block_mask)
    with pytest.raises(ValueError, match="more queries"):
        dense_attention(q, k[:, :, :10], v[:, :, :10])


@pytest.mark.parametrize("window, softcap", [(5, None), (None, 2.0), (7, 1.5)])
def test_dense_attention_window_and_softcap_equal_a_brute_force(window, softcap):
    """``window`` (a query sees itself and ``window - 1`` keys before it) and ``softcap``
    (logits -> softcap * tanh(logits / softcap)), query chunk at the end of the keys."""
    from sketchwalk.attention.reference import dense_attention

    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 2, 2, 20, 8, generator=g, dtype=torch.float64)
    got = dense_attention(q, k, v, scale=0.4, window=window, softcap=softcap, chunk_size=4)
    want = torch.zeros_like(q)
    for b in range(2):
        for h in range(4):
            for i in range(9):
                pos = 11 + i
                logits = (k[b, h // 2] @ q[b, h, i]) * 0.4
                if softcap is not None:
                    logits = softcap * torch.tanh(logits / softcap)
                keys = [j for j in range(20) if j <= pos and (window is None or j > pos - window)]
                p = torch.softmax(logits[keys], 0)
                want[b, h, i] = p @ v[b, h // 2, keys]
    torch.testing.assert_close(got, want)
