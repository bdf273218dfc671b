"""Step 2 of Sketch&Walk: the block transition matrix of a layer and the damped walk
(docs/algorithm.md §1.5-§1.7).

For layer l the per-head block probabilities P_h = softmax(logits_h) (rows over key blocks) are
summed over the heads that share a mask (all heads, a KV group, or one head) and row-normalised:
that is the transition matrix A_l. Sharpening raises it to the power s and renormalises
(``A ** s`` renormalised equals a softmax at temperature / s of ``log A``; we compute it in log
space so that large s cannot underflow every entry of a row to zero).

The walk starts from the previous sparse layer's walk matrix R_{l-1} (or from A_l) and repeats
``degree`` times ``state = (1 - beta) * A_l + beta * state @ A_l``. In closed form:

    R_l = (1 - beta) * sum_{k=0}^{d-1} beta^k A_l^{k+1} + beta^d * S A_l^d

so the previous layer enters with weight beta^d (1/64 at the released beta = 0.25, d = 3).
"""

from __future__ import annotations

import torch

from sketchwalk.config import SketchWalkConfig


def aggregate_heads(
    probs: torch.Tensor, num_kv_heads: int, granularity: str, how: str = "sum"
) -> torch.Tensor:
    """Sum (or take the maximum of, ``how="max"``) per-head block probabilities into transition
    rows and row-normalise.

    Args:
        probs: (B, Hq, nq, nk) per-query-head block probabilities (rows sum to 1).
        num_kv_heads: Hkv, for the ``kv_group`` granularity.
        granularity: ``layer`` (G = 1), ``kv_group`` (G = Hkv) or ``head`` (G = Hq).

    Returns:
        (B, G, nq, nk) row-stochastic matrices.
    """
    b, hq, nq, nk = probs.shape
    if how not in ("sum", "max"):
        raise ValueError(f"head aggregation must be 'sum' or 'max', got {how!r}")
    if granularity == "layer":
        a = probs.sum(dim=1, keepdim=True) if how == "sum" else probs.amax(dim=1, keepdim=True)
    elif granularity == "kv_group":
        grouped = probs.view(b, num_kv_heads, hq // num_kv_heads, nq, nk)
        a = grouped.sum(dim=2) if how == "sum" else grouped.amax(dim=2)
    elif granularity == "head":
        a = probs
    else:
        raise ValueError(f"granularity must be 'layer', 'kv_group' or 'head', got {granularity!r}")
    return a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)


def sharpen(a: torch.Tensor, exponent: float, parity: bool = False) -> torch.Tensor:
    """Row-normalised ``a ** exponent``; computed in log space unless ``parity``."""
    if exponent == 1.0:
        return a
    if parity:
        p = a.pow(exponent)
        return p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return torch.softmax(exponent * torch.log(a), dim=-1)


