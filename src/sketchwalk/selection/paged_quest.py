"""The quest decode rule over a paged KV cache, with key bounds kept per physical page.

A serving engine (`sketchwalk.engines.vllm`) holds each layer's keys in a pool of pages shared by
all requests, a request's logical block ``j`` living in page ``block_table[b, j]``; the selection
block IS the page. Instead of per-request decoder state (`SketchWalkDecoder`, which rebuilds or
grows bounds per sequence), `PageKeyBounds` keeps the per-channel minimum and maximum of the keys
of every PHYSICAL page, updated when the engine writes new keys into the cache:

- a write at offset 0 of a page starts the page anew (pages are filled from offset 0 by one
  request at a time, so this is where a freed page gets its new owner): its bounds are reset
  before the step's keys are folded in;
- every other write folds the key into its page's bounds (``scatter_reduce_`` amin / amax).

So a page's bounds always cover exactly the keys written to it since its last offset-0 write,
and pages shared through prefix caching (written once, read by many requests) need nothing
more. Bounds are stored in the cache's dtype (the min and max of bf16 keys are bf16 values:
nothing is lost) with one scratch page for padded slots (slot -1): 2 / page_size of the key
cache's memory (min and max), 1 / page_size of keys and values together.

`paged_quest_select` then ranks the blocks of a batch of decode rows of different lengths in one
pass: the bounds of each row's pages gathered through the block table, the log-space quest
scores of `sketchwalk.selection.quest` with the blocks past a row's end at -inf and its last
block weighted by its token count, the forced blocks (sink, window) at +inf, one ``topk`` (rows
of one budget) or one `top_k_compact` (rows of different budgets, each its own count). A
`PagedDecodePlan` holds what depends only on the rows' lengths (built once per engine step,
shared by the layers). Budgets that are not a
per-row count (``mass``, ``density`` with global allocation) take the reference per row
(`quest_block_scores` + `select_last_row`). The result equals `SketchWalkDecoder` with
``decode_rule="quest"`` on the same keys (tests), without any per-request state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sketchwalk.blocks import compact_mask
from sketchwalk.config import SketchWalkConfig
from sketchwalk.selection.quest import bound_logits, group_log_probs, quest_block_scores
from sketchwalk.selection.select import forced_counts, last_row_kept, select_last_row
from sketchwalk.selection.topk import top_k_compact


def page_writes(
    slots: torch.Tensor, page_size: int, scratch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For the tokens written at ``slots`` (N,) (page * page_size + offset; -1 for a padded
    token): int64 (N,) their pages and the pages they START (offset 0), ``scratch`` where there
    is none. The update rule of the per-page state: a page restarts where its offset 0 is
    written, every written token adds to its page."""
    slots = slots.long()
    inside = slots >= 0
    page = torch.where(inside, torch.div(slots, page_size, rounding_mode="floor"), scratch)
    starts = torch.where(inside & (slots % page_size == 0), page, scratch)
    return page, starts


