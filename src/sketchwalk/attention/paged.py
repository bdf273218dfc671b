"""Block-sparse attention over a paged KV cache: checks, dispatch and the PyTorch references.

Layout (the one serving engines such as vLLM keep): per layer a pool of pages
``k_pages`` / ``v_pages`` of logical shape (num_pages, page_size, Hkv, D). Any strides whose last
one is 1 are read as they are, so a (num_pages, Hkv, page_size, D) pool is passed as its
``transpose(1, 2)`` view (no copy). Sequence ``b`` of a batch holds ``seq_lens[b]`` tokens; its
logical page ``j`` (tokens ``j * page_size .. (j + 1) * page_size - 1``) lives in physical page
``block_table[b, j]``. The selection block IS the page (block_size == page_size), and selections
name LOGICAL blocks of the sequence: the kernels map them to pages through the block table.

- `paged_sparse_decode`: ``Tq`` new queries at the end of each sequence (lengths may differ).
- `paged_sparse_prefill`: a chunk of ``T`` queries at the end of each sequence (equal T, lengths
  may differ), with a `BlockSelection`-style selection of the blocks holding the chunk.
- `gather_pages`: the contiguous (B, Hkv, S, D) cache of a batch's pages (references, tests).

Backends: ``"triton"`` (`triton_paged`, bf16/fp16, page_size a multiple of 16, no host sync),
``"reference"`` (gathers each sequence's pages and calls `sparse_decode` / `sparse_attention`
with backend "reference"), ``"auto"`` (Triton on CUDA when it can run, else the reference).
Input checks on shapes, dtypes and devices never sync; ``validate=True`` (the default) also
checks the VALUES of ``seq_lens``, ``block_table`` and the selection in one host sync (skipped
during CUDA graph capture); pass ``validate=False`` on a serving path.
"""

from __future__ import annotations

import torch

from sketchwalk.attention.api import (
    _normalise_selection,
    on_device,
    resolve_backend,
    sparse_attention,
    sparse_decode,
)
from sketchwalk.blocks import BlockSelection, causal_block_mask, compact_mask


