"""Triton split-K decode attention: a few new queries against the selected blocks of a long cache.

Decode has one (or a few) queries per head, so a program per head would leave most of the GPU
idle and read the cache with a handful of programs. Instead:

1. ``_decode_split_kernel``: grid (splits, batch x units x tiles). A *unit* is a KV head with the
   query heads that share its mask (or one query head when masks are per head); its
   ``heads x queries`` rows are packed into the M dimension so each K/V tile is read once per
   unit. Split ``s`` takes a contiguous share of the unit's kept-block list (the share is computed
   in the kernel from ``kv_num_blocks``, so the host never syncs) and writes a normalised partial
   output plus its log-sum-exp (base 2).
2. ``_decode_combine_kernel``: one program per output row merges all of the row's splits by
   their log-sum-exp in one vector load (a serial loop over splits in 8 programs made the merge
   ~half of the batch-1 time at 128K).

Queries are aligned to the end of the cache: query ``i`` of ``Tq`` sits at position
``S - Tq + i`` and sees keys ``<= `` that position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sketchwalk.attention.triton_prefill import (
    LOG2E,
    _attend_block,
    _mask_layout,
    check_inputs,
    key_block_tile,
    upcast_dot,
)


# The cache length grows by one every generated token: specialising on it (Triton compiles a
# variant per divisibility-by-16 class) would recompile during generation.
@triton.jit(do_not_specialize=["cache_len"])
def _decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    num_ptr,
    idx_ptr,
    start_ptr,
    part_o_ptr,
    part_lse_ptr,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_nb,
    stride_ng,
    stride_ib,
    stride_ig,
    num_queries,
    cache_len,
    num_units,
    tiles_per_unit,
    heads_per_unit,
    group_size,
    num_splits,
    qk_scale,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    HAS_START: tl.constexpr,
):
    split = tl.program_id(0)
    pid = tl.program_id(1)
    batch = pid // (num_units * tiles_per_unit)
    unit = (pid // tiles_per_unit) % num_units
    tile = pid % tiles_per_unit

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    head_in_unit = rows // num_queries
    query = rows % num_queries
    pos = cache_len - num_queries + query
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
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

    # the cache position of the row's block 0 (its first real key in a left-padded batch)
    first_key = tl.load(start_ptr + batch) if HAS_START else 0
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for e in range(start, stop):
        kv_block = tl.load(idx_row + e)
        for s in tl.static_range(BLOCK_SIZE // BLOCK_N):
            # Always masked: a kept block may hold keys past a query (the cache's last block)
            # and the mask costs little next to the K/V reads that bound decode.
            acc, m_i, l_i = _attend_block(
                acc,
                m_i,
                l_i,
                q,
                k_base,
                v_base,
                stride_kt,
                stride_vt,
                first_key + kv_block * BLOCK_SIZE + s * BLOCK_N,
                pos,
                cache_len,
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
def _decode_combine_kernel(
    part_o_ptr,
    part_lse_ptr,
    o_ptr,
    stride_ob,
    stride_oh,
    stride_ot,
    num_queries,
    num_units,
    tiles_per_unit,
    heads_per_unit,
    num_splits,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
):
    # One program per output row: all of the row's splits are read at once (SPLIT_CHUNK at a
    # time) instead of one split per iteration, so the merge is a single memory round trip.
    pid = tl.program_id(0)
    row_in_tile = tl.program_id(1)
    batch = pid // (num_units * tiles_per_unit)
    unit = (pid // tiles_per_unit) % num_units
    tile = pid % tiles_per_unit
    splits = tl.arange(0, SPLIT_CHUNK)
    dims = tl.arange(0, HEAD_DIM)

    lse_max = tl.full([SPLIT_CHUNK], float("-inf"), dtype=tl.float32)
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        part = (pid * num_splits + s0 + splits) * BLOCK_M + row_in_tile
        lse = tl.load(part_lse_ptr + part, mask=s0 + splits < num_splits, other=float("-inf"))
        lse_max = tl.maximum(lse_max, lse)
    row_max = tl.max(lse_max, 0)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    weight_sum = tl.zeros([SPLIT_CHUNK], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        valid = s0 + splits < num_splits
        part = (pid * num_splits + s0 + splits) * BLOCK_M + row_in_tile
        w = tl.exp2(tl.load(part_lse_ptr + part, mask=valid, other=float("-inf")) - shift)
        o = tl.load(
            part_o_ptr + part[:, None].to(tl.int64) * HEAD_DIM + dims[None, :],
            mask=valid[:, None],
            other=0.0,
        )
        weight_sum += w
        acc += tl.sum(w[:, None] * o, 0)
    total = tl.sum(weight_sum, 0)
    out = acc / tl.where(total > 0.0, total, 1.0)

    row = tile * BLOCK_M + row_in_tile
    head_in_unit = row // num_queries
    query = row % num_queries
    head = unit * heads_per_unit + head_in_unit
    o_ptrs = (
        o_ptr
        + batch.to(tl.int64) * stride_ob
        + head.to(tl.int64) * stride_oh
        + query * stride_ot
        + dims
    )
    tl.store(
        o_ptrs,
        out.to(o_ptr.dtype.element_ty),
        mask=(head_in_unit < heads_per_unit) & (dims < HEAD_DIM),
    )


_SM_COUNT: dict[int, int] = {}


@dataclass(frozen=True)
class DecodeTuning:
    """Launch settings of `sparse_decode_triton` other than the defaults, for benchmark sweeps
    and tests; every field left at its default keeps the built-in choice.

    Attributes:
        splits: split-K factor when the call passes no ``num_splits`` (0: fill the GPU, about
            2 programs per SM); clamped to [1, ceil(nk / 2)] like the default.
        block_m: rows per program (None: the unit's heads x queries rounded up to a power of
            two, 16..64).
        num_warps, num_stages: launch options of the split kernel on CUDA.
    """

    splits: int = 0
    block_m: int | None = None
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        if self.splits < 0:
            raise ValueError(f"splits must be >= 0 (0: default), got {self.splits}")


DEFAULT_TUNING = DecodeTuning()


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def sparse_decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    num_splits: int | None = None,
    tuning: DecodeTuning | None = None,
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Split-K block-sparse decode attention.

    Args:
        q: (B, Hq, Tq, D) bf16/fp16, the last Tq positions of the sequence (Tq small).
        k_cache, v_cache: (B, Hkv, S, D), same dtype, S >= Tq.
        kv_num_blocks: int32 (B, G), G in {1, Hkv, Hq}: kept key blocks per mask group.
        kv_indices: int32 (B, G, nk): kept key-block indices, sorted ascending, first
            kv_num_blocks entries valid.
        block_size: tokens per key block (a multiple of 16).
        scale: softmax scale, default 1 / sqrt(D).
        num_splits: split-K factor; default fills the GPU (about 2 programs per SM).
        tuning: launch settings for sweeps and tests (`DecodeTuning`); None: the defaults.
        key_start: int (B,) on q's device, the cache position where row b's block 0 begins
            (its first real key in a left-padded batch; block j holds positions
            ``key_start[b] + j * block_size ..``); None: 0 for every row.

    Returns:
        (B, Hq, Tq, D) in q's dtype; a row that sees no kept key is 0.
    """
    check_inputs(q, k_cache, v_cache, block_size)
    _, num_q_heads, num_queries, head_dim = q.shape
    num_kv_heads, cache_len = k_cache.shape[1], k_cache.shape[2]
    num_groups = kv_num_blocks.shape[1]
    units, heads_per_unit = _mask_layout(num_groups, num_q_heads, num_kv_heads)
    q, k_cache, v_cache = (
        t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache)
    )
    kv_num_blocks = kv_num_blocks.to(torch.int32)
    kv_indices = kv_indices.to(torch.int32)
    if kv_indices.stride(-1) != 1:
        kv_indices = kv_indices.contiguous()

    starts = kv_num_blocks if key_start is None else key_start.to(torch.int32).contiguous()
    plan = split_launch(q, units, heads_per_unit, kv_indices.shape[-1], num_splits, tuning)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    group_stride = 0 if num_groups == 1 else 1
    _decode_split_kernel[(plan.num_splits, plan.programs)](
        q,
        k_cache,
        v_cache,
        kv_num_blocks,
        kv_indices,
        starts,  # unread without key_start
        plan.part_o,
        plan.part_lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        kv_num_blocks.stride(0),
        kv_num_blocks.stride(1) * group_stride,
        kv_indices.stride(0),
        kv_indices.stride(1) * group_stride,
        num_queries,
        cache_len,
        units,
        plan.tiles,
        heads_per_unit,
        num_q_heads // num_kv_heads,
        plan.num_splits,
        scale * LOG2E,
        BLOCK_SIZE=block_size,
        BLOCK_M=plan.block_m,
        BLOCK_N=key_block_tile(block_size),
        HEAD_DIM=head_dim,
        UPCAST_DOT=upcast_dot(q),
        HAS_START=key_start is not None,
        **plan.launch,
    )
    return combine_splits(plan, q, units, heads_per_unit)