class PageKeyBounds:
    """Per physical page, KV head and channel: the minimum and maximum of the keys written to a
    paged cache (see the module docstring).

    Args:
        k_pages: the layer's key pool, (num_pages, page_size, Hkv, D), any strides. The bounds
            start from its current contents, whole pages: an upper bound of whatever is there
            (engines create them before the first write; tests may not).
        storage: optional (key_min, key_max), each (num_pages, Hkv, D) in the pool's dtype, any
            strides: where to keep the bounds (e.g. memory the engine reserved beside each page)
            instead of a new allocation; their rows are overwritten with the bounds of the
            pool's contents.
        scratch: with ``storage``, the page whose bounds take the padded slots (-1): one that
            never holds a request's keys (vLLM's null block, page 0). Without ``storage`` the
            bounds get an extra scratch row of their own.
    """

    def __init__(
        self,
        k_pages: torch.Tensor,
        storage: tuple[torch.Tensor, torch.Tensor] | None = None,
        scratch: int = 0,
    ) -> None:
        if k_pages.dim() != 4:
            raise ValueError(
                "PageKeyBounds: k_pages must be (num_pages, page_size, kv_heads, head_dim), "
                f"got {tuple(k_pages.shape)}"
            )
        self.num_pages, self.page_size, hkv, d = k_pages.shape
        lo, hi = torch.aminmax(k_pages, dim=1)
        if storage is None:
            # one scratch page at the end takes the padded slots (-1)
            self.key_min = torch.cat([lo, lo.new_zeros(1, hkv, d)])
            self.key_max = torch.cat([hi, hi.new_zeros(1, hkv, d)])
            self.scratch = self.num_pages
            return
        key_min, key_max = storage
        for name, t in (("key_min", key_min), ("key_max", key_max)):
            if tuple(t.shape) != (self.num_pages, hkv, d) or t.dtype != k_pages.dtype:
                raise ValueError(
                    f"PageKeyBounds: storage {name} must be {(self.num_pages, hkv, d)} "
                    f"{k_pages.dtype}, got {tuple(t.shape)} {t.dtype}"
                )
        if not 0 <= scratch < self.num_pages:
            raise ValueError(f"PageKeyBounds: scratch page {scratch} outside the pool")
        key_min.copy_(lo)
        key_max.copy_(hi)
        self.key_min, self.key_max, self.scratch = key_min, key_max, int(scratch)

    def matches(self, k_pages: torch.Tensor) -> bool:
        """Whether these bounds belong to a pool of ``k_pages``' shape, dtype and device."""
        n, p, h, d = k_pages.shape
        return (
            (n, p) == (self.num_pages, self.page_size)
            and tuple(self.key_min.shape[1:]) == (h, d)
            and self.key_min.dtype == k_pages.dtype
            and self.key_min.device == k_pages.device
        )

    def update(self, keys: torch.Tensor, slots: torch.Tensor) -> None:
        """Fold the keys just written at ``slots`` (N,) (page * page_size + offset; -1 for a
        padded token) into their pages' bounds; keys (N, Hkv, D). No host sync."""
        if keys.shape[0] == 0:
            return
        page, starts = page_writes(slots, self.page_size, self.scratch)
        keys = keys.to(self.key_min.dtype)
        self.key_min.index_fill_(0, starts, float("inf"))
        self.key_max.index_fill_(0, starts, float("-inf"))
        index = page[:, None, None].expand_as(keys)
        self.key_min.scatter_reduce_(0, index, keys, "amin", include_self=True)
        self.key_max.scatter_reduce_(0, index, keys, "amax", include_self=True)


