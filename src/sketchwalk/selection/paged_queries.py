"""Query sums per physical page of a paged KV cache: the prefill selection state of tokens that a
serving engine no longer holds.

`SketchWalk.select_chunk` continues a prompt after tokens fed earlier from their pooled queries
(block means). A serving engine that reuses cached pages for a new request (prefix caching)
never ran the new request's earlier tokens, and queries are not cached. `PageQuerySums` keeps,
per physical page and query head, the float32 sum of the queries written to the page, with the
invariant of `sketchwalk.selection.paged_quest.PageKeyBounds`: a write at offset 0 restarts the
page, any write adds to it, padded slots (-1) land on a scratch page. `PageQuerySums.pooled`
turns the pages of a sequence's first ``length`` tokens into the pooled queries
`SketchWalk.seed_queries` takes, whoever wrote them.

Memory: Hq x D float32 per page and layer, ``2 Hq / (page_size Hkv)`` of the key cache (12.5%
for Llama-3.1-8B with 64-token pages; more with smaller pages), so engines keep it only when asked.
"""

from __future__ import annotations

import torch

from sketchwalk.selection.paged_quest import page_writes


class PageQuerySums:
    """Per physical page: the sum of the queries written to it since its last offset-0 write.

    Args:
        num_pages: pages in the pool.
        page_size: tokens per page.
        num_heads: query heads (of this worker).
        head_dim: D.
        device: where the pool lives.
        storage: optional (sums float32 (num_pages, Hq, D), valid float32 (num_pages,)), any
            strides: where to keep the sums and the per-page flag "restarted since these sums
            exist" (1.0) instead of new allocations (e.g. memory the engine reserved beside
            each page); the flags are cleared here.
        scratch: with ``storage``, the page that takes the padded slots (-1): one that never
            holds a request's tokens (vLLM's null block, page 0). Without ``storage`` the sums
            get an extra scratch row of their own.
    """

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        num_heads: int,
        head_dim: int,
        device,
        storage: tuple[torch.Tensor, torch.Tensor] | None = None,
        scratch: int = 0,
    ) -> None:
        self.num_pages, self.page_size = int(num_pages), int(page_size)
        if storage is None:
            self.sums = torch.zeros(num_pages + 1, num_heads, head_dim, device=device)
            # pages restarted since these sums exist (the others hold nothing trustworthy)
            self.valid = torch.zeros(num_pages + 1, device=device)
            self.scratch = self.num_pages
            return
        sums, valid = storage
        if tuple(sums.shape) != (num_pages, num_heads, head_dim) or sums.dtype != torch.float32:
            raise ValueError(
                f"PageQuerySums: storage sums must be float32 {(num_pages, num_heads, head_dim)}, "
                f"got {sums.dtype} {tuple(sums.shape)}"
            )
        if tuple(valid.shape) != (num_pages,) or valid.dtype != torch.float32:
            raise ValueError(
                f"PageQuerySums: storage valid must be float32 ({num_pages},), "
                f"got {valid.dtype} {tuple(valid.shape)}"
            )
        if not 0 <= scratch < self.num_pages:
            raise ValueError(f"PageQuerySums: scratch page {scratch} outside the pool")
        valid.zero_()
        self.sums, self.valid, self.scratch = sums, valid, int(scratch)

    def matches(self, num_pages: int, page_size: int, num_heads: int, device) -> bool:
        return (
            (num_pages, page_size) == (self.num_pages, self.page_size)
            and self.sums.shape[1] == num_heads
            and self.sums.device == torch.device(device)
        )

    def update(self, queries: torch.Tensor, slots: torch.Tensor) -> None:
        """Add the queries (N, Hq, D) of the tokens written at ``slots`` (N,). No host sync."""
        if queries.shape[0] == 0:
            return
        page, starts = page_writes(slots, self.page_size, self.scratch)
        self.sums.index_fill_(0, starts, 0.0)
        self.valid.index_fill_(0, starts, 1.0)
        self.sums.index_add_(0, page, queries.float())

    def pooled(
        self, table_row: torch.Tensor, length: int, block_size: int, parity: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled queries of a sequence's first ``length`` tokens, which must be all that its
        pages hold (call it before the queries of later tokens are added).

        Args:
            table_row: int (max_pages,) the sequence's pages.
            length: tokens, >= 1; the blocks are the pages (``block_size == page_size``).
            block_size: the selection's block size (checked against the page size).
            parity: divide every block by ``block_size`` (the released pooling) instead of its
                token count.

        Returns:
            (pooled float32 (1, Hq, nb, D), all_valid bool scalar tensor: every page was
            restarted since these sums exist). No host sync.
        """
        if block_size != self.page_size:
            raise ValueError(
                f"PageQuerySums.pooled: block_size {block_size} differs from the page size "
                f"{self.page_size}"
            )
        if length < 1:
            raise ValueError(f"PageQuerySums.pooled: length must be >= 1, got {length}")
        nb = -(-length // block_size)
        pages = table_row[:nb].long()
        sums = self.sums.index_select(0, pages)  # (nb, Hq, D)
        counts = torch.full((nb,), float(block_size), device=sums.device)
        if not parity:
            counts[-1] = float(length - (nb - 1) * block_size)
        pooled = (sums / counts[:, None, None]).transpose(0, 1)[None]
        return pooled.contiguous(), (self.valid.index_select(0, pages) > 0).all()


__all__ = ["PageQuerySums"]
