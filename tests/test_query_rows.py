"""Query-aware last rows (SketchWalkConfig.query_rows): exact scores against a brute force, and
SketchWalk's selection with them against the walk's selection and the oracle's ranking."""

from __future__ import annotations

import math

import pytest
import torch

from sketchwalk import SketchWalk, SketchWalkConfig
from sketchwalk.blocks import num_blocks
from sketchwalk.selection.baselines import OracleSelector
from sketchwalk.selection.query_rows import query_row_scores
from sketchwalk.testing import make_qkv


def brute_force_rows(q, k, rows, block_size, groups):
    """Per (batch, head, query) the full causal softmax, summed per key block, averaged over
    the row's queries and the group's heads, in float64, one query at a time."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    nb = num_blocks(s, block_size)
    out = torch.zeros(b, hq, rows, nb, dtype=torch.float64)
    count = torch.zeros(rows, dtype=torch.float64)
    for pos in range(s - t, s):
        r = pos // block_size - (nb - rows)
        if r < 0:
            continue
        count[r] += 1
        for h in range(hq):
            qv = q[:, h, pos - (s - t)].double()
            kv = k[:, h // (hq // hkv), : pos + 1].double()
            p = torch.softmax(qv[:, None, :] @ kv.transpose(-1, -2) / math.sqrt(d), dim=-1)[:, 0]
            for j in range(nb):
                out[:, h, r, j] += p[:, j * block_size : (j + 1) * block_size].sum(-1)
    out /= count.clamp_min(1)[:, None]
    return out.view(b, groups, hq // groups, rows, nb).mean(2)


@pytest.mark.parametrize(
    ("hq", "hkv", "t", "rows", "granularity"),
    [(4, 1, 100, 2, "kv_group"), (4, 4, 64, 1, "head"), (8, 2, 150, 3, "layer"),
     (2, 2, 40, 1, "kv_group"), (8, 1, 130, 3, "kv_group")],
)  # fmt: skip
def test_query_row_scores_match_brute_force(hq, hkv, t, rows, granularity):
    q, k, _ = make_qkv(2, hq, hkv, t, 16, seed=t + rows)
    groups = {"layer": 1, "kv_group": hkv, "head": hq}[granularity]
    got = query_row_scores(q, k, rows, 32, groups)
    want = brute_force_rows(q, k, rows, 32, groups)
    err = (got.double() - want).abs().max().item()
    print(f"max abs error {err:.2e}")
    assert got.shape == want.shape
    assert err < 1e-5
    # each query's masses sum to 1 over its causal blocks
    assert torch.allclose(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-5)


def test_query_row_scores_of_a_chunk():
    """Queries at the end of longer keys: rows partly before the chunk use the queries it has."""
    q, k, _ = make_qkv(1, 4, 2, 200, 16, seed=3)
    chunk = q[:, :, 170:]  # 30 queries: all of row 6 (192..199) and part of row 5 (160..191)
    got = query_row_scores(chunk, k, 2, 32, 2)
    want = brute_force_rows(chunk, k, 2, 32, 2)
    assert (got.double() - want).abs().max() < 1e-5
    # a row with none of its queries in the chunk scores zero
    tail = query_row_scores(q[:, :, 195:], k, 2, 32, 2)
    assert torch.count_nonzero(tail[:, :, 0]) == 0


def test_query_row_scores_rejects_bad_rows():
    q, k, _ = make_qkv(1, 2, 1, 64, 8)
    with pytest.raises(ValueError, match="rows must be"):
        query_row_scores(q, k, 3, 32, 1)
    with pytest.raises(ValueError, match="rows must be"):
        query_row_scores(q, k, 0, 32, 1)


@pytest.mark.parametrize("granularity", ["layer", "kv_group", "head"])
@pytest.mark.parametrize("t", [16 * 40, 16 * 40 - 7])
def test_sketchwalk_query_rows_rank_like_the_oracle(granularity, t):
    """The last rows keep the oracle's choice at the same budget; the others the walk's; the
    walk state carried to the next layer is unchanged."""
    cfg = SketchWalkConfig.preset("default", granularity=granularity, density=0.3,
                                  dense_layers=0, block_size=16, query_rows=0,
                                  query_tokens=0)  # fmt: skip
    rows = 3
    walk_only, with_rows = SketchWalk(cfg), SketchWalk(cfg.replace(query_rows=rows))
    oracle = OracleSelector(cfg)
    nb = num_blocks(t, 16)
    for layer in range(3):
        q, k, _ = make_qkv(1, 8, 2, t, 32, seed=10 * layer + t)
        a = walk_only.select(q, k, layer)
        b = with_rows.select(q, k, layer)
        o = oracle.select(q, k, layer)
        assert torch.equal(a.block_mask[:, :, : nb - rows], b.block_mask[:, :, : nb - rows])
        assert torch.equal(b.block_mask[:, :, nb - rows :], o.block_mask[:, :, nb - rows :])
        assert torch.equal(a.kv_num_blocks, b.kv_num_blocks)  # same budget per row
        assert torch.equal(walk_only.walk_state, with_rows.walk_state)
    # the test means something only if the walk and the oracle disagree on some last row
    assert not torch.equal(a.block_mask[:, :, nb - rows :], o.block_mask[:, :, nb - rows :])


def test_select_chunk_with_query_rows_equals_one_shot():
    cfg = SketchWalkConfig.preset("default", density=0.3, dense_layers=1, query_rows=2)
    t, cut = 64 * 9 + 5, 64 * 5 + 17
    one, chunked = SketchWalk(cfg), SketchWalk(cfg)
    chunked.keep_queries = True
    inputs = [make_qkv(1, 4, 2, t, 32, seed=layer)[:2] for layer in range(3)]
    fulls = [one.select(q, k, layer) for layer, (q, k) in enumerate(inputs)]
    for layer, (q, k) in enumerate(inputs):
        chunked.select(q[:, :, :cut], k[:, :, :cut], layer)
    for layer, (q, k) in enumerate(inputs):
        part = chunked.select_chunk(q[:, :, cut:], k, layer)
        rows = part.block_mask.shape[2]
        assert torch.equal(part.block_mask, fulls[layer].block_mask[:, :, -rows:])


def test_query_rows_flag_validation():
    with pytest.raises(ValueError, match="query_rows"):
        SketchWalkConfig(query_rows=-1)
    with pytest.raises(ValueError, match="query_rows"):
        SketchWalkConfig(query_rows=1.5)
    with pytest.raises(ValueError, match="query_tokens"):
        SketchWalkConfig(query_tokens=-3)


def test_exact_rows_cover_the_last_query_tokens():
    """``exact_rows``: the rows holding any of the last query_tokens tokens, counted token by
    token, at least query_rows, at most every row."""
    for t in (1, 15, 16, 17, 100, 128, 129, 640, 633):
        for rows in (0, 1, 2, 5):
            for tokens in (0, 1, 16, 17, 40, 128, 1000):
                cfg = SketchWalkConfig(block_size=16, query_rows=rows, query_tokens=tokens)
                holding = {pos // 16 for pos in range(max(0, t - tokens), t)}
                nb = num_blocks(t, 16)
                assert holding == set(range(nb - len(holding), nb))  # trailing rows
                assert cfg.exact_rows(t) == min(nb, max(rows, len(holding))), (t, rows, tokens)
    # the default preset: two rows on block-aligned prompts, three when the last block is partial
    d = SketchWalkConfig.preset("default")
    assert (d.exact_rows(64 * 500), d.exact_rows(64 * 500 + 1), d.exact_rows(64 * 500 - 7)) == (
        2, 3, 3,
    )  # fmt: skip


@pytest.mark.parametrize("t", [16 * 40, 16 * 40 - 7, 16 * 40 + 3])
def test_query_tokens_rank_the_rows_that_hold_them(t):
    """SketchWalk with query_tokens selects as with query_rows = exact_rows(T), its own rows
    and no others exact (a query chunk: test_select_chunk_with_query_rows_equals_one_shot)."""
    base = SketchWalkConfig.preset("default", density=0.3, dense_layers=1, block_size=16,
                                   query_rows=1, query_tokens=0)  # fmt: skip
    by_tokens = base.replace(query_tokens=40)
    rows = by_tokens.exact_rows(t)
    assert rows == num_blocks(t, 16) - (t - 40) // 16 and rows > 1
    a, b = SketchWalk(base.replace(query_rows=rows)), SketchWalk(by_tokens)
    fewer = SketchWalk(base)
    differs = False
    for layer in range(3):
        q, k, _ = make_qkv(1, 8, 2, t, 32, seed=layer + t)
        sa, sb, sf = a.select(q, k, layer), b.select(q, k, layer), fewer.select(q, k, layer)
        assert torch.equal(sa.block_mask, sb.block_mask)
        differs |= not torch.equal(sb.block_mask, sf.block_mask)
    assert differs  # the extra exact rows change the selection somewhere


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["layer", "kv_group"])
def test_query_rows_cuda_graph_equals_eager(granularity):
    """The graphed selection takes the exact rows as a graph input: same masks and walk state
    as the eager path, also on replays (second round)."""
    cfg = SketchWalkConfig.preset("default", granularity=granularity, density=0.2,
                                  dense_layers=1, query_rows=2)  # fmt: skip
    for t in (3000, 4100):
        layers = [make_qkv(1, 8, 2, t, 64, seed=7 * t + s, device="cuda")[:2] for s in range(4)]
        graphed, eager = SketchWalk(cfg), SketchWalk(cfg, cuda_graphs=False)
        plain = SketchWalk(cfg.replace(query_rows=0), cuda_graphs=False)
        for _ in range(2):
            for sw in (graphed, eager, plain):
                sw.reset()
            for i, (q, k) in enumerate(layers):
                a, b = graphed.select(q, k, i), eager.select(q, k, i)
                plain.select(q, k, i)
                assert torch.equal(a.block_mask, b.block_mask)
                assert torch.equal(a.kv_num_blocks, b.kv_num_blocks)
                if i >= cfg.dense_layers:
                    assert torch.equal(graphed.walk_state, eager.walk_state)
                    assert torch.equal(graphed.walk_state, plain.walk_state)
        assert graphed.transition_backend == "triton"


def test_recent_decode_rule_keeps_the_sink_and_the_latest_blocks():
    """decode_rule="recent" (the streaming baseline's decode): the sink plus the most recent
    blocks under the budget, whatever the queries; StreamingSelector decodes with it."""
    from sketchwalk.selection.baselines import StreamingSelector
    from sketchwalk.selection.decode import SketchWalkDecoder

    cfg = SketchWalkConfig.preset("default", density=0.4, dense_layers=0, block_size=16)
    assert StreamingSelector(cfg).config.decode_rule == "recent"
    dec = SketchWalkDecoder(cfg.replace(decode_rule="recent"))
    q, k, _ = make_qkv(2, 4, 2, 16 * 40 + 3, 16, seed=4)
    dec.prefill(q, k, 0)
    for step in range(3):
        qt, kt, _ = make_qkv(2, 4, 2, 1, 16, seed=50 + step)
        sel = dec.step(qt, kt, 0)
        mask = sel.block_mask  # (B, G, nk)
        nk = mask.shape[-1]
        kept = int(mask[0, 0].sum())
        assert 3 < kept < nk
        want = torch.zeros(nk, dtype=torch.bool)
        want[:1] = True  # one sink block
        want[nk - (kept - 1) :] = True  # then the latest ones
        assert torch.equal(mask, want.expand_as(mask))


@pytest.mark.parametrize("t", [64 * 300, 64 * 300 - 20])
def test_query_rows_budget_gives_the_exact_rows_more_at_the_same_density(t):
    """query_rows_budget f: the exact rows keep about f times an ordinary row's share (capped
    at their causal blocks), the other rows give it back so the overall density stays the
    target; f = 1 is the budget of before; count budgets are multiplied; decode rows and the
    mass budget are untouched."""
    from sketchwalk.selection.select import (
        forced_per_row,
        last_row_ranked,
        ranked_per_row,
        select_blocks,
        tail_rows_of,
    )

    base = SketchWalkConfig.preset("default", density=0.1, dense_layers=0)
    boosted = base.replace(query_rows_budget=4.0)
    nb = num_blocks(t, 64)
    rows = boosted.exact_rows(t)
    assert tail_rows_of(t, base) == 0 and tail_rows_of(t, boosted) == rows >= 2
    before = ranked_per_row(nb, base)
    after = ranked_per_row(nb, boosted, rows)
    assert torch.equal(ranked_per_row(nb, boosted, 0), before)  # no tail rows: unchanged
    forced = forced_per_row(nb, base)
    causal = torch.arange(1, nb + 1)
    kept_before, kept_after = (before + forced).sum(), (after + forced).sum()
    assert abs(int(kept_after) - int(kept_before)) <= nb // 10  # the same overall density
    tail = slice(nb - rows, nb)
    assert (after[tail] + forced[tail] >= 3.5 * (before[tail] + forced[tail])).all()
    assert (after[: nb - rows] <= before[: nb - rows]).all()  # the others give it back
    assert (after + forced <= causal).all()
    # through select_blocks: realized density at the target, tail rows larger
    scores = torch.rand(1, 2, nb, nb, generator=torch.Generator().manual_seed(0))
    a, b = select_blocks(scores, t, base), select_blocks(scores, t, boosted)
    assert b.density == pytest.approx(a.density, abs=0.002)
    assert (b.kv_num_blocks[..., tail] > 3 * a.kv_num_blocks[..., tail]).all()
    # count budgets are multiplied, decode rows keep theirs, mass is untouched
    topk = SketchWalkConfig.preset("default", top_k_blocks=5, query_rows_budget=3)
    assert ranked_per_row(nb, topk, 2)[-2:].tolist() == [15, 15]
    assert ranked_per_row(nb, topk, 2)[-3] == 5
    assert last_row_ranked(nb, boosted) == last_row_ranked(nb, base)
    assert tail_rows_of(t, boosted.replace(density=None, mass=0.9)) == 0
    with pytest.raises(ValueError, match="query_rows_budget"):
        SketchWalkConfig(query_rows_budget=0.5)
