import math
import warnings

import numpy as np
import pytest
import torch

from sketchwalk import BlockSelection, SketchWalk, SketchWalkConfig
from sketchwalk.selection.select import forced_block_mask, forced_counts, select_blocks
from sketchwalk.testing import make_qkv


def _scores(b, g, nb, seed=0):
    return torch.rand(b, g, nb, nb, generator=torch.Generator().manual_seed(seed))


def _check_invariants(sel: BlockSelection, cfg: SketchWalkConfig, nb: int):
    mask = sel.block_mask
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    assert not (mask & ~causal).any(), "selection is not causal"
    sink, window = forced_counts(nb, cfg)
    for i in range(nb):
        assert mask[..., i, i].all(), "diagonal missing"
        assert mask[..., i, : min(sink, i + 1)].all(), "sink missing"
        assert mask[..., i, max(0, i - window + 1) : i + 1].all(), "window missing"
    for i in range(max(0, nb - cfg.dense_last_rows), nb):
        assert mask[..., i, : i + 1].all(), "dense last row is not dense"
    # index form agrees with the mask
    for idx in np.ndindex(*mask.shape[:3]):
        kept = mask[idx].nonzero().flatten().to(torch.int32)
        n = int(sel.kv_num_blocks[idx])
        assert n == len(kept)
        assert torch.equal(sel.kv_indices[idx][:n], kept)
        assert (sel.kv_indices[idx][n:] == 0).all()


@pytest.mark.parametrize("nb", [1, 2, 7, 40])
@pytest.mark.parametrize("top_k", [0, 1, 3])
def test_top_k_keeps_exactly_k_best_ranked_blocks(nb, top_k):
    cfg = SketchWalkConfig(top_k_blocks=top_k)
    scores = _scores(2, 3, nb)
    sel = select_blocks(scores, nb * 64 - 5, cfg)
    _check_invariants(sel, cfg, nb)
    forced = forced_block_mask(nb, cfg, "cpu")
    extra = sel.block_mask & ~forced
    for idx in np.ndindex(2, 3, nb):
        b, g, i = idx
        cands = [j for j in range(i + 1) if not forced[i, j]]
        want = sorted(cands, key=lambda j: -float(scores[b, g, i, j]))[:top_k]
        assert sorted(extra[b, g, i].nonzero().flatten().tolist()) == sorted(want)


@pytest.mark.parametrize("frac", [0.0, 0.125, 0.5, 1.0])
def test_kblocks_frac_keeps_rounded_share_of_candidates(frac):
    nb = 50
    cfg = SketchWalkConfig(kblocks_frac=frac)
    sel = select_blocks(_scores(1, 1, nb, 3), nb * 64, cfg)
    _check_invariants(sel, cfg, nb)
    forced = forced_block_mask(nb, cfg, "cpu")
    extra = (sel.block_mask[0, 0] & ~forced).sum(-1)
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    n_cand = (causal & ~forced).sum(-1)
    assert torch.equal(extra, torch.floor(frac * n_cand.double() + 0.5).long())


@pytest.mark.parametrize("nb", [30, 64, 200])
@pytest.mark.parametrize("density", [0.1, 0.2, 0.3, 0.6])
@pytest.mark.parametrize("last_rows", [0, 4])
def test_density_budget_lands_within_one_block_per_row(nb, density, last_rows):
    cfg = SketchWalkConfig(density=density, dense_last_rows=last_rows, sink=0.01, window=0.01)
    sel = select_blocks(_scores(2, 2, nb, 5), nb * 64, cfg)
    _check_invariants(sel, cfg, nb)
    causal_blocks = nb * (nb + 1) // 2
    forced = int(forced_block_mask(nb, cfg, "cpu").sum())
    target = max(density * causal_blocks, forced)
    kept = sel.kv_num_blocks.sum(-1).double()  # per (batch, group)
    print(f"target {target:.1f} kept {kept.flatten().tolist()} rows {nb}")
    assert ((kept - target).abs() <= nb).all()
    assert abs(sel.density - target / causal_blocks) <= 1.0 / (nb + 1) * 2


def test_density_with_forced_blocks_above_target_keeps_forced_only():
    nb = 10
    cfg = SketchWalkConfig(density=0.05)  # forced (4 dense rows, window, sink) exceed 5%
    with pytest.warns(UserWarning, match=r"density 0\.05 requested .* keep 0\.818 at 10 blocks"):
        sel = select_blocks(_scores(1, 1, nb), nb * 64, cfg)
    assert torch.equal(sel.block_mask[0, 0], forced_block_mask(nb, cfg, "cpu"))