@dataclass
class PagedDecodePlan:
    """What a batch of decode rows needs beyond the queries and bounds, from their lengths alone
    (one per engine step, shared by the layers).

    Attributes:
        seq_lens: tokens per row, the current one included (host).
        num_key_blocks: blocks per row (host).
        kept: blocks each row keeps under a row budget (host; None for the other budgets).
        pages: int64 (B, nmax) the rows' physical pages; past a row's end its first page
            (finite bounds, masked by ``pre``: the scratch page may hold anything).
        pre: float32 (B, nmax) added to the logits before the softmax: -inf past a row's end,
            ``log(last_count / block_size)`` on its last block.
        forced: float32 (B, nmax) added after: +inf on the sink and window, 0 elsewhere.
        kv_num_blocks_row: int32 (B,) ``kept`` on the device.
    """

    seq_lens: list[int]
    num_key_blocks: list[int]
    kept: list[int] | None
    pages: torch.Tensor
    pre: torch.Tensor
    forced: torch.Tensor
    kv_num_blocks_row: torch.Tensor | None

    @classmethod
    def build(
        cls,
        seq_lens: list[int],
        block_table: torch.Tensor,
        config: SketchWalkConfig,
    ) -> PagedDecodePlan:
        """``block_table`` (B, max_pages) of the rows. One host-to-device copy of the small
        tables."""
        bs = config.block_size
        if not seq_lens:
            raise ValueError("PagedDecodePlan: no rows")
        if min(seq_lens) < 1:
            raise ValueError(f"PagedDecodePlan: every row needs a token, got {seq_lens}")
        nks = [-(-s // bs) for s in seq_lens]
        nmax = max(nks)
        if nmax > block_table.shape[1]:
            raise ValueError(
                f"PagedDecodePlan: a row of {max(seq_lens)} tokens needs {nmax} pages of "
                f"{bs}; the block table has {block_table.shape[1]}"
            )
        rows = len(seq_lens)
        pre = torch.zeros(rows, nmax)
        forced = torch.zeros(rows, nmax)
        valid = torch.zeros(rows, nmax, dtype=torch.bool)
        for b, (s, nk) in enumerate(zip(seq_lens, nks, strict=True)):
            valid[b, :nk] = True
            pre[b, nk:] = float("-inf")
            last = s - (nk - 1) * bs
            if last != bs:
                pre[b, nk - 1] = math.log(last / bs)
            sink, window = forced_counts(nk, config)
            forced[b, :sink] = float("inf")
            forced[b, nk - window : nk] = float("inf")
        row_budget = config.budget != "mass" and config.allocation == "row"
        kept = [last_row_kept(nk, config) for nk in nks] if row_budget else None
        device = block_table.device
        pages = block_table[:, :nmax].long()
        pages = torch.where(valid.to(device), pages, pages[:, :1])
        return cls(
            seq_lens=list(seq_lens),
            num_key_blocks=nks,
            kept=kept,
            pages=pages,
            pre=pre.to(device),
            forced=forced.to(device),
            kv_num_blocks_row=(
                torch.tensor(kept, dtype=torch.int32).to(device) if kept is not None else None
            ),
        )


def paged_quest_select(
    q: torch.Tensor,
    bounds: PageKeyBounds,
    plan: PagedDecodePlan,
    config: SketchWalkConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The quest selection of a batch of decode rows from per-page bounds.

    Args:
        q: (B, Hq, D) each row's current query (its key already in the bounds).
        bounds: the layer's `PageKeyBounds`.
        plan: the rows' `PagedDecodePlan`.
        config: block size, granularity and budget (as `SketchWalkDecoder`'s).

    Returns:
        (kv_num_blocks int32 (B, G), kv_indices int32 (B, G, n)): row b's first kv_num_blocks
        entries are its kept LOGICAL blocks (in score order under a row budget, ascending
        otherwise), the rest padding: what `sketchwalk.attention.paged.paged_sparse_decode`
        takes.
    """
    b, hq, d = q.shape
    hkv = bounds.key_min.shape[1]
    if hq % hkv:
        raise ValueError(f"paged_quest_select: {hq} query heads for {hkv} KV heads")
    nmax = plan.pages.shape[1]
    g = hq // hkv
    # (B, nmax, Hkv, D) -> (B * Hkv, nmax, D)
    lo = bounds.key_min[plan.pages].transpose(1, 2).reshape(b * hkv, nmax, d).float()
    hi = bounds.key_max[plan.pages].transpose(1, 2).reshape(b * hkv, nmax, d).float()
    if plan.kept is None:
        return _reference_rows(q, lo, hi, plan, config)
    logits = bound_logits(q, lo, hi).view(b, hq, nmax) + plan.pre[:, None]
    scores = group_log_probs(logits.view(b * hkv, g, nmax), b, config.granularity)
    groups = scores.shape[1]
    ranked = scores + plan.forced[:, None]
    num = plan.kv_num_blocks_row[:, None].expand(b, groups).contiguous()
    if min(plan.kept) == max(plan.kept):  # one budget: an unsorted top-k
        return num, ranked.topk(plan.kept[0], dim=-1, sorted=False).indices.to(torch.int32)
    # rows of different budgets: each row's own count, compacted on the device
    top, _ = top_k_compact(ranked, num)
    return num, top


def _reference_rows(
    q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, plan: PagedDecodePlan, config
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row at a time: `quest_block_scores` and `select_last_row` (the budgets that are not
    a count per row)."""
    b, _, d = q.shape
    nmax = plan.pages.shape[1]
    hkv = lo.shape[0] // b
    lo = lo.view(b, hkv, nmax, d)
    hi = hi.view(b, hkv, nmax, d)
    masks = []
    for r, (s, nk) in enumerate(zip(plan.seq_lens, plan.num_key_blocks, strict=True)):
        counts = torch.full((nk,), float(config.block_size), device=q.device)
        counts[-1] = float(s - (nk - 1) * config.block_size)
        scores = quest_block_scores(
            q[r : r + 1], lo[r : r + 1, :, :nk], hi[r : r + 1, :, :nk], counts, config.granularity
        )
        mask = select_last_row(scores, config)
        masks.append(torch.nn.functional.pad(mask, (0, nmax - nk)))
    return compact_mask(torch.cat(masks))


__all__ = ["PageKeyBounds", "PagedDecodePlan", "page_writes", "paged_quest_select"]
