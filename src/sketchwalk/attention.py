"""Exact dense and block-sparse attention: the plain PyTorch references, plus backend dispatch.

Both references process query rows in chunks, so memory is O(chunk x S), never O(T x S), and
accumulate in float32. Queries are aligned to the END of the keys: with T queries and S keys,
query i sits at position S - T + i and may attend keys 0 .. S - T + i (T == S is prefill).
"""

from __future__ import annotations

import math

import torch

from sketchwalk.core import check_qk
from sketchwalk.selection import BlockSelection
from sketchwalk.sketch import num_blocks

# Elements of the float32 score matrix of one chunk (about 64 MiB).
_CHUNK_ELEMENTS = 1 << 24

BACKENDS = ("reference", "triton", "flex", "auto")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, where: str) -> None:
    check_qk(q, k, where)
    if not isinstance(v, torch.Tensor) or v.shape != k.shape:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{where}: v must have k's shape {tuple(k.shape)}, got {shape}")
    if v.device != k.device or v.dtype != k.dtype:
        raise ValueError(f"{where}: v is {v.dtype} on {v.device}, k is {k.dtype} on {k.device}")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"{where}: more queries ({q.shape[2]}) than keys ({k.shape[2]})")


def _chunk_rows(num_heads: int, num_keys: int, chunk_size: int | None, multiple: int = 1) -> int:
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(1, num_heads * num_keys))
    chunk_size = max(multiple, (chunk_size // multiple) * multiple)
    return chunk_size


def _attend_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Softmax attention of a chunk of query rows with an explicit bool mask.

    q (B, Hq, C, D); k, v (B, Hkv, S, D); allowed broadcastable to (B, Hq, C, S).
    Rows with no allowed key give zeros. Returns (B, Hq, C, D) in float32 (float64 for float64
    inputs).
    """
    b, hq, c, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(acc).view(b, hkv, g, c, d)
    scores = (qf @ k.to(acc)[:, :, None].transpose(-1, -2)) * scale  # (B, Hkv, g, C, S)
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
) -> torch.Tensor:
    """Exact softmax attention with GQA, float32 accumulation, chunked over query rows.

    Args:
        q: (B, Hq, T, D).
        k, v: (B, Hkv, S, D), S >= T; Hq a multiple of Hkv (K/V are never repeated in memory).
        causal: mask keys after each query's position (queries aligned to the end of the keys).
        scale: softmax scale, default 1 / sqrt(D).
        chunk_size: query rows per chunk (default: about 256 MiB of float32 scores).

    Returns:
        (B, Hq, T, D) in q's dtype, like ``F.scaled_dot_product_attention``.
    """
    _check_qkv(q, k, v, "dense_attention")
    b, hq, t, d = q.shape
    s = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    rows = _chunk_rows(hq, s, chunk_size)
    out = torch.empty(b, hq, t, d, dtype=q.dtype, device=q.device)
    key_pos = torch.arange(s, device=q.device)
    for start in range(0, t, rows):
        stop = min(t, start + rows)
        # Keys past the chunk's last query position are masked anyway: skip them.
        horizon = s - t + stop if causal else s
        if causal:
            q_pos = torch.arange(start, stop, device=q.device) + (s - t)
            allowed = key_pos[None, :horizon] <= q_pos[:, None]
        else:
            allowed = torch.ones(1, 1, dtype=torch.bool, device=q.device)
        kc, vc = k[:, :, :horizon], v[:, :, :horizon]
        out[:, :, start:stop] = _attend_chunk(q[:, :, start:stop], kc, vc, allowed, scale).to(
            q.dtype
        )
    return out


def check_selection(
    selection: BlockSelection, q: torch.Tensor, k: torch.Tensor, where: str
) -> None:
    """The selection must cover q/k's sequence and have a mask group per layer, KV head or head."""
    if not isinstance(selection, BlockSelection):
        raise ValueError(
            f"{where}: selection must be a BlockSelection, got {type(selection).__name__}"
        )
    b, hq, t, _ = q.shape
    hkv = k.shape[1]
    if k.shape[2] != t:
        raise ValueError(
            f"{where}: block-sparse prefill needs as many keys as queries; q has seq {t}, k has "
            f"seq {k.shape[2]} (use sketchwalk.decode.sparse_decode for decode)"
        )
    nb = num_blocks(t, selection.block_size)
    expected = (b, None, nb, nb)
    got = tuple(selection.block_mask.shape)
    if selection.seq_len != t or got[0] != b or got[2:] != (nb, nb):
        raise ValueError(
            f"{where}: selection is for seq_len={selection.seq_len} with mask {got}; q/k need "
            f"seq_len={t} and a mask (batch={expected[0]}, groups, {nb}, {nb})"
        )
    if selection.num_groups not in (1, hkv, hq):
        raise ValueError(
            f"{where}: selection has {selection.num_groups} mask groups; expected 1, "
            f"num_kv_heads={hkv} or num_heads={hq}"
        )
    if selection.block_mask.device != q.device:
        raise ValueError(
            f"{where}: selection is on {selection.block_mask.device} but q is on {q.device}"
        )


def sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    scale: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Plain PyTorch block-sparse attention (the reference every fast path is tested against).

    Algorithm: for each chunk of whole query blocks, expand the chunk's rows of the block mask to
    token level (query token i may see key token j iff block (i // bs, j // bs) is kept and
    j <= i), then run exact masked softmax attention in float32. Rows with no visible key give 0.
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    bs = selection.block_size
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    head_mask = selection.head_mask(hq, hkv)  # (B, Hq, nb, nb)
    rows = _chunk_rows(hq, t, chunk_size, multiple=bs)
    out = torch.empty(b, hq, t, d, dtype=q.dtype, device=q.device)
    key_pos = torch.arange(t, device=q.device)
    key_block = key_pos // bs
    for start in range(0, t, rows):
        stop = min(t, start + rows)
        q_pos = torch.arange(start, stop, device=q.device)
        rows_mask = head_mask[:, :, q_pos // bs]  # (B, Hq, C, nb)
        allowed = rows_mask[..., key_block[:stop]] & (key_pos[None, :stop] <= q_pos[:, None])
        kc, vc = k[:, :, :stop], v[:, :, :stop]
        out[:, :, start:stop] = _attend_chunk(q[:, :, start:stop], kc, vc, allowed, scale).to(
            q.dtype
        )
    return out


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    backend: str = "reference",
    scale: float | None = None,
) -> torch.Tensor:
    """Exact softmax attention restricted to the selected key blocks.

    Args:
        q: (B, Hq, T, D); k, v: (B, Hkv, T, D); Hq a multiple of Hkv.
        selection: `BlockSelection` for this T (mask groups 1, Hkv or Hq).
        backend: ``"reference"`` (plain PyTorch, any device), ``"triton"``, ``"flex"`` or
            ``"auto"``. An explicit backend that cannot run raises; only ``"auto"`` falls back.
        scale: softmax scale, default 1 / sqrt(D).

    Returns:
        (B, Hq, T, D) in q's dtype.
    """
    _check_qkv(q, k, v, "sparse_attention")
    check_selection(selection, q, k, "sparse_attention")
    if backend not in BACKENDS:
        raise ValueError(f"sparse_attention: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return sparse_attention_reference(q, k, v, selection, scale)
    from sketchwalk.kernels import get_backend

    _, fn = get_backend(backend, q)
    return fn(q, k, v, selection, scale)


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The backend name ``sparse_attention`` would use for ``q`` ("auto" resolved)."""
    if backend == "reference":
        return backend
    from sketchwalk.kernels import get_backend

    name, _ = get_backend(backend, q)
    return name


__all__ = [
    "BACKENDS",
    "dense_attention",
    "resolve_backend",
    "sparse_attention",
    "sparse_attention_reference",
]