def block_transition(
    logits: torch.Tensor, num_kv_heads: int, config: SketchWalkConfig
) -> torch.Tensor:
    """Block logits (B, Hq, nq, nk) -> transition matrix A (B, G, nq, nk).

    The released prefill applies no causal mask before the block softmax; ``causal_sketch``
    (ignored under ``parity``) masks key blocks j > i first so no mass goes to the future.
    """
    nq, nk = logits.shape[-2:]
    if config.causal_sketch and not config.parity:
        future = torch.ones(nq, nk, dtype=torch.bool, device=logits.device).triu(nk - nq + 1)
        logits = logits.masked_fill(future, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    a = aggregate_heads(probs, num_kv_heads, config.granularity, config.head_aggregation)
    return sharpen(a, config.sparsity_exponent, config.parity)


def transition_from_pooled(
    q_blocks: torch.Tensor,
    k_blocks: torch.Tensor,
    config: SketchWalkConfig,
    layer_idx: int,
) -> torch.Tensor:
    """Pooled blocks -> transition matrix A (B, G, nq, nk), one KV group at a time.

    Same result as ``block_transition(block_logits(...))`` but never holds the per-head
    (B, Hq, nq, nk) logits at once (537 MB in float32 for 32 heads at 128K tokens) unless the
    granularity is ``head``: each KV group's logits are softmaxed and summed into A, and the
    sketch is applied once per layer.

    Args:
        q_blocks: (B, Hq, nq, D) pooled queries; k_blocks: (B, Hkv, nk, D) pooled keys.
    """
    from sketchwalk.selection.sketch import sketched_blocks

    hq, nq = q_blocks.shape[1], q_blocks.shape[2]
    hkv, nk = k_blocks.shape[1], k_blocks.shape[2]
    group = hq // hkv
    qs, ks, scale = sketched_blocks(q_blocks, k_blocks, config, layer_idx)
    causal = config.causal_sketch and not config.parity
    future = None
    if causal:
        future = torch.ones(nq, nk, dtype=torch.bool, device=q_blocks.device).triu(nk - nq + 1)
    per_group = []
    for h in range(hkv):
        logits = qs[:, h * group : (h + 1) * group] @ ks[:, h : h + 1].transpose(-1, -2)
        logits.mul_(scale)
        if config.parity and config.exact:
            logits.clamp_(-10.0, 10.0)
        if future is not None:
            logits.masked_fill_(future, float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # (B, group, nq, nk)
        if config.granularity == "head":
            per_group.append(probs)
        elif config.head_aggregation == "max":
            per_group.append(probs.amax(dim=1, keepdim=True))
        else:
            per_group.append(probs.sum(dim=1, keepdim=True))
    if config.granularity == "layer":
        a = per_group[0]
        for extra in per_group[1:]:
            a = torch.maximum(a, extra) if config.head_aggregation == "max" else a + extra
    else:
        a = torch.cat(per_group, dim=1)
    if config.granularity != "head":
        a = a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    return sharpen(a, config.sparsity_exponent, config.parity)


def walk_step(
    a: torch.Tensor,
    previous: torch.Tensor | None,
    degree: int,
    damping: float,
    causal: bool = False,
    bf16_products: bool = False,
) -> torch.Tensor:
    """The damped walk of one layer.

    Args:
        a: (B, G, n, n) this layer's transition matrix A_l.
        previous: (B, G, n, n) the previous layer's walk R_{l-1}, or None to start from A_l.
        degree: number of steps d.
        damping: beta.
        causal: ``a`` and ``previous`` are lower-triangular (a causal block softmax: every
            layer's A has no mass on future blocks, so neither has any walk built from them):
            the steps run as `causal_walk_product`, which skips the all-zero upper tiles
            (about a third of the dense products' work). Same result up to float rounding.
        bf16_products: the products ``state @ a`` take bfloat16 operands and accumulate in
            float32 (tensor cores on CUDA; on the CPU the operands are rounded to bfloat16 and
            multiplied in float32, the same arithmetic up to summation order); everything else
            (the state, the damping sum) stays float32. Only with ``causal``.

    Returns:
        (B, G, n, n) R_l.
    """
    if bf16_products and not causal:
        raise ValueError("walk_step: bf16_products needs causal (lower-triangular) matrices")
    state = a if previous is None else previous
    if bf16_products:
        return _bf16_walk(state, a, degree, damping)
    for _ in range(degree):
        if causal:
            state = causal_walk_product(state, a, damping)
        else:
            state = (1.0 - damping) * a + damping * (state @ a)
    return state


def causal_walk_product(
    state: torch.Tensor, a: torch.Tensor, damping: float, tile: int | None = None
) -> torch.Tensor:
    """One walk step ``(1 - beta) * a + beta * state @ a`` of lower-triangular matrices.

    Row tile I of the product (rows ``I * tile`` to ``(I + 1) * tile``) only involves columns
    below the tile's end: ``state[I, :w] @ a[:w, :w]`` with ``w = (I + 1) * tile`` holds every
    nonzero term of those rows, and everything right of ``w`` is an exact zero. Summing the
    row tiles costs about n^3 / 3 multiply-adds instead of n^3, in a fixed number of fused
    ``baddbmm`` calls on static shapes (CUDA-graph capturable). Entries above the diagonal
    inside a row tile come out as exact zeros (all their terms are zero), so the result has the
    dense product's zeros; its other entries agree with the dense product up to the float
    summation order.

    Args:
        state: (B, G, n, n) lower-triangular; a: (B, G, n, n) lower-triangular.
        damping: beta.
        tile: rows per tile (default: n / 16 rounded up to a multiple of 64, at least 64).

    Returns:
        (B, G, n, n) the step's result, lower-triangular.
    """
    *lead, n, _ = a.shape
    tile = _default_tile(n) if tile is None else tile
    s3 = state.reshape(-1, n, n)
    a3 = a.reshape(-1, n, n)
    out = torch.zeros_like(a3)
    for start in range(0, n, tile):
        stop = min(n, start + tile)
        torch.baddbmm(
            a3[:, start:stop, :stop],
            s3[:, start:stop, :stop],
            a3[:, :stop, :stop],
            beta=1.0 - damping,
            alpha=damping,
            out=out[:, start:stop, :stop],
        )
    return out.view(*lead, n, n)


def _default_tile(n: int) -> int:
    """Rows per tile of the causal products: n / 16 rounded up to a multiple of 64, >= 64."""
    return max(64, -(-n // (16 * 64)) * 64)


def _bf16_walk(state: torch.Tensor, a: torch.Tensor, degree: int, damping: float) -> torch.Tensor:
    """``degree`` causal walk steps with bfloat16 operands and float32 accumulation, row tile
    by row tile (`causal_walk_product`'s tiles). ``a``'s bfloat16 copy and ``(1 - beta) * a``
    are made once for all steps; each step rounds the state once. On CUDA the products run on
    tensor cores (``bmm`` with a float32 output); on the CPU, which has no such kernel, the
    operands rounded to bfloat16 are multiplied in float32: the same products up to summation
    order (the reference the tests compare with). Returns float32, lower-triangular.
    """
    *lead, n, _ = a.shape
    tile = _default_tile(n)
    a3 = a.reshape(-1, n, n)
    a_lo = _bf16_operand(a3)
    a_damped = a3 * (1.0 - damping)
    s3 = state.reshape(-1, n, n)
    for _ in range(degree):
        s_lo = _bf16_operand(s3)
        out = torch.zeros_like(a3)
        for start in range(0, n, tile):
            stop = min(n, start + tile)
            torch.add(
                a_damped[:, start:stop, :stop],
                _bf16_bmm(s_lo[:, start:stop, :stop], a_lo[:, :stop, :stop]),
                alpha=damping,
                out=out[:, start:stop, :stop],
            )
        s3 = out
    return s3.view(*lead, n, n)


def _bf16_operand(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a product operand: bfloat16 on CUDA, rounded to bfloat16 and held in float32
    elsewhere (the CPU has no bfloat16 x bfloat16 -> float32 product)."""
    lo = x.to(torch.bfloat16)
    return lo if x.is_cuda else lo.float()


def _bf16_bmm(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Float32 product of `_bf16_operand` operands (float32 accumulation)."""
    if lhs.is_cuda:
        return torch.bmm(lhs, rhs, out_dtype=torch.float32)
    return torch.bmm(lhs, rhs)


__all__ = [
    "aggregate_heads",
    "block_transition",
    "causal_walk_product",
    "sharpen",
    "transition_from_pooled",
    "walk_step",
]
