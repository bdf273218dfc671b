"""Decode attention over selected KV blocks: reference semantics and the Triton split-K kernel.

Tolerance rule (docs/STYLE.md): |kernel - fp32 reference| <= 2 * |low-precision PyTorch
same-math - fp32 reference| + the reference's own rounding. Without CUDA the Triton kernel runs
under the CPU interpreter (``TRITON_INTERPRET=1`` set here before any kernel import).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from sketchwalk.attention.api import sparse_decode  # noqa: E402
from sketchwalk.attention.reference import dense_attention  # noqa: E402


def make_decode_inputs(
    batch,
    hq,
    hkv,
    num_queries,
    cache_len,
    head_dim,
    block_size,
    groups,
    density,
    dtype,
    device,
    seed=0,
):
    """Seeded q (B, Hq, Tq, D), caches (B, Hkv, S, D) and a sorted random block selection
    (B, G) / (B, G, nk) that always keeps the first and the last (current) block."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, num_queries, head_dim, generator=gen)
    k = torch.randn(batch, hkv, cache_len, head_dim, generator=gen)
    v = torch.randn(batch, hkv, cache_len, head_dim, generator=gen)
    k[:, :, :8] += 2.0 * q.mean((1, 2))[:, None, None]  # a sink worth attending to
    nk = -(-cache_len // block_size)
    keep = torch.rand(batch, groups, nk, generator=gen) < density
    keep[..., 0] = True
    keep[..., -1] = True
    num = keep.sum(-1).to(torch.int32)
    order = torch.arange(nk)
    idx = torch.sort(torch.where(keep, order, nk + order), -1).values
    idx = torch.where(order < num[..., None], idx, torch.zeros_like(idx)).to(torch.int32)
    to = dict(device=device)
    return (
        q.to(dtype=dtype, **to),
        k.to(dtype=dtype, **to),
        v.to(dtype=dtype, **to),
        num.to(**to),
        idx.to(**to),
    )


def token_mask(num, idx, hq, hkv, num_queries, cache_len, block_size):
    """Bool (B, Hq, Tq, S): kept block and causal w.r.t. the query's position."""
    b, g, nk = idx.shape
    kept = torch.zeros(b, g, nk, dtype=torch.bool, device=idx.device)
    valid = torch.arange(nk, device=idx.device) < num[..., None]
    kept.scatter_(-1, idx.long(), valid)  # padding zeros scatter False into block 0 ...
    kept |= (idx == 0).logical_and(valid).any(-1, keepdim=True) & (
        torch.arange(nk, device=idx.device) == 0
    )  # ... so re-add block 0 where it is kept
    if g == 1:
        kept = kept.expand(b, hq, nk)
    elif g != hq:
        kept = kept.repeat_interleave(hq // hkv, 1)
    keys = torch.arange(cache_len, device=idx.device)
    pos = cache_len - num_queries + torch.arange(num_queries, device=idx.device)
    return kept[:, :, None, keys // block_size] & (keys[None, :] <= pos[:, None])


def same_math_low_precision(q, k, v, mask, scale):
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ kk.transpose(-1, -2)).float() * scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    return probs.to(q.dtype) @ vv


def check_decode(case, backend, device, seed=0, num_splits=None):
    b, hq, hkv, tq, s, d, bs, gran, density, dtype = case
    groups = {"layer": 1, "kv_group": hkv, "head": hq}[gran]
    q, k, v, num, idx = make_decode_inputs(
        b, hq, hkv, tq, s, d, bs, groups, density, dtype, device, seed
    )
    scale = 1.0 / math.sqrt(d)
    out = torch.full_like(q, float("nan"))
    if num_splits is None:
        out.copy_(sparse_decode(q, k, v, num, idx, bs, backend=backend))
    else:
        from sketchwalk.attention.triton_decode import sparse_decode_triton

        out.copy_(sparse_decode_triton(q, k, v, num, idx, bs, num_splits=num_splits))
    assert torch.isfinite(out).all(), "non-finite output (unwritten rows?)"
    ref = sparse_decode(q.float(), k.float(), v.float(), num, idx, bs).double()
    mask = token_mask(num, idx, hq, hkv, tq, s, bs)
    low_err = (same_math_low_precision(q, k, v, mask, scale).double() - ref).abs().max().item()
    rounding = (ref.to(dtype).double() - ref).abs().max().item()
    err = (out.double() - ref).abs()
    bound = 2 * low_err + rounding
    print(
        f"{backend} {case}: max {err.max().item():.3e} mean {err.mean().item():.3e}; "
        f"same-math {low_err:.3e}; rounding {rounding:.3e}; bound {bound:.3e}"
    )
    assert err.max().item() <= bound, f"max error {err.max().item():.3e} > bound {bound:.3e}"


def test_reference_full_selection_matches_dense():
    """With every block kept, decode equals dense attention aligned to the end of the cache."""
    b, hq, hkv, tq, s, d, bs = 2, 6, 2, 3, 150, 32, 32
    q, k, v, _, _ = make_decode_inputs(b, hq, hkv, tq, s, d, bs, 1, 1.0, torch.float64, "cpu")
    nk = -(-s // bs)
    num = torch.full((b, 1), nk, dtype=torch.int32)
    idx = torch.arange(nk, dtype=torch.int32).expand(b, 1, nk).contiguous()
    out = sparse_decode(q, k, v, num, idx, bs)
    torch.testing.assert_close(out, dense_attention(q, k, v, causal=True))
    # BlockSelection-style layout (one query-block row) gives the same answer.
    torch.testing.assert_close(sparse_decode(q, k, v, num[..., None], idx[:, :, None], bs), out)


def test_reference_matches_token_mask():
    case = (2, 8, 2, 2, 300, 32, 32, "kv_group", 0.4, torch.float64)
    b, hq, hkv, tq, s, d, bs, _, density, dtype = case
    q, k, v, num, idx = make_decode_inputs(b, hq, hkv, tq, s, d, bs, hkv, density, dtype, "cpu")
    mask = token_mask(num, idx, hq, hkv, tq, s, bs)
    expected = same_math_low_precision(q, k, v, mask, 1.0 / math.sqrt(d))
    # the helper's softmax runs in fp32
    torch.testing.assert_close(sparse_decode(q, k, v, num, idx, bs), expected, atol=1e-5, rtol=1e-5)


def test_decode_input_errors():
    q = torch.zeros(1, 4, 1, 32)
    k = torch.zeros(1, 2, 64, 32)
    num = torch.ones(1, 2, dtype=torch.int32)
    idx = torch.zeros(1, 2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="query must be"):
        sparse_decode(q[0], k, k, num, idx, 32)
    with pytest.raises(ValueError, match="groups"):
        sparse_decode(
            q,
            k,
            k,
            torch.ones(1, 3, dtype=torch.int32),
            torch.zeros(1, 3, 2, dtype=torch.int32),
            32,
        )
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse_decode(q, k, k, num, idx, 32, backend="nope")
    if not CUDA:
        with pytest.raises(RuntimeError, match="bfloat16/float16"):
            sparse_decode(q, k, k, num, idx, 32, backend="triton")


# (batch, Hq, Hkv, Tq, S, D, block, granularity, density, dtype)
SMALL_CASES = [
    (2, 6, 2, 1, 300, 64, 32, "kv_group", 0.5, torch.bfloat16),
    (1, 9, 3, 3, 500, 64, 64, "layer", 0.4, torch.bfloat16),  # SmolLM2 heads, 3 queries
    (2, 4, 4, 2, 130, 32, 16, "head", 0.5, torch.float16),
    (1, 8, 2, 1, 200, 128, 64, "head", 0.5, torch.bfloat16),
    (1, 32, 8, 1, 256, 128, 64, "layer", 0.3, torch.bfloat16),  # 4 heads per unit
]


@pytest.mark.parametrize(
    "case",
    SMALL_CASES,
    ids=lambda c: f"{c[0]}x{c[1]}/{c[2]}-q{c[3]}-S{c[4]}-d{c[5]}-bs{c[6]}-{c[7]}",
)
def test_triton_decode_small(case):
    """Small shapes: compiled on CUDA, the CPU interpreter otherwise (CI)."""
    check_decode(case, "triton", "cuda" if CUDA else "cpu")


@pytest.mark.parametrize("num_splits", [1, 3, 70])
def test_triton_decode_split_counts(num_splits):
    """The combine merges 1 split, a few, and more than one SPLIT_CHUNK (64) of them, most
    empty (fewer kept blocks than splits)."""
    case = (1, 8, 2, 2, 700, 64, 32, "kv_group", 0.5, torch.bfloat16)
    check_decode(case, "triton", "cuda" if CUDA else "cpu", seed=3, num_splits=num_splits)


GPU_CASES = [
    (1, 32, 8, 1, 20000, 128, 64, "layer", 0.2, torch.bfloat16),
    (8, 32, 8, 1, 9000, 128, 64, "kv_group", 0.2, torch.bfloat16),
    (4, 9, 3, 4, 12345, 64, 64, "head", 0.3, torch.float16),
    (2, 32, 8, 16, 4096, 128, 64, "kv_group", 0.3, torch.bfloat16),  # rows span 2 tiles
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case", GPU_CASES, ids=lambda c: f"{c[0]}x{c[1]}/{c[2]}-q{c[3]}-S{c[4]}-{c[7]}"
)
def test_triton_decode_gpu(case):
    check_decode(case, "triton", "cuda", seed=5)
