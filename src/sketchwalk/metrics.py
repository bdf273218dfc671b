"""Accuracy of sparse attention against dense, and what the true attention looks like per block.

Everything that needs the true softmax attention is computed exactly, in chunks of query rows,
so memory stays O(chunk x T).
"""

from __future__ import annotations

import math

import torch

from sketchwalk.blocks import BlockSelection, causal_block_mask, check_finite, num_blocks

_CHUNK_ELEMENTS = 1 << 24


def _flat64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1).double()


def _check_pair(a: torch.Tensor, b: torch.Tensor, where: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{where}: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of the two tensors flattened (float64)."""
    _check_pair(a, b, "cosine_similarity")
    x, y = _flat64(a), _flat64(b)
    den = x.norm() * y.norm()
    if den == 0:
        return 1.0 if torch.equal(x, y) else 0.0
    return float((x @ y / den).item())


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared error (float64)."""
    _check_pair(a, b, "mse")
    return float((_flat64(a) - _flat64(b)).pow(2).mean().item())


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute elementwise difference."""
    _check_pair(a, b, "max_abs_error")
    return float((_flat64(a) - _flat64(b)).abs().max().item())


def relative_l2_error(approx: torch.Tensor, ref: torch.Tensor) -> float:
    """||approx - ref|| / ||ref|| (float64)."""
    _check_pair(approx, ref, "relative_l2_error")
    x, y = _flat64(approx), _flat64(ref)
    den = y.norm()
    return float(((x - y).norm() / den).item()) if den > 0 else float((x - y).norm().item())


def density(selection: BlockSelection) -> float:
    """Kept causal blocks / causal blocks of a selection (over batch rows and mask groups)."""
    return selection.density


def _query_chunks(t: int, heads: int, block_size: int, chunk_size: int | None):
    """Row ranges of about ``chunk_size`` query rows (by default ~2^24 probabilities each, with
    ``heads`` = batch x query heads), whole query blocks where a block fits in the budget. Callers
    accumulate per block, so a block larger than the budget (even block_size >= T) is split
    rather than held at once."""
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(1, heads * t))
    rows = (chunk_size // block_size) * block_size if chunk_size >= block_size else chunk_size
    rows = max(1, rows)
    for start in range(0, t, rows):
        yield start, min(t, start + rows)


def _reduce_key_blocks(p: torch.Tensor, block_size: int, nb: int, reduce: str) -> torch.Tensor:
    """(..., S) probabilities -> (..., nb) per key block (``"sum"`` or ``"max"``); blocks past
    S are 0. No padding to nb * block_size (which is huge when block_size >> S)."""
    s = p.shape[-1]
    full = s // block_size
    parts = []
    if full:
        body = p[..., : full * block_size].unflatten(-1, (full, block_size))
        parts.append(body.sum(-1) if reduce == "sum" else body.amax(-1))
    if s > full * block_size:
        tail = p[..., full * block_size :]
        parts.append(tail.sum(-1, keepdim=True) if reduce == "sum" else tail.amax(-1, keepdim=True))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    if out.shape[-1] < nb:
        out = torch.nn.functional.pad(out, (0, nb - out.shape[-1]))
    return out


def _causal_probs(
    q: torch.Tensor, k: torch.Tensor, start: int, stop: int, scale: float
) -> torch.Tensor:
    """Softmax probabilities of query rows [start, stop) over the keys they can see (keys
    0 .. stop - 1; later keys have probability 0 and are left out): (B, Hq, C, stop) float32."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    c = stop - start
    qf = q[:, :, start:stop].float().view(b, hkv, g, c, d)
    kf = k[:, :, :stop].float()
    scores = (qf @ kf[:, :, None].transpose(-1, -2)).view(b, hq, c, stop).mul_(scale)
    key_pos = torch.arange(stop, device=q.device)
    q_pos = torch.arange(start, stop, device=q.device)
    scores = scores.masked_fill_(key_pos[None, :] > q_pos[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1)


def _check_qk_pair(q: torch.Tensor, k: torch.Tensor, where: str) -> None:
    from sketchwalk.blocks import check_qk

    check_qk(q, k, where)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{where}: q has seq {q.shape[2]} but k has seq {k.shape[2]}")


def attention_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    selection: BlockSelection,
    scale: float | None = None,
    chunk_size: int | None = None,
    per_head: bool = False,
) -> float | torch.Tensor:
    """Share of the dense causal softmax mass that falls inside the kept blocks.

    Averaged over heads, batch and query rows (``per_head=True`` returns the (Hq,) float64
    vector averaged over batch and rows instead). 1.0 means the selection loses nothing.
    """
    _check_qk_pair(q, k, "attention_recall")
    check_finite("attention_recall", q=q, k=k)
    b, hq, t, d = q.shape
    bs = selection.block_size
    if selection.seq_len != t:
        raise ValueError(f"attention_recall: selection is for seq {selection.seq_len}, q has {t}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    head_mask = selection.head_mask(hq, k.shape[1])
    nb = num_blocks(t, bs)
    total = torch.zeros(hq, dtype=torch.float64, device=q.device)
    for start, stop in _query_chunks(t, b * hq, bs, chunk_size):
        p = _causal_probs(q, k, start, stop, scale)
        p_blocks = _reduce_key_blocks(p, bs, nb, "sum")
        del p
        rows_mask = head_mask[:, :, torch.arange(start, stop, device=q.device) // bs]
        kept = (p_blocks * rows_mask).sum(-1)  # (B, Hq, C)
        total += kept.double().sum(dim=(0, 2))
    per = total / (b * t)
    return per.cpu() if per_head else float(per.mean().item())


def true_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    reduce: str = "sum",
    scale: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The true causal attention aggregated per (query block, key block) tile.

    Args:
        q: (B, Hq, T, D); k: (B, Hkv, T, D).
        block_size: tile size.
        reduce: ``"sum"``: mean over the tile's query rows of the probability mass on the key
            block (each row sums to 1); ``"max"``: the largest probability in the tile (what
            SeerAttention's gate is distilled from, before row-normalisation).

    Returns:
        float32 (B, Hq, nb, nb).
    """
    if reduce not in ("sum", "max"):
        raise ValueError(f"true_block_attention: reduce must be 'sum' or 'max', got {reduce!r}")
    _check_qk_pair(q, k, "true_block_attention")
    check_finite("true_block_attention", q=q, k=k)
    b, hq, t, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    nb = num_blocks(t, block_size)
    out = torch.zeros(b, hq, nb, nb, dtype=torch.float32, device=q.device)
    for start, stop in _query_chunks(t, b * hq, block_size, chunk_size):
        p = _causal_probs(q, k, start, stop, scale)
        per_row = _reduce_key_blocks(p, block_size, nb, reduce)  # (B, Hq, C, nb)
        del p
        # rows -> query blocks; a chunk may hold part of a block (accumulated across chunks)
        row_block = torch.arange(start, stop, device=q.device) // block_size
        if reduce == "sum":
            out.index_add_(2, row_block, per_row)
        else:
            index = row_block[None, None, :, None].expand_as(per_row)
            out.scatter_reduce_(2, index, per_row, "amax", include_self=True)
    if reduce == "sum":  # mean over each block's rows (the tail block has fewer)
        counts = torch.full((nb,), float(block_size), device=q.device)
        counts[-1] = t - (nb - 1) * block_size
        out /= counts[:, None]
    return out


def recall_from_block_attention(
    block_attention: torch.Tensor, selection: BlockSelection, seq_len: int | None = None
) -> float:
    """`attention_recall` computed from a precomputed ``true_block_attention(..., "sum")``.

    Exact, not an approximation: the recall is the row-weighted mean over heads and query
    blocks of the block mass inside the kept blocks (the tail block weighs its true row count).
    Much cheaper when many selections are scored against the same layer.

    Args:
        block_attention: (B, Hq, nb, nb) from ``true_block_attention(q, k, bs, reduce="sum")``.
        selection: mask groups 1, Hkv or Hq.
    """
    hq = block_attention.shape[1]
    t = selection.seq_len if seq_len is None else seq_len
    # Any group count 1, Hkv or Hq expands correctly when Hkv is taken to be the group count.
    mask = selection.head_mask(hq, selection.num_groups).to(block_attention.device)
    return block_mask_recall(block_attention, mask, t, selection.block_size)


def block_mask_recall(
    block_attention: torch.Tensor, head_mask: torch.Tensor, seq_len: int, block_size: int
) -> float:
    """Attention recall of a per-head bool block mask (B, Hq, nb, nb) from the true block
    attention (B, Hq, nb, nb): each row's kept mass weighted by its number of query tokens (the
    tail block's true count), summed and divided by B * Hq * T."""
    b, hq, nb, _ = block_attention.shape
    per_block = (block_attention.double() * head_mask).sum(-1)  # (B, Hq, nb)
    rows = torch.full((nb,), float(block_size), dtype=torch.float64, device=per_block.device)
    rows[-1] = seq_len - (nb - 1) * block_size
    return float((per_block * rows).sum() / (b * hq * seq_len))


def oracle_selection(
    block_attention: torch.Tensor,
    like: BlockSelection,
) -> BlockSelection:
    """The best possible selection with ``like``'s per-row budget: each row keeps as many blocks
    as ``like`` keeps there, chosen by the true block attention (B, G, nb, nb) of the same mask
    groups."""
    counts = like.kv_num_blocks.long()  # (B, G, nb)
    nb = like.num_blocks
    causal = causal_block_mask(nb, block_attention.device)
    scores = block_attention.float().masked_fill(~causal, float("-inf"))
    kmax = int(counts.max().item())
    top = scores.topk(kmax, dim=-1).indices
    keep = torch.arange(kmax, device=scores.device) < counts[..., None]
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, top, keep)
    return BlockSelection.from_mask(mask & causal, like.block_size, like.seq_len)


__all__ = [
    "attention_recall",
    "block_mask_recall",
    "cosine_similarity",
    "density",
    "max_abs_error",
    "mse",
    "oracle_selection",
    "recall_from_block_attention",
    "relative_l2_error",
    "true_block_attention",
]
