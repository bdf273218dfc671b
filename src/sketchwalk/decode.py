"""Decode attention over selected KV blocks: one (or a few) new queries against a long cache.

`sparse_decode` validates its inputs and dispatches on ``backend``:

- ``"reference"``: plain PyTorch, runs anywhere, fp32 math (below).
- ``"triton"``: the split-K Triton kernel in `sketchwalk.kernels.triton_decode` (CUDA, or the
  CPU interpreter under ``TRITON_INTERPRET=1``). An explicit backend never falls back.

Selection layout: one row of kept key blocks per (batch, mask group), shared by the ``Tq``
queries of the step. ``kv_num_blocks`` is int32 ``(B, G)`` and ``kv_indices`` int32
``(B, G, nk)``; the ``BlockSelection`` layout with a single query-block row, ``(B, G, 1)`` and
``(B, G, 1, nk)``, is accepted too. Query head ``h`` uses group ``0`` if G == 1,
``h // (Hq // Hkv)`` if G == Hkv, ``h`` if G == Hq.
"""

from __future__ import annotations

import math
import os

import torch

BACKENDS = ("reference", "triton")


def _group_of_head(head: int, num_q_heads: int, num_kv_heads: int, num_groups: int) -> int:
    if num_groups == 1:
        return 0
    if num_groups == num_q_heads:
        return head
    return head // (num_q_heads // num_kv_heads)


def sparse_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference decode attention restricted to kept key blocks.

    For every (batch b, query head h):
      1. take the mask group g of h and its kept blocks ``kv_indices[b, g, :kv_num_blocks[b, g]]``;
      2. expand them to key positions ``j * block_size + t`` (t < block_size), dropping those
         ``>= S``;
      3. scores = q[b, h] @ k[b, h // (Hq / Hkv), keys]^T * scale in fp32 (fp64 for fp64
         input), with keys after the query's own position ``S - Tq + i`` masked out;
      4. softmax over the kept keys, multiply by the matching values; a row with no visible key
         is 0.

    Args:
        q: (B, Hq, Tq, D). k_cache, v_cache: (B, Hkv, S, D).
        kv_num_blocks: (B, G) int. kv_indices: (B, G, nk) int.

    Returns:
        (B, Hq, Tq, D) in q's dtype.
    """
    batch, num_q_heads, num_queries, head_dim = q.shape
    num_kv_heads, cache_len = k_cache.shape[1], k_cache.shape[2]
    num_groups = kv_num_blocks.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    offsets = torch.arange(block_size, device=q.device)
    query_pos = cache_len - num_queries + torch.arange(num_queries, device=q.device)
    for b in range(batch):
        for h in range(num_q_heads):
            g = _group_of_head(h, num_q_heads, num_kv_heads, num_groups)
            kv_head = h // (num_q_heads // num_kv_heads)
            count = int(kv_num_blocks[b, g])
            blocks = kv_indices[b, g, :count].long()
            keys = (blocks[:, None] * block_size + offsets[None, :]).reshape(-1)
            keys = keys[keys < cache_len]
            if keys.numel() == 0:
                continue
            k_sel = k_cache[b, kv_head, keys].to(acc_dtype)
            v_sel = v_cache[b, kv_head, keys].to(acc_dtype)
            scores = q[b, h].to(acc_dtype) @ k_sel.T * scale
            visible = keys[None, :] <= query_pos[:, None]
            scores = scores.masked_fill(~visible, float("-inf"))
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            out[b, h] = probs @ v_sel
    return out.to(q.dtype)


def _normalise_selection(
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if kv_num_blocks.dim() == 3 and kv_indices.dim() == 4:
        if kv_num_blocks.shape[2] != 1 or kv_indices.shape[2] != 1:
            raise ValueError(
                "decode selection in BlockSelection layout must have one query-block "
                f"row, got kv_num_blocks {tuple(kv_num_blocks.shape)}"
            )
        kv_num_blocks, kv_indices = kv_num_blocks[:, :, 0], kv_indices[:, :, 0]
    if kv_num_blocks.dim() != 2 or kv_indices.dim() != 3:
        raise ValueError(
            "kv_num_blocks must be (batch, groups) and kv_indices "
            f"(batch, groups, nk), got {tuple(kv_num_blocks.shape)} and "
            f"{tuple(kv_indices.shape)}"
        )
    if kv_num_blocks.shape[0] != batch or kv_indices.shape[:2] != kv_num_blocks.shape:
        raise ValueError(
            f"selection batch/groups {tuple(kv_indices.shape[:2])} do not match "
            f"kv_num_blocks {tuple(kv_num_blocks.shape)} and batch {batch}"
        )
    if kv_num_blocks.dtype.is_floating_point or kv_indices.dtype.is_floating_point:
        raise ValueError("kv_num_blocks and kv_indices must be integer tensors")
    return kv_num_blocks, kv_indices


def sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block_size: int,
    backend: str = "reference",
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of the last ``Tq`` positions over the kept blocks of a KV cache.

    Args:
        q: (B, Hq, Tq, D), query ``i`` at cache position ``S - Tq + i``.
        k_cache, v_cache: (B, Hkv, S, D), Hq % Hkv == 0, S >= Tq.
        kv_num_blocks: int32 (B, G) (or (B, G, 1)), G in {1, Hkv, Hq}.
        kv_indices: int32 (B, G, nk) (or (B, G, 1, nk)), sorted ascending, padded with 0.
        block_size: tokens per key block.
        backend: "reference" or "triton" (no silent fallback).
        scale: softmax scale, default 1 / sqrt(D).

    Returns:
        (B, Hq, Tq, D) in q's dtype.
    """
    if q.dim() != 4:
        raise ValueError(f"query must be (batch, heads, queries, head_dim), got {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be (batch, kv_heads, seq, head_dim), got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    batch, num_q_heads, num_queries, head_dim = q.shape
    if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} does not match query {tuple(q.shape)}")
    num_kv_heads, cache_len = k_cache.shape[1], k_cache.shape[2]
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"query heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})"
        )
    if not 1 <= num_queries <= cache_len:
        raise ValueError(f"need 1 <= Tq <= S, got Tq={num_queries}, S={cache_len}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    kv_num_blocks, kv_indices = _normalise_selection(kv_num_blocks, kv_indices, batch)
    if kv_num_blocks.shape[1] not in (1, num_kv_heads, num_q_heads):
        raise ValueError(
            f"selection has {kv_num_blocks.shape[1]} groups; expected 1, "
            f"{num_kv_heads} or {num_q_heads}"
        )
    if backend == "reference":
        return sparse_decode_reference(
            q, k_cache, v_cache, kv_num_blocks, kv_indices, block_size, scale
        )
    if backend == "triton":
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("triton decode backend needs CUDA tensors (or TRITON_INTERPRET=1)")
        try:
            from sketchwalk.kernels.triton_decode import sparse_decode_triton
        except ImportError as err:
            raise RuntimeError(f"triton decode backend unavailable: {err}") from err
        return sparse_decode_triton(
            q, k_cache, v_cache, kv_num_blocks, kv_indices, block_size, scale
        )
    raise ValueError(f"unknown decode backend {backend!r}; expected one of {BACKENDS}")


__all__ = ["BACKENDS", "sparse_decode", "sparse_decode_reference"]
