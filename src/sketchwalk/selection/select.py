"""Step 3 of Sketch&Walk: which key blocks each query block keeps (docs/algorithm.md §1.8-§1.9).

Per query-block row i (only key blocks j <= i are causal):

1. forced blocks: the first ``sink_blocks`` blocks of the context, a local window of
   ``window_blocks`` blocks ending at the diagonal (so the diagonal is always kept), and every
   causal block of the last ``dense_last_rows`` rows;
2. the other causal blocks ("candidates") are ranked by the walk matrix R and the best ones are
   kept, as many as the budget gives (precedence: `SketchWalkConfig.budget`):
   - ``density`` with ``allocation="row"``: a per-row rate d' is solved so that the total
     kept, forced blocks included, is within one block per row of ``density`` x (number of
     causal blocks);
   - ``density`` with ``allocation="global"``: each row's scores are normalised over its causal
     blocks, and one threshold over all rows AND mask groups of the layer (per sequence) keeps
     the best candidates, so that the total kept, forced included, is exactly
     round(density x causal blocks x groups) (`global_ranked_count`);
   - ``mass``: per row and mask group, the normalised scores of the forced blocks count first,
     then candidates are added best first while the kept share is below ``mass``
     (`mass_keep`): data-dependent, computed on the device by sort + cumsum;
   - ``kblocks_frac``: round(frac * candidates in the row) (parity: every candidate strictly
     above the row's (1 - frac) quantile of candidate scores, like the released code);
   - ``top_k_blocks``: N per row (or all candidates if fewer).

Block counts from fractions of the context: ``max(1, round(frac * nb))`` for sink and window,
unless ``sink_blocks`` / ``window_blocks`` give them in blocks. Under ``parity`` the final mask's
sink takes the window's size (the released final mask does that) while the quantile's
candidates exclude only the ``sink`` sink and the window band (docs/algorithm.md §1.9, §5.9).

Every budget runs without host syncs and with static shapes (the CUDA-graph path of
`sketchwalk.selection.prefill` replays `select_blocks`), except the parity quantile
(``torch.nanquantile`` in row slices), which the prefill runs eagerly.

`select_last_row` is the same rule for one query row at the end of a context of nk blocks
(decode): sink and window forced, the budget of the last row of an nk-block prefill without
dense last rows.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch

from sketchwalk.blocks import BlockSelection, causal_block_mask, num_blocks
from sketchwalk.config import SketchWalkConfig


def forced_counts(nb: int, config: SketchWalkConfig) -> tuple[int, int]:
    """(sink_blocks, window_blocks) of the final mask for a context of ``nb`` blocks."""
    window = _window_count(nb, config)
    sink = window if config.parity else _sink_count(nb, config)
    return min(sink, nb), min(window, nb)


def _window_count(nb: int, config: SketchWalkConfig) -> int:
    if config.window_blocks is not None:
        return config.window_blocks
    return max(1, round(config.window * nb))


def _sink_count(nb: int, config: SketchWalkConfig) -> int:
    """The configured sink (``sink_blocks`` or the ``sink`` fraction), before parity's
    window-sized sink: under parity it is what the quantile's candidates leave out."""
    if config.sink_blocks is not None:
        return config.sink_blocks
    return max(1, round(config.sink * nb))


