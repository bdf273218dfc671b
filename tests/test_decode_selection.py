import math

import pytest
import torch

from sketchwalk import SketchWalkConfig
from sketchwalk.attention.api import sparse_decode
from sketchwalk.selection.decode import SketchWalkDecoder
from sketchwalk.selection.select import forced_counts, select_blocks, select_last_row
from sketchwalk.selection.sketch import block_pool, sketched_blocks
from sketchwalk.selection.walk import aggregate_heads
from sketchwalk.testing import make_qkv


def _run(
    cfg,
    t_prefill=300,
    steps=40,
    b=2,
    hq=6,
    hkv=2,
    d=32,
    layer=2,
    seed=0,
    window=8,
    structured=True,
):
    q, k, v = make_qkv(b, hq, hkv, t_prefill + steps, d, seed=seed, structured=structured)
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


# ---- decode_rule "quest": per-block key bounds of the current query ------------------------


def _needle_inputs(b, hq, hkv, t, d=64, bs=64, seed=0, strength=30.0):
    """Random keys and queries (no structure); for every (batch, KV head) one key in a middle
    block is ``strength`` times a random unit direction, and one query head of that KV group is
    8 times the same direction at the last position (the decode query). Returns q, k (B, H, t+1,
    D) and needles[(b, g)] = (needle block, aligned query head)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t + 1, d, generator=gen)
    k = torch.randn(b, hkv, t + 1, d, generator=gen)
    group = hq // hkv
    nb = t // bs
    needles = {}
    for i in range(b):
        for g in range(hkv):
            block = 3 + (7 * i + 5 * g) % (nb - 8)  # away from the sink and the window
            pos = block * bs + int(torch.randint(bs, (1,), generator=gen))
            u = torch.randn(d, generator=gen)
            u /= u.norm()
            k[i, g, pos] = strength * u
            head = g * group + i % group
            q[i, head, t] = 8.0 * u
            needles[(i, g)] = (block, head)
    return q, k, needles


def _group_of(head, g, granularity):
    return {"layer": 0, "kv_group": g, "head": head}[granularity]


@pytest.mark.parametrize("hq, hkv", [(4, 4), (6, 2), (8, 2)])  # GQA groups 1, 3, 4
@pytest.mark.parametrize("granularity", ["layer", "kv_group", "head"])
def test_quest_always_keeps_a_planted_needle_the_walk_can_miss(hq, hkv, granularity):
    t = 64 * 40 + 17
    q, k, needles = _needle_inputs(2, hq, hkv, t, seed=hq + hkv)
    kept = {}
    top_k = max(2, hkv)  # with one mask per layer, every KV head's needle shares it
    for rule in ("quest", "walk"):
        cfg = SketchWalkConfig(
            decode_rule=rule,
            granularity=granularity,
            top_k_blocks=top_k,
            sink_blocks=1,
            window_blocks=2,
            dense_layers=0,
        )
        dec = SketchWalkDecoder(cfg)
        dec.prefill(q[:, :, :t], k[:, :, :t], 0)
        sel = dec.step(q[:, :, t:], k[:, :, t:], 0)
        assert sel.kv_num_blocks.unique().tolist() == [1 + 2 + top_k]
        kept[rule] = [
            bool(sel.block_mask[i, _group_of(head, g, granularity), block])
            for (i, g), (block, head) in needles.items()
        ]
    print(f"needles kept: quest {kept['quest']}, walk {kept['walk']}")
    assert all(kept["quest"])
    assert not all(kept["walk"])  # the mean-pooled walk row does not see the needle


def test_quest_keeps_a_needle_that_arrived_during_decode():
    """The needle key comes through step() (incremental bounds), in a block that later leaves
    the window; the last query looks for it."""
    b, hq, hkv, d, bs = 2, 8, 2, 64, 64
    t0, steps = 64 * 10 + 5, 250  # 14 blocks at the end, the last one partial
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(b, hq, t0 + steps, d, generator=gen)
    k = torch.randn(b, hkv, t0 + steps, d, generator=gen)
    u = torch.randn(d, generator=gen)
    u /= u.norm()
    pos = t0 + 100  # block 11 (a block opened during decode)
    k[:, 1, pos] = 30.0 * u
    q[:, 5, -1] = 8.0 * u  # head 5 belongs to KV group 1
    cfg = SketchWalkConfig(
        decode_rule="quest",
        granularity="kv_group",
        top_k_blocks=1,
        sink_blocks=1,
        window_blocks=2,
        dense_layers=0,
    )
    dec = SketchWalkDecoder(cfg)
    dec.prefill(q[:, :, :t0], k[:, :, :t0], 3)
    for s in range(t0, t0 + steps):
        sel = dec.step(q[:, :, s : s + 1], k[:, :, s : s + 1], 3)
    assert sel.block_mask.shape == (b, hkv, 14)
    assert sel.block_mask[:, 1, pos // bs].all()
    assert sel.kv_num_blocks.unique().tolist() == [1 + 2 + 1]


@pytest.mark.parametrize("t_prefill, bs", [(300, 16), (64, 16), (5, 16), (130, 64)])
def test_incremental_key_bounds_equal_recomputed_bounds(t_prefill, bs):
    from sketchwalk.selection.quest import block_key_bounds

    cfg = SketchWalkConfig(decode_rule="quest", block_size=bs, top_k_blocks=2, dense_layers=0)
    steps = 90
    q, k, _ = make_qkv(2, 6, 3, t_prefill + steps, 8, seed=t_prefill)
    dec = SketchWalkDecoder(cfg)
    dec.prefill(q[:, :, :t_prefill], k[:, :, :t_prefill], 0)
    for s in range(t_prefill, t_prefill + steps):
        dec.step(q[:, :, s : s + 1], k[:, :, s : s + 1], 0)
        st = dec._layers[0]
        if s % 7 and s != t_prefill + steps - 1:
            continue
        t = s + 1
        nb = math.ceil(t / bs)
        want_min = torch.stack(
            [k[:, :, j * bs : min(t, (j + 1) * bs)].amin(2) for j in range(nb)], dim=2
        )
        want_max = torch.stack(
            [k[:, :, j * bs : min(t, (j + 1) * bs)].amax(2) for j in range(nb)], dim=2
        )
        assert torch.equal(st.key_min, want_min) and torch.equal(st.key_max, want_max)
        one_pass = block_key_bounds(k[:, :, :t], bs)
        assert torch.equal(one_pass[0], want_min) and torch.equal(one_pass[1], want_max)
    assert st.seq_len == t_prefill + steps


@pytest.mark.parametrize("granularity", ["layer", "kv_group", "head"])
@pytest.mark.parametrize("hq, hkv", [(3, 3), (6, 2), (8, 2)])
def test_quest_scores_equal_brute_force_bound(granularity, hq, hkv):
    bs, d, t = 16, 8, 16 * 9 + 3
    cfg = SketchWalkConfig(
        decode_rule="quest",
        block_size=bs,
        granularity=granularity,
        top_k_blocks=2,
        dense_layers=0,
    )
    q, k, _ = make_qkv(2, hq, hkv, t + 1, d, seed=hq)
    dec = SketchWalkDecoder(cfg)
    dec.prefill(q[:, :, :t], k[:, :, :t], 0)
    sel = dec.step(q[:, :, t:], k[:, :, t:], 0)
    nb, group = math.ceil((t + 1) / bs), hq // hkv
    probs = torch.zeros(2, hq, nb, dtype=torch.float64)
    for i in range(2):
        for h in range(hq):
            qh = q[i, h, t].double()
            bound, top = [], []
            for j in range(nb):
                keys = k[i, h // group, j * bs : min(t + 1, (j + 1) * bs)].double()
                lo, hi = keys.min(0).values, keys.max(0).values
                bound.append(sum(max(qh[c] * lo[c], qh[c] * hi[c]) for c in range(d)))
                top.append(float((keys @ qh).max()))
                assert bound[-1] >= top[-1] - 1e-9  # an upper bound of the block's logits
            n = torch.tensor([min(t + 1, (j + 1) * bs) - j * bs for j in range(nb)])
            logits = torch.tensor(bound) / math.sqrt(d) + n.double().log()
            probs[i, h] = torch.softmax(logits, -1)
    if granularity == "layer":
        want = probs.amax(1, keepdim=True)
    elif granularity == "kv_group":
        want = probs.view(2, hkv, group, nb).amax(2)
    else:
        want = probs
    err = (sel.scores.double() - want).abs().max().item()
    print(f"max abs error of the quest scores: {err:.2e}")
    torch.testing.assert_close(sel.scores.double(), want, rtol=1e-5, atol=1e-6)


def _last_row_reference(scores, cfg):
    """Brute force of the decode budgets, written from their definitions: sink and window
    forced; ranked blocks by the last row of an nk-block prefill without dense last rows."""
    b, g, nk = scores.shape
    sink, window = forced_counts(nk, cfg)
    forced = [j < sink or j >= nk - window for j in range(nk)]
    cands = [j for j in range(nk) if not forced[j]]
    mask = torch.tensor(forced).expand(b, g, nk).clone()
    s = scores.double()
    if cfg.budget == "mass":
        for i in range(b):
            for gg in range(g):
                share = s[i, gg] / s[i, gg].sum()
                have = float(share[torch.tensor(forced)].sum())
                for j in sorted(cands, key=lambda j: -float(share[j])):
                    if have >= cfg.mass:
                        break
                    mask[i, gg, j] = True
                    have += float(share[j])
        return mask
    prefill = cfg.replace(dense_last_rows=0, allocation="row")
    if cfg.budget == "top_k_blocks":
        k_last = min(cfg.top_k_blocks, len(cands))
    elif cfg.budget == "kblocks_frac":
        k_last = math.floor(cfg.kblocks_frac * len(cands) + 0.5)
    else:  # density: the per-row rate that meets the prefill's total
        from sketchwalk.selection.select import ranked_per_row

        k_last = int(ranked_per_row(nk, prefill)[-1])
    if cfg.budget == "density" and cfg.allocation == "global":
        for i in range(b):
            ranked = [
                (-float(s[i, gg, j] / s[i, gg].sum()), gg, j) for gg in range(g) for j in cands
            ]
            for _, gg, j in sorted(ranked)[: g * k_last]:
                mask[i, gg, j] = True
        return mask
    for i in range(b):
        for gg in range(g):
            for j in sorted(cands, key=lambda j: -float(s[i, gg, j]))[:k_last]:
                mask[i, gg, j] = True
    return mask


DECODE_BUDGETS = [
    {"top_k_blocks": 3},
    {"top_k_blocks": 0},
    {"kblocks_frac": 0.3},
    {"density": 0.6},
    {"density": 0.6, "allocation": "global"},
    {"mass": 0.3},
    {"mass": 0.6},
    {"mass": 1.0},
]


@pytest.mark.parametrize("budget", DECODE_BUDGETS)
@pytest.mark.parametrize("rule", ["quest", "walk"])
@pytest.mark.parametrize("granularity", ["kv_group", "head"])
def test_decode_budgets_equal_brute_force(budget, rule, granularity):
    cfg = SketchWalkConfig(
        block_size=16,
        decode_rule=rule,
        granularity=granularity,
        sink_blocks=1,
        window_blocks=2,
        **budget,
    )
    # unstructured inputs: spread-out scores, so every budget ranks more than the forced blocks
    _, _, _, _, sels = _run(cfg, t_prefill=200, steps=35, hq=6, hkv=2, structured=False)
    for sel in sels[::5] + sels[-1:]:
        want = _last_row_reference(sel.scores, cfg)
        diff = int((sel.block_mask != want).sum())
        assert diff == 0, f"seq {sel.seq_len}: {diff} blocks differ"
        assert torch.equal(sel.kv_num_blocks, want.sum(-1, dtype=torch.int32))
    nk = sels[-1].block_mask.shape[-1]
    n = sels[-1].kv_num_blocks
    print(f"{rule} {budget}: kept per (batch, group) at {nk} blocks: {n.tolist()}")
    if "top_k_blocks" in budget:
        assert (n == 3 + budget["top_k_blocks"]).all()
    elif budget.get("mass") == 1.0:
        assert (n == nk).all()
    else:
        assert (n > 3).all() and (n < nk).all()  # the budget ranked some blocks, not all
    if budget.get("allocation") == "global":
        row = select_last_row(sels[-1].scores, cfg.replace(allocation="row"))
        assert torch.equal(n.sum(-1), row.sum((-1, -2), dtype=torch.int32))


@pytest.mark.parametrize(
    "budget", [{"top_k_blocks": 3}, {"kblocks_frac": 0.3}, {"density": 0.3}, {"mass": 0.8}]
)
def test_last_row_selection_is_the_prefill_rule_on_its_last_row(budget):
    """select_last_row on a row equals select_blocks' last row of an nk-block prefill (no
    dense last rows) whose last row holds those scores."""
    nk = 37
    cfg = SketchWalkConfig(dense_last_rows=0, sink_blocks=2, window_blocks=3, **budget)
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(2, 3, nk, nk, generator=gen) ** 3
    prefill = select_blocks(scores, nk * 64, cfg).block_mask[:, :, -1]
    assert torch.equal(select_last_row(scores[:, :, -1], cfg), prefill)


def test_quest_rule_dense_layers_and_batch_rows_are_independent():
    cfg = SketchWalkConfig(decode_rule="quest", block_size=16, dense_layers=1, mass=0.7)
    q, k, _ = make_qkv(3, 8, 2, 150, 16, seed=9)
    both, one = SketchWalkDecoder(cfg), [SketchWalkDecoder(cfg) for _ in range(3)]
    for layer in (0, 1):
        both.prefill(q[:, :, :140], k[:, :, :140], layer)
        for i in range(3):
            one[i].prefill(q[i : i + 1, :, :140], k[i : i + 1, :, :140], layer)
    for s in range(140, 150):
        dense = both.step(q[:, :, s : s + 1], k[:, :, s : s + 1], 0)
        assert dense.block_mask.all() and dense.scores is None
        sel = both.step(q[:, :, s : s + 1], k[:, :, s : s + 1], 1)
        for i in range(3):
            one[i].step(q[i : i + 1, :, s : s + 1], k[i : i + 1, :, s : s + 1], 0)
            alone = one[i].step(q[i : i + 1, :, s : s + 1], k[i : i + 1, :, s : s + 1], 1)
            assert torch.equal(sel.block_mask[i : i + 1], alone.block_mask)
    assert 0 < sel.density < 1


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["quest", "walk", "quest_graph"])
@pytest.mark.parametrize(
    "budget", [{"top_k_blocks": 4}, {"density": 0.3, "allocation": "global"}, {"mass": 0.8}]
)
def test_decode_on_cuda_matches_cpu_without_host_sync(rule, budget):
    """Decode steps on CUDA select what the CPU selects, and after the first step of a layer
    make no synchronising call (new blocks opening included)."""
    graphs = rule.endswith("_graph")  # the quest step captured in a CUDA graph (row budgets)
    cfg = SketchWalkConfig(
        block_size=32, decode_rule=rule.removesuffix("_graph"), granularity="kv_group",
        dense_layers=0, **budget,
    )  # fmt: skip
    q, k, _ = make_qkv(2, 8, 2, 1000 + 80, 64, seed=5, structured=False)
    cpu, gpu = SketchWalkDecoder(cfg), SketchWalkDecoder(cfg, cuda_graphs=graphs)
    cpu.prefill(q[:, :, :1000], k[:, :, :1000], 0)
    qc, kc = q.cuda(), k.cuda()
    gpu.prefill(qc[:, :, :1000], kc[:, :, :1000], 0)
    differ = total = 0
    for s in range(1000, 1080):
        a = cpu.step(q[:, :, s : s + 1], k[:, :, s : s + 1], 0)
        if s > 1000:
            torch.cuda.set_sync_debug_mode("error")
        try:
            b = gpu.step(qc[:, :, s : s + 1], kc[:, :, s : s + 1], 0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        differ += int((a.block_mask != b.block_mask.cpu()).sum())
        total += a.block_mask.numel()
    print(f"{rule} {budget}: {differ} of {total} blocks differ CPU vs CUDA")
    assert differ <= total * 2e-3


@pytest.mark.parametrize("granularity", ["layer", "kv_group", "head"])
@pytest.mark.parametrize(
    "budget",
    [{"top_k_blocks": 3}, {"density": 0.3}, {"kblocks_frac": 0.25}, {"density": 0.05}],
)
def test_fast_quest_step_equals_the_reference(granularity, budget):
    """The fast decode path (log-space scores, +inf bias on forced blocks, one topk, host-side
    counts) keeps exactly the blocks of the reference (quest_block_scores + select_last_row),
    over steps that open new blocks and grow the bound buffers past their first capacity."""
    cfg = SketchWalkConfig(
        decode_rule="quest",
        block_size=16,
        granularity=granularity,
        sink_blocks=1,
        window_blocks=2,
        dense_last_rows=0,
        dense_layers=0,
        **budget,
    )
    t0, steps = 70, 150
    q, k, _ = make_qkv(2, 6, 2, t0 + steps, 16, seed=11, structured=False)
    fast, ref = SketchWalkDecoder(cfg, fast=True), SketchWalkDecoder(cfg, fast=False)
    for dec in (fast, ref):
        dec.prefill(q[:, :, :t0], k[:, :, :t0], 0)
    for s in range(t0, t0 + steps):
        a = fast.step(q[:, :, s : s + 1], k[:, :, s : s + 1], 0)
        b = ref.step(q[:, :, s : s + 1], k[:, :, s : s + 1], 0)
        assert torch.equal(a.block_mask, b.block_mask), f"step {s}"
        assert torch.equal(a.kv_num_blocks, b.kv_num_blocks)
        assert a.density == pytest.approx(b.density, abs=1e-12)
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-7)
        kept = a.kv_indices[..., : a.kv_indices.shape[-1]].sort(-1).values
        want = b.kv_indices[..., : kept.shape[-1]]
        assert torch.equal(kept, want)  # the same block list, in another order
    assert torch.equal(fast._layers[0].key_min, ref._layers[0].key_min)
    assert torch.equal(fast._layers[0].key_max, ref._layers[0].key_max)


def test_fast_quest_bounds_survive_buffer_growth():
    """Bounds kept in a capacity buffer grown by doubling equal the one-pass bounds."""
    from sketchwalk.selection.quest import block_key_bounds

    cfg = SketchWalkConfig(decode_rule="quest", block_size=4, top_k_blocks=2, dense_layers=0)
    q, k, _ = make_qkv(1, 4, 2, 8 + 400, 8, seed=2)
    dec = SketchWalkDecoder(cfg)
    dec.prefill(q[:, :, :8], k[:, :, :8], 0)
    capacity = dec._layers[0].min_buffer.shape[2]
    for s in range(8, 408):
        dec.step(q[:, :, s : s + 1], k[:, :, s : s + 1], 0)
    st = dec._layers[0]
    assert st.min_buffer.shape[2] > capacity  # it grew
    want_min, want_max = block_key_bounds(k, 4)
    assert torch.equal(st.key_min, want_min) and torch.equal(st.key_max, want_max)


def test_sparse_decode_takes_kept_blocks_in_any_order():
    q, k, v = make_qkv(2, 4, 2, 200, 16, seed=4, structured=False)
    qt = q[:, :, -1:]
    idx = torch.tensor([[[0, 5, 12, 7], [3, 1, 12, 9]]] * 2, dtype=torch.int32)
    num = torch.full((2, 2), 4, dtype=torch.int32)
    ordered = sparse_decode(qt, k, v, num, idx.sort(-1).values, 16)
    shuffled = sparse_decode(qt, k, v, num, idx, 16)
    torch.testing.assert_close(shuffled, ordered)


@pytest.mark.parametrize("granularity", ["layer", "kv_group", "head"])
@pytest.mark.parametrize("budget", [{"density": 0.3}, {"top_k_blocks": 3}, {"density": 0.05}])
def test_static_quest_step_equals_the_fast_path(granularity, budget):
    """The static-shape quest step (the body a CUDA graph captures; run eagerly on the CPU)
    keeps the fast path's blocks, with the same counts and scores, over steps that open new
    blocks and grow the buffers past their first capacity (the body is rebuilt there)."""
    cfg = SketchWalkConfig(
        decode_rule="quest", block_size=16, granularity=granularity, sink_blocks=1,
        window_blocks=2, dense_last_rows=0, dense_layers=0, **budget,
    )  # fmt: skip
    t0, steps = 70, 1100  # 5 blocks, capacity 69: grown once
    q, k, _ = make_qkv(2, 6, 2, t0 + steps, 16, seed=12, structured=False)
    static = SketchWalkDecoder(cfg, cuda_graphs=True)
    fast = SketchWalkDecoder(cfg)
    for dec in (static, fast):
        dec.prefill(q[:, :, :t0], k[:, :, :t0], 0)
    capacity = static._layers[0].min_buffer.shape[2]
    for s in range(t0, t0 + steps):
        a = static.step(q[:, :, s : s + 1], k[:, :, s : s + 1], 0)
        b = fast.step(q[:, :, s : s + 1], k[:, :, s : s + 1], 0)
        if s % 37 and s != t0 + steps - 1 and s % 16:
            continue
        assert torch.equal(a.block_mask, b.block_mask), f"step {s}"
        assert torch.equal(a.kv_num_blocks, b.kv_num_blocks)
        assert a.density == b.density
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-7)
    st = static._layers[0]
    assert st.min_buffer.shape[2] > capacity
    assert int(st.static.pos) == st.seq_len == t0 + steps
    assert torch.equal(st.key_min, fast._layers[0].key_min)
    assert torch.equal(st.key_max, fast._layers[0].key_max)


# ---- decode_pin_blocks: the prompt's question rows pin blocks for every decode step ---------


def _pin_cfg(granularity="kv_group", **budget):
    budget = budget or {"density": 0.3}
    return SketchWalkConfig(
        decode_rule="quest", block_size=16, granularity=granularity, sink_blocks=1,
        window_blocks=2, dense_last_rows=0, dense_layers=0, query_tokens=20,
        decode_pin_blocks=3, **budget,
    )  # fmt: skip


@pytest.mark.parametrize("granularity", ["layer", "kv_group", "head"])
def test_pins_are_the_blocks_the_last_prompt_rows_attend_to_most(granularity):
    from sketchwalk.selection.query_rows import query_row_scores

    cfg = _pin_cfg(granularity)
    t = 16 * 12 + 5  # a partial last block: exact_rows covers the last 20 tokens -> 2 rows
    q, k, _ = make_qkv(2, 6, 2, t, 16, seed=3, structured=False)
    dec = SketchWalkDecoder(cfg)
    dec.prefill(q, k, 0)
    pinned = dec._layers[0].pin_bias > 0  # (B, G, capacity)
    groups = {"layer": 1, "kv_group": 2, "head": 6}[granularity]
    assert cfg.exact_rows(t) == 2
    want = query_row_scores(q, k, 2, 16, groups, backend="reference").sum(dim=2)
    for b in range(2):
        for g in range(groups):
            got = set(pinned[b, g].nonzero().flatten().tolist())
            best = set(want[b, g].topk(3).indices.tolist())
            assert got == best
    # no exact rows configured: the last prompt row pins
    one = SketchWalkDecoder(cfg.replace(query_tokens=0, query_rows=0))
    one.prefill(q, k, 0)
    want1 = query_row_scores(q, k, 1, 16, groups, backend="reference")[:, :, 0]
    got1 = one._layers[0].pin_bias > 0
    assert torch.equal(got1[..., :13].float().topk(3).indices.sort(-1).values,
                       want1.topk(3).indices.sort(-1).values)  # fmt: skip


@pytest.mark.parametrize("path", ["fast", "reference", "static"])
@pytest.mark.parametrize("budget", [{"density": 0.3}, {"top_k_blocks": 4}])
def test_pinned_blocks_are_kept_at_every_step_inside_the_budget(path, budget):
    cfg = _pin_cfg(**budget)
    t0, steps = 16 * 30 + 3, 120  # 31 blocks: the budget holds the forced blocks and the pins
    nb0 = 31
    q, k, _ = make_qkv(1, 6, 2, t0 + steps, 16, seed=5, structured=False)

    def make(c):
        return SketchWalkDecoder(c, fast=path != "reference", cuda_graphs=path == "static")

    pins, plain = make(cfg), make(cfg.replace(decode_pin_blocks=0))
    for dec in (pins, plain):
        dec.prefill(q[:, :, :t0], k[:, :, :t0], 0)
    pinned0 = pins._layers[0].pin_bias[..., :nb0] > 0
    changed = False
    for s in range(t0, t0 + steps):
        a = pins.step(q[:, :, s : s + 1], k[:, :, s : s + 1], 0)
        b = plain.step(q[:, :, s : s + 1], k[:, :, s : s + 1], 0)
        assert torch.equal(a.kv_num_blocks, b.kv_num_blocks)  # the same budget
        nk = a.block_mask.shape[-1]
        pinned = torch.zeros_like(a.block_mask)
        pinned[..., :nb0] = pinned0
        assert bool((a.block_mask | ~pinned).all()), f"step {s}: a pinned block was dropped"
        sink, window = forced_counts(nk, cfg)
        assert bool(a.block_mask[..., :sink].all()) and bool(a.block_mask[..., nk - window :].all())
        changed |= not torch.equal(a.block_mask, b.block_mask)
    assert changed  # the pins changed the selection somewhere


@pytest.mark.parametrize("t0", [16 * 40, 16 * 25])  # the budget holds the pins / only two
def test_pins_agree_across_the_decode_paths(t0):
    """Reference, fast and static steps keep the same blocks, also when the ranked budget is
    smaller than the pins (the question's best pins first)."""
    cfg = _pin_cfg(density=0.25)
    steps = 90
    q, k, _ = make_qkv(2, 6, 2, t0 + steps, 16, seed=8, structured=False)
    decs = [SketchWalkDecoder(cfg, fast=False), SketchWalkDecoder(cfg),
            SketchWalkDecoder(cfg, cuda_graphs=True)]  # fmt: skip
    for dec in decs:
        dec.prefill(q[:, :, :t0], k[:, :, :t0], 0)
    for s in range(t0, t0 + steps):
        masks = [d.step(q[:, :, s : s + 1], k[:, :, s : s + 1], 0).block_mask for d in decs]
        assert torch.equal(masks[0], masks[1]) and torch.equal(masks[1], masks[2]), f"step {s}"


def test_pins_are_added_to_a_mass_budget():
    cfg = _pin_cfg(mass=0.5)
    t0 = 100
    q, k, _ = make_qkv(1, 6, 2, t0 + 10, 16, seed=9, structured=False)
    pins, plain = SketchWalkDecoder(cfg), SketchWalkDecoder(cfg.replace(decode_pin_blocks=0))
    for dec in (pins, plain):
        dec.prefill(q[:, :, :t0], k[:, :, :t0], 0)
    for s in range(t0, t0 + 10):
        a = pins.step(q[:, :, s : s + 1], k[:, :, s : s + 1], 0)
        b = plain.step(q[:, :, s : s + 1], k[:, :, s : s + 1], 0)
        nk = a.block_mask.shape[-1]
        pinned = pins._layers[0].pin_bias[..., :nk] > 0
        assert torch.equal(a.block_mask, b.block_mask | pinned)


def test_pins_keep_the_block_the_question_found_when_the_bound_ranks_it_low():
    """A key block that only the prompt's question matches: decode queries that do not look
    for it leave it out under the bound alone; the pins keep it at every step."""
    torch.manual_seed(0)
    bs, t0, d = 16, 16 * 20, 16
    q = torch.randn(1, 2, t0 + 8, d) * 0.1
    k = torch.randn(1, 1, t0 + 8, d) * 0.1
    direction = torch.zeros(d)
    direction[0] = 1.0
    k[0, 0, 5 * bs + 3] = 6.0 * direction  # the needle, in block 5
    q[0, :, t0 - 10 : t0] = 6.0 * direction  # the question looks for it
    cfg = SketchWalkConfig(
        decode_rule="quest", block_size=bs, granularity="layer", sink_blocks=1,
        window_blocks=2, dense_last_rows=0, dense_layers=0, top_k_blocks=2,
        query_tokens=10, decode_pin_blocks=1,
    )  # fmt: skip
    pins, plain = SketchWalkDecoder(cfg), SketchWalkDecoder(cfg.replace(decode_pin_blocks=0))
    for dec in (pins, plain):
        dec.prefill(q[:, :, :t0], k[:, :, :t0], 0)
    for s in range(t0, t0 + 8):
        q[0, :, s] = -6.0 * direction  # answer tokens whose bound ranks block 5 low
        a = pins.step(q[:, :, s : s + 1], k[:, :, s : s + 1], 0)
        b = plain.step(q[:, :, s : s + 1], k[:, :, s : s + 1], 0)
        assert bool(a.block_mask[0, 0, 5]) and not bool(b.block_mask[0, 0, 5])


def test_decode_pin_blocks_validation():
    with pytest.raises(ValueError, match="decode_pin_blocks"):
        SketchWalkConfig(decode_pin_blocks=-1)
    with pytest.raises(ValueError, match=r"decode_pin_blocks.*quest"):
        SketchWalkConfig(decode_pin_blocks=2, decode_rule="walk")
