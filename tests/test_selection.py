import math

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
    strictly-greater quantile over the non-forced causal blocks, window-sized sink, dense last
    rows."""
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
        mask = np.zeros((nb, nb), bool)
        for i in range(nb):
            forced = [j for j in range(i + 1) if j < w or j > i - w]
            for j in forced:
                mask[i, j] = True
            cands = [j for j in range(i + 1) if j not in forced]
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
