"""Per-page selection state kept in the padding a serving engine leaves after each KV-cache page.

A paged KV cache is one allocation of ``num_pages`` pages; an engine that sizes it to fill the
device's memory budget (vLLM) pays only for what its per-page size says. `PageTailLayout` is the
state the SketchWalk backend keeps per physical page, laid out as bytes that follow the page's
keys and values: the engine grows its page size by `PageTailLayout.nbytes` (vLLM:
``page_size_padded`` of the layer's KV-cache spec), so that its block count already pays for
the state, and views each layer's cache with the longer page stride. `PageTailLayout.views`
then finds the state inside that stride:

====================  ============================================  =================
bytes after the page  what                                          dtype
====================  ============================================  =================
2 Hkv D s             key minimum, then key maximum (Hkv, D) each   the cache's (s bytes)
4 Hq D                query sums (Hq, D), only with ``num_heads``   float32
4                     page restarted since the sums exist (1.0)     float32
up to 15              padding to a multiple of 16 bytes
====================  ============================================  =================

(`sketchwalk.selection.paged_quest.PageKeyBounds` and
`sketchwalk.selection.paged_queries.PageQuerySums` take these views as their storage.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TAIL_ALIGN = 16  # bytes: the tail keeps pages on 16-byte boundaries if they were


@dataclass(frozen=True)
class PageTailViews:
    """The state of every page, as views into the cache's storage.

    Attributes:
        key_min: (num_pages, Hkv, D) in the cache's dtype.
        key_max: (num_pages, Hkv, D) in the cache's dtype.
        sums: float32 (num_pages, Hq, D), or None when the tail holds no query sums.
        valid: float32 (num_pages,), or None likewise.
    """

    key_min: torch.Tensor
    key_max: torch.Tensor
    sums: torch.Tensor | None
    valid: torch.Tensor | None


@dataclass(frozen=True)
class PageTailLayout:
    """Bytes per page of the per-page state (module docstring).

    Attributes:
        num_kv_heads: Hkv of the layer (this worker's share).
        head_dim: D.
        dtype: the cache's dtype.
        num_heads: Hq for the query sums; 0 for none.
    """

    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    num_heads: int = 0

    def __post_init__(self) -> None:
        if self.num_kv_heads < 1 or self.head_dim < 1 or self.num_heads < 0:
            raise ValueError(
                "PageTailLayout: num_kv_heads and head_dim must be >= 1 and num_heads >= 0, got "
                f"{self.num_kv_heads}, {self.head_dim}, {self.num_heads}"
            )

    @property
    def bounds_bytes(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * _itemsize(self.dtype)

    @property
    def sums_bytes(self) -> int:
        return 4 * (self.num_heads * self.head_dim + 1) if self.num_heads else 0

    @property
    def nbytes(self) -> int:
        """Bytes per page: bounds, then the query sums and their flag, 16-byte aligned."""
        raw = self.bounds_bytes + self.sums_bytes
        return -(-raw // TAIL_ALIGN) * TAIL_ALIGN

    def without_sums(self) -> PageTailLayout:
        return PageTailLayout(self.num_kv_heads, self.head_dim, self.dtype)

    def views(self, kv_cache: torch.Tensor) -> PageTailViews | None:
        """The state inside the page stride of ``kv_cache``.

        Args:
            kv_cache: (num_pages, H, N, C) a layer's cache in this layout's dtype, any order of
                the inner dimensions, each page one dense run of H * N * C elements; the stride
                between pages may be longer (the engine's padding).

        Returns:
            The views, when the padding after every page holds at least `nbytes` (the key
            bounds alone when it holds `without_sums().nbytes` but not the sums); else None.
        """
        if kv_cache.dim() != 4 or kv_cache.dtype != self.dtype or kv_cache.shape[0] < 1:
            return None
        if kv_cache.stride(3) != 1 or min(kv_cache.stride()) < 1:
            return None
        page_elems = kv_cache[0].numel()
        inner = zip(kv_cache.shape[1:], kv_cache.stride()[1:], strict=True)
        extent = 1 + sum((n - 1) * s for n, s in inner)
        if extent != page_elems:  # not one dense run per page: nothing known free after it
            return None
        size = _itemsize(self.dtype)
        room = (kv_cache.stride(0) - page_elems) * size
        layout = self if room >= self.nbytes else self.without_sums()
        if room < layout.nbytes:
            return None
        raw = kv_cache.view(torch.uint8)  # strides and offset in bytes
        num_pages = kv_cache.shape[0]
        tail = torch.as_strided(
            raw, (num_pages, layout.nbytes), (raw.stride(0), 1),
            raw.storage_offset() + page_elems * size,
        )  # fmt: skip
        hkv, d = self.num_kv_heads, self.head_dim
        bounds = tail[:, : layout.bounds_bytes].view(self.dtype).view(num_pages, 2, hkv, d)
        sums = valid = None
        if layout.num_heads:
            start = layout.bounds_bytes
            stop = start + 4 * layout.num_heads * d
            sums = tail[:, start:stop].view(torch.float32).view(num_pages, layout.num_heads, d)
            valid = tail[:, stop : stop + 4].view(torch.float32)[:, 0]
        return PageTailViews(bounds[:, 0], bounds[:, 1], sums, valid)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


__all__ = ["TAIL_ALIGN", "PageTailLayout", "PageTailViews"]
