"""Triton block-sparse attention over a paged KV cache (one selection block = one page).

The cache is a pool of pages, ``k_pages`` / ``v_pages`` of logical shape
(num_pages, page_size, Hkv, D) with any strides whose last one is 1 (a (num_pages, Hkv,
page_size, D) pool is passed as its ``transpose(1, 2)`` view). Sequence ``b`` holds
``seq_lens[b]`` tokens; its logical page ``j`` (tokens ``j * page_size ..``) is physical page
``block_table[b, j]``. Selections name LOGICAL blocks; the kernels look each kept block up in the
block table and read that page.

- ``_paged_decode_split_kernel``: the split-K decode kernel of `triton_decode` with a per-sequence
  length read on the device and a page lookup per kept block; its partial outputs are merged by
  `triton_decode`'s combine kernel unchanged. Kept blocks may come in any order (every block is
  masked).
- ``_paged_prefill_kernel``: the prefill kernel of `triton_prefill` (one program per query block
  row and unit, GQA heads packed into the rows) for a chunk of T queries at the end of each
  sequence, with each sequence's own query offset. Blocks left of the row's block are read
  unmasked, the row's own block masked, blocks right of it skipped, so kept blocks may come in
  any order too. Pointer loads only.

Both reuse `triton_prefill._attend_block` with in-page offsets: the page base is the pointer,
and the query positions and sequence length are shifted by the block's first position, so the
causal and length masks, and therefore the results, are bit-identical to the contiguous kernels
on the same data.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sketchwalk.attention.triton_decode import DecodeTuning, combine_splits, split_launch
from sketchwalk.attention.triton_prefill import (
    DEFAULT_TUNING as DEFAULT_PREFILL_TUNING,
)
from sketchwalk.attention.triton_prefill import (
    LOG2E,
    PrefillTuning,
    _attend_block,
    _mask_layout,
    check_inputs,
    key_block_tile,
    upcast_dot,
)


@triton.jit
def _paged_decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    table_ptr,
    lens_ptr,
    num_ptr,
    idx_ptr,
    part_o_ptr,
    part_lse_ptr,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kp,
    stride_kt,
    stride_kh,
    stride_vp,
    stride_vt,
    stride_vh,
    stride_tb,
    stride_tp,
    stride_lb,
    stride_nb,
    stride_ng,
    stride_ib,
    stride_ig,
    num_queries,
    num_units,
    tiles_per_unit,
    heads_per_unit,
    group_size,
    num_splits,
    qk_scale,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    split = tl.program_id(0)
    pid = tl.program_id(1)
    batch = pid // (num_units * tiles_per_unit)
    unit = (pid // tiles_per_unit) % num_units
    tile = pid % tiles_per_unit

    seq_len = tl.load(lens_ptr + batch * stride_lb)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    head_in_unit = rows // num_queries
    query = rows % num_queries
    pos = seq_len - num_queries + query
    head = unit * heads_per_unit + head_in_unit
    row_ok = head_in_unit < heads_per_unit
    kv_head = (unit * heads_per_unit) // group_size
    dims = tl.arange(0, HEAD_DIM)

    q_ptrs = (
        q_ptr
        + batch.to(tl.int64) * stride_qb
        + head[:, None].to(tl.int64) * stride_qh
        + query[:, None] * stride_qt
        + dims[None, :]
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

    n_sel = tl.load(num_ptr + batch * stride_nb + unit * stride_ng)
    per_split = tl.cdiv(n_sel, num_splits)
    start = split * per_split
    stop = tl.minimum(n_sel, start + per_split)
    idx_row = idx_ptr + batch * stride_ib + unit * stride_ig
    table_row = table_ptr + batch.to(tl.int64) * stride_tb
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for e in range(start, stop):
        kv_block = tl.load(idx_row + e)
        block_start = kv_block * PAGE_SIZE
        # A block past the sequence holds no key: skip it without reading its table entry.
        if block_start < seq_len:
            page = tl.load(table_row + kv_block * stride_tp).to(tl.int64)
            for s in tl.static_range(PAGE_SIZE // BLOCK_N):
                # In-page offsets: positions and length shifted by the block's first position.
                acc, m_i, l_i = _attend_block(
                    acc,
                    m_i,
                    l_i,
                    q,
                    k_head + page * stride_kp,
                    v_head + page * stride_vp,
                    stride_kt,
                    stride_vt,
                    s * BLOCK_N,
                    pos - block_start,
                    seq_len - block_start,
                    qk_scale,
                    BLOCK_N,
                    HEAD_DIM,
                    True,
                    UPCAST_DOT,
                )

    has_mass = l_i > 0.0
    out = acc / tl.where(has_mass, l_i, 1.0)[:, None]
    lse = tl.where(has_mass, m_i + tl.log2(tl.where(has_mass, l_i, 1.0)), float("-inf"))
    part = (pid * num_splits + split) * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(part_o_ptr + part[:, None].to(tl.int64) * HEAD_DIM + dims[None, :], out)
    tl.store(part_lse_ptr + part, lse)


@triton.jit
def _paged_prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    table_ptr,
    lens_ptr,
    num_ptr,
    idx_ptr,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kp,
    stride_kt,
    stride_kh,
    stride_vp,
    stride_vt,
    stride_vh,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_tb,
    stride_tp,
    stride_lb,
    stride_nb,
    stride_ng,
    stride_nq,
    stride_ib,
    stride_ig,
    stride_iq,
    num_queries,
    num_units,
    heads_per_unit,
    group_size,
    num_q_blocks,
    tiles_per_q_block,
    qk_scale,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_u = tl.program_id(1)
    batch = pid_u // num_units
    unit = pid_u % num_units
    # Late query blocks keep the most key blocks: launch them first for better tail balance.
    q_block = num_q_blocks - 1 - pid_m // tiles_per_q_block
    tile = pid_m % tiles_per_q_block

    # The chunk's T queries sit at positions seq_len - T .. seq_len - 1 of this sequence; row 0
    # of its selection is the logical block holding the first of them (maybe partly earlier
    # tokens), so the row's own block is row_block. Rows past the sequence's last block (a
    # shorter sequence in a batch padded to the longest one's rows) have no valid query.
    seq_len = tl.load(lens_ptr + batch * stride_lb)
    q_offset = seq_len - num_queries
    row_block = q_block + q_offset // PAGE_SIZE
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    head_in_unit = rows // PAGE_SIZE
    pos = row_block * PAGE_SIZE + rows % PAGE_SIZE
    query = pos - q_offset
    head = unit * heads_per_unit + head_in_unit
    row_ok = (head_in_unit < heads_per_unit) & (pos < seq_len) & (query >= 0)
    kv_head = (unit * heads_per_unit) // group_size
    dims = tl.arange(0, HEAD_DIM)

    q_ptrs = (
        q_ptr
        + batch.to(tl.int64) * stride_qb
        + head[:, None].to(tl.int64) * stride_qh
        + query[:, None].to(tl.int64) * stride_qt
        + dims[None, :]
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

    n_sel = tl.load(num_ptr + batch * stride_nb + unit * stride_ng + q_block * stride_nq)
    n_sel = tl.where(row_block * PAGE_SIZE < seq_len, n_sel, 0)
    idx_row = idx_ptr + batch * stride_ib + unit * stride_ig + q_block * stride_iq
    table_row = table_ptr + batch.to(tl.int64) * stride_tb
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for e in range(0, n_sel):
        kv_block = tl.load(idx_row + e)
        block_start = kv_block * PAGE_SIZE
        # Blocks right of the row's own block are invisible to all its queries: skipped (and
        # their table entries, maybe past the sequence, never read).
        if kv_block <= row_block:
            page = tl.load(table_row + kv_block * stride_tp).to(tl.int64)
            k_base = k_head + page * stride_kp
            v_base = v_head + page * stride_vp
            if kv_block < row_block:
                # Strictly left of the row's block: every key is visible, no mask.
                for s in tl.static_range(PAGE_SIZE // BLOCK_N):
                    acc, m_i, l_i = _attend_block(
                        acc,
                        m_i,
                        l_i,
                        q,
                        k_base,
                        v_base,
                        stride_kt,
                        stride_vt,
                        s * BLOCK_N,
                        pos - block_start,
                        seq_len - block_start,
                        qk_scale,
                        BLOCK_N,
                        HEAD_DIM,
                        False,
                        UPCAST_DOT,
                    )
            else:
                for s in tl.static_range(PAGE_SIZE // BLOCK_N):
                    acc, m_i, l_i = _attend_block(
                        acc,
                        m_i,
                        l_i,
                        q,
                        k_base,
                        v_base,
                        stride_kt,
                        stride_vt,
                        s * BLOCK_N,
                        pos - block_start,
                        seq_len - block_start,
                        qk_scale,
                        BLOCK_N,
                        HEAD_DIM,
                        True,
                        UPCAST_DOT,
                    )

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = (
        o_ptr
        + batch.to(tl.int64) * stride_ob
        + head[:, None].to(tl.int64) * stride_oh
        + query[:, None].to(tl.int64) * stride_ot
        + dims[None, :]
    )
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def _kernel_tensors(
    q: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """int32 index tensors (no copy when they already are), q with a unit last stride."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_table = block_table.to(torch.int32)
    seq_lens = seq_lens.to(torch.int32)
    kv_num_blocks = kv_num_blocks.to(torch.int32)
    kv_indices = kv_indices.to(torch.int32)
    if kv_indices.stride(-1) != 1:
        kv_indices = kv_indices.contiguous()
    return q, block_table, seq_lens, kv_num_blocks, kv_indices


