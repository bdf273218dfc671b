"""Step 3 of Sketch&Walk: which key blocks each query block keeps (docs/algorithm.md §1.8-§1.9).

Per query-block row i (only key blocks j <= i are causal):

1. forced blocks: the first ``sink_blocks`` blocks of the context, a local window of
   ``window_blocks`` blocks ending at the diagonal (so the diagonal is always kept), and every
   causal block of the last ``dense_last_rows`` rows;
2. the other causal blocks ("candidates") are ranked by the walk matrix R and the best ones are
   kept, as many as the budget gives:
   - ``kblocks_frac``: round(frac * candidates in the row) (parity: every candidate strictly
     above the row's (1 - frac) quantile of candidate scores, like the released code);
   - ``top_k_blocks``: N per row (or all candidates if fewer);
   - ``density``: a per-row rate d' is solved so that the total kept, forced blocks included,
     is within one block per row of ``density`` x (number of causal blocks).

Block counts from fractions of the context: ``max(1, round(frac * nb))`` for sink and window.
Under ``parity`` the sink takes the window's size (the released final mask does that).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from sketchwalk.blocks import BlockSelection, causal_block_mask, num_blocks
from sketchwalk.config import SketchWalkConfig


def forced_counts(nb: int, config: SketchWalkConfig) -> tuple[int, int]:
    """(sink_blocks, window_blocks) for a context of ``nb`` blocks."""
    window = max(1, round(config.window * nb))
    sink = window if config.parity else max(1, round(config.sink * nb))
    return min(sink, nb), min(window, nb)


def forced_block_mask(
    nb: int, config: SketchWalkConfig, device: torch.device | str
) -> torch.Tensor:
    """bool (nb, nb): sink, window (with diagonal) and dense last rows; causal."""
    sink, window = forced_counts(nb, config)
    i = torch.arange(nb, device=device)[:, None]
    j = torch.arange(nb, device=device)[None, :]
    causal = j <= i
    forced = (j < sink) | (j > i - window)
    if config.dense_last_rows > 0:
        forced = forced | (i >= nb - config.dense_last_rows)
    return forced & causal


def forced_per_row(nb: int, config: SketchWalkConfig) -> torch.Tensor:
    """Number of forced blocks of each row, int64 (nb,) on the CPU (no device work)."""
    sink, window = forced_counts(nb, config)
    i = torch.arange(nb, dtype=torch.int64)
    causal = i + 1
    s = torch.clamp(causal, max=sink)
    w = torch.clamp(causal, max=window)
    overlap = torch.clamp(s - (i - w + 1), min=0)  # sink blocks that are also in the window
    forced = s + w - torch.minimum(overlap, w)
    if config.dense_last_rows > 0:
        forced = torch.where(i >= nb - config.dense_last_rows, causal, forced)
    return forced


def _density_row_budgets(
    forced_per_row: torch.Tensor, causal_per_row: torch.Tensor, density: float
) -> torch.Tensor:
    """Kept blocks per row (forced included) so the total is density x causal blocks.

    Solves for a per-row rate d' by bisection: kept_i = clamp(round(d' * causal_i), forced_i,
    causal_i). The total is monotone in d', so the result lands within one block per row of
    the target unless the forced blocks alone exceed it.
    """
    target = density * float(causal_per_row.sum())
    causal_f = causal_per_row.double()

    def kept(rate: float) -> torch.Tensor:
        k = torch.floor(rate * causal_f + 0.5)
        return torch.maximum(torch.minimum(k, causal_f), forced_per_row.double())

    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if float(kept(mid).sum()) < target:
            lo = mid
        else:
            hi = mid
    below, above = kept(lo), kept(hi)
    best = below if abs(float(below.sum()) - target) <= abs(float(above.sum()) - target) else above
    return best.long()


@lru_cache(maxsize=64)
def _causal_and_candidates(
    nb: int, config: SketchWalkConfig, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(causal, candidates) bool (nb, nb) on ``device``, cached per (nb, config, device)."""
    causal = causal_block_mask(nb, device)
    return causal, causal & ~forced_block_mask(nb, config, device)


def ranked_per_row(nb: int, config: SketchWalkConfig) -> torch.Tensor:
    """Ranked (non-forced) blocks each row keeps: int64 (nb,) on the CPU.

    Depends only on nb and the budget fields, so it is cached: no device work and no host-side
    bisection on the hot path after the first layer.
    """
    return _ranked_per_row(nb, config)