@dataclass
class SplitLaunch:
    """Launch geometry and scratch buffers of a split-K decode (`split_launch`)."""

    block_m: int
    tiles: int
    programs: int
    num_splits: int
    part_o: torch.Tensor
    part_lse: torch.Tensor
    launch: dict


def split_launch(
    q: torch.Tensor,
    units: int,
    heads_per_unit: int,
    max_kept: int,
    num_splits: int | None,
    tuning: DecodeTuning | None,
) -> SplitLaunch:
    """The grid of a split-K decode kernel (programs x splits) and its partial-result buffers,
    shared by the contiguous and the paged decode. ``max_kept``: the width of the kept-block
    lists (the split count never exceeds half of it)."""
    batch, _, num_queries, head_dim = q.shape
    tuning = DEFAULT_TUNING if tuning is None else tuning
    rows = heads_per_unit * num_queries
    block_m = tuning.block_m or max(16, min(64, triton.next_power_of_2(rows)))
    tiles = triton.cdiv(rows, block_m)
    programs = batch * units * tiles
    if num_splits is None:
        num_splits = tuning.splits or triton.cdiv(2 * _sm_count(q.device), programs)
        num_splits = max(1, min(num_splits, triton.cdiv(max_kept, 2)))
    part_o = torch.empty(
        programs * num_splits * block_m * head_dim, device=q.device, dtype=torch.float32
    )
    part_lse = torch.empty(programs * num_splits * block_m, device=q.device, dtype=torch.float32)
    launch = {"num_warps": tuning.num_warps, "num_stages": tuning.num_stages} if q.is_cuda else {}
    return SplitLaunch(block_m, tiles, programs, num_splits, part_o, part_lse, launch)


def combine_splits(
    plan: SplitLaunch, q: torch.Tensor, units: int, heads_per_unit: int
) -> torch.Tensor:
    """Merge the splits' partial outputs by their log-sum-exp: (B, Hq, Tq, D) in q's dtype."""
    num_queries, head_dim = q.shape[2], q.shape[3]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    _decode_combine_kernel[(plan.programs, min(plan.block_m, heads_per_unit * num_queries))](
        plan.part_o,
        plan.part_lse,
        out,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        num_queries,
        units,
        plan.tiles,
        heads_per_unit,
        plan.num_splits,
        BLOCK_M=plan.block_m,
        HEAD_DIM=head_dim,
        SPLIT_CHUNK=min(64, triton.next_power_of_2(plan.num_splits)),
        **({"num_warps": 4} if q.is_cuda else {}),
    )
    return out


__all__ = ["DecodeTuning", "sparse_decode_triton"]
