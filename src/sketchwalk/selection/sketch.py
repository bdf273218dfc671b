"""Step 1 of Sketch&Walk: block pooling and the randomized Hadamard sketch, then block logits
(docs/algorithm.md §1.2-§1.4; the released arithmetic under ``parity``: §5.3-§5.6).

The sketch maps a pooled head vector x in R^D to R^r:

    x~ = scale * (H_n (s * pad_n(x)))[coords]

with s a random +-1 sign vector (one draw per layer, shared by Q and K), H_n the Sylvester
Walsh-Hadamard matrix of size n = next power of two >= D (entries +-1, H_n H_n = n I), coords r
distinct coordinates drawn by a random permutation, and

- normalised (ours): scale = 1 / sqrt(r), so E[q~ . k~] = q . k for every r, and with r == n the
  map is an exact rotation (q~ . k~ == q . k);
- parity (released): scale = 1 / sqrt(n / r), which makes q~ . k~ = (r^2 / n) q . k on average.

All draws come from a seeded ``torch.Generator`` keyed by (seed, layer_idx), so a run is
reproducible and the draws can be recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from sketchwalk.config import SketchWalkConfig


def block_pool(x: torch.Tensor, block_size: int, parity: bool = False) -> torch.Tensor:
    """Mean of ``x`` over consecutive blocks of tokens.

    Args:
        x: (B, H, T, D) tensor, any float dtype.
        block_size: tokens per block.
        parity: divide the (zero-padded) tail block by ``block_size`` like the released code,
            instead of by its true token count.

    Returns:
        (B, H, ceil(T / block_size), D) float32 block means.
    """
    b, h, t, d = x.shape
    full = t // block_size
    tail = t - full * block_size
    # Sum in float32 inside the reduction: no float32 copy (or padded copy) of x is made.
    parts = []
    if full:
        body = x[:, :, : full * block_size].reshape(b, h, full, block_size, d)
        parts.append(body.sum(dim=3, dtype=torch.float32).div_(block_size))
    if tail:
        divisor = block_size if parity else tail
        parts.append(
            x[:, :, full * block_size :].sum(dim=2, keepdim=True, dtype=torch.float32).div_(divisor)
        )
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@lru_cache(maxsize=16)
def _sylvester_cpu(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sylvester Walsh-Hadamard matrix of size n (a power of two), entries +-1, float32."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard_matrix: n must be a power of two, got {n}")
    return _sylvester_cpu(n).to(device)


@dataclass(frozen=True)
class SketchDraws:
    """The random draws of one layer's sketch.

    Attributes:
        signs: (n,) float32 tensor of +-1.
        coords: (r,) int64 tensor of distinct coordinates in [0, n).
        head_dim: D; n = next_power_of_two(D); r = len(coords).
    """

    signs: torch.Tensor
    coords: torch.Tensor
    head_dim: int

    @property
    def n(self) -> int:
        return self.signs.numel()

    @property
    def r(self) -> int:
        return self.coords.numel()


@lru_cache(maxsize=1024)
def sketch_draws(head_dim: int, sketch_dim: int, seed: int, layer_idx: int) -> SketchDraws:
    """Seeded draws for one layer. ``sketch_dim`` is clamped to the padded head dim."""
    n = next_power_of_two(head_dim)
    r = min(sketch_dim, n)
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(layer_idx)) % (2**63))
    signs = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    coords = torch.randperm(n, generator=gen)[:r]
    return SketchDraws(signs=signs, coords=coords, head_dim=head_dim)


def sketch_projection(
    draws: SketchDraws, parity: bool = False, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The (D, r) matrix P with ``x~ = x @ P`` (sign flip, Hadamard, coordinate pick, scale)."""
    n, r, d = draws.n, draws.r, draws.head_dim
    h = hadamard_matrix(n, device)
    p = draws.signs.to(device)[:, None] * h[:, draws.coords.to(device)]
    scale = 1.0 / math.sqrt(n / r) if parity else 1.0 / math.sqrt(r)
    return (p * scale)[:d]


def layer_projection(
    head_dim: int,
    sketch_dim: int,
    seed: int,
    layer_idx: int,
    parity: bool,
    device: torch.device | str,
) -> torch.Tensor:
    """The (D, r) sketch matrix of one layer on ``device``, built once and cached (so a layer's
    selection copies nothing from the host after the first sequence)."""
    return _layer_projection(head_dim, sketch_dim, seed, layer_idx, parity, torch.device(device))


