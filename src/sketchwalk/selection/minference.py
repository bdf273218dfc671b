"""MInference's vertical-slash estimate (Jiang et al. 2024), as block scores at our budgets.

MInference observes that many heads attend along a few key columns ("vertical" lines: sinks,
delimiters) and a few diagonals ("slash" lines: fixed relative offsets, the local window among
them), and finds them from the LAST queries only (docs/algorithm.md §8.2):

1. the last ``L = last_queries`` queries (64) attend causally to every key: A (L, T), the exact
   softmax at scale 1 / sqrt(D);
2. the vertical profile v[c] = mean over the L rows of A[r, c] (the mass a query puts on key c);
3. the slash profile s[o] = mean over the L rows of A[r, r - o] (the mass it puts at distance o),
   both divided by L whatever the number of rows that reach a key or an offset.

MInference then keeps the ``vertical_size`` best columns and ``slash_size`` best diagonals at
token level. Our kernels read blocks, so the lines are converted to blocks:

- scores (the default, ranked by our budgets): the mass the two profiles put on each tile, per
  query row of block i and averaged over its rows: ``V[i, j]`` = sum of v over the causal keys
  of block j, ``S[i, j]`` = sum of s over the offsets of the tile's causal cells; the score is
  ``(V + S) / 2`` (each profile sums to at most 1 per row);
- ``vertical_size`` and ``slash_size`` (MInference's own budget): a tile is kept when it holds a
  kept column or a cell of a kept diagonal (plus our forced blocks), per head; a mask group keeps
  the union of its heads' tiles.

`vertical_slash` and `vertical_slash_block_scores` are shared with FlexPrefill
(`sketchwalk.selection.flexprefill`), whose vertical-slash heads use the same estimate.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sketchwalk.blocks import UsageError, causal_block_mask, num_blocks
from sketchwalk.config import SketchWalkConfig
from sketchwalk.selection.baselines import _BudgetSelector, aggregate_groups, union_groups

__all__ = [
    "DEFAULT_LAST_QUERIES",
    "MInferenceSelector",
    "vertical_slash",
    "vertical_slash_block_mask",
    "vertical_slash_block_scores",
]

# MInference's last_q: queries at the end of the prompt that estimate the lines.
DEFAULT_LAST_QUERIES = 64


def vertical_slash(
    q: torch.Tensor, k: torch.Tensor, last_queries: int, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical and slash profiles of the last queries' exact attention.

    Args:
        q: (B, Hq, T, D) queries; k: (B, Hkv, T, D) keys (GQA: head h reads KV head
            h // (Hq / Hkv)).
        last_queries: L, the number of queries at the end that are looked at (clamped to T).
        scale: softmax scale (default 1 / sqrt(D)).

    Returns:
        (v, s), float32 (B, Hq, T) each: ``v[c]`` = mean over the L rows r of A[r, c], ``s[o]``
        = mean over the L rows of A[r, r - o] (0 where r - o < 0). The (L, T) attention is
        formed one KV group at a time.
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    n_last = max(1, min(int(last_queries), t))
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    pos = torch.arange(t - n_last, t, device=q.device)  # absolute positions of the rows
    allowed = torch.arange(t, device=q.device)[None, :] <= pos[:, None]  # (L, T)
    v = torch.empty(b, hq, t, dtype=torch.float32, device=q.device)
    s = torch.empty_like(v)
    for g in range(hkv):
        heads = slice(g * group, (g + 1) * group)
        qg = q[:, heads, t - n_last :].float()  # (B, G, L, D)
        kg = k[:, g : g + 1].float()  # (B, 1, T, D)
        logits = torch.matmul(qg, kg.transpose(-1, -2)) * scale  # (B, G, L, T)
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        v[:, heads] = probs.mean(dim=2)
        s[:, heads] = _diagonal_sums(probs, t) / n_last
    return v, s


def _diagonal_sums(probs: torch.Tensor, t: int) -> torch.Tensor:
    """Sums of (..., L, T) rows along offsets: out[o] = sum_r probs[r, p_r - o], where row r
    sits at absolute position p_r = T - L + r (the skew of the flipped rows: row r's offset o
    is column o + L - 1 - r of the flipped row)."""
    *lead, n_last, _ = probs.shape
    flipped = torch.nn.functional.pad(probs.flip(-1), (0, n_last))  # (..., L, T + L)
    flat = flipped.reshape(-1, n_last * (t + n_last))
    width = t + n_last - 1
    skewed = flat[:, n_last - 1 : n_last - 1 + n_last * width].reshape(-1, n_last, width)
    return skewed[..., :t].sum(dim=-2).reshape(*lead, t)


def _tile_windows(profile: torch.Tensor, block_size: int) -> torch.Tensor:
    """(..., T) per-offset values -> (..., nb, 2 * block_size - 1): window d holds offsets
    d * block_size + delta for delta in [-(block_size - 1), block_size - 1] (0 outside [0, T))."""
    t = profile.shape[-1]
    nb = num_blocks(t, block_size)
    padded = torch.nn.functional.pad(profile, (block_size - 1, nb * block_size - t))
    return padded.unfold(-1, 2 * block_size - 1, block_size)


def _last_rows(t: int, block_size: int) -> int:
    """Query rows of the last block (block_size when T is a multiple of it)."""
    return t - (num_blocks(t, block_size) - 1) * block_size


def _toeplitz(per_distance: torch.Tensor, last_row: torch.Tensor, nb: int) -> torch.Tensor:
    """(..., nb) values by distance d = i - j, and the last row's own (..., nb) -> (..., nb, nb)
    with rows i < nb - 1 reading per_distance[i - j], row nb - 1 reading last_row[nb - 1 - j],
    and 0 above the diagonal."""
    dev = per_distance.device
    dist = torch.arange(nb, device=dev)[:, None] - torch.arange(nb, device=dev)[None, :]
    causal = dist >= 0
    out = per_distance[..., dist.clamp_min(0)]
    out[..., -1, :] = last_row[..., (nb - 1) - torch.arange(nb, device=dev)]
    return torch.where(causal, out, torch.zeros((), dtype=out.dtype, device=dev))


def vertical_slash_block_scores(v: torch.Tensor, s: torch.Tensor, block_size: int) -> torch.Tensor:
    """The mass the vertical and slash profiles put on each (query block, key block) tile.

    Per query row r of block i: ``V`` = sum of v[c] over the keys c <= r of block j, ``S`` =
    sum of s[r - c] over the same keys; both are averaged over the rows of block i (the last
    block may be partial). The score is (V + S) / 2.

    Args:
        v, s: float32 (B, H, T) profiles (`vertical_slash`).
        block_size: tokens per block.

    Returns:
        float32 (B, H, nb, nb), 0 above the diagonal.
    """
    t = v.shape[-1]
    nb = num_blocks(t, block_size)
    n_last = _last_rows(t, block_size)
    dev = v.device
    # vertical: whole key blocks below the diagonal; on it, key c counts for the rows r >= c
    blocks = torch.nn.functional.pad(v, (0, nb * block_size - t)).unflatten(-1, (nb, block_size))
    rows = torch.full((nb,), float(block_size), device=dev)
    rows[-1] = n_last
    col = torch.arange(block_size, device=dev, dtype=torch.float32)
    share = ((rows[:, None] - col[None, :]) / rows[:, None]).clamp_min(0.0)  # (nb, block)
    below = blocks.sum(dim=-1)  # (B, H, nb)
    diag = (blocks * share).sum(dim=-1)
    causal = causal_block_mask(nb, dev)
    vertical = torch.where(causal, below[..., None, :], 0.0)
    vertical.diagonal(dim1=-2, dim2=-1).copy_(diag)
    # slash: a full tile at distance d holds (block - |delta|) cells at offset d * block + delta;
    # the last row's tiles hold #{a < n_last, b < block: a - b = delta} cells
    delta = torch.arange(-(block_size - 1), block_size, device=dev)
    full_cells = (block_size - delta.abs()).float()
    last_cells = (
        (torch.minimum(torch.full_like(delta, n_last), block_size + delta) - delta.clamp_min(0))
        .clamp_min(0)
        .float()
    )
    windows = _tile_windows(s, block_size)  # (B, H, nb, 2 * block - 1)
    slash = _toeplitz(windows @ full_cells / block_size, windows @ last_cells / n_last, nb)
    return 0.5 * (vertical + slash)


def vertical_slash_block_mask(
    columns: torch.Tensor, offsets: torch.Tensor, block_size: int
) -> torch.Tensor:
    """The tiles that hold a kept column or a cell of a kept diagonal.

    Args:
        columns: bool (B, H, T), kept key columns; offsets: bool (B, H, T), kept diagonals
            (offset o = query position - key position).
        block_size: tokens per block.

    Returns:
        bool (B, H, nb, nb), causal.
    """
    t = columns.shape[-1]
    nb = num_blocks(t, block_size)
    n_last = _last_rows(t, block_size)
    blocks = torch.nn.functional.pad(columns, (0, nb * block_size - t)).unflatten(
        -1, (nb, block_size)
    )
    causal = causal_block_mask(nb, columns.device)
    vertical = blocks.any(dim=-1)[..., None, :] & causal
    windows = _tile_windows(offsets.float(), block_size) > 0  # (B, H, nb, 2 * block - 1)
    full = windows.any(dim=-1)
    last = windows[..., : block_size - 1 + n_last].any(dim=-1)
    return vertical | _toeplitz(full, last, nb)


class MInferenceSelector(_BudgetSelector):
    """MInference's vertical-slash estimate from the last queries, converted to blocks.

    Args:
        config: SketchWalk's config (forced blocks, budget, granularity, dense layers).
        last_queries: queries at the end of the prompt that estimate the lines (MInference: 64).
        vertical_size, slash_size: MInference's own budget, in key columns and diagonals per
            head; given together, they replace the config's budget (the realized density then
            follows the data). None (default): the block scores are ranked by our budget.
        scale: softmax scale (default 1 / sqrt(head_dim)).
    """

    name = "minference"

    def __init__(
        self,
        config: SketchWalkConfig | None = None,
        last_queries: int = DEFAULT_LAST_QUERIES,
        vertical_size: int | None = None,
        slash_size: int | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__(config)
        if isinstance(last_queries, bool) or not isinstance(last_queries, int) or last_queries < 1:
            raise UsageError(
                f"MInferenceSelector: last_queries must be an int >= 1, got {last_queries!r}"
            )
        if (vertical_size is None) != (slash_size is None):
            raise UsageError(
                "MInferenceSelector: give vertical_size and slash_size together (MInference's "
                "own budget) or neither (the config's budget)"
            )
        for label, size in (("vertical_size", vertical_size), ("slash_size", slash_size)):
            if size is not None and (
                isinstance(size, bool) or not isinstance(size, int) or size < 0
            ):
                raise UsageError(f"MInferenceSelector: {label} must be an int >= 0, got {size!r}")
        self.last_queries = last_queries
        self.vertical_size = vertical_size
        self.slash_size = slash_size
        self.scale = scale

    @property
    def native(self) -> bool:
        """Whether MInference's own budget (vertical_size, slash_size) is used."""
        return self.vertical_size is not None

    def _scores(self, q, k, layer_idx, groups):
        v, s = vertical_slash(q, k, self.last_queries, self.scale)
        return aggregate_groups(vertical_slash_block_scores(v, s, self.config.block_size), groups)

    def _native_mask(self, q, k, layer_idx, groups):
        v, s = vertical_slash(q, k, self.last_queries, self.scale)
        t = v.shape[-1]
        columns = _top_mask(v, min(self.vertical_size, t))
        offsets = _top_mask(s, min(self.slash_size, t))
        per_head = vertical_slash_block_mask(columns, offsets, self.config.block_size)
        return union_groups(per_head, groups)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "last_queries": self.last_queries,
            "vertical_size": self.vertical_size,
            "slash_size": self.slash_size,
        }


def _top_mask(values: torch.Tensor, count: int) -> torch.Tensor:
    """bool like ``values`` (..., n): its ``count`` largest entries of each row."""
    out = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    if count > 0:
        out.scatter_(-1, values.topk(count, dim=-1).indices, True)
    return out
