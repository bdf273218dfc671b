"""SeerAttention's learned prefill gate (AttnGate) and its block selection (docs/algorithm.md §4).

The gate predicts, for every query head, a distribution over key blocks from PRE-RoPE q and k:

1. pool q and k over blocks of ``block_size`` tokens (ceil mode: the tail block averages over its
   true token count), with one or more of ``max``/``min``/``avg``; the pooled vectors of the
   chosen types are concatenated on the channel axis (``Qavg_Kmaxminavg`` by default: q averaged,
   k max-, min- and average-pooled, so k has ``3 * head_dim`` channels);
2. per-head linear maps to ``hidden_size`` channels (weights ``(heads, in_channels, hidden)``):
   q with ``Hq`` heads, k with ``Hkv`` heads then repeated to ``Hq`` (GQA). When q has a single
   pooling type and ``hidden_size == head_dim`` (and ``force_double`` is off) the q map is
   omitted, and the k map then has ``Hq`` heads, applied after repeating k to ``Hq`` heads;
3. block-level RoPE of dimension ``hidden_size`` on both, at the block position ids
   ``position_ids[:, ::block_size]`` (the position of each block's first token);
4. logits ``q . k / sqrt(hidden_size)`` plus a block causal mask, softmax over key blocks.

Selection (`select_blocks_from_scores`) follows SeerAttention: ``threshold`` keeps blocks whose
score exceeds ``t``; ``nz_ratio`` keeps the same ``max(1, int((1 - sqrt(1 - nz)) * nb))`` top
blocks in every row; with ``last_block_dense`` the last two query-block rows are dense; the mask
is then made lower-triangular. The checkpoint format is in `sketchwalk.gate.checkpoint`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sketchwalk.blocks import causal_block_mask

POOL_TYPES: tuple[str, ...] = ("max", "min", "avg")
DEFAULT_GATE_TYPE = "Qavg_Kmaxminavg"
LAST_DENSE_ROWS = 2  # rows kept dense when seerattn_last_block_dense is on


def _pool_names(spec: str) -> tuple[str, ...]:
    names = tuple(spec[i : i + 3] for i in range(0, len(spec), 3))
    if not names or "".join(names) != spec or any(n not in POOL_TYPES for n in names):
        raise ValueError(f"pooling spec {spec!r} is not a concatenation of {POOL_TYPES}")
    return names


def _all_gate_types() -> tuple[str, ...]:
    combos = [
        "".join(c)
        for r in range(1, len(POOL_TYPES) + 1)
        for c in itertools.combinations(POOL_TYPES, r)
    ]
    return tuple(f"Q{q}_K{k}" for q in combos for k in combos)


# Every (q, k) pooling combination; each side lists its pooling types in the order max, min, avg.
GATE_TYPES: tuple[str, ...] = _all_gate_types()


def parse_gate_type(gate_type: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split a gate type such as ``"Qavg_Kmaxminavg"`` into (q pooling types, k pooling types)."""
    if gate_type not in GATE_TYPES:
        raise ValueError(
            f"unknown gate type {gate_type!r}: expected 'Q<pools>_K<pools>' with pools a non-empty "
            f"ordered subset of {POOL_TYPES}, e.g. {DEFAULT_GATE_TYPE!r}"
        )
    q_spec, k_spec = gate_type.split("_")
    return _pool_names(q_spec[1:]), _pool_names(k_spec[1:])