def test_scores_shape_checked():
    with pytest.raises(ValueError, match="scores must be"):
        select_blocks(torch.rand(1, 1, 3, 3), 1000, SketchWalkConfig())


def test_from_mask_rejects_non_bool_and_wrong_blocks():
    with pytest.raises(ValueError, match="bool"):
        BlockSelection.from_mask(torch.ones(1, 1, 2, 2), 64, 128)
    with pytest.raises(ValueError, match="2x2 blocks"):
        BlockSelection.from_mask(torch.ones(1, 1, 3, 3, dtype=torch.bool), 64, 128)


def test_full_selection_density_is_one():
    sel = BlockSelection.full(2, 3, 1000, 64)
    assert sel.density == 1.0
    assert sel.kv_num_blocks[0, 0].tolist() == list(range(1, 17))


# ---- parity with the released arithmetic -------------------------------------------------


def _released_selection(
    layers_qk, block_size=64, frac=0.125, sink=0.025, window=0.05, degree=3, beta=0.25, dense_last=4
):
    """A direct transcription of the released exact-mode prefill as docs/algorithm.md §5 states it,
    with numpy loops: full-block tail divisor, clamp(qb.kb / sqrt(D), -10, 10) logits,
    non-causal softmax, head sum + row-normalise, damped walk carried across layers, per-row
    strictly-greater quantile over the causal blocks outside the `sink`-fraction sink and the
    window band (docs/algorithm.md §1.9, §5.9), then a window-sized sink forced in the final
    mask, dense last rows."""
    masks, state = [], None
    for q, k in layers_qk:
        q, k = q[0].double().numpy(), k[0].double().numpy()  # batch 1: (H, T, D)
        hq, t, d = q.shape
        hkv = k.shape[0]
        nb = math.ceil(t / block_size)
        pad = nb * block_size - t
        qp = np.concatenate([q, np.zeros((hq, pad, d))], 1).reshape(hq, nb, block_size, d)
        kp = np.concatenate([k, np.zeros((hkv, pad, d))], 1).reshape(hkv, nb, block_size, d)
        qb, kb = qp.sum(2) / block_size, kp.sum(2) / block_size
        a = np.zeros((nb, nb))
        for h in range(hq):
            s = np.clip(qb[h] @ kb[h // (hq // hkv)].T / math.sqrt(d), -10, 10)
            p = np.exp(s - s.max(1, keepdims=True))
            a += p / p.sum(1, keepdims=True)
        a /= a.sum(1, keepdims=True)
        st = a if state is None else state
        for _ in range(degree):
            st = (1 - beta) * a + beta * st @ a
        state = st
        w = max(1, round(window * nb))
        s_rank = max(1, round(sink * nb))  # the quantile's sink: the `sink` fraction
        mask = np.zeros((nb, nb), bool)
        for i in range(nb):
            # the final mask forces a window-sized sink ...
            forced = [j for j in range(i + 1) if j < w or j > i - w]
            for j in forced:
                mask[i, j] = True
            # ... but the quantile ranks every causal block outside the `sink`-fraction sink
            # and the window band (blocks in [s_rank, w) shift the threshold)
            cands = [j for j in range(i + 1) if not (j < s_rank or j > i - w)]
            if i >= nb - dense_last:
                mask[i, : i + 1] = True
                continue
            if cands:
                vals = st[i, cands]
                thr = np.quantile(vals, 1 - frac)
                for j, v in zip(cands, vals, strict=True):
                    if v > thr:
                        mask[i, j] = True
        masks.append(mask)
    return masks


@pytest.mark.parametrize("t", [64 * 40, 64 * 33 + 17])
def test_parity_exact_paper_preset_matches_released_selection(t):
    cfg = SketchWalkConfig.preset("paper", exact=True, parity=True, dense_layers=0)
    sw = SketchWalk(cfg)
    layers = [make_qkv(1, 6, 2, t, 32, seed=s)[:2] for s in range(3)]
    ours = [sw.select(q, k, i).block_mask[0, 0].numpy() for i, (q, k) in enumerate(layers)]
    theirs = _released_selection(layers)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        diff = int((a != b).sum())
        print(f"layer {i}: {int(a.sum())} kept blocks, {diff} differ")
        assert diff == 0


@pytest.mark.parametrize("nb", [1, 2, 3, 10, 57, 300])
@pytest.mark.parametrize("sink, window, last", [(0.025, 0.05, 4), (0.3, 0.1, 0), (0.0, 0.5, 2)])
@pytest.mark.parametrize("parity", [False, True])
def test_forced_per_row_counts_the_forced_mask(nb, sink, window, last, parity):
    from sketchwalk.selection.select import forced_per_row

    cfg = SketchWalkConfig(sink=sink, window=window, dense_last_rows=last, parity=parity)
    want = forced_block_mask(nb, cfg, "cpu").sum(-1)
    assert torch.equal(forced_per_row(nb, cfg), want)


@pytest.mark.parametrize("nb", [40, 200])
@pytest.mark.parametrize("last_rows", [0, 4])
def test_parity_quantile_ranks_blocks_between_the_two_sinks(nb, last_rows):
    """docs/algorithm.md §5.9, transcribed: per row, the candidates of the (1 - frac) quantile are
    the causal blocks outside the `sink`-fraction sink and the window band; the final mask
    then forces the window-sized sink, the window and the dense last rows."""
    frac, sink, window = 0.125, 0.025, 0.05
    cfg = SketchWalkConfig(parity=True, kblocks_frac=frac, dense_last_rows=last_rows)
    scores = _scores(1, 2, nb, seed=nb)
    got = select_blocks(scores, nb * 64, cfg).block_mask
    s_rank, w = max(1, round(sink * nb)), max(1, round(window * nb))
    assert s_rank < w  # the case the fix is about
    want = np.zeros((1, 2, nb, nb), bool)
    changed = 0
    for g in range(2):
        r = scores[0, g].double().numpy()
        for i in range(nb):
            want[0, g, i, [j for j in range(i + 1) if j < w or j > i - w]] = True
            if i >= nb - last_rows:
                want[0, g, i, : i + 1] = True
                continue
            cands = [j for j in range(i + 1) if not (j < s_rank or j > i - w)]
            if cands:
                thr = np.quantile(r[i, cands], 1 - frac)
                want[0, g, i, [j for j in cands if r[i, j] > thr]] = True
                # the earlier candidate set (window-sized sink left out) ranks differently
                old = [j for j in cands if j >= w]
                if old:
                    old_thr = np.quantile(r[i, old], 1 - frac)
                    changed += sum((r[i, j] > thr) != (r[i, j] > old_thr) for j in old)
    diff = int((got.numpy() != want).sum())
    print(f"nb {nb}: {int(got.sum())} kept, {diff} differ; old candidate set changes {changed}")
    assert diff == 0
    assert changed > 0  # the test tells the two candidate sets apart


def _normalised(r, i):
    row = np.clip(r[i, : i + 1], 0, None)
    return row / row.sum()


@pytest.mark.parametrize("nb", [1, 3, 17, 60])
@pytest.mark.parametrize("mass", [0.3, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("last_rows, sink_blocks, window_blocks", [(0, 1, 1), (4, None, None)])
def test_mass_budget_matches_brute_force(nb, mass, last_rows, sink_blocks, window_blocks):
    """Per row and group: forced blocks' normalised share first, then the best candidates
    until the kept share reaches ``mass``. Scores are non-causal (future blocks carry mass that
    the causal normalisation must drop)."""
    cfg = SketchWalkConfig(
        mass=mass, dense_last_rows=last_rows, sink_blocks=sink_blocks, window_blocks=window_blocks
    )
    scores = _scores(2, 3, nb, seed=nb) ** 4  # peaked rows
    sel = select_blocks(scores, nb * 64, cfg)
    _check_invariants(sel, cfg, nb)
    forced = forced_block_mask(nb, cfg, "cpu").numpy()
    kept_counts = []
    for b, g in np.ndindex(2, 3):
        r = scores[b, g].double().numpy()
        want = forced.copy()
        for i in range(nb):
            share = _normalised(r, i)
            have = share[forced[i, : i + 1]].sum()
            cands = sorted((j for j in range(i + 1) if not forced[i, j]), key=lambda j: -share[j])
            for j in cands:
                if have >= mass and mass < 1:
                    break
                want[i, j] = True
                have += share[j]
            kept_share = share[want[i, : i + 1]].sum()
            assert kept_share >= mass - 1e-9 or want[i, : i + 1].all()
        got = sel.block_mask[b, g].numpy()
        kept_counts.append(int(got.sum()))
        assert (got == want).all(), f"(b, g) = {(b, g)}: {int((got != want).sum())} differ"
    print(f"nb {nb} mass {mass}: kept per (batch, group) {kept_counts}")
    if mass == 1.0:
        assert sel.density == 1.0


def test_mass_forced_share_counts_first():
    """A row whose window already holds more than ``mass`` keeps no ranked block."""
    nb = 8
    cfg = SketchWalkConfig(mass=0.5, sink_blocks=0, window_blocks=1, dense_last_rows=0)
    scores = torch.full((1, 1, nb, nb), 0.01)
    scores[0, 0].diagonal().fill_(1.0)  # the diagonal (forced) holds most of each row
    scores[0, 0, 7, 3] = 0.5  # row 7: diagonal share 1 / (1 + 0.5 + 6 * 0.01) < 0.7
    cfg7 = cfg.replace(mass=0.7)
    plain = select_blocks(scores, nb * 64, cfg).block_mask[0, 0]
    assert torch.equal(plain, torch.eye(nb, dtype=torch.bool))
    more = select_blocks(scores, nb * 64, cfg7).block_mask[0, 0]
    assert more[7].nonzero().flatten().tolist() == [3, 7]
    assert torch.equal(more[:7], torch.eye(nb, dtype=torch.bool)[:7])


@pytest.mark.parametrize("nb", [5, 33, 80])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("density", [0.15, 0.3, 0.7])
@pytest.mark.parametrize("last_rows", [0, 4])
def test_global_density_allocation_matches_brute_force(nb, groups, density, last_rows):
    cfg = SketchWalkConfig(
        density=density,
        allocation="global",
        dense_last_rows=last_rows,
        sink_blocks=1,
        window_blocks=2,
    )
    scores = _scores(2, groups, nb, seed=3 * nb + groups) ** 3
    forced = forced_block_mask(nb, cfg, "cpu").numpy()
    causal_blocks = nb * (nb + 1) // 2
    n_forced = int(forced.sum())
    target = density * causal_blocks * groups
    with warnings.catch_warnings():  # a target below the forced floor warns (tested below)
        warnings.simplefilter("ignore")
        sel = select_blocks(scores, nb * 64, cfg)
    _check_invariants(sel, cfg, nb)
    for b in range(2):
        ranked = []
        for g in range(groups):
            r = scores[b, g].double().numpy()
            for i in range(nb):
                share = _normalised(r, i)
                ranked += [(-share[j], g, i, j) for j in range(i + 1) if not forced[i, j]]
        n = max(0, min(int(target + 0.5) - n_forced * groups, len(ranked)))
        want = np.broadcast_to(forced, (groups, nb, nb)).copy()
        for _, g, i, j in sorted(ranked)[:n]:
            want[g, i, j] = True
        got = sel.block_mask[b].numpy()
        assert (got == want).all(), f"batch {b}: {int((got != want).sum())} differ"
        kept = int(got.sum())
        print(
            f"nb {nb} G {groups} d {density}: kept {kept}, target {target:.1f}, forced "
            f"{n_forced * groups}, per group {got.sum((1, 2)).tolist()}"
        )
        assert kept == n_forced * groups + n
        assert abs(kept - target) <= 1 or kept == n_forced * groups
    # the realized density is reported exactly
    assert sel.density == float(sel.block_mask.sum()) / (2 * groups * causal_blocks)


def test_global_allocation_moves_blocks_between_groups_and_rows():
    """Group 0's rows are peaked (one block holds the mass), group 1's are flat: at equal
    total density, global allocation gives group 1 more blocks than row allocation does and
    keeps the same total."""
    nb = 64
    gen = torch.Generator().manual_seed(0)
    flat = torch.rand(1, 1, nb, nb, generator=gen) * 0.1 + 1.0
    peaked = torch.rand(1, 1, nb, nb, generator=gen) * 0.01
    peaked[0, 0, :, 5] = 10.0
    scores = torch.cat([peaked, flat], dim=1)
    base = SketchWalkConfig(density=0.3, dense_last_rows=0, sink_blocks=1, window_blocks=1)
    row = select_blocks(scores, nb * 64, base)
    glob = select_blocks(scores, nb * 64, base.replace(allocation="global"))
    per_row_alloc, per_glob = row.kv_num_blocks.sum(-1)[0], glob.kv_num_blocks.sum(-1)[0]
    print(f"blocks per group: row {per_row_alloc.tolist()}, global {per_glob.tolist()}")
    assert per_row_alloc[0] == per_row_alloc[1]
    assert per_glob[1] > per_row_alloc[1] and per_glob[0] < per_row_alloc[0]
    assert abs(glob.density - 0.3) * 2 * nb * (nb + 1) / 2 <= 1
    assert glob.block_mask[0, 0, 6:, 5].all()  # the peaked block of every row is kept


@pytest.mark.parametrize("nb", [1, 4, 64, 300])
def test_forced_sizes_in_blocks_override_the_fractions(nb):
    cfg = SketchWalkConfig(sink_blocks=2, window_blocks=3, dense_last_rows=0)
    assert forced_counts(nb, cfg) == (min(2, nb), min(3, nb))
    mask = forced_block_mask(nb, cfg, "cpu")
    for i in range(nb):
        want = sorted({j for j in range(i + 1) if j < 2 or j > i - 3})
        assert mask[i].nonzero().flatten().tolist() == want
    no_sink = SketchWalkConfig(sink_blocks=0, window_blocks=1, dense_last_rows=0)
    assert torch.equal(forced_block_mask(nb, no_sink, "cpu"), torch.eye(nb, dtype=torch.bool))
    # under parity the final sink still takes the window's size
    assert forced_counts(nb, cfg.replace(parity=True)) == (min(3, nb), min(3, nb))


def test_paper_preset_forced_counts_are_the_released_fractions():
    paper = SketchWalkConfig.preset("paper")
    assert paper.sink_blocks is None and paper.window_blocks is None
    for nb in (1, 10, 40, 64, 200, 2048):
        w = max(1, round(0.05 * nb))
        assert forced_counts(nb, paper) == (min(nb, max(1, round(0.025 * nb))), min(nb, w))
        assert forced_counts(nb, paper.replace(parity=True)) == (min(nb, w), min(nb, w))


@pytest.mark.parametrize("nb", [10, 64, 300])
def test_forced_density_and_warning_once(nb):
    from sketchwalk.selection.select import forced_density

    cfg = SketchWalkConfig(density=0.01)
    floor = forced_density(nb, cfg)
    assert floor == float(forced_block_mask(nb, cfg, "cpu").sum()) / (nb * (nb + 1) / 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        select_blocks(_scores(1, 1, nb), nb * 64, cfg)
        select_blocks(_scores(1, 1, nb, 1), nb * 64, cfg)  # same (nb, config): no new warning
        select_blocks(_scores(1, 1, nb), nb * 64, cfg.replace(density=min(1.0, floor + 0.01)))
    texts = [str(w.message) for w in caught]
    print(texts)
    assert len(texts) == 1
    assert "density 0.01 requested" in texts[0] and f"keep {floor:.3g} at {nb} blocks" in texts[0]


@pytest.mark.parametrize("budget", [{"mass": 0.8}, {"density": 0.3, "allocation": "global"}])
def test_new_budgets_through_sketchwalk(budget):
    """SketchWalk.select with the new budgets equals select_blocks on its walk matrix."""
    cfg = SketchWalkConfig(dense_layers=0, granularity="kv_group", **budget)
    q, k, _ = make_qkv(2, 6, 2, 64 * 20 + 9, 16, seed=4)
    sel = SketchWalk(cfg).select(q, k, 0)
    again = select_blocks(sel.scores, q.shape[2], cfg)
    assert torch.equal(sel.block_mask, again.block_mask)
    assert sel.block_mask.shape == (2, 2, 21, 21)
    assert 0 < sel.density < 1


@pytest.mark.parametrize("nb", [1, 2, 9, 130])
@pytest.mark.parametrize("sink_blocks, window_blocks", [(0, 1), (0, 5), (3, 1), (4, 4), (200, 7)])
@pytest.mark.parametrize("last", [0, 3])
def test_forced_per_row_counts_the_forced_mask_sized_in_blocks(
    nb, sink_blocks, window_blocks, last
):
    from sketchwalk.selection.select import forced_per_row

    cfg = SketchWalkConfig(
        sink_blocks=sink_blocks, window_blocks=window_blocks, dense_last_rows=last
    )
    assert torch.equal(forced_per_row(nb, cfg), forced_block_mask(nb, cfg, "cpu").sum(-1))
