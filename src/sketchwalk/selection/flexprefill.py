"""FlexPrefill's per-head pattern choice (Lai et al. 2025), ranked at our budgets.

FlexPrefill decides per head and per prompt whether the block pattern depends on the query
("query-aware") or follows fixed lines ("vertical-slash"), from the last block of queries
(docs/algorithm.md §8.3). Per head:

1. the last ``block_size`` queries attend exactly to every key (causal softmax at 1 / sqrt(D));
   their block distribution ``a_true[j]`` = sum over the keys of block j of the mean attention
   (the vertical profile of `sketchwalk.selection.minference.vertical_slash`, summed per block);
2. the pooled estimate ``a_est`` = softmax over key blocks of mean(last queries) . mean(keys of
   block j) / sqrt(D);
3. the square root of the Jensen-Shannon divergence between the two (natural log) decides: below
   ``tau`` the pooled estimate can be trusted and the head is query-aware, otherwise it is a
   vertical-slash head;
4. scores: a query-aware head ranks tile (i, j) by the causal block softmax of mean(queries of
   block i) . mean(keys of block j) / sqrt(D); a vertical-slash head by the mass its vertical and
   slash profiles put on the tile (`~sketchwalk.selection.minference.vertical_slash_block_scores`,
   from the same last-block attention).

A mask group averages its heads' scores (every head's rows are distributions). FlexPrefill's own
budget, the cumulative attention ``gamma``, is an option (`FlexPrefillSelector` ``gamma``): a
query-aware head keeps the fewest tiles of its whole causal block matrix whose scores reach
``gamma`` of the total, a vertical-slash head the fewest key columns and the fewest diagonals
whose profiles each reach ``gamma`` of their total, converted to the tiles that hold them; a mask
group keeps the union of its heads' tiles, plus the forced blocks.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sketchwalk.blocks import UsageError, causal_block_mask, num_blocks
from sketchwalk.config import SketchWalkConfig
from sketchwalk.selection.baselines import _BudgetSelector, aggregate_groups, union_groups
from sketchwalk.selection.minference import (
    vertical_slash,
    vertical_slash_block_mask,
    vertical_slash_block_scores,
)
from sketchwalk.selection.select import mass_keep
from sketchwalk.selection.sketch import block_pool

__all__ = [
    "DEFAULT_TAU",
    "FlexPrefillSelector",
    "js_distance",
    "pooled_block_scores",
    "query_aware_heads",
]

# FlexPrefill's threshold on the square-rooted Jensen-Shannon divergence.
DEFAULT_TAU = 0.1


def js_distance(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Square root of the Jensen-Shannon divergence (natural log) of distributions over the
    last dim; 0 log 0 counts as 0. Returns (...)."""
    m = 0.5 * (p + r)

    def kl(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x * (x.clamp_min(1e-30).log() - m.clamp_min(1e-30).log()), 0.0)

    return (0.5 * kl(p).sum(-1) + 0.5 * kl(r).sum(-1)).clamp_min(0.0).sqrt()