def _is_int(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def gather_pages(pages: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` tokens of each sequence's pages as a contiguous cache.

    Args:
        pages: (num_pages, page_size, Hkv, D) (any strides).
        block_table: int (B, max_pages) (or (max_pages,) for one sequence): logical page ->
            physical page.
        seq_len: tokens to gather per sequence (at most max_pages * page_size).

    Returns:
        (B, Hkv, seq_len, D) contiguous, in pages' dtype.
    """
    if pages.dim() != 4:
        raise ValueError(
            f"gather_pages: pages must be (num_pages, page_size, kv_heads, head_dim), got "
            f"{tuple(pages.shape)}"
        )
    if block_table.dim() == 1:
        block_table = block_table[None]
    if block_table.dim() != 2 or not _is_int(block_table):
        raise ValueError(
            f"gather_pages: block_table must be an integer (batch, max_pages) tensor, got "
            f"{block_table.dtype} of shape {tuple(block_table.shape)}"
        )
    page_size = pages.shape[1]
    used = -(-seq_len // page_size)
    if seq_len < 0 or used > block_table.shape[1]:
        raise ValueError(
            f"gather_pages: seq_len={seq_len} needs {used} pages of {page_size} tokens; "
            f"block_table has {block_table.shape[1]} per sequence"
        )
    table = block_table[:, :used].long().to(pages.device)
    batch = table.shape[0]
    tokens = pages[table].reshape(batch, used * page_size, *pages.shape[2:])[:, :seq_len]
    return tokens.transpose(1, 2).contiguous()


# ---- checks -----------------------------------------------------------------------------


def _check_common(
    where: str,
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
) -> None:
    """Ranks, shapes, dtypes and devices (no host sync)."""
    for name, t in (
        ("q", q),
        ("k_pages", k_pages),
        ("v_pages", v_pages),
        ("block_table", block_table),
        ("seq_lens", seq_lens),
    ):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4 or not q.is_floating_point():
        raise ValueError(
            f"{where}: q must be a floating (batch, heads, queries, head_dim) tensor, got "
            f"{q.dtype} of shape {tuple(q.shape)}"
        )
    batch, num_q_heads, num_queries, head_dim = q.shape
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"{where}: page_size must be a positive int, got {page_size!r}")
    if k_pages.dim() != 4:
        raise ValueError(
            f"{where}: k_pages must be (num_pages, page_size, kv_heads, head_dim) (a "
            f"(num_pages, kv_heads, page_size, head_dim) pool as its transpose(1, 2) view), got "
            f"shape {tuple(k_pages.shape)}"
        )
    if v_pages.shape != k_pages.shape:
        raise ValueError(
            f"{where}: v_pages {tuple(v_pages.shape)} must have k_pages' shape "
            f"{tuple(k_pages.shape)}"
        )
    if k_pages.shape[1] != page_size:
        raise ValueError(
            f"{where}: k_pages has pages of {k_pages.shape[1]} tokens (dim 1) but "
            f"page_size={page_size}; a (num_pages, kv_heads, page_size, head_dim) pool is "
            "passed as k_pages.transpose(1, 2)"
        )
    num_kv_heads = k_pages.shape[2]
    if k_pages.shape[3] != head_dim:
        raise ValueError(
            f"{where}: k_pages head_dim {k_pages.shape[3]} does not match q's {head_dim}"
        )
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"{where}: q heads ({num_q_heads}) must be a multiple of k_pages' kv heads "
            f"({num_kv_heads})"
        )
    if k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        raise ValueError(
            f"{where}: k_pages and v_pages must have q's dtype {q.dtype}, got {k_pages.dtype} "
            f"and {v_pages.dtype}"
        )
    if block_table.dim() != 2 or not _is_int(block_table):
        raise ValueError(
            f"{where}: block_table must be an integer (batch, max_pages) tensor, got "
            f"{block_table.dtype} of shape {tuple(block_table.shape)}"
        )
    if block_table.shape[0] != batch:
        raise ValueError(
            f"{where}: block_table has {block_table.shape[0]} rows for a batch of {batch}"
        )
    if seq_lens.dim() != 1 or not _is_int(seq_lens) or seq_lens.shape[0] != batch:
        raise ValueError(
            f"{where}: seq_lens must be an integer (batch,) = ({batch},) tensor, got "
            f"{seq_lens.dtype} of shape {tuple(seq_lens.shape)}"
        )
    for name, t in (
        ("k_pages", k_pages),
        ("v_pages", v_pages),
        ("block_table", block_table),
        ("seq_lens", seq_lens),
    ):
        if t.device != q.device:
            raise ValueError(f"{where}: {name} is on {t.device} but q is on {q.device}")
    if num_queries < 1:
        raise ValueError(f"{where}: q has no queries (dim 2 is 0)")


def _check_groups(where: str, num_groups: int, num_q_heads: int, num_kv_heads: int) -> None:
    if num_groups not in (1, num_kv_heads, num_q_heads):
        raise ValueError(
            f"{where}: kv_num_blocks has {num_groups} mask groups; expected 1, "
            f"num_kv_heads={num_kv_heads} or num_heads={num_q_heads}"
        )


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _validate_values(
    where: str,
    num_queries: int,
    num_pages: int,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    page_size: int,
    prefill: bool,
) -> None:
    """The values of seq_lens, block_table and the selection, in ONE host sync (none while a CUDA
    graph is being captured). kv_num_blocks (B, G, R), kv_indices (B, G, R, n)."""
    if _capturing(seq_lens):
        return
    lens = seq_lens.long()
    max_pages = block_table.shape[1]
    pages_used = (lens + page_size - 1) // page_size  # (B,)
    in_use = torch.arange(max_pages, device=lens.device)[None, :] < pages_used[:, None]
    table = block_table.long()
    n = kv_indices.shape[-1]
    num = kv_num_blocks.long()
    valid = torch.arange(n, device=num.device) < num[..., None]  # (B, G, R, n)
    idx = kv_indices.long()
    blocks = pages_used[:, None, None, None]
    checks: list[tuple[torch.Tensor, str]] = [
        (
            (lens >= num_queries).all(),
            f"seq_lens must be >= the {num_queries} queries of q for every sequence",
        ),
        (
            (lens <= max_pages * page_size).all(),
            f"block_table is too short: seq_lens need more than its {max_pages} pages of "
            f"{page_size} tokens",
        ),
        (
            ((table >= 0) & (table < num_pages) | ~in_use).all(),
            f"block_table entries of the pages in use must lie in [0, num_pages={num_pages})",
        ),
        (
            ((num >= 0) & (num <= n)).all(),
            f"kv_num_blocks must lie in [0, {n}] (kv_indices' last dim)",
        ),
        (
            ((idx >= 0) & (idx < blocks) | ~valid).all(),
            "kv_indices' kept entries must be logical blocks of the sequence, in "
            "[0, ceil(seq_lens[b] / page_size))",
        ),
    ]
    if prefill:
        rows = pages_used - (lens - num_queries).clamp_min(0) // page_size
        checks.append(
            (
                (rows <= kv_num_blocks.shape[2]).all(),
                f"kv_num_blocks has {kv_num_blocks.shape[2]} query-block rows; a sequence needs "
                "ceil(S / page_size) - (S - T) // page_size (the blocks holding its T queries)",
            )
        )
    if bool(torch.stack([ok for ok, _ in checks]).all()):  # the one host sync
        return
    for ok, message in checks:
        if not bool(ok):
            raise ValueError(f"{where}: {message}")


def _kernel_backend(
    where: str,
    backend: str,
    mode: str,
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_size: int,
) -> str:
    """The backend to run: ``resolve_backend`` plus what paged reads need (page_size a multiple
    of 16, unit last stride); ``"auto"`` falls back to the reference when they do not hold."""
    name = resolve_backend(backend, q, mode)
    if name == "reference":
        return name
    if name != "triton":  # FlexAttention: no paged path
        if backend == "auto":
            return "reference"
        raise RuntimeError(f"{where}: backend {name!r} has no paged kernel; use 'triton'")
    problem = None
    if page_size % 16:
        problem = f"page_size must be a multiple of 16 for the triton backend, got {page_size}"
    elif k_pages.stride(-1) != 1 or v_pages.stride(-1) != 1:
        problem = (
            "k_pages and v_pages need a contiguous last dim (stride 1) for the triton backend, "
            f"got strides {k_pages.stride()} and {v_pages.stride()}"
        )
    if problem is None:
        return name
    if backend == "auto":
        return "reference"
    raise ValueError(f"{where}: {problem}")


# ---- decode -----------------------------------------------------------------------------


def paged_sparse_decode(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    page_size: int,
    scale: float | None = None,
    backend: str = "auto",
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Attention of the last ``Tq`` positions of each sequence over its kept blocks, read from a
    paged cache.

    Args:
        q: (B, Hq, Tq, D); query i of sequence b at position seq_lens[b] - Tq + i.
        k_pages, v_pages: (num_pages, page_size, Hkv, D), Hq % Hkv == 0 (module docstring).
        block_table: int32 (B, max_pages): logical page -> physical page.
        seq_lens: int32 (B,) on q's device: tokens per sequence (Tq <= seq_lens[b] <=
            max_pages * page_size); lengths may differ.
        kv_num_blocks: int32 (B, G) (or (B, G, 1)), G in {1, Hkv, Hq}.
        kv_indices: int32 (B, G, n) (or (B, G, 1, n)): the first kv_num_blocks entries are kept
            LOGICAL blocks of the sequence, in any order, no repeats.
        page_size: tokens per page = per selection block.
        scale: softmax scale, default 1 / sqrt(D).
        backend: ``"reference"``, ``"triton"`` or ``"auto"``.
        validate: check the values of seq_lens, block_table and the selection (one host sync).

    Returns:
        (B, Hq, Tq, D) in q's dtype; a row that sees no kept key is 0.
    """
    where = "paged_sparse_decode"
    _check_common(where, q, k_pages, v_pages, block_table, seq_lens, page_size)
    batch, num_q_heads, num_queries, _ = q.shape
    try:
        kv_num_blocks, kv_indices = _normalise_selection(kv_num_blocks, kv_indices, batch)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    _check_groups(where, kv_num_blocks.shape[1], num_q_heads, k_pages.shape[2])
    for name, t in (("kv_num_blocks", kv_num_blocks), ("kv_indices", kv_indices)):
        if t.device != q.device:
            raise ValueError(f"{where}: {name} is on {t.device} but q is on {q.device}")
    name = _kernel_backend(where, backend, "decode", q, k_pages, v_pages, page_size)
    if validate:
        _validate_values(
            where,
            num_queries,
            k_pages.shape[0],
            block_table,
            seq_lens,
            kv_num_blocks[:, :, None],
            kv_indices[:, :, None],
            page_size,
            prefill=False,
        )
    if name == "reference":
        return paged_sparse_decode_reference(
            q, k_pages, v_pages, block_table, seq_lens, kv_num_blocks, kv_indices, page_size, scale
        )
    from sketchwalk.attention.triton_paged import paged_decode_triton

    with on_device(q):
        return paged_decode_triton(
            q, k_pages, v_pages, block_table, seq_lens, kv_num_blocks, kv_indices, page_size, scale
        )


def paged_sparse_decode_reference(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    page_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference: per sequence, gather its pages (`gather_pages`) and run
    ``sparse_decode(..., backend="reference")``. kv_num_blocks (B, G), kv_indices (B, G, n)."""
    out = torch.empty_like(q)
    for b, seq_len in enumerate(seq_lens.tolist()):
        k = gather_pages(k_pages, block_table[b], seq_len)
        v = gather_pages(v_pages, block_table[b], seq_len)
        out[b : b + 1] = sparse_decode(
            q[b : b + 1],
            k,
            v,
            kv_num_blocks[b : b + 1],
            kv_indices[b : b + 1],
            page_size,
            backend="reference",
            scale=scale,
        )
    return out


# ---- prefill (a query chunk per sequence) -------------------------------------------------


def paged_sparse_prefill(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    page_size: int,
    scale: float | None = None,
    backend: str = "auto",
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Block-sparse causal attention of a chunk of T queries at the end of each sequence, whose
    keys (the chunk's own included) are already in the paged cache.

    Args:
        q: (B, Hq, T, D); query i of sequence b at position seq_lens[b] - T + i (T ==
            seq_lens[b]: a whole prefill; T < seq_lens[b]: a chunk of chunked prefill, its
            first query anywhere in a page).
        k_pages, v_pages, block_table: as `paged_sparse_decode`.
        seq_lens: int32 (B,): tokens per sequence including the chunk, each >= T; they may
            differ between sequences.
        kv_num_blocks: int32 (B, G, NQ); kv_indices: int32 (B, G, NQ, n), G in {1, Hkv, Hq}.
            Row r of sequence b is its logical block (seq_lens[b] - T) // page_size + r: the
            layout of a `BlockSelection` for T queries at the end of S keys (its
            ``kv_num_blocks`` / ``kv_indices``, e.g. from `SketchWalk.select_chunk`), with NQ
            at least ceil(S / page_size) - (S - T) // page_size for every sequence (shorter
            sequences' extra rows are ignored). Each row's first kv_num_blocks entries are
            kept LOGICAL blocks in any order; blocks right of the row's own block contribute
            nothing (causal).
        page_size: tokens per page = per selection block.
        scale: softmax scale, default 1 / sqrt(D).
        backend: ``"reference"``, ``"triton"`` or ``"auto"``.
        validate: check the values of seq_lens, block_table and the selection (one host sync).

    Returns:
        (B, Hq, T, D) in q's dtype. Rows whose selection keeps nothing visible are 0.
    """
    where = "paged_sparse_prefill"
    _check_common(where, q, k_pages, v_pages, block_table, seq_lens, page_size)
    batch, num_q_heads, num_queries, _ = q.shape
    if kv_num_blocks.dim() != 3 or kv_indices.dim() != 4:
        raise ValueError(
            f"{where}: kv_num_blocks must be (batch, groups, q_blocks) and kv_indices "
            f"(batch, groups, q_blocks, n), got {tuple(kv_num_blocks.shape)} and "
            f"{tuple(kv_indices.shape)}"
        )
    if kv_num_blocks.shape[0] != batch or kv_indices.shape[:3] != kv_num_blocks.shape:
        raise ValueError(
            f"{where}: kv_indices {tuple(kv_indices.shape)} and kv_num_blocks "
            f"{tuple(kv_num_blocks.shape)} do not match each other or the batch {batch}"
        )
    if not _is_int(kv_num_blocks) or not _is_int(kv_indices):
        raise ValueError(f"{where}: kv_num_blocks and kv_indices must be integer tensors")
    _check_groups(where, kv_num_blocks.shape[1], num_q_heads, k_pages.shape[2])
    for name, t in (("kv_num_blocks", kv_num_blocks), ("kv_indices", kv_indices)):
        if t.device != q.device:
            raise ValueError(f"{where}: {name} is on {t.device} but q is on {q.device}")
    name = _kernel_backend(where, backend, "prefill", q, k_pages, v_pages, page_size)
    if validate:
        _validate_values(
            where,
            num_queries,
            k_pages.shape[0],
            block_table,
            seq_lens,
            kv_num_blocks,
            kv_indices,
            page_size,
            prefill=True,
        )
    if name == "reference":
        return paged_sparse_prefill_reference(
            q, k_pages, v_pages, block_table, seq_lens, kv_num_blocks, kv_indices, page_size, scale
        )
    from sketchwalk.attention.triton_paged import paged_prefill_triton

    with on_device(q):
        return paged_prefill_triton(
            q, k_pages, v_pages, block_table, seq_lens, kv_num_blocks, kv_indices, page_size, scale
        )


def chunk_selection(
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    seq_len: int,
    num_queries: int,
    page_size: int,
) -> BlockSelection:
    """The `BlockSelection` of ONE sequence's query chunk from paged-prefill index rows.

    Args:
        kv_num_blocks: int (1, G, NQ); kv_indices: int (1, G, NQ, n), kept logical blocks in
            any order (rows past the sequence's nq and entries right of a row's block or past
            the sequence are dropped).
        seq_len: the sequence's tokens S; num_queries: the chunk's T (queries at S - T ..).
        page_size: the block size.
    """
    nk = -(-seq_len // page_size)
    nq = nk - (seq_len - num_queries) // page_size
    num = kv_num_blocks[:, :, :nq].long()
    idx = kv_indices[:, :, :nq].long()
    valid = (torch.arange(idx.shape[-1], device=idx.device) < num[..., None]) & (idx < nk)
    cols = torch.where(valid, idx, nk)
    mask = torch.zeros(*idx.shape[:-1], nk + 1, dtype=torch.bool, device=idx.device)
    mask = mask.scatter_(-1, cols, True)[..., :nk]
    mask &= causal_block_mask(nq, idx.device, num_key_blocks=nk)
    num_c, idx_c = compact_mask(mask)
    return BlockSelection(mask, page_size, seq_len, num_c, idx_c, None)


def paged_sparse_prefill_reference(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    page_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference: per sequence, gather its pages (`gather_pages`), turn its selection rows into
    a `BlockSelection` (`chunk_selection`) and run ``sparse_attention(..., backend="reference")``.
    """
    num_queries = q.shape[2]
    out = torch.empty_like(q)
    for b, seq_len in enumerate(seq_lens.tolist()):
        k = gather_pages(k_pages, block_table[b], seq_len)
        v = gather_pages(v_pages, block_table[b], seq_len)
        selection = chunk_selection(
            kv_num_blocks[b : b + 1], kv_indices[b : b + 1], seq_len, num_queries, page_size
        )
        out[b : b + 1] = sparse_attention(
            q[b : b + 1], k, v, selection, backend="reference", scale=scale
        )
    return out


__all__ = [
    "chunk_selection",
    "gather_pages",
    "paged_sparse_decode",
    "paged_sparse_decode_reference",
    "paged_sparse_prefill",
    "paged_sparse_prefill_reference",
]