def pool_blocks(x: torch.Tensor, block_size: int, pool_types: tuple[str, ...]) -> torch.Tensor:
    """Pool tokens into blocks (ceil mode) and concatenate the pooled types on the channel axis.

    Args:
        x: (B, H, T, D) token vectors.
        block_size: tokens per block; the tail block may be partial.
        pool_types: ordered subset of ``("max", "min", "avg")``.

    Returns:
        (B, H, ceil(T / block_size), len(pool_types) * D) float32; ``avg`` divides by the true
        token count of each block, ``max``/``min`` ignore the padding of a partial tail block.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, heads, seq, head_dim), got shape {tuple(x.shape)}")
    batch, heads, seq_len, dim = x.shape
    if seq_len == 0:
        raise ValueError("x has no tokens")
    num_blocks = -(-seq_len // block_size)
    pad = num_blocks * block_size - seq_len
    x = x.float()
    counts = torch.full((num_blocks,), float(block_size), device=x.device)
    counts[-1] = block_size - pad
    out = []
    for kind in pool_types:
        if kind == "avg":
            padded = F.pad(x, (0, 0, 0, pad), value=0.0)
            summed = padded.view(batch, heads, num_blocks, block_size, dim).sum(dim=3)
            out.append(summed / counts[:, None])
        elif kind in ("max", "min"):
            fill = float("-inf") if kind == "max" else float("inf")
            padded = F.pad(x, (0, 0, 0, pad), value=fill).view(
                batch, heads, num_blocks, block_size, dim
            )
            out.append(padded.amax(dim=3) if kind == "max" else padded.amin(dim=3))
        else:
            raise ValueError(f"unknown pooling type {kind!r}; expected one of {POOL_TYPES}")
    return torch.cat(out, dim=-1)


def rope_inv_freq(
    dim: int, rope_theta: float = 10000.0, rope_scaling: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """Inverse RoPE frequencies (dim // 2,) for rotary dimension ``dim``.

    Supports the ``default``, ``linear`` and ``llama3`` rope types (Llama-3.1's frequency-dependent
    scaling); other types raise, since silently ignoring them would move the gate's positions.
    """
    if dim % 2:
        raise ValueError(f"rotary dimension must be even, got {dim}")
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rope_type = "default"
    if rope_scaling:
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type == "default":
        pass
    elif rope_type == "linear":
        inv_freq = inv_freq / float(rope_scaling["factor"])
    elif rope_type == "llama3":
        factor = float(rope_scaling["factor"])
        low = float(rope_scaling["low_freq_factor"])
        high = float(rope_scaling["high_freq_factor"])
        old_len = float(rope_scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are slowed down by `factor`, short ones kept, the band between blended
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        blend = (old_len / wavelen - low) / (high - low)
        blended = (1 - blend) * scaled / factor + blend * scaled
        in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(in_band, blended, scaled)
    else:
        raise ValueError(f"rope type {rope_type!r} is not supported by the gate's block RoPE")
    return inv_freq.float()


def apply_block_rope(
    x: torch.Tensor, block_position_ids: torch.Tensor, inv_freq: torch.Tensor
) -> torch.Tensor:
    """Rotate ``x`` (B, H, n, dim) at positions (B, n) with half-split (rotate_half) RoPE."""
    angles = block_position_ids.to(torch.float32)[:, :, None] * inv_freq.to(x.device)[None, None, :]
    emb = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, n, dim)
    cos, sin = emb.cos(), emb.sin()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class HeadLinear(nn.Module):
    """Per-head linear map without bias: weight (heads, in_channels, out_channels).

    An input with fewer heads than the map (GQA keys) is repeated head-wise first
    (head h reads input head h // (heads / input_heads)).
    """

    def __init__(self, heads: int, in_channels: int, out_channels: int, init_std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, in_channels, out_channels))
        nn.init.normal_(self.weight, mean=0.0, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, h, n, in_channels) -> (B, heads, n, out_channels)."""
        heads = self.weight.shape[0]
        if x.shape[1] != heads:
            if heads % x.shape[1]:
                raise ValueError(f"cannot map {x.shape[1]} input heads onto {heads} gate heads")
            x = x.repeat_interleave(heads // x.shape[1], dim=1)
        return torch.matmul(x, self.weight.unsqueeze(0))


class AttnGate(nn.Module):
    """One layer's prefill gate. See the module docstring for the algorithm.

    Args:
        num_q_heads: Hq.
        num_kv_heads: Hkv (Hq % Hkv == 0).
        head_dim: D of the model's pre-RoPE q/k.
        block_size: tokens per block.
        hidden_size: gate channels (and rotary dimension).
        gate_type: pooling combination, one of :data:`GATE_TYPES`.
        force_double: keep the q map even when it could be omitted.
        rope_theta, rope_scaling: the base model's RoPE settings, applied at dimension hidden_size.
        init_std: std of the normal init of the maps.
    """

    def __init__(
        self,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int = 64,
        hidden_size: int = 128,
        gate_type: str = DEFAULT_GATE_TYPE,
        force_double: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: Mapping[str, Any] | None = None,
        init_std: float = 0.02,
    ):
        super().__init__()
        if num_q_heads % num_kv_heads:
            raise ValueError(
                f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        if block_size < 1 or hidden_size < 2 or hidden_size % 2:
            raise ValueError(
                f"need block_size >= 1 and an even hidden_size, got {block_size}, {hidden_size}"
            )
        self.q_pools, self.k_pools = parse_gate_type(gate_type)
        self.gate_type = gate_type
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.block_size, self.hidden_size = block_size, hidden_size
        self.mask_linear_q: HeadLinear | None
        if len(self.q_pools) > 1 or hidden_size != head_dim or force_double:
            self.mask_linear_q = HeadLinear(
                num_q_heads, len(self.q_pools) * head_dim, hidden_size, init_std
            )
            self.mask_linear_k = HeadLinear(
                num_kv_heads, len(self.k_pools) * head_dim, hidden_size, init_std
            )
        else:
            self.mask_linear_q = None
            self.mask_linear_k = HeadLinear(
                num_q_heads, len(self.k_pools) * head_dim, hidden_size, init_std
            )
        self.register_buffer(
            "inv_freq", rope_inv_freq(hidden_size, rope_theta, rope_scaling), persistent=False
        )

    def pool(self, q_pre: torch.Tensor, k_pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool pre-RoPE q (B, Hq, T, D) and k (B, Hkv, T, D) into gate inputs.

        Returns:
            q_pooled (B, Hq, nb, len(q_pools) * D), k_pooled (B, Hkv, nb, len(k_pools) * D).
        """
        _check_qk(q_pre, k_pre, self.num_q_heads, self.num_kv_heads, self.head_dim)
        return (
            pool_blocks(q_pre, self.block_size, self.q_pools),
            pool_blocks(k_pre, self.block_size, self.k_pools),
        )

    def logits_from_pooled(
        self, q_pooled: torch.Tensor, k_pooled: torch.Tensor, block_position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Masked block logits from pooled inputs.

        Args:
            q_pooled: (B, Hq, nq, len(q_pools) * D).
            k_pooled: (B, Hkv, nk, len(k_pools) * D).
            block_position_ids: (B, nk) position of each block's first token.

        Returns:
            (B, Hq, nq, nk) float32 logits ``q . k / sqrt(hidden)``; causally masked entries hold
            the most negative float32 (finite, so a log-softmax stays finite).
        """
        q = q_pooled.float()
        if self.mask_linear_q is not None:
            q = self.mask_linear_q(q)
        k = self.mask_linear_k(k_pooled.float())
        nq, nk = q.shape[2], k.shape[2]
        pos = block_position_ids.to(q.device)
        q = apply_block_rope(q, pos[:, nk - nq :], self.inv_freq)
        k = apply_block_rope(k, pos, self.inv_freq)
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.hidden_size)
        allowed = causal_block_mask(nq, logits.device, nk)
        return logits.masked_fill(~allowed, torch.finfo(torch.float32).min)

    def forward(
        self, q_pre: torch.Tensor, k_pre: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Masked block logits (B, Hq, nb, nb) from pre-RoPE q (B, Hq, T, D), k (B, Hkv, T, D).

        ``position_ids`` (B, T) or (T,) defaults to ``arange(T)``.
        """
        q_pooled, k_pooled = self.pool(q_pre, k_pre)
        block_pos = block_position_ids(
            position_ids, q_pre.shape[0], q_pre.shape[2], self.block_size, q_pre.device
        )
        return self.logits_from_pooled(q_pooled, k_pooled, block_pos)

    def block_scores(
        self, q_pre: torch.Tensor, k_pre: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Softmax block scores (B, Hq, nb, nb): each row sums to 1 over its causal key blocks."""
        return torch.softmax(self.forward(q_pre, k_pre, position_ids), dim=-1)


def block_position_ids(
    position_ids: torch.Tensor | None,
    batch: int,
    seq_len: int,
    block_size: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Block position ids (B, nb) = ``position_ids[:, ::block_size]`` (default positions arange)."""
    if position_ids is None:
        position_ids = torch.arange(seq_len, device=device)
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.dim() != 2 or position_ids.shape[-1] != seq_len:
        raise ValueError(
            f"position_ids must be (batch, {seq_len}) or ({seq_len},), got "
            f"{tuple(position_ids.shape)}"
        )
    if position_ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids batch {position_ids.shape[0]} does not match {batch}")
    return position_ids[:, ::block_size].expand(batch, -1)


def _check_qk(q: torch.Tensor, k: torch.Tensor, hq: int, hkv: int, dim: int) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q_pre and k_pre must be (batch, heads, seq, head_dim), got "
            f"{tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.shape[1] != hq or q.shape[3] != dim:
        raise ValueError(f"q_pre must be (batch, {hq}, seq, {dim}), got {tuple(q.shape)}")
    if k.shape[1] != hkv or k.shape[3] != dim:
        raise ValueError(f"k_pre must be (batch, {hkv}, seq, {dim}), got {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q_pre and k_pre must share batch and seq (prefill), got "
            f"{tuple(q.shape)} and {tuple(k.shape)}"
        )


def select_blocks_from_scores(
    scores: torch.Tensor,
    threshold: float | None = None,
    nz_ratio: float | None = None,
    last_block_dense: bool = True,
) -> torch.Tensor:
    """SeerAttention's block selection from gate scores.

    Args:
        scores: (B, H, nq, nk) softmax scores (threshold) or scores/logits (nz_ratio).
        threshold: keep blocks with score > threshold.
        nz_ratio: keep the top ``max(1, int((1 - sqrt(1 - nz_ratio)) * nk))`` blocks of every row.
        last_block_dense: the last two query-block rows keep every causal block.

    Returns:
        bool (B, H, nq, nk), lower-triangular (causal).
    """
    if (threshold is None) == (nz_ratio is None):
        raise ValueError("give exactly one of threshold or nz_ratio")
    if scores.dim() != 4:
        raise ValueError(f"scores must be (batch, heads, nq, nk), got {tuple(scores.shape)}")
    nq, nk = scores.shape[-2:]
    if threshold is not None:
        mask = scores > threshold
    else:
        if not 0.0 <= nz_ratio <= 1.0:
            raise ValueError(f"nz_ratio must be in [0, 1], got {nz_ratio}")
        topk = min(nk, max(1, int((1.0 - math.sqrt(1.0 - nz_ratio)) * nk)))
        idx = torch.topk(scores, topk, dim=-1).indices
        mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        mask.scatter_(-1, idx, True)
    if last_block_dense:
        mask[..., -LAST_DENSE_ROWS:, :] = True
    return mask & causal_block_mask(nq, scores.device, nk)
