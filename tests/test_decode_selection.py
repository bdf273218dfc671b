import math

import pytest
import torch

from sketchwalk import SketchWalkConfig
from sketchwalk.attention.api import sparse_decode
from sketchwalk.selection.decode import SketchWalkDecoder
from sketchwalk.selection.select import forced_counts
from sketchwalk.selection.sketch import block_pool, sketched_blocks
from sketchwalk.selection.walk import aggregate_heads
from sketchwalk.testing import make_qkv


def _run(cfg, t_prefill=300, steps=40, b=2, hq=6, hkv=2, d=32, layer=2, seed=0, window=8):
    q, k, v = make_qkv(b, hq, hkv, t_prefill + steps, d, seed=seed)
    dec = SketchWalkDecoder(cfg, window_queries=window)
    dec.prefill(q[:, :, :t_prefill], k[:, :, :t_prefill], layer)
    sels = []
    for t in range(t_prefill, t_prefill + steps):
        sels.append(dec.step(q[:, :, t : t + 1], k[:, :, t : t + 1], layer))
    return dec, q, k, v, sels


def test_incremental_pooled_keys_equal_full_repooling():
    cfg = SketchWalkConfig(block_size=16, top_k_blocks=3)
    dec, _q, k, _, sels = _run(cfg, t_prefill=50, steps=40)
    st = dec._layers[2]
    t = st.seq_len
    torch.testing.assert_close(st.key_sums / st.key_counts[:, None], block_pool(k[:, :, :t], 16))
    assert sels[-1].seq_len == t == 90