@lru_cache(maxsize=1024)
def _layer_projection(
    head_dim: int, sketch_dim: int, seed: int, layer_idx: int, parity: bool, device: torch.device
) -> torch.Tensor:
    draws = sketch_draws(head_dim, sketch_dim, seed, layer_idx)
    return sketch_projection(draws, parity, device)


def hadamard_sketch(x: torch.Tensor, draws: SketchDraws, parity: bool = False) -> torch.Tensor:
    """Apply the sketch to the last dim of ``x`` (..., D) -> (..., r), float32."""
    if x.shape[-1] != draws.head_dim:
        raise ValueError(
            f"hadamard_sketch: x's last dim must be head_dim={draws.head_dim}, got {x.shape[-1]}"
        )
    return x.float() @ sketch_projection(draws, parity, x.device)


def sketched_blocks(
    q_blocks: torch.Tensor,
    k_blocks: torch.Tensor,
    config: SketchWalkConfig,
    layer_idx: int,
    projection: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Sketch the pooled blocks once per layer.

    ``projection`` replaces the layer's cached (D, r) sketch matrix (`layer_projection`); the
    CUDA-graph path of `SketchWalk.select` passes a static copy of it.

    Returns:
        (qs (B, Hq, nq, r), ks (B, Hkv, nk, r), scale): block logits are ``scale * qs . ks``
        (clamped to [-10, 10] in parity-exact mode); see `block_logits` for the arithmetic.
    """
    d = q_blocks.shape[-1]
    if config.exact:
        qs, ks, r = q_blocks.float(), k_blocks.float(), d
    else:
        proj = projection
        if proj is None:
            proj = layer_projection(
                d, config.sketch_dim, config.seed, layer_idx, config.parity, q_blocks.device
            )
        qs, ks, r = q_blocks.float() @ proj, k_blocks.float() @ proj, proj.shape[1]
    if config.parity:
        scale = 1.0 / math.sqrt(d) if config.exact else 1.0 / math.sqrt(r) / 100.0
    else:
        scale = 1.0 / (math.sqrt(d) * config.temperature)
    return qs, ks, scale


def block_logits(
    q_blocks: torch.Tensor,
    k_blocks: torch.Tensor,
    config: SketchWalkConfig,
    layer_idx: int,
) -> torch.Tensor:
    """Per-query-head block logits.

    Args:
        q_blocks: (B, Hq, nq, D) pooled queries.
        k_blocks: (B, Hkv, nk, D) pooled keys; query head h uses KV head h // (Hq // Hkv).
        config: decides sketch vs exact, temperature and parity arithmetic.
        layer_idx: keys the layer's random draws.

    Returns:
        (B, Hq, nq, nk) float32 logits (before any causal mask).

    Arithmetic by mode (D = head_dim, r = sketch dim, T = temperature):
        sketch:          q~ . k~ / (sqrt(D) * T)                  (normalised sketch)
        exact:           qb . kb / (sqrt(D) * T)
        parity sketch:   q~ . k~ / sqrt(r) / 100                  (unnormalised sketch)
        parity exact:    clamp(qb . kb / sqrt(D), -10, 10)
    """
    b, hq, nq, _ = q_blocks.shape
    hkv, nk = k_blocks.shape[1], k_blocks.shape[2]
    qs, ks, scale = sketched_blocks(q_blocks, k_blocks, config, layer_idx)
    # GQA: (B, Hkv, group, nq, r) @ (B, Hkv, 1, r, nk)
    logits = qs.view(b, hkv, hq // hkv, nq, -1) @ ks.view(b, hkv, 1, nk, -1).transpose(-1, -2)
    logits = logits.view(b, hq, nq, nk).mul_(scale)
    if config.parity and config.exact:
        logits.clamp_(-10.0, 10.0)
    return logits


__all__ = [
    "SketchDraws",
    "block_logits",
    "block_pool",
    "hadamard_matrix",
    "hadamard_sketch",
    "layer_projection",
    "next_power_of_two",
    "sketch_draws",
    "sketch_projection",
    "sketched_blocks",
]
