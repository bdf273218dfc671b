"""Triton kernels for the block transition matrix of one layer, without per-head logits in memory
(docs/algorithm.md §1.10).

Given sketched pooled blocks ``qs`` (B, Hq, nq, r) and ``ks`` (B, Hkv, nk, r) (float32, from
`sketchwalk.selection.sketch.sketched_blocks`), the transition matrix of mask group g is

    A[b, g, i, j] = (1 / H_g) * sum_{h in group g} softmax_j(scale * qs[b, h, i] . ks[b, h // q, j])

with q = Hq // Hkv query heads per KV head, H_g the number of query heads in the group (all Hq
for ``layer``, q for ``kv_group``, 1 for ``head``) and, when causal, key blocks
j > i + (nk - nq) masked before the softmax. Each head's softmax row sums to 1, so the row
normalisation of the summed probabilities is the division by H_g.

Two launches, nothing of size (Hq, nq, nk):

1. ``_row_stats_kernel``: one program per (batch * query head, query tile) streams the key tiles
   once and keeps an online row max and sum in the exp2 domain; it writes the row max and the
   reciprocal row sum, (B, Hq, nq) each (a few hundred KB).
2. ``_accumulate_kernel``: one program per (batch * group, query tile, key tile) recomputes the
   tile's logits for each head of the group, adds ``exp2(s - max) / sum`` into a register tile and
   writes A's tile once (tiles wholly in the causal future are written as zeros, no dot).

Both passes compute the logits with the same code, so the probabilities of one head sum to 1 up
to float32 rounding. The dots run in ``tf32x3`` by default (three TF32 tensor-core products:
float32-level accuracy, unlike plain TF32's 10-bit mantissa, which can reorder close blocks).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from sketchwalk.config import SketchWalkConfig
from sketchwalk.selection.sketch import sketched_blocks
from sketchwalk.selection.walk import sharpen

LOG2E = 1.4426950408889634
GRANULARITIES = ("layer", "kv_group", "head")


@triton.jit
def _logits_tile(
    q,
    ks_base,
    stride_kn,
    stride_kr,
    key_start,
    rows,
    nk,
    causal_offset,
    qk_scale2,
    clamp_value,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    R: tl.constexpr,
    CAUSAL: tl.constexpr,
    CLAMP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Logits in the log2 domain of one (query tile, key tile); invisible entries are -inf."""
    cols = key_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_R)
    k = tl.load(
        ks_base + cols[:, None] * stride_kn + dims[None, :] * stride_kr,
        mask=(cols[:, None] < nk) & (dims[None, :] < R),
        other=0.0,
    )
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if CLAMP:
        # Parity-exact arithmetic clamps the natural-log-domain logits before the softmax.
        s = (
            tl.minimum(tl.maximum(s * (qk_scale2 / 1.4426950408889634), -clamp_value), clamp_value)
            * 1.4426950408889634
        )
    else:
        s = s * qk_scale2
    visible = cols[None, :] < nk
    if CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _row_stats_kernel(
    qs_ptr,
    ks_ptr,
    max_ptr,
    inv_sum_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qr,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kr,
    num_q_heads,
    group,
    nq,
    nk,
    causal_offset,
    qk_scale2,
    clamp_value,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    R: tl.constexpr,
    CAUSAL: tl.constexpr,
    CLAMP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_q_heads
    h = pid_bh % num_q_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_R)
    q = tl.load(
        qs_ptr
        + b * stride_qb
        + h * stride_qh
        + rows[:, None] * stride_qn
        + dims[None, :] * stride_qr,
        mask=(rows[:, None] < nq) & (dims[None, :] < R),
        other=0.0,
    )
    ks_base = ks_ptr + b * stride_kb + (h // group) * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    key_end = nk
    if CAUSAL:
        key_end = tl.minimum(nk, pid_m * BLOCK_M + BLOCK_M + causal_offset)
    for key_start in range(0, key_end, BLOCK_N):
        s = _logits_tile(
            q,
            ks_base,
            stride_kn,
            stride_kr,
            key_start,
            rows,
            nk,
            causal_offset,
            qk_scale2,
            clamp_value,
            BLOCK_N,
            BLOCK_R,
            R,
            CAUSAL,
            CLAMP,
            PRECISION,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows past nq (or, non-causal, none) can be fully masked: keep exp2 away from NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_shift) + tl.sum(tl.exp2(s - m_shift[:, None]), 1)
        m_i = m_new
    # Kept apart (not folded into m + log2(l)): s - m is exact near the row max, where the
    # large probabilities are, while s - (m + log2 l) would carry m's rounding into every entry.
    tl.store(max_ptr + pid_bh * nq + rows, m_i, mask=rows < nq)
    tl.store(inv_sum_ptr + pid_bh * nq + rows, 1.0 / l_i, mask=rows < nq)


@triton.jit
def _accumulate_kernel(
    qs_ptr,
    ks_ptr,
    max_ptr,
    inv_sum_ptr,
    a_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qr,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kr,
    stride_ab,
    stride_ag,
    stride_an,
    num_q_heads,
    num_groups,
    heads_per_group,
    group,
    nq,
    nk,
    causal_offset,
    qk_scale2,
    clamp_value,
    inv_heads,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    R: tl.constexpr,
    CAUSAL: tl.constexpr,
    CLAMP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b = pid_bg // num_groups
    g = pid_bg % num_groups
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    future = False
    if CAUSAL:
        future = pid_n * BLOCK_N > pid_m * BLOCK_M + BLOCK_M - 1 + causal_offset
    if not future:
        row_ok = rows < nq
        for t in range(0, heads_per_group):
            h = g * heads_per_group + t
            q = tl.load(
                qs_ptr
                + b * stride_qb
                + h * stride_qh
                + rows[:, None] * stride_qn
                + dims[None, :] * stride_qr,
                mask=row_ok[:, None] & (dims[None, :] < R),
                other=0.0,
            )
            stat = (b * num_q_heads + h) * nq + rows
            m_row = tl.load(max_ptr + stat, mask=row_ok, other=0.0)
            inv_l = tl.load(inv_sum_ptr + stat, mask=row_ok, other=0.0)
            s = _logits_tile(
                q,
                ks_ptr + b * stride_kb + (h // group) * stride_kh,
                stride_kn,
                stride_kr,
                pid_n * BLOCK_N,
                rows,
                nk,
                causal_offset,
                qk_scale2,
                clamp_value,
                BLOCK_N,
                BLOCK_R,
                R,
                CAUSAL,
                CLAMP,
                PRECISION,
            )
            acc += tl.exp2(s - m_row[:, None]) * inv_l[:, None]
        acc = acc * inv_heads
    out = a_ptr + b * stride_ab + g * stride_ag + rows[:, None] * stride_an + cols[None, :]
    tl.store(out, acc, mask=(rows[:, None] < nq) & (cols[None, :] < nk))


def _num_groups(granularity: str, num_q_heads: int, num_kv_heads: int) -> int:
    return {"layer": 1, "kv_group": num_kv_heads, "head": num_q_heads}[granularity]


def transition_triton(
    qs: torch.Tensor,
    ks: torch.Tensor,
    scale: float,
    causal: bool,
    granularity: str,
    clamp: float | None = None,
    precision: str = "tf32x3",
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
) -> torch.Tensor:
    """Row-normalised head sum of block softmaxes, A (B, G, nq, nk), without per-head logits.

    Args:
        qs: (B, Hq, nq, r) float32 sketched pooled queries.
        ks: (B, Hkv, nk, r) float32 sketched pooled keys; query head h uses KV head
            h // (Hq // Hkv).
        scale: logits are ``scale * qs . ks``.
        causal: mask key blocks j > i + (nk - nq) before the softmax.
        granularity: ``layer`` (G = 1), ``kv_group`` (G = Hkv) or ``head`` (G = Hq).
        clamp: clamp the logits to [-clamp, clamp] before the softmax (parity-exact mode).
        precision: ``tl.dot`` input precision for the float32 dots: ``tf32x3`` (default,
            float32-level), ``ieee`` (exact float32, slower) or ``tf32``.
        block_m, block_n, num_warps: tile sizes (powers of two >= 16) and warps per program.

    Returns:
        (B, G, nq, nk) float32; every row sums to 1 (up to rounding) and is exactly 0 on masked
        future blocks. Apply `sketchwalk.selection.walk.sharpen` afterwards as the PyTorch path
        does (`fused_transition` does both).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if qs.dim() != 4 or ks.dim() != 4:
        raise ValueError(
            f"qs must be (B, Hq, nq, r) and ks (B, Hkv, nk, r), got "
            f"{tuple(qs.shape)} and {tuple(ks.shape)}"
        )
    b, hq, nq, r = qs.shape
    hkv, nk = ks.shape[1], ks.shape[2]
    if ks.shape[0] != b or ks.shape[3] != r or hq % hkv:
        raise ValueError(
            f"ks must be (B={b}, Hkv dividing Hq={hq}, nk, r={r}), got {tuple(ks.shape)}"
        )
    if qs.dtype != torch.float32 or ks.dtype != torch.float32:
        raise ValueError(f"qs and ks must be float32, got {qs.dtype} and {ks.dtype}")
    if causal and nk < nq:
        raise ValueError(f"causal transition needs nk >= nq, got nq={nq}, nk={nk}")
    qs, ks = qs.contiguous(), ks.contiguous()
    groups = _num_groups(granularity, hq, hkv)
    heads_per_group = hq // groups
    a = torch.empty(b, groups, nq, nk, device=qs.device, dtype=torch.float32)
    if a.numel() == 0:
        return a
    row_max = torch.empty(b, hq, nq, device=qs.device, dtype=torch.float32)
    inv_sum = torch.empty_like(row_max)
    block_r = max(16, triton.next_power_of_2(r))
    common = dict(
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=block_r,
        R=r,
        CAUSAL=bool(causal),
        CLAMP=clamp is not None,
        PRECISION=precision,
        num_warps=num_warps,
    )
    qk_scale2 = float(scale) * LOG2E
    clamp_value = float(clamp) if clamp is not None else 0.0
    offset = nk - nq
    m_tiles = triton.cdiv(nq, block_m)
    _row_stats_kernel[(m_tiles, b * hq)](
        qs,
        ks,
        row_max,
        inv_sum,
        *qs.stride(),
        *ks.stride(),
        hq,
        hq // hkv,
        nq,
        nk,
        offset,
        qk_scale2,
        clamp_value,
        **common,
    )
    _accumulate_kernel[(triton.cdiv(nk, block_n), m_tiles, b * groups)](
        qs,
        ks,
        row_max,
        inv_sum,
        a,
        *qs.stride(),
        *ks.stride(),
        a.stride(0),
        a.stride(1),
        a.stride(2),
        hq,
        groups,
        heads_per_group,
        hq // hkv,
        nq,
        nk,
        offset,
        qk_scale2,
        clamp_value,
        1.0 / heads_per_group,
        **common,
    )
    return a


def fused_transition(
    q_blocks: torch.Tensor,
    k_blocks: torch.Tensor,
    config: SketchWalkConfig,
    layer_idx: int,
    projection: torch.Tensor | None = None,
    **kernel_options: Any,
) -> torch.Tensor:
    """`sketchwalk.selection.walk.transition_from_pooled` through the fused kernel: sketch,
    block softmax and head sum (`transition_triton`), then sharpening.

    Args:
        q_blocks: (B, Hq, nq, D) pooled queries; k_blocks: (B, Hkv, nk, D) pooled keys.
        config: the selection settings (granularity ``layer`` or ``kv_group`` to gain anything).
        layer_idx: the layer, for its sketch matrix.
        projection: overrides the layer's sketch matrix (a CUDA-graph input).
        kernel_options: ``precision``, ``block_m``, ``block_n``, ``num_warps`` of
            `transition_triton` (benchmark sweeps); none given: its defaults.

    Returns:
        (B, G, nq, nk) float32, the sharpened transition matrix A_l.
    """
    if config.head_aggregation != "sum":
        raise ValueError(
            "fused_transition sums the heads of a mask group; head_aggregation "
            f"{config.head_aggregation!r} runs on the reference backend"
        )
    qs, ks, scale = sketched_blocks(q_blocks, k_blocks, config, layer_idx, projection=projection)
    a = transition_triton(
        qs,
        ks,
        scale,
        config.causal_sketch and not config.parity,
        config.granularity,
        clamp=10.0 if (config.parity and config.exact) else None,
        **kernel_options,
    )
    return sharpen(a, config.sparsity_exponent, config.parity)


def transition_flops(qs: torch.Tensor, ks: torch.Tensor, causal: bool) -> float:
    """Multiply-adds x 2 of the two passes (each computes every visible head logit once)."""
    b, hq, nq, r = qs.shape
    nk = ks.shape[2]
    pairs = nq * nk - (nq * (nq - 1) / 2 if causal else 0)
    return 2 * 2.0 * b * hq * pairs * r


__all__ = ["GRANULARITIES", "fused_transition", "transition_flops", "transition_triton"]
