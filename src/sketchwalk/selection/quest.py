"""Query-aware decode-time block scores from per-block key bounds (``decode_rule="quest"``).

The walk's decode row (`sketchwalk.selection.decode`) scores key blocks by their MEAN key against
a window of recent queries: a single key that the current query needs ("a needle") barely moves
its block's mean and is easily dropped. Here every block keeps the per-channel minimum and maximum
of its keys, and the current query q scores block j by an upper bound of its largest logit:

    u_j = sum_c max(q_c * min_jc, q_c * max_jc)  >=  max_{t in block j} q . k_t

(each term bounds q_c * k_tc for every token t of the block). The idea is Quest's (Tang et al.,
2024, "Query-aware sparsity for efficient long-context LLM inference"); this is our own code.
``max(q_c * lo, q_c * hi)`` is ``q_c * hi`` for q_c >= 0 and ``q_c * lo`` otherwise, so
``u = relu(q) . max + min(q, 0) . min``: two matrix products, no (heads, blocks, channels)
intermediate.

Per query head the bounds become block probabilities, ``softmax_j(u_j / sqrt(D) + log n_j)``
(n_j tokens in block j: the bound on the block's softmax mass, up to the shared normaliser), and
a mask group takes the MAX over its heads: the group's mask serves every head in it, and a block
one head needs must stay competitive even if the other heads ignore it (a sum would dilute one
head's needle by the group size against blocks that are mildly useful to all heads).

State per layer and KV head: ``key_min``, ``key_max`` (B, Hkv, nk, D) float32, built from the
prefill's keys in one pass (`block_key_bounds`); `sketchwalk.selection.decode` folds each new
key into them in place, O(D) per head.
"""

from __future__ import annotations

import math

import torch


def block_key_bounds(k: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block, per-channel min and max of the keys, in one pass.

    Args:
        k: (B, Hkv, T, D) keys.
        block_size: tokens per block; a partial tail block is padded with copies of its last
            key, which leaves its min and max unchanged.

    Returns:
        (key_min, key_max), float32 (B, Hkv, nb, D) each, nb = ceil(T / block_size).
    """
    b, h, t, d = k.shape
    nb = -(-t // block_size)
    pad = nb * block_size - t
    kf = k.float()
    if pad:
        kf = torch.cat([kf, kf[:, :, -1:].expand(b, h, pad, d)], dim=2)
    key_min, key_max = torch.aminmax(kf.view(b, h, nb, block_size, d), dim=3)
    return key_min, key_max


def quest_block_scores(
    q: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    block_counts: torch.Tensor,
    granularity: str,
) -> torch.Tensor:
    """Block scores of one query per mask group.

    Args:
        q: (B, Hq, D) the current query (one token).
        key_min, key_max: (B, Hkv, nk, D) per-block key bounds; Hq a multiple of Hkv.
        block_counts: (nk,) tokens per block (float).
        granularity: ``layer`` (G = 1), ``kv_group`` (G = Hkv) or ``head`` (G = Hq).

    Returns:
        float32 (B, G, nk): per head ``softmax(u / sqrt(D) + log n)`` over the blocks, maximum
        over the heads of each mask group.
    """
    b, hq, d = q.shape
    hkv, nk = key_min.shape[1], key_min.shape[2]
    qg = q.float().view(b, hkv, hq // hkv, d)
    bound = qg.clamp_min(0.0) @ key_max.transpose(-1, -2) + qg.clamp_max(0.0) @ key_min.transpose(
        -1, -2
    )  # (B, Hkv, group, nk)
    logits = bound / math.sqrt(d) + block_counts.float().log()
    probs = torch.softmax(logits, dim=-1)
    if granularity == "layer":
        return probs.amax(dim=(1, 2))[:, None]
    if granularity == "kv_group":
        return probs.amax(dim=2)
    if granularity == "head":
        return probs.reshape(b, hq, nk)
    raise ValueError(f"granularity must be 'layer', 'kv_group' or 'head', got {granularity!r}")


def bound_logits(q: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor) -> torch.Tensor:
    """The scaled upper-bound logits ``u / sqrt(D)`` of one query per head, in two products.

    Args:
        q: (B, Hq, D) queries.
        key_min, key_max: float32 (B, Hkv, n, D) or (B * Hkv, n, D) block bounds.

    Returns:
        float32 (B * Hkv, Hq / Hkv, n): the heads of a KV group side by side.
    """
    b, hq, d = q.shape
    n = key_min.shape[-2]
    hkv = key_min.numel() // (b * n * d)
    # the scale goes into the query: relu(s q) = s relu(q) for s > 0
    qs = q.reshape(b * hkv, hq // hkv, d).to(torch.float32) * (1.0 / math.sqrt(d))
    q_pos = qs.clamp_min(0.0)
    logits = torch.bmm(q_pos, key_max.reshape(b * hkv, n, d).transpose(1, 2))
    logits.baddbmm_(qs - q_pos, key_min.reshape(b * hkv, n, d).transpose(1, 2))
    return logits


def group_log_probs(logits: torch.Tensor, batch: int, granularity: str) -> torch.Tensor:
    """Per head, log-softmax of ``logits`` (B * Hkv, g, n) over the blocks; per mask group, the
    maximum over its heads: float32 (B, G, n)."""
    _, g, n = logits.shape
    logits = logits - logits.logsumexp(dim=-1, keepdim=True)
    logits = logits.view(batch, -1, g, n)
    if granularity == "layer":
        return logits.amax(dim=(1, 2))[:, None]
    if granularity == "kv_group":
        return logits.amax(dim=2)
    if granularity == "head":
        return logits.reshape(batch, -1, n)
    raise ValueError(f"granularity must be 'layer', 'kv_group' or 'head', got {granularity!r}")


def quest_log_scores(
    q: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    last_count: int,
    block_size: int,
    granularity: str,
) -> torch.Tensor:
    """`quest_block_scores` in log space, with fewer device operations (the decode fast path).

    Same arguments, except the block sizes: every block holds ``block_size`` tokens but the
    last, which holds ``last_count``. The shared ``log(block_size)`` term drops out of the
    softmax, so only the last block gets ``log(last_count / block_size)``; the scale is folded
    into the query; the two products are one ``bmm`` and one in-place ``baddbmm``
    (`bound_logits`); and the group takes the maximum of log-probabilities, which ranks blocks
    as the maximum of probabilities does (`group_log_probs`).

    Returns:
        float32 (B, G, nk): ``log`` of `quest_block_scores`' result.
    """
    nk = key_min.shape[2]
    logits = bound_logits(q, key_min, key_max)
    if last_count != block_size:
        logits[:, :, nk - 1] += math.log(last_count / block_size)
    return group_log_probs(logits, q.shape[0], granularity)


__all__ = [
    "block_key_bounds",
    "bound_logits",
    "group_log_probs",
    "quest_block_scores",
    "quest_log_scores",
]
