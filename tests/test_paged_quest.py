"""Quest decode selection over a paged cache with per-page key bounds
(`sketchwalk.selection.paged_quest`) against per-sequence recomputation and `SketchWalkDecoder`."""

from __future__ import annotations

import pytest
import torch

from sketchwalk import SketchWalkConfig
from sketchwalk.selection.decode import SketchWalkDecoder
from sketchwalk.selection.paged_quest import PagedDecodePlan, PageKeyBounds, paged_quest_select

HKV, D = 2, 16


def _write(k_pages, bounds, keys, slots):
    """What an engine does: write the keys at their slots, then fold them into the bounds."""
    keep = slots >= 0
    page_size = k_pages.shape[1]
    k_pages[slots[keep] // page_size, slots[keep] % page_size] = keys[keep]
    bounds.update(keys, slots)


def _slots(table_row, start, stop, page_size):
    pos = torch.arange(start, stop)
    return table_row.long()[pos // page_size] * page_size + pos % page_size


def _expected_bounds(k_pages, table_row, seq_len):
    """Per logical block of one sequence, min and max over its written tokens."""
    page_size = k_pages.shape[1]
    out_lo, out_hi = [], []
    for j in range(-(-seq_len // page_size)):
        n = min(page_size, seq_len - j * page_size)
        keys = k_pages[int(table_row[j]), :n]
        out_lo.append(keys.amin(0))
        out_hi.append(keys.amax(0))
    return torch.stack(out_lo), torch.stack(out_hi)


def test_page_bounds_follow_writes_page_reuse_and_padding():
    """Chunks whose edges fall inside pages, a padded slot, and a page that a second sequence
    takes over after the first one freed it (its old, larger keys must be forgotten)."""
    g = torch.Generator().manual_seed(0)
    page, num_pages = 8, 12
    # the pool starts as garbage: bounds made now are only an upper bound of it
    k_pages = torch.randn(num_pages, page, HKV, D, generator=g) * 100
    bounds = PageKeyBounds(k_pages)
    table_a = torch.randperm(num_pages, generator=g)[:5].to(torch.int32)
    keys_a = torch.randn(37, HKV, D, generator=g) * 10
    for start, stop in ((0, 13), (13, 14), (14, 30), (30, 37)):
        slots = _slots(table_a, start, stop, page)
        if stop - start > 2:  # a padded token in the flattened batch
            slots = torch.cat([slots, torch.tensor([-1])])
            keys = torch.cat([keys_a[start:stop], torch.full((1, HKV, D), 1e6)])
        else:
            keys = keys_a[start:stop]
        _write(k_pages, bounds, keys, slots)
    lo, hi = _expected_bounds(k_pages, table_a, 37)
    assert torch.equal(bounds.key_min[table_a[:5].long()], lo)
    assert torch.equal(bounds.key_max[table_a[:5].long()], hi)
    # sequence A is freed; B reuses two of its pages, with small keys, in another order
    table_b = torch.stack([table_a[3], table_a[0]]).to(torch.int32)
    keys_b = torch.randn(11, HKV, D, generator=g) * 0.1
    _write(k_pages, bounds, keys_b, _slots(table_b, 0, 11, page))
    lo, hi = _expected_bounds(k_pages, table_b, 11)
    assert torch.equal(bounds.key_min[table_b.long()], lo)
    assert torch.equal(bounds.key_max[table_b.long()], hi)
    assert float(bounds.key_max[table_b.long()].abs().max()) < 1.0  # A's keys are gone
    assert bounds.matches(k_pages)
    assert not bounds.matches(k_pages[:, :4])


def test_page_bounds_start_from_the_pool_and_reject_bad_shapes():
    k_pages = torch.randn(3, 4, HKV, D)
    bounds = PageKeyBounds(k_pages)
    torch.testing.assert_close(bounds.key_min[:3], k_pages.amin(1))
    with pytest.raises(ValueError, match="num_pages, page_size"):
        PageKeyBounds(k_pages[0])


BUDGETS = [
    {"top_k_blocks": 3},
    {"density": 0.3},
    {"kblocks_frac": 0.25},
    {"density": 0.05},
    {"mass": 0.6},
    {"density": 0.3, "allocation": "global"},
]


@pytest.mark.parametrize("granularity", ["layer", "kv_group", "head"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_paged_selection_equals_the_decoder_per_sequence(granularity, budget):
    """Rows of different lengths (a partial last page, one exactly full, one with a single
    token in its last page), pages shuffled: each row keeps the blocks `SketchWalkDecoder`
    (reference path) keeps after a prefill of all but the last token and a step with it."""
    page, hq = 16, 6
    cfg = SketchWalkConfig(
        decode_rule="quest", block_size=page, granularity=granularity, sink_blocks=1,
        window_blocks=2, dense_last_rows=0, dense_layers=0, **budget,
    )  # fmt: skip
    g = torch.Generator().manual_seed(5)
    lens = [150, 96, 65, 200]
    max_pages = 14
    num_pages = len(lens) * max_pages + 2
    k_pages = torch.zeros(num_pages, page, HKV, D)
    bounds = PageKeyBounds(k_pages)
    table = torch.randperm(num_pages, generator=g)[: len(lens) * max_pages]
    table = table.view(len(lens), max_pages).to(torch.int32)
    qs, ks = [], []
    for b, s in enumerate(lens):
        k = torch.randn(s, HKV, D, generator=g) * 2
        k[s // 3] *= 6  # a needle-like key in an early block
        qb = torch.randn(hq, D, generator=g)
        # the current token's key matches one head per group: that head's softmax mass sits in
        # the last block, whose weight (its token count) then moves the group's ranking
        k[-1] = qb[:: hq // HKV] * 3
        _write(k_pages, bounds, k, _slots(table[b], 0, s, page))
        ks.append(k)
        qs.append(qb)
    q = torch.stack(qs)
    plan = PagedDecodePlan.build(lens, table, cfg)
    num, idx = paged_quest_select(q, bounds, plan, cfg)
    assert num.dtype == idx.dtype == torch.int32
    for b, s in enumerate(lens):
        dec = SketchWalkDecoder(cfg, fast=False)
        kb = ks[b].transpose(0, 1)[None]  # (1, Hkv, s, D)
        dec.prefill(torch.zeros(1, hq, s - 1, D), kb[:, :, :-1], 0)
        want = dec.step(q[b][None, :, None], kb[:, :, -1:], 0)
        nk = -(-s // page)
        got = torch.zeros(want.block_mask.shape[1], nk, dtype=torch.bool)
        for grp in range(got.shape[0]):
            n = int(num[b, grp])
            got[grp, idx[b, grp, :n].long()] = True
            assert n == int(got[grp].sum())  # no block twice
        assert torch.equal(got, want.block_mask[0]), f"row {b} (len {s})"


def test_paged_selection_keeps_a_needle_in_a_prefix_shared_page():
    """Two requests share their first pages (prefix caching: written once); the second row's
    query points at a key in a shared page: kept, from bounds nobody rewrote."""
    page, hq = 16, 4
    cfg = SketchWalkConfig(decode_rule="quest", block_size=page, top_k_blocks=1, sink_blocks=1,
                           window_blocks=1, dense_layers=0, dense_last_rows=0)  # fmt: skip
    g = torch.Generator().manual_seed(2)
    k_pages = torch.zeros(20, page, HKV, D)
    bounds = PageKeyBounds(k_pages)
    shared = [7, 3, 11, 5]
    table = torch.tensor([[*shared, 0, 1, 2], [*shared, 9, 13, 17]], dtype=torch.int32)
    keys = torch.randn(112, HKV, D, generator=g) * 0.1
    needle = torch.randn(HKV, D, generator=g)
    keys[40] = needle * 5  # logical block 2: page 11, shared
    _write(k_pages, bounds, keys, _slots(table[0], 0, 112, page))
    other = torch.randn(112 - 64, HKV, D, generator=g) * 0.1
    _write(k_pages, bounds, other, _slots(table[1], 64, 112, page))
    q = torch.randn(2, hq, D, generator=g) * 0.1
    q[1] = needle.repeat_interleave(hq // HKV, dim=0) * 3
    plan = PagedDecodePlan.build([112, 112], table, cfg)
    num, idx = paged_quest_select(q, bounds, plan, cfg)
    kept = set(idx[1, 0, : int(num[1, 0])].tolist())
    assert 2 in kept, kept


def test_plan_errors():
    cfg = SketchWalkConfig(decode_rule="quest", block_size=16, top_k_blocks=2)
    table = torch.zeros(1, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="needs 4 pages"):
        PagedDecodePlan.build([60], table, cfg)
    with pytest.raises(ValueError, match="no rows"):
        PagedDecodePlan.build([], table, cfg)
    with pytest.raises(ValueError, match="every row needs a token"):
        PagedDecodePlan.build([0], table, cfg)


# ---- query sums per page: the prefill state of tokens an engine did not run -----------------


def test_page_query_sums_pool_like_block_pool():
    """Queries written in chunks with edges inside pages, a padded slot, a page taken over from
    an earlier owner: after each chunk, the pooled queries of the tokens written equal
    `block_pool` of those queries."""
    from sketchwalk.selection.paged_queries import PageQuerySums
    from sketchwalk.selection.sketch import block_pool

    g = torch.Generator().manual_seed(7)
    page, hq, d, num_pages = 8, 4, 16, 10
    store = PageQuerySums(num_pages, page, hq, d, "cpu")
    old = torch.randn(30, hq, d, generator=g) * 100
    store.update(old, _slots(torch.tensor([2, 5, 6, 9]), 0, 30, page))  # an earlier owner
    table = torch.tensor([5, 1, 2, 8, 0], dtype=torch.int32)
    q = torch.randn(37, hq, d, generator=g)
    for start, stop in ((0, 5), (5, 21), (21, 22), (22, 37)):
        slots = torch.cat([_slots(table, start, stop, page), torch.tensor([-1])])
        store.update(torch.cat([q[start:stop], torch.full((1, hq, d), 1e6)]), slots)
        for parity in (False, True):  # the tokens written so far
            pooled, valid = store.pooled(table, stop, page, parity)
            want = block_pool(q[:stop].transpose(0, 1)[None], page, parity)
            torch.testing.assert_close(pooled, want, rtol=1e-5, atol=1e-5)
            assert bool(valid)
    # page 9 was last written by the old owner, 3 was never written: not trustworthy
    _, valid = store.pooled(torch.tensor([5, 9, 3]), 20, page)
    assert not bool(valid)
    with pytest.raises(ValueError, match="differs from the page size"):
        store.pooled(table, 10, 16)


@pytest.mark.parametrize("granularity", ["layer", "kv_group", "head"])
def test_seeded_chunk_selects_the_one_shot_rows(granularity):
    """A selector seeded with pooled queries from the pages (what a prefix-cache hit gives)
    selects for the rest of the prompt the rows a one-shot prefill selects."""
    from sketchwalk import SketchWalk
    from sketchwalk.selection.paged_queries import PageQuerySums

    page, hq, hkv, d, t, offset, layers = 16, 4, 2, 16, 150, 96, 3
    cfg = SketchWalkConfig(block_size=page, density=0.3, dense_layers=1, granularity=granularity)
    g = torch.Generator().manual_seed(1)
    qs = [torch.randn(1, hq, t, d, generator=g) for _ in range(layers)]
    ks = [torch.randn(1, hkv, t, d, generator=g) for _ in range(layers)]
    table = torch.randperm(12, generator=g)[:10].to(torch.int32)
    stores = []
    for layer in range(layers):  # the earlier request wrote the first 96 tokens' queries
        store = PageQuerySums(12, page, hq, d, "cpu")
        store.update(qs[layer][0, :, :offset].transpose(0, 1), _slots(table, 0, offset, page))
        stores.append(store)
    one_shot, seeded = SketchWalk(cfg), SketchWalk(cfg)
    for layer in range(layers):
        want = one_shot.select(qs[layer], ks[layer], layer)
        pooled, valid = stores[layer].pooled(table, offset, page, cfg.parity)
        assert bool(valid)
        seeded.seed_queries(layer, pooled, offset)
        got = seeded.select_chunk(qs[layer][:, :, offset:], ks[layer], layer)
        nq = got.block_mask.shape[2]
        assert torch.equal(got.block_mask, want.block_mask[:, :, -nq:]), f"layer {layer}"


def test_seed_queries_errors():
    from sketchwalk import SketchWalk

    sw = SketchWalk(SketchWalkConfig(block_size=16))
    with pytest.raises(ValueError, match=r"\(B, Hq, 2, D\)"):
        sw.seed_queries(0, torch.zeros(1, 4, 3, 8), 20)
    with pytest.raises(ValueError, match="float32"):
        sw.seed_queries(0, torch.zeros(1, 4, 2, 8, dtype=torch.float16), 20)
    with pytest.raises(ValueError, match="length must be"):
        sw.seed_queries(0, torch.zeros(1, 4, 2, 8), 0)