@lru_cache(maxsize=256)
def _ranked_per_row(nb: int, config: SketchWalkConfig) -> torch.Tensor:
    budget, density, top_k, frac = (
        config.budget,
        config.density,
        config.top_k_blocks,
        config.kblocks_frac,
    )
    n_forced = forced_per_row(nb, config)
    n_causal = torch.arange(1, nb + 1, dtype=torch.int64)
    n_cand = n_causal - n_forced
    if budget == "density":
        budgets = _density_row_budgets(n_forced, n_causal, density)
        k_row = (budgets - n_forced).clamp_min(0)
    elif budget == "top_k_blocks":
        k_row = torch.clamp(n_cand, max=top_k)
    else:
        k_row = torch.floor(frac * n_cand.double() + 0.5).long()
    return torch.minimum(k_row, n_cand)


def select_blocks(scores: torch.Tensor, seq_len: int, config: SketchWalkConfig) -> BlockSelection:
    """Rank the walk matrix and build the causal block selection.

    Args:
        scores: (B, G, nb, nb) walk matrix R_l (higher = more important).
        seq_len: T (tokens); nb must equal ceil(T / block_size).
        config: budget form, forced blocks, parity.

    Returns:
        The `BlockSelection` (with ``scores`` attached).
    """
    nq, nk = scores.shape[-2:]
    nb = num_blocks(seq_len, config.block_size)
    if (nq, nk) != (nb, nb):
        raise ValueError(
            f"scores must be (batch, groups, {nb}, {nb}) for seq_len={seq_len}, got "
            f"{tuple(scores.shape)}"
        )
    device = scores.device
    causal, candidates = _causal_and_candidates(nb, config, torch.device(device))
    forced = causal & ~candidates
    if config.budget == "kblocks_frac" and config.parity:
        ranked = _quantile_threshold(scores, candidates, config.kblocks_frac)
    else:
        ranked = _top_k_rows(scores, candidates, ranked_per_row(nb, config), config)

    mask = forced | ranked
    return BlockSelection.from_mask(mask & causal, config.block_size, seq_len, scores=scores)


def _top_k_rows(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    k_row: torch.Tensor,
    config: SketchWalkConfig | None = None,
) -> torch.Tensor:
    """bool mask keeping the k_row[i] best candidates of each row i (k_row: CPU int64 (nb,))."""
    kmax = int(k_row.max()) if k_row.numel() else 0
    out = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if kmax == 0:
        return out
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    top = masked.topk(kmax, dim=-1, sorted=True).indices  # (B, G, nb, kmax)
    if config is not None:
        keep = _keep_table(scores.shape[-1], config, scores.device)[:, :kmax]
    else:
        keep = torch.arange(kmax, device=scores.device) < k_row.to(scores.device)[:, None]
    out.scatter_(-1, top, keep.expand_as(top))
    return out & candidates


@lru_cache(maxsize=256)
def _keep_table_cached(nb: int, config: SketchWalkConfig, device: torch.device) -> torch.Tensor:
    k_row = _ranked_per_row(nb, config)
    kmax = int(k_row.max()) if k_row.numel() else 0
    return torch.arange(kmax, device=device) < k_row.to(device)[:, None]


def _keep_table(nb: int, config: SketchWalkConfig, device: torch.device) -> torch.Tensor:
    """bool (nb, kmax) on ``device``: rank r of row i is kept iff r < ranked_per_row[i].
    Cached per (nb, budget, device), so later layers copy nothing from the host."""
    return _keep_table_cached(nb, config, torch.device(device))


def _quantile_threshold(
    scores: torch.Tensor, candidates: torch.Tensor, frac: float
) -> torch.Tensor:
    """Released ranking: per row, keep candidates strictly above the (1 - frac) quantile (linear
    interpolation) of that row's candidate scores. Non-candidates are NaN for nanquantile;
    rows are processed in slices because torch.quantile caps its input size."""
    b, g, nb, _ = scores.shape
    vals = scores.float().masked_fill(~candidates, float("nan"))
    out = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    rows = max(1, (1 << 22) // max(1, b * g * nb))
    for start in range(0, nb, rows):
        chunk = vals[:, :, start : start + rows]
        thr = torch.nanquantile(chunk, 1.0 - frac, dim=-1, keepdim=True)
        out[:, :, start : start + rows] = chunk > thr  # NaN compares False
    return out


__all__ = [
    "forced_block_mask",
    "forced_counts",
    "select_blocks",
]
