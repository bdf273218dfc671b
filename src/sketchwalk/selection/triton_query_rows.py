"""Triton kernels for the exact scores of the last query-block rows
(`sketchwalk.selection.query_rows.query_row_scores`), without the rows' probabilities in memory
(docs/algorithm.md §1.10).

For a scored row (query block ``i = nb - rows + r``) and query head h, the score of key block j
is

    S[b, h, r, j] = (1 / n_r) * sum_{query p in row i} sum_{key c in block j, c <= p}
                    exp(scale * q[b, h, p] . k[b, h // g, c] - m_p) / l_p

with g = Hq // Hkv, n_r the row's queries present in ``q`` (a query chunk may start inside the
scored rows) and ``m_p``, ``l_p`` the softmax maximum and normaliser of query p over its causal
keys. Each program holds one row's queries of ``HEADS`` query heads of one KV head, stacked
head-major into a (HEADS x block, D) tile, so every key tile it loads serves all of them; the
key blocks of a row are split into spans of ``split_tiles`` blocks, one program per span, so that
a few rows of a long prompt still fill the GPU. Two launches of ``_query_rows_kernel``, nothing
of size (rows x block, T):

1. statistics pass: per (row x head chunk, span, batch x KV head) the online softmax maximum
   and sum of each query over the span's key blocks (exp2 domain, float32), written as partial
   statistics (a few KB per program);
2. mass pass: the same programs merge the partial statistics of the row's spans into each
   query's (maximum, 1 / sum), recompute the span's logits and write
   ``sum exp2(s - max) / sum / n_r`` over each key block's keys and the row's queries, per
   head, into S[b, h, r, j].

Both passes compute the logits with the same code, so one query's masses sum to 1 over its
causal blocks up to float32 rounding. Dots take q/k's dtype with float32 accumulation; float32
inputs use ``tf32x3`` dots by default (float32-level accuracy). The mean over a mask group's
heads is left to the caller (a (B, Hq, rows, nb) tensor).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sketchwalk.blocks import check_qk, num_blocks

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Query rows per program (HEADS x block) at most, and bytes of the query tile at most: the tile
# stays in registers / shared memory for the whole span, next to the pipelined key tiles.
MAX_QUERY_ROWS = 256
MAX_QUERY_TILE_BYTES = 64 * 1024
# Aim for this many programs per streaming multiprocessor, but give each at least this many key
# blocks (a program loads its query tile and merges the statistics once per span).
PROGRAMS_PER_SM = 4
MIN_SPAN_TILES = 8


@triton.jit
def _query_tile(
    q_base,
    stride_qh,
    stride_qt,
    stride_qd,
    first_head,
    row_block,
    group,
    s,
    t,
    block_size,
    D,
    BLOCK_M: tl.constexpr,
    HEADS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """The row's queries of query heads first_head .. first_head + HEADS - 1 of the KV head
    (HEADS x BLOCK_M, BLOCK_D), their positions and whether each is a query of the chunk."""
    offs = tl.arange(0, HEADS * BLOCK_M)
    head = first_head + offs // BLOCK_M
    within = offs % BLOCK_M
    pos = row_block * block_size + within
    valid = (head < group) & (within < block_size) & (pos < s) & (pos >= s - t)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_base
        + head.to(tl.int64)[:, None] * stride_qh
        + (pos - (s - t)).to(tl.int64)[:, None] * stride_qt
        + dims[None, :] * stride_qd,
        mask=valid[:, None] & (dims[None, :] < D),
        other=0.0,
    )
    if UPCAST_DOT:
        q = q.to(tl.float32)
    return q, pos, valid


@triton.jit
def _logits_tile(
    q,
    pos,
    valid,
    k_base,
    stride_kt,
    stride_kd,
    key_block,
    s,
    block_size,
    D,
    qk_scale2,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Logits in the log2 domain of the query tile against key block ``key_block``
    (HEADS x BLOCK_M, BLOCK_M); future keys, padding and missing queries are -inf."""
    offs_n = tl.arange(0, BLOCK_M)
    cols = key_block * block_size + offs_n
    col_ok = (offs_n < block_size) & (cols < s)
    dims = tl.arange(0, BLOCK_D)
    k = tl.load(
        k_base + cols.to(tl.int64)[:, None] * stride_kt + dims[None, :] * stride_kd,
        mask=col_ok[:, None] & (dims[None, :] < D),
        other=0.0,
    )
    if UPCAST_DOT:
        k = k.to(tl.float32)
    x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale2
    visible = valid[:, None] & col_ok[None, :] & (cols[None, :] <= pos[:, None])
    return tl.where(visible, x, float("-inf"))