def paged_decode_triton(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    page_size: int,
    scale: float | None = None,
    num_splits: int | None = None,
    tuning: DecodeTuning | None = None,
) -> torch.Tensor:
    """Split-K block-sparse decode over a paged cache (inputs checked by
    `sketchwalk.attention.paged.paged_sparse_decode`; no host sync).

    Args:
        q: (B, Hq, Tq, D) bf16/fp16; query i of sequence b at position seq_lens[b] - Tq + i.
        k_pages, v_pages: (num_pages, page_size, Hkv, D), last stride 1.
        block_table: int (B, max_pages): logical page -> physical page.
        seq_lens: int (B,): tokens per sequence (>= Tq).
        kv_num_blocks: int (B, G); kv_indices: int (B, G, n): kept LOGICAL blocks, any order.
        page_size: tokens per page = per selection block (a multiple of 16).
        scale, num_splits, tuning: as `sparse_decode_triton`.

    Returns:
        (B, Hq, Tq, D) in q's dtype; a row that sees no kept key is 0.
    """
    check_inputs(q, k_pages, v_pages, page_size)
    _, num_q_heads, num_queries, head_dim = q.shape
    num_kv_heads = k_pages.shape[2]
    num_groups = kv_num_blocks.shape[1]
    units, heads_per_unit = _mask_layout(num_groups, num_q_heads, num_kv_heads)
    q, block_table, seq_lens, kv_num_blocks, kv_indices = _kernel_tensors(
        q, block_table, seq_lens, kv_num_blocks, kv_indices
    )

    plan = split_launch(q, units, heads_per_unit, kv_indices.shape[-1], num_splits, tuning)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    group_stride = 0 if num_groups == 1 else 1
    _paged_decode_split_kernel[(plan.num_splits, plan.programs)](
        q,
        k_pages,
        v_pages,
        block_table,
        seq_lens,
        kv_num_blocks,
        kv_indices,
        plan.part_o,
        plan.part_lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_pages.stride(0),
        k_pages.stride(1),
        k_pages.stride(2),
        v_pages.stride(0),
        v_pages.stride(1),
        v_pages.stride(2),
        block_table.stride(0),
        block_table.stride(1),
        seq_lens.stride(0),
        kv_num_blocks.stride(0),
        kv_num_blocks.stride(1) * group_stride,
        kv_indices.stride(0),
        kv_indices.stride(1) * group_stride,
        num_queries,
        units,
        plan.tiles,
        heads_per_unit,
        num_q_heads // num_kv_heads,
        plan.num_splits,
        scale * LOG2E,
        PAGE_SIZE=page_size,
        BLOCK_M=plan.block_m,
        BLOCK_N=key_block_tile(page_size),
        HEAD_DIM=head_dim,
        UPCAST_DOT=upcast_dot(q),
        **plan.launch,
    )
    return combine_splits(plan, q, units, heads_per_unit)


