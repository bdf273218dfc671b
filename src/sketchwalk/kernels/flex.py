"""FlexAttention backend: a `BlockSelection` turned into a `BlockMask` with `from_kv_blocks`.

Kept blocks left of the diagonal are passed as *full* blocks (FlexAttention skips the mask
function on them); the diagonal block is the only *partial* block and gets the causal
``mask_mod``. ``compute_q_blocks=False``: inference needs no backward (column) metadata.
`flex_attention` is compiled once per process and cached (torch.compile re-specialises per
shape and dtype as usual).
"""

from __future__ import annotations

from typing import Any

import torch

_compiled_flex: Any = None


def compiled_flex_attention() -> Any:
    """The process-wide compiled `flex_attention` (compiled on first use)."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _causal(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
    return q_idx >= kv_idx


def build_block_mask(
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block_size: int,
    seq_len: int,
    num_q_heads: int,
    num_kv_heads: int,
) -> Any:
    """`BlockMask` for a causal block selection.

    Args:
        kv_num_blocks: int32 (B, G, nq); kv_indices: int32 (B, G, nq, nk), sorted ascending.
        block_size: tokens per block; seq_len: T.
        num_q_heads, num_kv_heads: head counts; a per-KV-group mask (G == Hkv < Hq) is repeated
            over each group's query heads since a BlockMask has one or Hq heads.

    Returns:
        BlockMask with full (off-diagonal) and partial (diagonal, causal mask_mod) blocks.
    """
    from torch.nn.attention.flex_attention import BlockMask

    num = kv_num_blocks.to(torch.int32)
    idx = kv_indices.to(torch.int32)
    num_q_blocks = num.shape[-1]
    rows = torch.arange(num_q_blocks, device=idx.device, dtype=torch.int32)
    cols = torch.arange(idx.shape[-1], device=idx.device)
    kept = cols < num[..., None]
    has_diag = (kept & (idx == rows[:, None])).any(-1)
    # Sorted ascending and causal: when the diagonal is kept it is the row's last entry, so the
    # first (num - has_diag) entries are exactly the off-diagonal (full) blocks.
    full_num = (num - has_diag.to(torch.int32)).contiguous()
    full_idx = idx.contiguous()
    part_num = has_diag.to(torch.int32).contiguous()
    # FlexAttention indexes the partial and the full index tensors with one set of strides, so
    # both must have the same shape: the diagonal goes in column 0 of a zero tensor.
    part_idx = torch.zeros_like(full_idx)
    part_idx[..., 0] = rows
    groups = num.shape[1]
    if groups != 1 and groups != num_q_heads:
        repeat = num_q_heads // num_kv_heads
        full_num, full_idx, part_num, part_idx = (
            t.repeat_interleave(repeat, dim=1) for t in (full_num, full_idx, part_num, part_idx))
    return BlockMask.from_kv_blocks(
        part_num, part_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=_causal,
        seq_lengths=(seq_len, seq_len), compute_q_blocks=False,
    )


def kernel_options(block_size: int) -> dict[str, int] | None:
    """FlexAttention's default tiles are 128; smaller selection blocks need matching tiles."""
    if block_size < 128:
        return {"BLOCK_M": block_size, "BLOCK_N": block_size}
    return None


def flex_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    block_mask: Any = None,
) -> torch.Tensor:
    """Block-sparse causal attention through compiled FlexAttention.

    Args:
        q: (B, Hq, T, D); k, v: (B, Hkv, T, D); selection tensors as in `build_block_mask`.
        block_mask: a prebuilt mask from `build_block_mask` (skips rebuilding it).

    Returns:
        (B, Hq, T, D) in q's dtype.
    """
    if block_mask is None:
        block_mask = build_block_mask(kv_num_blocks, kv_indices, block_size, q.shape[2],
                                      q.shape[1], k.shape[1])
    return compiled_flex_attention()(
        q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        kernel_options=kernel_options(block_size),
    )


__all__ = ["build_block_mask", "compiled_flex_attention", "flex_sparse_attention",
           "kernel_options"]
