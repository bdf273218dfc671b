"""Exact dense and block-sparse attention (prefill and decode): the plain PyTorch references
every kernel is tested against. Imports no kernel.

Both references process query rows in chunks, so memory is O(chunk x S), never O(T x S), and
accumulate in float32. Queries are aligned to the END of the keys: with T queries and S keys,
query i sits at position S - T + i and may attend keys 0 .. S - T + i (T == S is prefill).
"""

from __future__ import annotations

import math

import torch

from sketchwalk.blocks import BlockSelection, check_finite, check_qkv

# Elements of the float32 score matrix of one chunk (about 64 MiB).
_CHUNK_ELEMENTS = 1 << 24


def _chunk_rows(num_heads: int, num_keys: int, chunk_size: int | None) -> int:
    """Query rows per chunk: ``chunk_size``, or about 2^24 scores with ``num_heads`` = batch x
    query heads."""
    if chunk_size is None:
        chunk_size = _CHUNK_ELEMENTS // max(1, num_heads * num_keys)
    return max(1, chunk_size)


def _attend_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention of a chunk of query rows with an explicit bool mask.

    q (B, Hq, C, D); k, v (B, Hkv, S, D); allowed broadcastable to (B, Hq, C, S); ``softcap``:
    logits become ``softcap * tanh(logits / softcap)`` before the mask.
    Rows with no allowed key give zeros. Returns (B, Hq, C, D) in float32 (float64 for float64
    inputs).
    """
    b, hq, c, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(acc).view(b, hkv, g, c, d)
    scores = (qf @ k.to(acc)[:, :, None].transpose(-1, -2)) * scale  # (B, Hkv, g, C, S)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.view(b, hq, c, s).masked_fill_(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = scores.sub_(row_max).exp_()
    denom = p.sum(dim=-1, keepdim=True)
    p = p.div_(denom.clamp_min(torch.finfo(p.dtype).tiny))
    out = p.view(b, hkv, g, c, s) @ v.to(acc)[:, :, None]
    return out.view(b, hq, c, d)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    chunk_size: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Exact softmax attention with GQA, float32 accumulation, chunked over query rows.

    Args:
        q: (B, Hq, T, D).
        k, v: (B, Hkv, S, D), S >= T; Hq a multiple of Hkv (K/V are never repeated in memory).
        causal: mask keys after each query's position (queries aligned to the end of the keys).
        scale: softmax scale, default 1 / sqrt(D).
        chunk_size: query rows per chunk (default: about 256 MiB of float32 scores).
        window: with ``causal``, a sliding window: a query sees itself and the ``window - 1``
            keys before it.
        softcap: logit soft-capping, ``softcap * tanh(logits / softcap)``.

    Returns:
        (B, Hq, T, D) in q's dtype, like ``F.scaled_dot_product_attention``.
    """
    check_qkv(q, k, v, "dense_attention")
    check_finite("dense_attention", q=q, k=k, v=v)
    b, hq, t, d = q.shape
    s = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    rows = _chunk_rows(b * hq, s, chunk_size)
    out = torch.empty(b, hq, t, d, dtype=q.dtype, device=q.device)
    key_pos = torch.arange(s, device=q.device)
    for start in range(0, t, rows):
        stop = min(t, start + rows)
        # Keys past the chunk's last query position are masked anyway: skip them.
        horizon = s - t + stop if causal else s
        if causal:
            q_pos = torch.arange(start, stop, device=q.device) + (s - t)
            allowed = key_pos[None, :horizon] <= q_pos[:, None]
            if window is not None:
                allowed &= key_pos[None, :horizon] > q_pos[:, None] - window
        else:
            allowed = torch.ones(1, 1, dtype=torch.bool, device=q.device)
        kc, vc = k[:, :, :horizon], v[:, :, :horizon]
        out[:, :, start:stop] = _attend_chunk(
            q[:, :, start:stop], kc, vc, allowed, scale, softcap
        ).to(q.dtype)
    return out


def sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    scale: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Plain PyTorch block-sparse attention (the reference every fast path is tested against).

    Algorithm: the T queries sit at key positions S - T .. S - 1 (T == S for a prefill; T < S
    for a query chunk, whose selection rows are the last nq of the nk key blocks). For each
    chunk of query rows, expand the rows of the block mask to token level (the query at
    position p may see key j iff block (p // bs, j // bs) is kept and j <= p), then run exact
    masked softmax attention in float32. Rows with no visible key give 0.
    """
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    offset = s - t
    bs = selection.block_size
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    head_mask = selection.head_mask(hq, hkv)  # (B, Hq, nq, nk)
    first_row = offset // bs  # the block of the first query: row 0 of the mask
    # Chunks need not be whole blocks (each row reads its own block's mask row): a block larger
    # than the chunk budget (block_size >= T, say) must not turn into one T x T chunk.
    rows = _chunk_rows(b * hq, s, chunk_size)
    out = torch.empty(b, hq, t, d, dtype=q.dtype, device=q.device)
    key_pos = torch.arange(s, device=q.device)
    key_block = key_pos // bs
    for start in range(0, t, rows):
        stop = min(t, start + rows)
        q_pos = torch.arange(start, stop, device=q.device) + offset
        horizon = offset + stop  # keys after the chunk's last query are masked anyway
        rows_mask = head_mask[:, :, q_pos // bs - first_row]  # (B, Hq, C, nk)
        allowed = rows_mask[..., key_block[:horizon]] & (key_pos[None, :horizon] <= q_pos[:, None])
        kc, vc = k[:, :, :horizon], v[:, :, :horizon]
        out[:, :, start:stop] = _attend_chunk(q[:, :, start:stop], kc, vc, allowed, scale).to(
            q.dtype
        )
    return out


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
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference decode attention restricted to kept key blocks.

    For every (batch b, query head h):
      1. take the mask group g of h and its kept blocks ``kv_indices[b, g, :kv_num_blocks[b, g]]``;
      2. expand them to key positions ``start_b + j * block_size + t`` (t < block_size;
         ``start_b = key_start[b]``, 0 without it), dropping those ``>= S``;
      3. scores = q[b, h] @ k[b, h // (Hq / Hkv), keys]^T * scale in fp32 (fp64 for fp64
         input), with keys after the query's own position ``S - Tq + i`` masked out;
      4. softmax over the kept keys, multiply by the matching values; a row with no visible key
         is 0.

    Args:
        q: (B, Hq, Tq, D). k_cache, v_cache: (B, Hkv, S, D).
        kv_num_blocks: (B, G) int. kv_indices: (B, G, nk) int.
        key_start: int (B,): the cache position of each row's block 0 (None: 0).

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
            first = 0 if key_start is None else int(key_start[b])
            keys = (first + blocks[:, None] * block_size + offsets[None, :]).reshape(-1)
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


__all__ = [
    "dense_attention",
    "sparse_attention_reference",
    "sparse_decode_reference",
]