def test_step_row_equals_brute_force_window_softmax():
    cfg = SketchWalkConfig(block_size=16, top_k_blocks=3, granularity="kv_group", degree=2)
    b, hq, hkv, w = 1, 4, 2, 5
    q, k, _ = make_qkv(b, hq, hkv, 100, 16, seed=3)
    dec = SketchWalkDecoder(cfg, window_queries=w)
    dec.prefill(q[:, :, :99], k[:, :, :99], 4)
    a_before = dec._layers[4].transition.clone()  # 7 blocks, last one has 3 tokens
    sel = dec.step(q[:, :, 99:], k[:, :, 99:], 4)
    # brute force a_t: the last w queries against the re-pooled cache
    kb = block_pool(k, 16)
    qs, ks, scale = sketched_blocks(q[:, :, -w:], kb, cfg, 4)
    rows = torch.zeros(b, hq, 1, kb.shape[2])
    for h in range(hq):
        logits = qs[:, h] @ ks[:, h // 2].transpose(-1, -2) * scale
        rows[:, h, 0] = torch.softmax(logits, -1).sum(1)
    a_t = aggregate_heads(rows, hkv, "kv_group")[:, :, 0]
    # running average: the last block's row had 3 tokens, this is the 4th
    a_new = a_before.clone()
    a_new[:, :, -1] = 0.75 * a_before[:, :, -1] + 0.25 * a_t
    torch.testing.assert_close(dec._layers[4].transition, a_new)
    state = a_t
    for _ in range(2):
        state = 0.75 * a_t + 0.25 * (state[:, :, None] @ a_new).squeeze(2)
    torch.testing.assert_close(sel.scores, state)


def test_new_block_grows_the_transition_matrix():
    cfg = SketchWalkConfig(block_size=16, top_k_blocks=2)
    dec, *_ = _run(cfg, t_prefill=64, steps=1, layer=3)
    a = dec._layers[3].transition
    assert a.shape[-2:] == (5, 5)
    assert (a[:, :, :4, 4] == 0).all()  # earlier rows get no mass on the new block
    torch.testing.assert_close(a[:, :, 4].sum(-1), torch.ones(a.shape[:2]))


@pytest.mark.parametrize("budget", [{"top_k_blocks": 3}, {"density": 0.3}, {}])
@pytest.mark.parametrize("granularity", ["layer", "kv_group", "head"])
def test_selection_invariants(budget, granularity):
    cfg = SketchWalkConfig(block_size=16, granularity=granularity, **budget)
    _, _, _, _, sels = _run(cfg, t_prefill=200, steps=35)
    groups = {"layer": 1, "kv_group": 2, "head": 6}[granularity]
    for sel in sels:
        nk = math.ceil(sel.seq_len / 16)
        m = sel.block_mask
        assert m.shape == (2, groups, nk)
        sink, window = forced_counts(nk, cfg)
        assert m[..., :sink].all() and m[..., nk - window :].all() and m[..., -1].all()
        assert torch.equal(sel.kv_num_blocks, m.sum(-1, dtype=torch.int32))
        for idx in range(2):
            for g in range(groups):
                n = int(sel.kv_num_blocks[idx, g])
                assert sel.kv_indices[idx, g, :n].tolist() == m[idx, g].nonzero().flatten().tolist()
        if "top_k_blocks" in budget:
            forced = sink + window - max(0, sink + window - nk)
            assert (sel.kv_num_blocks == min(nk, forced + 3)).all()
        if "density" in budget:
            assert abs(sel.density - 0.3) <= max(forced_counts(nk, cfg)) / nk + 1 / nk


def test_dense_layers_keep_every_block():
    cfg = SketchWalkConfig(block_size=16, dense_layers=2, top_k_blocks=1)
    _, _, _, _, sels = _run(cfg, layer=1, steps=3)
    assert all(s.block_mask.all() and s.scores is None for s in sels)


def test_decode_selection_beats_random_and_feeds_sparse_decode():
    cfg = SketchWalkConfig(block_size=32, top_k_blocks=4)
    _dec, q, k, v, sels = _run(cfg, t_prefill=1500, steps=4, b=1, hq=8, hkv=2, d=64, seed=7)
    sel = sels[-1]
    t = sel.seq_len
    qt, kc, vc = q[:, :, t - 1 : t], k[:, :, :t], v[:, :, :t]
    out = sparse_decode(qt, kc, vc, sel.kv_num_blocks, sel.kv_indices, 32)
    # the last query's true attention mass inside the kept blocks vs random blocks
    scores = (qt.double() @ kc.repeat_interleave(4, 1).double().transpose(-1, -2)) / 8.0
    p = torch.softmax(scores, -1)[0, :, 0]  # (Hq, t)
    nk = sel.block_mask.shape[-1]
    blocks = torch.nn.functional.pad(p, (0, nk * 32 - t)).view(8, nk, 32).sum(-1)
    ours = float((blocks * sel.block_mask[0, 0]).sum(-1).mean())
    gen = torch.Generator().manual_seed(0)
    n = int(sel.kv_num_blocks[0, 0])
    rand = []
    for _ in range(50):
        m = torch.zeros(nk, dtype=torch.bool)
        m[torch.randperm(nk, generator=gen)[:n]] = True
        rand.append(float((blocks * m).sum(-1).mean()))
    print(f"recall of the last query: sketchwalk {ours:.4f}, random mean {sum(rand) / 50:.4f}")
    assert ours > max(rand)
    # and sparse_decode really restricts to those blocks
    full = sparse_decode(
        qt,
        kc,
        vc,
        torch.full_like(sel.kv_num_blocks, nk),
        torch.arange(nk, dtype=torch.int32).expand(1, 1, nk),
        32,
    )
    assert not torch.allclose(out, full)


def test_errors():
    dec = SketchWalkDecoder(SketchWalkConfig(block_size=16))
    q, k, _ = make_qkv(1, 2, 2, 40, 8)
    with pytest.raises(ValueError, match="no prefill state"):
        dec.step(q[:, :, :1], k[:, :, :1], 5)
    dec.prefill(q, k, 5)
    with pytest.raises(ValueError, match="one new token per call"):
        dec.step(q[:, :, :2], k[:, :, :2], 5)
    with pytest.raises(ValueError, match="window_queries"):
        SketchWalkDecoder(window_queries=0)
