import pytest
import torch

from sketchwalk import BlockSelection, SketchWalk, SketchWalkConfig, metrics
from sketchwalk.testing import make_qkv, random_selection


def _probs(q, k):
    g = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(g, 1).double()
    s = q.double() @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5
    t = q.shape[2]
    s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -1)


def test_error_metrics():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([1.0, 2.0, 5.0])
    assert metrics.mse(a, b) == pytest.approx(4 / 3)
    assert metrics.max_abs_error(a, b) == pytest.approx(2.0)
    assert metrics.relative_l2_error(b, a) == pytest.approx(2 / 14**0.5)
    assert metrics.cosine_similarity(a, a) == pytest.approx(1.0)
    assert metrics.cosine_similarity(a, -a) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.mse(a, b[:2])


@pytest.mark.parametrize("t, bs", [(200, 64), (64, 64), (30, 64)])
@pytest.mark.parametrize("chunk", [None, 64])
def test_attention_recall_brute_force(t, bs, chunk):
    q, k, _ = make_qkv(2, 6, 2, t, 16, seed=t)
    sel = random_selection(2, 2, t, bs, 0.4, seed=1)
    got = metrics.attention_recall(q, k, sel, chunk_size=chunk)
    p = _probs(q, k)
    idx = torch.arange(t) // bs
    tok = sel.head_mask(6, 2)[:, :, idx][:, :, :, idx]
    want = float((p * tok).sum(-1).mean())
    print(f"recall {got:.6f} brute force {want:.6f}")
    assert got == pytest.approx(want, abs=1e-6)
    full = BlockSelection.full(2, 1, t, bs)
    assert metrics.attention_recall(q, k, full) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("t, bs", [(200, 64), (128, 32), (10, 64)])
@pytest.mark.parametrize("reduce", ["sum", "max"])
def test_true_block_attention_brute_force(t, bs, reduce):
    q, k, _ = make_qkv(1, 4, 4, t, 16, seed=2)
    got = metrics.true_block_attention(q, k, bs, reduce=reduce, chunk_size=bs)
    p = _probs(q, k)
    nb = -(-t // bs)
    want = torch.zeros(1, 4, nb, nb, dtype=torch.float64)
    for i in range(nb):
        for j in range(nb):
            tile = p[:, :, i * bs : (i + 1) * bs, j * bs : (j + 1) * bs]
            want[:, :, i, j] = tile.sum(-1).mean(-1) if reduce == "sum" else tile.amax((-1, -2))
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    if reduce == "sum":
        torch.testing.assert_close(got.sum(-1), torch.ones(1, 4, nb), atol=1e-5, rtol=0)


def test_oracle_is_an_upper_bound_at_the_same_budget():
    q, k, _ = make_qkv(1, 8, 2, 1024, 32, seed=4)
    sel = SketchWalk(SketchWalkConfig(dense_layers=0, density=0.3)).select(q, k, 0)
    block_attn = metrics.true_block_attention(q, k, 64).mean(1, keepdim=True)
    oracle = metrics.oracle_selection(block_attn, sel)
    assert torch.equal(oracle.kv_num_blocks, sel.kv_num_blocks)
    r_sw, r_or = metrics.attention_recall(q, k, sel), metrics.attention_recall(q, k, oracle)
    print(f"sketchwalk {r_sw:.4f} oracle {r_or:.4f}")
    assert r_or >= r_sw - 1e-9


@pytest.mark.parametrize("t", [200, 256, 30])
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_recall_from_block_attention_equals_attention_recall(t, groups):
    q, k, _ = make_qkv(2, 6, 2, t, 16, seed=t + groups)
    sel = random_selection(2, groups, t, 64, 0.4, seed=3)
    tba = metrics.true_block_attention(q, k, 64)
    fast = metrics.recall_from_block_attention(tba, sel)
    slow = metrics.attention_recall(q, k, sel)
    print(f"from blocks {fast:.8f} direct {slow:.8f}")
    assert fast == pytest.approx(slow, abs=1e-6)


def test_density_counts_kept_causal_blocks():
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[..., torch.arange(4), torch.arange(4)] = True  # 4 of 10 causal blocks per row set
    mask[1, 0, 3, :] = True  # + 3 more in batch row 1
    sel = BlockSelection.from_mask(mask, 16, 64)
    assert metrics.density(sel) == pytest.approx((4 + 7) / 20)