def forced_density(nb: int, config: SketchWalkConfig) -> float:
    """Share of the causal blocks of an nb-block prefill that the forced blocks alone keep
    (sink, window with diagonal, dense last rows): the lowest density any budget can reach."""
    return float(forced_per_row(nb, config).sum()) / (nb * (nb + 1) // 2)


@lru_cache(maxsize=256)
def _warn_below_forced_floor(nb: int, config: SketchWalkConfig) -> None:
    """Warn (once per (nb, config)) when a density target is below the forced floor."""
    if config.density is None:
        return
    floor = forced_density(nb, config)
    if config.density < floor:
        sink, window = forced_counts(nb, config)
        warnings.warn(
            f"density {config.density:g} requested but the forced sink/window/dense-last-rows "
            f"blocks alone keep {floor:.3g} at {nb} blocks (sink {sink}, window {window}, "
            f"dense_last_rows {config.dense_last_rows}): only the forced blocks are kept",
            stacklevel=3,
        )


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
    forced_per_row: torch.Tensor,
    causal_per_row: torch.Tensor,
    density: float,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kept blocks per row (forced included) so the total is density x causal blocks.

    Solves for a per-row rate d' by bisection: kept_i = clamp(round(d' * w_i * causal_i),
    forced_i, causal_i), w_i = ``weight[i]`` >= 1 (1 without it). The total is monotone in d', so
    the result lands within one block per row of the target unless the forced blocks alone
    exceed it.
    """
    target = density * float(causal_per_row.sum())
    causal_f = causal_per_row.double()
    scaled = causal_f if weight is None else causal_f * weight

    def kept(rate: float) -> torch.Tensor:
        k = torch.floor(rate * scaled + 0.5)
        return torch.maximum(torch.minimum(k, causal_f), forced_per_row.double())

    lo, hi = 0.0, 1.0  # weights >= 1: rate 1 already keeps every causal block
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


def _quantile_candidates(nb: int, config: SketchWalkConfig, device: torch.device) -> torch.Tensor:
    """bool (nb, nb): the released quantile's candidates (docs/algorithm.md §1.9, §5.9): causal
    blocks outside the configured sink (not parity's window-sized one: that is forced only in the
    final mask) and the window band; rows of the dense last rows have none."""
    causal = causal_block_mask(nb, device)
    i = torch.arange(nb, device=device)[:, None]
    j = torch.arange(nb, device=device)[None, :]
    excluded = (j < min(_sink_count(nb, config), nb)) | (j > i - min(_window_count(nb, config), nb))
    if config.dense_last_rows > 0:
        excluded = excluded | (i >= nb - config.dense_last_rows)
    return causal & ~excluded


def ranked_per_row(nb: int, config: SketchWalkConfig, tail_rows: int = 0) -> torch.Tensor:
    """Ranked (non-forced) blocks each row keeps: int64 (nb,) on the CPU.

    ``tail_rows``: the last rows, those ranked by their exact attention, whose budget
    ``config.query_rows_budget`` multiplies (`tail_rows_of`). Depends only on nb, the tail and
    the budget fields, so it is cached: no device work and no host-side bisection on the hot
    path after the first layer.
    """
    return _ranked_per_row(nb, config, tail_rows)


def tail_rows_of(seq_len: int, config: SketchWalkConfig) -> int:
    """The rows whose row budget ``query_rows_budget`` multiplies: ``exact_rows(T)`` when it
    is not 1 and the budget is per row, else 0."""
    if config.query_rows_budget == 1.0 or config.budget == "mass" or config.allocation != "row":
        return 0
    return config.exact_rows(seq_len)


@lru_cache(maxsize=256)
def _ranked_per_row(nb: int, config: SketchWalkConfig, tail_rows: int = 0) -> torch.Tensor:
    if config.budget == "mass":
        raise ValueError(
            "ranked_per_row: the mass budget keeps a data-dependent number of blocks per row "
            "(see mass_keep)"
        )
    budget, density, top_k, frac = (
        config.budget,
        config.density,
        config.top_k_blocks,
        config.kblocks_frac,
    )
    n_forced = forced_per_row(nb, config)
    n_causal = torch.arange(1, nb + 1, dtype=torch.int64)
    n_cand = n_causal - n_forced
    weight = None
    if tail_rows and config.query_rows_budget != 1.0:
        weight = torch.ones(nb, dtype=torch.float64)
        weight[nb - min(tail_rows, nb) :] = config.query_rows_budget
    if budget == "density":
        budgets = _density_row_budgets(n_forced, n_causal, density, weight)
        k_row = (budgets - n_forced).clamp_min(0)
    elif budget == "top_k_blocks":
        k_row = torch.full((nb,), top_k, dtype=torch.int64)
        if weight is not None:
            k_row = torch.floor(top_k * weight + 0.5).long()
    else:
        scaled = n_cand.double() if weight is None else n_cand.double() * weight
        k_row = torch.floor(frac * scaled + 0.5).long()
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
    device = torch.device(scores.device)
    causal, candidates = _causal_and_candidates(nb, config, device)
    forced = causal & ~candidates
    budget = config.budget
    if budget == "density":
        _warn_below_forced_floor(nb, config)
    if budget == "kblocks_frac" and config.parity:
        quantile_candidates = _quantile_candidates(nb, config, device)
        ranked = _quantile_threshold(scores, quantile_candidates, config.kblocks_frac)
    elif budget == "mass":
        ranked = mass_keep(scores, causal, forced, candidates, config.mass)
    elif budget == "density" and config.allocation == "global":
        n_ranked = global_ranked_count(nb, scores.shape[1], config)
        ranked = global_top(scores, causal, candidates, n_ranked)
    else:
        tail = tail_rows_of(seq_len, config)
        ranked = _top_k_rows(scores, candidates, ranked_per_row(nb, config, tail), config, tail)

    mask = forced | ranked
    return BlockSelection.from_mask(mask & causal, config.block_size, seq_len, scores=scores)


def normalised_rows(scores: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """float32 scores divided by each row's sum over its causal blocks (non-causal entries and
    negative scores count as 0; an all-zero row stays zero).

    Args:
        scores: (..., n) non-negative scores; causal: bool mask broadcastable to it.
    """
    vals = torch.where(causal, scores.float(), 0.0).clamp_min(0.0)
    return vals / vals.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def mass_keep(
    scores: torch.Tensor,
    causal: torch.Tensor,
    forced: torch.Tensor,
    candidates: torch.Tensor,
    mass: float,
) -> torch.Tensor:
    """Cumulative-mass rule: the candidates each row keeps, bool like ``scores``.

    Per row: the scores are normalised over the causal blocks (`normalised_rows`); the forced
    blocks' share is kept first; then candidates are taken in descending score order while the
    share kept before the next one is still below ``mass``, i.e. the fewest best candidates
    that bring the row to ``mass`` (all of them if it cannot be reached; none if the forced
    blocks already reach it). ``mass >= 1`` keeps every candidate. On the device: one sort and
    one float64 cumulative sum per row, static shapes, no host sync.

    Args:
        scores: (..., n) non-negative scores (walk rows, decode rows).
        causal, forced, candidates: bool masks broadcastable to ``scores``; forced and
            candidates are disjoint parts of causal.
        mass: the share in (0, 1].
    """
    shape = torch.broadcast_shapes(scores.shape, candidates.shape)
    if mass >= 1.0:
        return candidates.expand(shape).clone()
    share = normalised_rows(scores, causal)
    have = torch.where(forced, share, 0.0).sum(dim=-1, keepdim=True, dtype=torch.float64)
    ranked = torch.where(candidates, share, -1.0)  # below every share: sorted last
    ranked, order = ranked.sort(dim=-1, descending=True)  # float32 sort, float64 sums
    gained = ranked.clamp_min(0.0).cumsum(dim=-1, dtype=torch.float64)
    before = have + torch.nn.functional.pad(gained[..., :-1], (1, 0))
    keep = (before < mass) & (ranked >= 0.0)
    out = torch.zeros(shape, dtype=torch.bool, device=scores.device)
    return out.scatter_(-1, order, keep)


def global_ranked_count(nb: int, groups: int, config: SketchWalkConfig) -> int:
    """Ranked blocks a global density allocation keeps over all rows and ``groups`` mask
    groups of one sequence: round(density x causal x groups) minus the forced blocks, clamped
    to [0, candidates]. Forced plus this count is the exact number of kept blocks."""
    causal = nb * (nb + 1) // 2
    forced = int(forced_per_row(nb, config).sum())
    target = int(config.density * causal * groups + 0.5)
    return max(0, min(target - forced * groups, (causal - forced) * groups))


def global_top(
    scores: torch.Tensor, causal: torch.Tensor, candidates: torch.Tensor, n_ranked: int
) -> torch.Tensor:
    """Global allocation: per sequence (dim 0), the ``n_ranked`` candidates with the highest
    row-normalised scores over every row and mask group; bool like ``scores``.

    Ranking row-normalised scores across rows keeps the blocks that add the most to the mean
    attention recall of the rows, instead of the same share in every row.
    """
    shape = torch.broadcast_shapes(scores.shape, candidates.shape)
    out = torch.zeros(shape, dtype=torch.bool, device=scores.device)
    if n_ranked <= 0:
        return out
    flat = normalised_rows(scores, causal).masked_fill(~candidates, float("-inf"))
    flat = flat.reshape(shape[0], -1)
    top = flat.topk(n_ranked, dim=-1, sorted=False).indices
    return out.view(shape[0], -1).scatter_(-1, top, True).view(shape) & candidates


@lru_cache(maxsize=1024)
def last_row_ranked(nk: int, config: SketchWalkConfig) -> int:
    """Ranked blocks of the last row of an nk-block prefill without dense last rows (the
    decode-time budget for the row budgets ``kblocks_frac``, ``top_k_blocks``, ``density``)."""
    return int(_ranked_per_row(nk, config.replace(dense_last_rows=0, allocation="row"))[-1])


def last_row_kept(nk: int, config: SketchWalkConfig) -> int:
    """Blocks a decode row keeps over nk blocks under a row budget: the forced ones (sink and
    window) plus `last_row_ranked`."""
    sink, window = forced_counts(nk, config)
    return min(nk, min(nk, sink + window) + last_row_ranked(nk, config))


def select_last_row(scores: torch.Tensor, config: SketchWalkConfig) -> torch.Tensor:
    """The decode-time selection of one query row over nk key blocks: bool (B, G, nk).

    Sink and window (counted on the nk-block context) are forced; the rest is ranked by
    ``scores`` (B, G, nk) under the same budgets as the last row of an nk-block prefill
    without dense last rows: ``kblocks_frac`` / ``top_k_blocks`` / ``density`` (row) keep
    `last_row_ranked` per group; ``density`` with global allocation keeps G times that many
    per sequence, spread over the groups by normalised score (`global_top`); ``mass`` runs
    `mass_keep` on the row. No host sync.
    """
    nk = scores.shape[-1]
    sink, window = forced_counts(nk, config)
    j = torch.arange(nk, device=scores.device)
    forced = (j < sink) | (j >= nk - window)
    candidates = ~forced
    causal = torch.ones_like(forced)
    if config.budget == "mass":
        ranked = mass_keep(scores, causal, forced, candidates, config.mass)
    elif config.budget == "density" and config.allocation == "global":
        n_ranked = scores.shape[1] * last_row_ranked(nk, config)
        ranked = global_top(scores, causal, candidates, n_ranked)
    else:
        k_last = last_row_ranked(nk, config)
        ranked = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        if k_last > 0:
            top = scores.masked_fill(forced, float("-inf")).topk(k_last, dim=-1).indices
            ranked.scatter_(-1, top, True)
    return ranked | forced


def _top_k_rows(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    k_row: torch.Tensor,
    config: SketchWalkConfig | None = None,
    tail_rows: int = 0,
) -> torch.Tensor:
    """bool mask keeping the k_row[i] best candidates of each row i (k_row: CPU int64 (nb,))."""
    kmax = int(k_row.max()) if k_row.numel() else 0
    out = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if kmax == 0:
        return out
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    top = masked.topk(kmax, dim=-1, sorted=True).indices  # (B, G, nb, kmax)
    if config is not None:
        keep = _keep_table(scores.shape[-1], config, scores.device, tail_rows)[:, :kmax]
    else:
        keep = torch.arange(kmax, device=scores.device) < k_row.to(scores.device)[:, None]
    out.scatter_(-1, top, keep.expand_as(top))
    return out & candidates


@lru_cache(maxsize=256)
def _keep_table_cached(
    nb: int, config: SketchWalkConfig, device: torch.device, tail_rows: int = 0
) -> torch.Tensor:
    k_row = _ranked_per_row(nb, config, tail_rows)
    kmax = int(k_row.max()) if k_row.numel() else 0
    return torch.arange(kmax, device=device) < k_row.to(device)[:, None]


def _keep_table(
    nb: int, config: SketchWalkConfig, device: torch.device, tail_rows: int = 0
) -> torch.Tensor:
    """bool (nb, kmax) on ``device``: rank r of row i is kept iff r < ranked_per_row[i].
    Cached per (nb, budget, tail, device), so later layers copy nothing from the host."""
    return _keep_table_cached(nb, config, torch.device(device), tail_rows)


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
    "forced_density",
    "forced_per_row",
    "global_ranked_count",
    "global_top",
    "last_row_kept",
    "last_row_ranked",
    "mass_keep",
    "normalised_rows",
    "ranked_per_row",
    "select_blocks",
    "select_last_row",
    "tail_rows_of",
]
