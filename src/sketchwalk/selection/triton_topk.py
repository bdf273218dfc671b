"""Triton kernel of `sketchwalk.selection.topk.top_k_compact` (the decode selection's last
step): per row, the ``k`` highest scores as a compacted, ascending index list.

One program per row. Floats map to order-preserving unsigned keys (sign bit flipped for
non-negatives, all bits for negatives); the k-th largest key is found bit by bit from the top
(32 counting passes over the row, each ``count(key >= trial) >= k`` deciding one bit); one last
pass keeps the keys above it and the first ties at it, placing each kept index by a prefix sum.
The row is read in tiles (a decode row of up to 4096 blocks is one tile: 33 reductions in all),
so any length works.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_MAX = 4096


@triton.jit
def _ordered_key(x):
    """float32 -> uint32 with the same order (NaN aside)."""
    bits = x.to(tl.uint32, bitcast=True)
    negative = (bits >> 31) == 1
    flip = tl.where(
        negative, tl.full((), 0xFFFFFFFF, tl.uint32), tl.full((), 0x80000000, tl.uint32)
    )
    return bits ^ flip


@triton.jit
def _top_k_compact_kernel(
    scores_ptr,
    k_ptr,
    idx_ptr,
    num_ptr,
    n,
    stride_row,
    stride_idx,
    k_stride,
    TILE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = scores_ptr + row * stride_row
    k = tl.load(k_ptr + row * k_stride).to(tl.int32)
    k = tl.minimum(tl.maximum(k, 0), n)
    # the k-th largest key, bit by bit from the top
    threshold = tl.zeros((), dtype=tl.uint32)
    for bit in tl.static_range(32):
        trial = threshold | (tl.full((), 1, tl.uint32) << (31 - bit))
        count = tl.zeros((), dtype=tl.int32)
        for start in range(0, n, TILE):
            offs = start + tl.arange(0, TILE)
            inside = offs < n
            key = _ordered_key(tl.load(base + offs, mask=inside, other=0.0))
            count += tl.sum(((key >= trial) & inside).to(tl.int32), axis=0)
        threshold = tl.where(count >= k, trial, threshold)
    # keep the keys above it, then ties at it in index order until k are kept
    above = tl.zeros((), dtype=tl.int32)
    for start in range(0, n, TILE):
        offs = start + tl.arange(0, TILE)
        inside = offs < n
        key = _ordered_key(tl.load(base + offs, mask=inside, other=0.0))
        above += tl.sum(((key > threshold) & inside).to(tl.int32), axis=0)
    ties_wanted = k - above
    kept = tl.zeros((), dtype=tl.int32)
    ties_seen = tl.zeros((), dtype=tl.int32)
    for start in range(0, n, TILE):
        offs = start + tl.arange(0, TILE)
        inside = offs < n
        key = _ordered_key(tl.load(base + offs, mask=inside, other=0.0))
        tie = ((key == threshold) & inside).to(tl.int32)
        tie_rank = tl.cumsum(tie, axis=0) + ties_seen  # 1-based among the row's ties
        take = (((key > threshold) & inside) | ((tie == 1) & (tie_rank <= ties_wanted))).to(
            tl.int32
        )
        dest = tl.cumsum(take, axis=0) - take + kept
        tl.store(idx_ptr + row * stride_idx + dest, offs.to(tl.int32), mask=take == 1)
        kept += tl.sum(take, axis=0)
        ties_seen += tl.sum(tie, axis=0)
    tl.store(num_ptr + row, kept)


def launch_top_k_compact(flat: torch.Tensor, ks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """flat: float32 (R, n), last stride 1; ks: integer (1,) or (R,), same device."""
    n = flat.shape[1]
    idx = torch.empty(flat.shape, dtype=torch.int32, device=flat.device)
    num = torch.empty(flat.shape[0], dtype=torch.int32, device=flat.device)
    tile = min(TILE_MAX, triton.next_power_of_2(max(n, 16)))
    _top_k_compact_kernel[(flat.shape[0],)](
        flat, ks, idx, num, n, flat.stride(0), idx.stride(0), 0 if ks.numel() == 1 else 1,
        TILE=tile, num_warps=8 if tile >= 2048 else 4,
    )  # fmt: skip
    return idx, num


__all__ = ["launch_top_k_compact"]