def pooled_block_scores(qb: torch.Tensor, kb: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal block softmax of pooled queries and keys.

    Args:
        qb: (B, Hq, nb, D) block means of the queries; kb: (B, Hkv, nb, D) of the keys.
        scale: logit scale (1 / sqrt(D)).

    Returns:
        float32 (B, Hq, nb, nb), rows summing to 1 over j <= i, 0 above the diagonal.
    """
    b, hq, nb, d = qb.shape
    hkv = kb.shape[1]
    logits = torch.matmul(
        qb.float().view(b, hkv, hq // hkv, nb, d), kb.float()[:, :, None].transpose(-1, -2)
    ).view(b, hq, nb, nb)
    causal = causal_block_mask(nb, qb.device)
    return torch.softmax((logits * scale).masked_fill(~causal, float("-inf")), dim=-1)


def query_aware_heads(
    q: torch.Tensor,
    kb: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    tau: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexPrefill's pattern test.

    Args:
        q: (B, Hq, T, D) queries; kb: (B, Hkv, nb, D) block means of the keys.
        v: float32 (B, Hq, T) vertical profile of the last ``block_size`` queries.
        block_size: tokens per block (also the number of last queries).
        tau: threshold on the square-rooted JS divergence.
        scale: logit scale (1 / sqrt(D)).

    Returns:
        (bool (B, Hq): query-aware heads, float32 (B, Hq): their JS distances).
    """
    b, hq, t, d = q.shape
    hkv = kb.shape[1]
    nb = kb.shape[2]
    last = q[:, :, max(0, t - block_size) :].float().mean(dim=2)  # (B, Hq, D)
    logits = torch.matmul(
        last.view(b, hkv, hq // hkv, 1, d), kb.float()[:, :, None].transpose(-1, -2)
    ).view(b, hq, nb)
    estimate = torch.softmax(logits * scale, dim=-1)
    padded = torch.nn.functional.pad(v, (0, nb * block_size - t))
    truth = padded.unflatten(-1, (nb, block_size)).sum(dim=-1)
    distance = js_distance(truth, estimate)
    return distance < tau, distance


class FlexPrefillSelector(_BudgetSelector):
    """FlexPrefill's per-head query-aware or vertical-slash scores.

    Args:
        config: SketchWalk's config (forced blocks, budget, granularity, dense layers).
        tau: threshold of the pattern test (FlexPrefill: 0.1); 0 makes every head
            vertical-slash, a value above sqrt(log 2) every head query-aware.
        gamma: FlexPrefill's cumulative-attention budget in (0, 1]; given, it replaces the
            config's budget (the realized density then follows the data). None (default): the
            scores are ranked by our budget.
        scale: softmax scale (default 1 / sqrt(head_dim)).
    """

    name = "flexprefill"

    def __init__(
        self,
        config: SketchWalkConfig | None = None,
        tau: float = DEFAULT_TAU,
        gamma: float | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__(config)
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau >= 0.0:
            raise UsageError(f"FlexPrefillSelector: tau must be a number >= 0, got {tau!r}")
        if gamma is not None and (
            isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1
        ):
            raise UsageError(f"FlexPrefillSelector: gamma must be in (0, 1], got {gamma!r}")
        self.tau = float(tau)
        self.gamma = None if gamma is None else float(gamma)
        self.scale = scale
        self.last_query_aware: torch.Tensor | None = None  # (B, Hq) of the last layer

    @property
    def native(self) -> bool:
        """Whether FlexPrefill's own budget (``gamma``) is used."""
        return self.gamma is not None

    def _estimate(self, q, k):
        """Per-head pattern choice and the pieces both patterns need."""
        bs = self.config.block_size
        scale = 1.0 / math.sqrt(q.shape[-1]) if self.scale is None else self.scale
        v, s = vertical_slash(q, k, bs, scale)
        kb = block_pool(k, bs)
        aware, _ = query_aware_heads(q, kb, v, bs, self.tau, scale)
        self.last_query_aware = aware
        return aware, v, s, kb, scale

    def _scores(self, q, k, layer_idx, groups):
        aware, v, s, kb, scale = self._estimate(q, k)
        bs = self.config.block_size
        per_head = vertical_slash_block_scores(v, s, bs)
        if bool(aware.any()):
            pooled = pooled_block_scores(block_pool(q, bs), kb, scale)
            per_head = torch.where(aware[..., None, None], pooled, per_head)
        return aggregate_groups(per_head, groups)

    def _native_mask(self, q, k, layer_idx, groups):
        aware, v, s, kb, scale = self._estimate(q, k)
        bs = self.config.block_size
        t = q.shape[2]
        everything = torch.ones(t, dtype=torch.bool, device=q.device)
        nothing = torch.zeros_like(everything)
        columns = mass_keep(v, everything, nothing, everything, self.gamma)
        offsets = mass_keep(s, everything, nothing, everything, self.gamma)
        per_head = vertical_slash_block_mask(columns, offsets, bs)
        if bool(aware.any()):
            pooled = pooled_block_scores(block_pool(q, bs), kb, scale)
            nb = num_blocks(t, bs)
            causal = causal_block_mask(nb, q.device).flatten()
            flat = pooled.flatten(-2)
            kept = mass_keep(flat, causal, torch.zeros_like(causal), causal, self.gamma)
            per_head = torch.where(aware[..., None, None], kept.view_as(pooled), per_head)
        return union_groups(per_head, groups)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "tau": self.tau, "gamma": self.gamma}
