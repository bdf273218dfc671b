"""XAttention's antidiagonal block scores (Xu et al. 2025), ranked at our budgets.

XAttention scores a (query block, key block) tile by the attention on strided antidiagonals
inside it (docs/algorithm.md §8.1). With a stride S that divides the block size, the tokens are
grouped into S-token steps; within the S x S sub-tile of query step a and key step b, the
antidiagonal is the S cells (S a + S - 1 - s, S b + s), s = 0 .. S - 1. Every query row and
every key column of a sub-tile crosses it once, so vertical lines and diagonals inside a tile are
seen without looking at every cell. Per head:

1. the strided logit of (a, b) is the sum of the antidiagonal's logits divided by S, at scale
   1 / sqrt(D): ``sum_s q[S a + S - 1 - s] . k[S b + s] / (S sqrt(D))`` (one matrix product of
   the strided, reversed queries with the strided keys);
2. a softmax over the causal steps b <= a of each step a;
3. the score of tile (i, j) is the sum of those probabilities over the steps of query block i
   and key block j, divided by the number of query steps of block i (each row of scores sums
   to 1: an estimate of the attention mass of the tile).

A mask group averages its heads' scores. XAttention's own budget (keep the best tiles of a row
until their share of the row's scores reaches a threshold, the first block and the diagonal
first) is the ``mass`` budget of `SketchWalkConfig`: ``config.replace(density=None, mass=0.9)``.

Lengths that are not a multiple of the block size are padded with zero tokens: a step made only
of padding keys is masked out, a step made only of padding queries is dropped, and a partial step
sums its real cells only.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sketchwalk.blocks import UsageError, num_blocks
from sketchwalk.config import SketchWalkConfig
from sketchwalk.selection.baselines import _BudgetSelector, aggregate_groups

__all__ = ["DEFAULT_STRIDE", "XAttentionSelector", "antidiagonal_block_scores"]

# XAttention's stride for language models (8 with blocks of 128; it must divide the block size).
DEFAULT_STRIDE = 8
# Elements of one chunk of (B, heads of a KV group, steps, steps) float32 strided probabilities.
DEFAULT_CHUNK_ELEMENTS = 1 << 26


def antidiagonal_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    stride: int,
    scale: float | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Per-head antidiagonal block scores.

    Args:
        q: (B, Hq, T, D) queries; k: (B, Hkv, T, D) keys (GQA: head h reads KV head
            h // (Hq / Hkv)).
        block_size: tokens per block; a multiple of ``stride``.
        stride: S, the antidiagonal step.
        scale: softmax scale (default 1 / sqrt(D)); the strided logits are divided by S too.
        chunk_elements: size of one chunk of strided probabilities (rows of steps are processed
            in chunks of whole query blocks).

    Returns:
        float32 (B, Hq, nb, nb): each row's tiles sum to 1 over its causal blocks, 0 above the
        diagonal. The strided product runs in the inputs' dtype, the softmax in float32.
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    nb = num_blocks(t, block_size)
    steps_per_block = block_size // stride
    steps = nb * steps_per_block
    pad = nb * block_size - t
    scale = (1.0 / math.sqrt(d) if scale is None else scale) / stride
    # step a of the queries: q[S a + S - 1 - s] for s = 0 .. S - 1, concatenated on channels
    qs = torch.nn.functional.pad(q, (0, 0, 0, pad)).unflatten(2, (steps, stride)).flip(3)
    qs = qs.flatten(3)  # (B, Hq, steps, S * D)
    ks = torch.nn.functional.pad(k, (0, 0, 0, pad)).unflatten(2, (steps, stride)).flatten(3)
    dev = q.device
    step_pos = torch.arange(steps, device=dev) * stride  # first token of each step
    real_keys = step_pos < t
    real_rows = (step_pos < t).view(nb, steps_per_block).sum(dim=1).float()  # per query block
    rows = max(1, chunk_elements // max(1, b * group * steps))
    rows = max(steps_per_block, rows // steps_per_block * steps_per_block)
    out = torch.empty(b, hq, nb, nb, dtype=torch.float32, device=dev)
    cols = torch.arange(steps, device=dev)
    for g in range(hkv):
        heads = slice(g * group, (g + 1) * group)
        kg = ks[:, g : g + 1].transpose(-1, -2)  # (B, 1, S * D, steps)
        for start in range(0, steps, rows):
            stop = min(steps, start + rows)
            logits = torch.matmul(qs[:, heads, start:stop], kg).float() * scale
            a = torch.arange(start, stop, device=dev)
            allowed = (cols[None, :] <= a[:, None]) & real_keys[None, :]
            probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
            probs = probs * (step_pos[start:stop] < t)[:, None]  # padding-only query steps
            tiles = probs.unflatten(-1, (nb, steps_per_block)).sum(dim=-1)
            tiles = tiles.unflatten(-2, (-1, steps_per_block)).sum(dim=-2)
            first = start // steps_per_block
            out[:, heads, first : first + tiles.shape[-2]] = tiles
    return out / real_rows[:, None]


class XAttentionSelector(_BudgetSelector):
    """XAttention's antidiagonal scores, ranked at SketchWalk's budget.

    Args:
        config: SketchWalk's config (forced blocks, budget, granularity, dense layers); its
            ``block_size`` must be a multiple of ``stride``. XAttention's threshold rule is the
            ``mass`` budget.
        stride: S, the antidiagonal step (XAttention: 8 or 16).
        scale: softmax scale (default 1 / sqrt(head_dim)).
        chunk_elements: size of one chunk of strided probabilities (~2**28 on a large GPU).
    """

    name = "xattention"

    def __init__(
        self,
        config: SketchWalkConfig | None = None,
        stride: int = DEFAULT_STRIDE,
        scale: float | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        super().__init__(config)
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise UsageError(f"XAttentionSelector: stride must be an int >= 1, got {stride!r}")
        if self.config.block_size % stride:
            raise UsageError(
                f"XAttentionSelector: stride {stride} must divide the block size "
                f"{self.config.block_size} (--block_size)"
            )
        self.stride = stride
        self.scale = scale
        self.chunk_elements = int(chunk_elements)

    def _scores(self, q, k, layer_idx, groups):
        per_head = antidiagonal_block_scores(
            q, k, self.config.block_size, self.stride, self.scale, self.chunk_elements
        )
        return aggregate_groups(per_head, groups)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "stride": self.stride}
