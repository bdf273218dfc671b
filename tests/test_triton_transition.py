"""Fused Triton transition matrix against `sketchwalk.selection.walk.transition_from_pooled`.

Tolerance rule (docs/STYLE.md): |kernel - float64 reference| <= 2 * |float32 PyTorch same-math
(`transition_from_pooled`) - float64 reference| + the reference's rounding to float32, plus, for
the default ``tf32x3`` dots only, an allowance of 2^-17 * max|A| (three TF32 products keep about
21 of float32's 24 mantissa bits; ``ieee`` dots get no allowance).

Without CUDA the kernels run under the CPU interpreter (``TRITON_INTERPRET=1``, set at
collection before triton is imported) at tiny shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from sketchwalk.config import SketchWalkConfig  # noqa: E402
from sketchwalk.selection.sketch import sketched_blocks  # noqa: E402
from sketchwalk.selection.walk import transition_from_pooled  # noqa: E402

triton = pytest.importorskip("triton")


def pooled_blocks(b, hq, hkv, n, d, seed, device):
    """Seeded pooled blocks with a shared drift (nearby blocks score higher, as in real data)."""
    gen = torch.Generator().manual_seed(seed)
    qb = torch.randn(b, hq, n, d, generator=gen)
    kb = torch.randn(b, hkv, n, d, generator=gen)
    drift = torch.sin(torch.linspace(0, 9.0, n))[None, None, :, None] * torch.randn(
        1, hkv, 1, d, generator=gen
    )
    kb = 3.0 * (kb + 2.0 * drift)
    qb = 3.0 * (qb + 2.0 * drift.repeat_interleave(hq // hkv, 1))
    return qb.to(device), kb.to(device)


def reference64(qs, ks, scale, causal, granularity, clamp=None):
    """The transition in float64 from the same float32 sketched inputs."""
    hq, hkv, nq, nk = qs.shape[1], ks.shape[1], qs.shape[2], ks.shape[2]
    logits = qs.double() @ ks.double().repeat_interleave(hq // hkv, 1).transpose(-1, -2) * scale
    if clamp is not None:
        logits = logits.clamp(-clamp, clamp)
    if causal:
        future = torch.ones(nq, nk, dtype=torch.bool, device=qs.device).triu(nk - nq + 1)
        logits = logits.masked_fill(future, float("-inf"))
    probs = torch.softmax(logits, -1)
    groups = {"layer": 1, "kv_group": hkv, "head": hq}[granularity]
    a = probs.view(probs.shape[0], groups, hq // groups, nq, nk).sum(2)
    return a / a.sum(-1, keepdim=True)


def check(case, device, precision="tf32x3", seed=0):
    from sketchwalk.selection.triton_transition import transition_triton

    b, hq, hkv, n, d, granularity, causal, exact, parity = case
    cfg = SketchWalkConfig(
        granularity=granularity, causal_sketch=causal, exact=exact, parity=parity, sketch_dim=64
    )
    qb, kb = pooled_blocks(b, hq, hkv, n, d, seed, device)
    qs, ks, scale = sketched_blocks(qb, kb, cfg, 3)
    use_causal = cfg.causal_sketch and not cfg.parity
    clamp = 10.0 if (cfg.parity and cfg.exact) else None
    out = transition_triton(
        qs, ks, scale, use_causal, granularity, clamp=clamp, precision=precision
    )
    torch_path = transition_from_pooled(qb, kb, cfg, 3).double()
    ref = reference64(qs, ks, scale, use_causal, granularity, clamp)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all(), "non-finite transition entries"
    err = (out.double() - ref).abs()
    same_math = (torch_path - ref).abs().max().item()
    rounding = (ref.float().double() - ref).abs().max().item()
    allowance = 2.0**-17 * ref.abs().max().item() if precision == "tf32x3" else 0.0
    bound = 2 * same_math + rounding + allowance
    rows = (out.double().sum(-1) - 1).abs().max().item()
    print(
        f"{case} {precision}: kernel max {err.max().item():.3e} mean {err.mean().item():.3e}; "
        f"torch same-math max {same_math:.3e}; rounding {rounding:.3e}; bound {bound:.3e}; "
        f"row-sum error {rows:.2e}"
    )
    assert err.max().item() <= bound, f"max error {err.max().item():.3e} > bound {bound:.3e}"
    if use_causal:
        future = torch.ones(n, n, dtype=torch.bool, device=device).triu(1)
        assert (out[..., future] == 0).all(), "mass on future blocks"


# (B, Hq, Hkv, n blocks, head_dim, granularity, causal_sketch, exact, parity)
SMALL_CASES = [
    (1, 4, 2, 40, 32, "layer", True, False, False),  # sketch r = 32, n not a tile multiple
    (2, 6, 2, 23, 48, "kv_group", True, True, False),  # exact, r = 48 padded to 64, batch 2
    (1, 2, 1, 17, 16, "head", False, False, False),  # non-causal, per head
    (1, 4, 4, 30, 32, "layer", True, True, True),  # parity exact: clamp, non-causal
]


@pytest.mark.parametrize(
    "case",
    SMALL_CASES,
    ids=lambda c: (
        f"{c[1]}/{c[2]}x{c[3]}-{c[5]}"
        f"{'-causal' if c[6] else ''}{'-exact' if c[7] else ''}"
        f"{'-parity' if c[8] else ''}"
    ),
)
def test_transition_triton_small(case):
    """Compiled on CUDA, the CPU interpreter otherwise (CI)."""
    check(case, "cuda" if CUDA else "cpu")


def test_transition_triton_rejects_bad_inputs():
    from sketchwalk.selection.triton_transition import transition_triton

    qs = torch.zeros(1, 4, 8, 16)
    with pytest.raises(ValueError, match="granularity"):
        transition_triton(qs, torch.zeros(1, 2, 8, 16), 1.0, True, "block")
    with pytest.raises(ValueError, match="float32"):
        transition_triton(qs.double(), torch.zeros(1, 2, 8, 16).double(), 1.0, True, "layer")
    with pytest.raises(ValueError, match="ks must be"):
        transition_triton(qs, torch.zeros(1, 3, 8, 16), 1.0, True, "layer")


GPU_CASES = [
    (1, 32, 8, 512, 128, "layer", True, False, False),  # Llama-3.1-8B at 32K tokens
    (2, 32, 8, 300, 128, "kv_group", True, False, False),
    (1, 9, 3, 1031, 64, "kv_group", True, False, False),  # SmolLM2, 66K tokens
    (1, 9, 3, 257, 64, "head", True, True, False),
    (1, 32, 8, 200, 128, "layer", False, True, True),  # parity exact
]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32x3", "ieee"])
@pytest.mark.parametrize(
    "case",
    GPU_CASES,
    ids=lambda c: (
        f"{c[0]}x{c[1]}/{c[2]}x{c[3]}-{c[5]}{'-exact' if c[7] else ''}{'-parity' if c[8] else ''}"
    ),
)
def test_transition_triton_gpu(case, precision):
    check(case, "cuda", precision, seed=5)
