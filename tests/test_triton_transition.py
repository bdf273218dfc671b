"""Fused Triton transition matrix against `sketchwalk.selection.walk.transition_from_pooled`.

Tolerance rule (`sketchwalk.testing.assert_within_rule`): float64 reference, float32 PyTorch
same-math (`transition_from_pooled`), the reference's rounding to float32, plus, for the default
``tf32x3`` dots only, an allowance of 2^-17 * max|A| (three TF32 products keep about 21 of
float32's 24 mantissa bits; ``ieee`` dots get no allowance).

Without CUDA the kernels run under the CPU interpreter (tests/conftest.py) at tiny shapes.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import pytest
import torch

from sketchwalk.config import SketchWalkConfig
from sketchwalk.selection.sketch import sketched_blocks
from sketchwalk.selection.walk import sharpen, transition_from_pooled
from sketchwalk.testing import assert_within_rule, mask_groups

CUDA = torch.cuda.is_available()
triton = pytest.importorskip("triton")


class TransitionCase(NamedTuple):
    batch: int
    q_heads: int
    kv_heads: int
    blocks: int
    head_dim: int
    granularity: str
    causal_sketch: bool
    exact: bool
    parity: bool
    note: str = ""

    @property
    def id(self) -> str:
        flags = [
            name
            for name, on in (
                ("causal", self.causal_sketch),
                ("exact", self.exact),
                ("parity", self.parity),
            )
            if on
        ]
        return "-".join(
            [
                f"B{self.batch}-H{self.q_heads}/{self.kv_heads}-n{self.blocks}-D{self.head_dim}",
                self.granularity,
                *flags,
            ]
        )

    def config(self) -> SketchWalkConfig:
        return SketchWalkConfig(
            granularity=self.granularity,
            causal_sketch=self.causal_sketch,
            exact=self.exact,
            parity=self.parity,
            sketch_dim=64,
        )


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
    groups = mask_groups(granularity, hq, hkv)
    a = probs.view(probs.shape[0], groups, hq // groups, nq, nk).sum(2)
    return a / a.sum(-1, keepdim=True)


def _allowance(precision: str, reference: torch.Tensor) -> float:
    """The tf32x3 dots' documented precision loss (module docstring); none for ``ieee``."""
    return 2.0**-17 * reference.abs().max().item() if precision == "tf32x3" else 0.0


def check(case: TransitionCase, device, precision="tf32x3", seed=0):
    from sketchwalk.selection.triton_transition import transition_triton

    cfg = case.config()
    qb, kb = pooled_blocks(
        case.batch, case.q_heads, case.kv_heads, case.blocks, case.head_dim, seed, device
    )
    qs, ks, scale = sketched_blocks(qb, kb, cfg, 3)
    use_causal = cfg.causal_sketch and not cfg.parity
    clamp = 10.0 if (cfg.parity and cfg.exact) else None
    out = transition_triton(
        qs, ks, scale, use_causal, case.granularity, clamp=clamp, precision=precision
    )
    torch_path = transition_from_pooled(qb, kb, cfg, 3)
    ref = reference64(qs, ks, scale, use_causal, case.granularity, clamp)
    assert out.dtype == torch.float32
    rows = (out.double().sum(-1) - 1).abs().max().item()
    print(f"{case.id} {precision}: row-sum error {rows:.2e}")
    assert_within_rule(
        out, ref, torch_path, f"{case.id} {precision}", allowance=_allowance(precision, ref)
    )
    if use_causal:
        future = torch.ones(case.blocks, case.blocks, dtype=torch.bool, device=device).triu(1)
        assert (out[..., future] == 0).all(), "mass on future blocks"


SMALL_CASES = [
    TransitionCase(1, 4, 2, 40, 32, "layer", True, False, False, "r 32, n not a tile multiple"),
    TransitionCase(2, 6, 2, 23, 48, "kv_group", True, True, False, "exact, r 48 padded to 64"),
    TransitionCase(1, 2, 1, 17, 16, "head", False, False, False, "non-causal, per head"),
    TransitionCase(1, 4, 4, 30, 32, "layer", True, True, True, "parity exact: clamp, non-causal"),
]


@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.id)
def test_transition_triton_small(case):
    """Compiled on CUDA, the CPU interpreter otherwise (CI)."""
    check(case, "cuda" if CUDA else "cpu")


@pytest.mark.parametrize("precision, exponent", [("tf32x3", 1.0), ("ieee", 1.0), ("ieee", 2.0)])
@pytest.mark.parametrize("case", SMALL_CASES[:2], ids=lambda c: c.id)
def test_fused_transition_matches_the_reference(case, precision, exponent):
    """`fused_transition` (SketchWalk's Triton path, benchmarks/transition.py's sweep): sketch,
    kernel and sharpening within the rule of `transition_from_pooled` against the float64
    reference; the sweep's kernel options (tiles, precision) reach the kernel."""
    from sketchwalk.selection.triton_transition import fused_transition

    device = "cuda" if CUDA else "cpu"
    cfg = dataclasses.replace(case.config(), sparsity_exponent=exponent)
    qb, kb = pooled_blocks(
        case.batch, case.q_heads, case.kv_heads, case.blocks, case.head_dim, 1, device
    )
    qs, ks, scale = sketched_blocks(qb, kb, cfg, 3)
    use_causal = cfg.causal_sketch and not cfg.parity
    clamp = 10.0 if (cfg.parity and cfg.exact) else None
    a = reference64(qs, ks, scale, use_causal, case.granularity, clamp)
    ref = sharpen(a, exponent, cfg.parity)
    out = fused_transition(qb, kb, cfg, 3, precision=precision, block_m=32, block_n=16)
    assert out.dtype == torch.float32
    assert_within_rule(
        out,
        ref,
        transition_from_pooled(qb, kb, cfg, 3),
        f"fused {case.id} {precision} exponent {exponent}",
        allowance=_allowance(precision, ref),
    )
    with pytest.raises(TypeError, match="unexpected keyword"):
        fused_transition(qb, kb, cfg, 3, tiles=64)


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
    TransitionCase(1, 32, 8, 512, 128, "layer", True, False, False, "Llama-3.1-8B at 32K"),
    TransitionCase(2, 32, 8, 300, 128, "kv_group", True, False, False, "Llama, batch 2"),
    TransitionCase(1, 9, 3, 1031, 64, "kv_group", True, False, False, "SmolLM2 at 66K"),
    TransitionCase(1, 9, 3, 257, 64, "head", True, True, False, "SmolLM2, exact"),
    TransitionCase(1, 32, 8, 200, 128, "layer", False, True, True, "parity exact"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32x3", "ieee"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_transition_triton_gpu(case, precision):
    check(case, "cuda", precision, seed=5)


def test_fused_transition_refuses_max_head_aggregation():
    from sketchwalk.selection.triton_transition import fused_transition

    cfg = SketchWalkConfig(granularity="kv_group", head_aggregation="max")
    qb, kb = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match="reference backend"):
        fused_transition(qb, kb, cfg, 0)
