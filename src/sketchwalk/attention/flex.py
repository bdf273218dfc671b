"""FlexAttention backend: a `BlockSelection` turned into a `BlockMask` with `from_kv_blocks`.

A per-KV-group selection (G == Hkv < Hq) is run with the KV heads folded into the batch, so
the mask is never repeated over query heads. Kept blocks left of the diagonal are passed as
*full* blocks (FlexAttention skips the mask function on them); the diagonal block is the only
*partial* block and gets the causal ``mask_mod``. ``compute_q_blocks=False``: inference needs
no backward (column) metadata.
`flex_attention` is compiled once per process and cached (torch.compile re-specialises per
shape and dtype as usual).

Never the eager path: uncompiled `flex_attention` evaluates only ``mask_mod`` over the full
score matrix and ignores the block indices, so with our causal ``mask_mod`` it returns *dense*
causal attention. torch.compile silently falls back to that path once a function has been
recompiled ``torch._dynamo.config.recompile_limit`` times (8 by default: eight shapes) or when
``suppress_errors`` is on. Every call therefore runs under a scoped dynamo config with a larger
limit (`FLEX_RECOMPILE_LIMIT`), ``fail_on_recompile_limit_hit`` and no error suppression: past
the limit the backend raises RuntimeError instead of returning wrong numbers.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

_compiled_flex: Any = None
# Distinct (shape, dtype, mask layout) specialisations of the compiled flex_attention per process.
FLEX_RECOMPILE_LIMIT = 256


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
        num_q_heads, num_kv_heads: head counts (unused here; see `flex_sparse_attention` for
            how a per-KV-group mask is laid out).

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
    return BlockMask.from_kv_blocks(
        part_num,
        part_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=_causal,
        seq_lengths=(seq_len, seq_len),
        compute_q_blocks=False,
    )


def kernel_options(block_size: int) -> dict[str, int] | None:
    """FlexAttention's default tiles are 128; smaller selection blocks need matching tiles."""
    if block_size < 128:
        return {"BLOCK_M": block_size, "BLOCK_N": block_size}
    return None


def _no_eager_fallback() -> Any:
    """Scoped dynamo settings under which compiled flex_attention never falls back to eager."""
    dynamo_config = importlib.import_module("torch._dynamo").config
    settings = {
        "recompile_limit": FLEX_RECOMPILE_LIMIT,
        "fail_on_recompile_limit_hit": True,
        "suppress_errors": False,
    }
    return dynamo_config.patch(
        **{key: val for key, val in settings.items() if hasattr(dynamo_config, key)}
    )


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
        block_mask: a prebuilt mask from `build_block_mask` (skips rebuilding it; for a
            per-KV-group selection it must be built from the batch-folded selection).

    Returns:
        (B, Hq, T, D) in q's dtype.
    """
    batch, num_q_heads, seq_len, head_dim = q.shape
    num_kv_heads = k.shape[1]
    groups = kv_num_blocks.shape[1]
    per_group = groups == num_kv_heads and num_q_heads != num_kv_heads
    if per_group:
        # A BlockMask has 1 or Hq heads. Rather than repeating a per-KV-group mask over each
        # group's query heads, fold the KV heads into the batch: (B * Hkv, group, T, D) queries,
        # one KV head each, and a mask with one head that broadcasts over the group.
        kv_num_blocks = kv_num_blocks.reshape(batch * groups, 1, -1)
        kv_indices = kv_indices.reshape(batch * groups, 1, *kv_indices.shape[2:])
        q = q.reshape(batch * num_kv_heads, num_q_heads // num_kv_heads, seq_len, head_dim)
        k = k.reshape(batch * num_kv_heads, 1, seq_len, head_dim)
        v = v.reshape(batch * num_kv_heads, 1, seq_len, v.shape[-1])
    if block_mask is None:
        block_mask = build_block_mask(
            kv_num_blocks, kv_indices, block_size, seq_len, q.shape[1], k.shape[1]
        )
    with _no_eager_fallback():
        try:
            out = compiled_flex_attention()(
                q,
                k,
                v,
                block_mask=block_mask,
                scale=scale,
                enable_gqa=q.shape[1] != k.shape[1],
                kernel_options=kernel_options(block_size),
            )
        except Exception as err:
            if "RecompileLimit" not in type(err).__name__:
                raise
            raise RuntimeError(
                f"flex backend: compiled flex_attention hit its recompile limit "
                f"({FLEX_RECOMPILE_LIMIT} specialisations in this process); refusing the eager "
                f"fallback, which ignores the block selection. Raise "
                f"sketchwalk.attention.flex.FLEX_RECOMPILE_LIMIT or use backend='triton'."
            ) from err
    return out.reshape(batch, num_q_heads, seq_len, out.shape[-1]) if per_group else out


__all__ = [
    "FLEX_RECOMPILE_LIMIT",
    "build_block_mask",
    "compiled_flex_attention",
    "flex_sparse_attention",
    "kernel_options",
]