@triton.jit
def _merge_stats(m_i, l_i, m_part, l_part):
    """Softmax statistics (max, sum of exp2(x - max)) of two parts merged, per query; a part
    that saw no key has (-inf, 0)."""
    m_new = tl.maximum(m_i, m_part)
    # a query that saw nothing yet: keep exp2 away from -inf - -inf
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, l_i * tl.exp2(m_i - m_shift) + l_part * tl.exp2(m_part - m_shift)


@triton.jit
def _query_rows_kernel(
    q_ptr,
    k_ptr,
    part_max_ptr,
    part_sum_ptr,
    out_ptr,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_ob,
    stride_oh,
    stride_or,
    num_kv_heads,
    group,
    head_chunks,
    rows,
    nb,
    s,
    t,
    block_size,
    D,
    split_tiles,
    num_splits,
    qk_scale2,
    BLOCK_M: tl.constexpr,
    HEADS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    MASS_PASS: tl.constexpr,
):
    """One (row x head chunk, span, batch x KV head) program. First pass (MASS_PASS False):
    the span's softmax statistics per query into the partial buffers. Second pass: the row's
    statistics merged from its spans, then the span's per-head block masses into out."""
    pid_row = tl.program_id(0)
    split = tl.program_id(1)
    pid_bh = tl.program_id(2)
    r = pid_row // head_chunks
    first_head = (pid_row % head_chunks) * HEADS
    row_block = nb - rows + r
    b = (pid_bh // num_kv_heads).to(tl.int64)
    kv_head = (pid_bh % num_kv_heads).to(tl.int64)
    q, pos, valid = _query_tile(
        q_ptr + b * stride_qb + kv_head * group * stride_qh, stride_qh, stride_qt, stride_qd,
        first_head, row_block, group, s, t, block_size, D, BLOCK_M, HEADS, BLOCK_D, UPCAST_DOT,
    )  # fmt: skip
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    offs = tl.arange(0, HEADS * BLOCK_M)
    part = (pid_bh * (rows * head_chunks) + pid_row) * num_splits * (HEADS * BLOCK_M) + offs
    m_i = tl.full([HEADS * BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([HEADS * BLOCK_M], tl.float32)
    heads = first_head + tl.arange(0, HEADS)
    out_base = out_ptr + b * stride_ob + (kv_head * group + heads).to(tl.int64) * stride_oh
    out_base += r * stride_or
    weight = l_i
    if MASS_PASS:
        # the spans that hold the row's key blocks (it sees blocks 0 .. row_block)
        for span in range(0, tl.cdiv(row_block + 1, split_tiles)):
            m_i, l_i = _merge_stats(
                m_i,
                l_i,
                tl.load(part_max_ptr + part + span * (HEADS * BLOCK_M)),
                tl.load(part_sum_ptr + part + span * (HEADS * BLOCK_M)),
            )
        # the row's queries present in the chunk (the same for every head)
        count = tl.minimum(row_block * block_size + block_size, s) - tl.maximum(
            row_block * block_size, s - t
        )
        # (a missing query has l = 0 and no visible key: any finite weight leaves it at 0)
        weight = 1.0 / tl.where(l_i > 0.0, l_i, 1.0) / tl.maximum(count, 1).to(tl.float32)
    m_shift = tl.where(m_i == float("-inf"), 0.0, m_i)
    span_end = tl.minimum(split * split_tiles + split_tiles, row_block + 1)
    for key_block in range(split * split_tiles, span_end):
        x = _logits_tile(
            q, pos, valid, k_base, stride_kt, stride_kd, key_block, s, block_size, D, qk_scale2,
            BLOCK_M, BLOCK_D, PRECISION, UPCAST_DOT,
        )  # fmt: skip
        if MASS_PASS:
            mass = tl.sum(tl.exp2(x - m_shift[:, None]), 1) * weight  # per query
            per_head = tl.sum(tl.reshape(mass, (HEADS, BLOCK_M)), 1)
            tl.store(out_base + key_block, per_head, mask=heads < group)
        else:
            m_tile = tl.max(x, 1)
            m_tile_shift = tl.where(m_tile == float("-inf"), 0.0, m_tile)
            l_tile = tl.sum(tl.exp2(x - m_tile_shift[:, None]), 1)
            m_i, l_i = _merge_stats(m_i, l_i, m_tile, l_tile)
    if not MASS_PASS:
        tl.store(part_max_ptr + part + split * (HEADS * BLOCK_M), m_i)
        tl.store(part_sum_ptr + part + split * (HEADS * BLOCK_M), l_i)


def _tiling(
    q: torch.Tensor, group: int, block_size: int, max_query_rows: int
) -> tuple[int, int, int]:
    """(BLOCK_M, HEADS, BLOCK_D): the block padded to a power of two >= 16, the query heads per
    program (a power of two) and the head dim padded likewise."""
    block_m = max(16, triton.next_power_of_2(block_size))
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    tile_rows = MAX_QUERY_TILE_BYTES // (block_d * q.element_size())
    fit = max(1, min(max_query_rows, tile_rows) // block_m)
    heads = min(triton.next_power_of_2(group), 1 << (fit.bit_length() - 1))
    return block_m, heads, block_d


def _span_tiles(q: torch.Tensor, nb: int, programs: int) -> int:
    """Key blocks per program: about PROGRAMS_PER_SM programs per multiprocessor in all."""
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
    splits = max(1, min(nb, triton.cdiv(PROGRAMS_PER_SM * sms, programs)))
    return max(MIN_SPAN_TILES, triton.cdiv(nb, splits))


def query_row_mass_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: int,
    block_size: int,
    scale: float | None = None,
    precision: str = "tf32x3",
    split_tiles: int | None = None,
    max_query_rows: int = MAX_QUERY_ROWS,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Per query head, the mean softmax mass each key block receives from the last ``rows``
    query-block rows, in two Triton launches (module docstring).

    Args:
        q: (B, Hq, T, D) queries at the end of the keys (positions S - T .. S - 1), float16,
            bfloat16 or float32; any strides.
        k: (B, Hkv, S, D) keys of q's dtype, Hkv dividing Hq, T <= S; any strides.
        rows: trailing query-block rows, 1 <= rows <= ceil(S / block_size).
        block_size: tokens per block (>= 1; padded to a power of two >= 16 in the tiles).
        scale: softmax scale (default 1 / sqrt(D)).
        precision: ``tl.dot`` input precision for float32 inputs: ``tf32x3`` (default,
            float32-level), ``ieee`` or ``tf32``; 16-bit inputs use their tensor-core dots.
        split_tiles: key blocks per program (default: about ``PROGRAMS_PER_SM`` programs per
            multiprocessor, at least ``MIN_SPAN_TILES`` blocks each).
        max_query_rows: query rows (heads x block) per program at most; fewer for a query
            tile over ``MAX_QUERY_TILE_BYTES``.
        num_warps: warps per program (default 8 for 128 query rows or more, else 4).
        num_stages: software-pipelining stages of the key-tile loop (default: Triton's).

    Returns:
        float32 (B, Hq, rows, nb): entry [b, h, r, j] is the mean over row r's queries in q
        (query block nb - rows + r) of the probability mass query head h puts on key block j;
        0 on future blocks and for a row with no query in q. Average consecutive heads for
        mask groups.
    """
    check_qk(q, k, "query_row_mass_triton")
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"query_row_mass_triton: q and k must be float16, bfloat16 or float32, got {q.dtype}"
        )
    if t > s:
        raise ValueError(f"query_row_mass_triton: more queries ({t}) than keys ({s})")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"query_row_mass_triton: block_size must be an int >= 1, got {block_size}")
    nb = num_blocks(s, block_size)
    if not isinstance(rows, int) or not 1 <= rows <= nb:
        raise ValueError(f"query_row_mass_triton: rows must be in [1, {nb}], got {rows}")
    if split_tiles is not None and split_tiles < 1:
        raise ValueError(f"query_row_mass_triton: split_tiles must be >= 1, got {split_tiles}")
    group = hq // hkv
    block_m, heads, block_d = _tiling(q, group, block_size, max_query_rows)
    head_chunks = triton.cdiv(group, heads)
    if split_tiles is None:
        split_tiles = _span_tiles(q, nb, rows * head_chunks * b * hkv)
    num_splits = triton.cdiv(nb, split_tiles)
    out = torch.zeros(b, hq, rows, nb, dtype=torch.float32, device=q.device)
    part_shape = (b * hkv, rows * head_chunks, num_splits, heads * block_m)
    part_max = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if num_warps is None:
        num_warps = 8 if heads * block_m >= 128 else 4
    common = dict(
        BLOCK_M=block_m,
        HEADS=heads,
        BLOCK_D=block_d,
        PRECISION=precision if q.dtype == torch.float32 else None,
        # the interpreter's tl.dot multiplies bfloat16 as raw integer bits
        UPCAST_DOT=not q.is_cuda and q.dtype == torch.bfloat16,
        num_warps=num_warps,
    )
    if num_stages is not None:
        common["num_stages"] = num_stages
    args = (q, k, part_max, part_sum, out, *q.stride(), *k.stride(), *out.stride()[:3])
    sizes = (hkv, group, head_chunks, rows, nb, s, t, block_size, d, split_tiles, num_splits)
    grid = (rows * head_chunks, num_splits, b * hkv)
    for mass_pass in (False, True):
        _query_rows_kernel[grid](*args, *sizes, scale * LOG2E, MASS_PASS=mass_pass, **common)
    return out


__all__ = ["query_row_mass_triton"]