def paged_prefill_triton(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    page_size: int,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    tuning: PrefillTuning | None = None,
) -> torch.Tensor:
    """Block-sparse attention of a chunk of T queries at the end of each sequence of a paged
    cache (inputs checked by `sketchwalk.attention.paged.paged_sparse_prefill`; no host sync).

    Args:
        q: (B, Hq, T, D) bf16/fp16; query i of sequence b at position seq_lens[b] - T + i.
        k_pages, v_pages: (num_pages, page_size, Hkv, D), last stride 1.
        block_table: int (B, max_pages); seq_lens: int (B,), each >= T (may differ).
        kv_num_blocks: int (B, G, NQ); kv_indices: int (B, G, NQ, n). Row r of sequence b is
            its logical block (seq_lens[b] - T) // page_size + r; NQ is at least the largest
            row count ceil(S / page_size) - (S - T) // page_size over the batch (rows past a
            sequence's last block are ignored). Kept LOGICAL blocks in any order.
        page_size: tokens per page = per selection block (a multiple of 16).
        scale: softmax scale, default 1 / sqrt(D).
        out: optional (B, Hq, T, D) output buffer.
        tuning: `PrefillTuning` (its ``configs`` and ``key_tile``; the TMA and warp
            specialisation variants do not apply to paged reads).

    Returns:
        (B, Hq, T, D) in q's dtype. Rows whose selection is empty are 0.
    """
    check_inputs(q, k_pages, v_pages, page_size)
    batch, num_q_heads, num_queries, head_dim = q.shape
    num_kv_heads = k_pages.shape[2]
    num_groups = kv_num_blocks.shape[1]
    units, heads_per_unit = _mask_layout(num_groups, num_q_heads, num_kv_heads)
    num_q_blocks = kv_num_blocks.shape[2]
    q, block_table, seq_lens, kv_num_blocks, kv_indices = _kernel_tensors(
        q, block_table, seq_lens, kv_num_blocks, kv_indices
    )
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)

    tuning = DEFAULT_PREFILL_TUNING if tuning is None else tuning
    max_block_m, num_warps, num_stages = tuning.config(head_dim)
    rows = heads_per_unit * page_size
    block_m = max(16, min(max_block_m, triton.next_power_of_2(rows)))
    tiles = triton.cdiv(rows, block_m)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    group_stride = 0 if num_groups == 1 else 1
    block_n = tuning.key_tile or key_block_tile(page_size)
    if page_size % block_n:
        raise RuntimeError(f"key tile {block_n} does not divide page_size {page_size}")
    launch = {}
    if q.is_cuda:
        launch = {"num_warps": num_warps, "num_stages": num_stages}
    _paged_prefill_kernel[(num_q_blocks * tiles, batch * units)](
        q,
        k_pages,
        v_pages,
        out,
        block_table,
        seq_lens,
        kv_num_blocks,
        kv_indices,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_pages.stride(0),
        k_pages.stride(1),
        k_pages.stride(2),
        v_pages.stride(0),
        v_pages.stride(1),
        v_pages.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        block_table.stride(0),
        block_table.stride(1),
        seq_lens.stride(0),
        kv_num_blocks.stride(0),
        kv_num_blocks.stride(1) * group_stride,
        kv_num_blocks.stride(2),
        kv_indices.stride(0),
        kv_indices.stride(1) * group_stride,
        kv_indices.stride(2),
        num_queries,
        units,
        heads_per_unit,
        num_q_heads // num_kv_heads,
        num_q_blocks,
        tiles,
        scale * LOG2E,
        PAGE_SIZE=page_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        UPCAST_DOT=upcast_dot(q),
        **launch,
    )
    return out


__all__ = ["paged_decode_triton", "paged_prefill_triton"]
