"""Block-sparse prefill kernels (Triton, FlexAttention) against the reference, under the
tolerance rule of `sketchwalk.testing.assert_within_rule` (fp32 reference, bf16/fp16 PyTorch
same-math). Without CUDA the Triton kernel runs under the CPU interpreter (tests/conftest.py).
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from sketchwalk.attention.api import resolve_backend, sparse_attention
from sketchwalk.blocks import BlockSelection
from sketchwalk.testing import (
    assert_within_rule,
    make_qkv,
    mask_groups,
    masked_attention_low_precision,
    random_selection,
)

CUDA = torch.cuda.is_available()
triton = pytest.importorskip("triton")


def check_prefill(out, q, k, v, selection: BlockSelection, scale=None, label="") -> None:
    """A prefill kernel's output against the fp32 reference under the tolerance rule."""
    assert out.shape == q.shape and out.dtype == q.dtype
    t = q.shape[2]
    pos = torch.arange(t, device=q.device)
    blocks = pos // selection.block_size
    allowed = selection.head_mask(q.shape[1], k.shape[1])[:, :, blocks][..., blocks]
    allowed = allowed & (pos[None, :] <= pos[:, None])
    reference = sparse_attention(q.float(), k.float(), v.float(), selection, scale=scale)
    same_math = masked_attention_low_precision(q, k, v, allowed, scale)
    assert_within_rule(out, reference, same_math, label)


class PrefillCase(NamedTuple):
    batch: int
    q_heads: int
    kv_heads: int
    seq_len: int
    head_dim: int
    block_size: int
    granularity: str
    dtype: torch.dtype
    density: float
    keep_diagonal: bool = True
    note: str = ""

    @property
    def id(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        diagonal = "" if self.keep_diagonal else "-nodiag"
        return (
            f"B{self.batch}-H{self.q_heads}/{self.kv_heads}-T{self.seq_len}-D{self.head_dim}"
            f"-bs{self.block_size}-{self.granularity}-{dtype}-d{self.density}{diagonal}"
        )


SMALL_CASES = [
    PrefillCase(2, 6, 2, 150, 64, 32, "kv_group", torch.bfloat16, 0.4, note="tail, group 3"),
    PrefillCase(1, 9, 3, 200, 64, 64, "layer", torch.bfloat16, 0.3, note="SmolLM2 heads"),
    PrefillCase(1, 8, 1, 130, 128, 64, "head", torch.float16, 0.5, note="group 8, head masks"),
    PrefillCase(2, 4, 4, 40, 32, 64, "layer", torch.bfloat16, 0.5, note="T < block, MHA"),
    PrefillCase(1, 4, 2, 192, 64, 64, "kv_group", torch.bfloat16, 0.0, note="diagonal only"),
    PrefillCase(1, 8, 2, 100, 64, 16, "kv_group", torch.float16, 0.3, False, "empty rows"),
]


def _run_case(case: PrefillCase, backend: str, device: str, seed: int = 0) -> None:
    q, k, v = make_qkv(
        case.batch,
        case.q_heads,
        case.kv_heads,
        case.seq_len,
        case.head_dim,
        dtype=case.dtype,
        device=device,
        seed=seed,
    )
    sel = random_selection(
        case.batch,
        mask_groups(case.granularity, case.q_heads, case.kv_heads),
        case.seq_len,
        case.block_size,
        case.density,
        seed=seed + 1,
        device=device,
        keep_diagonal=case.keep_diagonal,
    )
    assert resolve_backend(backend, q) == backend
    kernel = _prefill_kernel(backend)
    out = kernel(q, k, v, sel.kv_num_blocks, sel.kv_indices, sel.block_size)
    check_prefill(out, q, k, v, sel, label=f"{backend} {case.id} ({case.note})")
    # The dispatch runs that kernel: the same bits, not the reference it is checked against.
    assert torch.equal(sparse_attention(q, k, v, sel, backend=backend), out)


def _prefill_kernel(backend: str):
    """The kernel function behind a prefill backend, imported directly."""
    if backend == "triton":
        from sketchwalk.attention.triton_prefill import sparse_prefill

        return sparse_prefill
    from sketchwalk.attention.flex import flex_sparse_attention

    assert backend == "flex"
    return flex_sparse_attention


@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.id)
def test_triton_prefill_small(case):
    """Small shapes: compiled on CUDA, the CPU interpreter otherwise (CI)."""
    _run_case(case, "triton", "cuda" if CUDA else "cpu")


def test_triton_prefill_poisoned_output_and_scale():
    """Every output element is written (poisoned buffer), and a custom scale is honoured."""
    from sketchwalk.attention.triton_prefill import sparse_prefill

    device = "cuda" if CUDA else "cpu"
    q, k, v = make_qkv(1, 4, 2, 96, 32, dtype=torch.bfloat16, device=device, seed=3)
    sel = random_selection(1, 2, 96, 32, 0.5, seed=4, device=device)
    out = torch.full_like(q, float("nan"))
    sparse_prefill(q, k, v, sel.kv_num_blocks, sel.kv_indices, sel.block_size, 0.3, out=out)
    check_prefill(out, q, k, v, sel, scale=0.3, label="poisoned, scale 0.3")


def test_resolve_backend_errors_and_auto():
    device = "cuda" if CUDA else "cpu"
    q = torch.randn(1, 2, 8, 64, device=device)
    with pytest.raises(RuntimeError, match="bfloat16/float16"):
        resolve_backend("triton", q)
    with pytest.raises(RuntimeError, match="head_dim"):
        resolve_backend("triton", torch.randn(1, 2, 8, 48, device=device).bfloat16())
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda-magic", q)
    with pytest.raises(RuntimeError, match="no decode kernel"):
        resolve_backend("flex", q.bfloat16(), mode="decode")
    if not CUDA:
        with pytest.raises(RuntimeError, match="CUDA"):
            resolve_backend("flex", q.bfloat16())
        # the interpreter is a test tool: "auto" never picks it, for prefill or decode
        assert resolve_backend("auto", q.bfloat16()) == "reference"
        assert resolve_backend("auto", q.bfloat16(), mode="decode") == "reference"
    else:
        assert resolve_backend("auto", q.bfloat16()) == "triton"
        assert resolve_backend("auto", q.bfloat16(), mode="decode") == "triton"
        with pytest.raises(RuntimeError, match="CUDA"):
            resolve_backend("flex", q.cpu().bfloat16())


# Larger GPU shapes: Llama-3.1-8B and SmolLM2 attention shapes at a few thousand tokens.
GPU_CASES = [
    PrefillCase(2, 32, 8, 1000, 128, 64, "kv_group", torch.bfloat16, 0.2, note="Llama, batch 2"),
    PrefillCase(1, 32, 8, 2048, 128, 64, "layer", torch.bfloat16, 0.2, note="Llama"),
    PrefillCase(1, 9, 3, 2050, 64, 64, "layer", torch.bfloat16, 0.3, note="SmolLM2"),
    PrefillCase(3, 9, 3, 777, 64, 64, "head", torch.float16, 0.3, note="SmolLM2, batch 3"),
    PrefillCase(1, 8, 2, 1500, 128, 128, "kv_group", torch.bfloat16, 0.3, note="block 128"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flex"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_prefill_gpu(case, backend):
    _run_case(case, backend, "cuda", seed=11)


@pytest.mark.gpu
@pytest.mark.parametrize("case", SMALL_CASES[:5], ids=lambda c: c.id)
def test_flex_small_gpu(case):
    _run_case(case, "flex", "cuda", seed=7)


@pytest.mark.gpu
def test_sparse_attention_dispatch_gpu():
    q, k, v = make_qkv(1, 8, 2, 640, 128, dtype=torch.bfloat16, device="cuda", seed=9)
    sel = random_selection(1, 2, 640, 64, 0.3, seed=10, device="cuda")
    assert resolve_backend("auto", q) == "triton"
    for backend in ("triton", "flex", "auto"):
        out = sparse_attention(q, k, v, sel, backend=backend)
        check_prefill(out, q, k, v, sel, label=f"sparse_attention({backend})")
        kernel = _prefill_kernel(resolve_backend(backend, q))
        assert torch.equal(out, kernel(q, k, v, sel.kv_num_blocks, sel.kv_indices, 64))


@pytest.mark.gpu
def test_flex_never_falls_back_to_eager(monkeypatch):
    """Past dynamo's recompile limit torch.compile runs flex_attention eagerly, and eager flex
    ignores the block indices (dense causal attention: the old per-KV-group failures, max
    error 3-4). The backend must raise instead: with a limit of 1 specialisation, two new
    shapes in a row are either right or a RuntimeError, and the second one cannot compile."""
    from sketchwalk.attention import flex

    monkeypatch.setattr(flex, "FLEX_RECOMPILE_LIMIT", 1)
    raised = 0
    for t in (320, 448):  # lengths no other test compiles
        q, k, v = make_qkv(1, 4, 2, t, 64, dtype=torch.bfloat16, device="cuda", seed=t)
        sel = random_selection(1, 2, t, 64, 0.0, seed=t + 1, device="cuda")
        try:
            out = sparse_attention(q, k, v, sel, backend="flex")
        except RuntimeError as err:
            assert "recompile limit" in str(err)
            raised += 1
            continue
        check_prefill(out, q, k, v, sel, label=f"flex T={t}, recompile limit 1")
    assert raised >= 1


@pytest.mark.gpu
def test_prefill_tma_matches_pointer_loads_gpu():
    """The D-128 default (TMA descriptor loads + warp specialisation) computes the same bits as
    plain pointer loads (`PrefillTuning(tma=False, warp_spec=False)`) and as the pointer path
    that non-contiguous K/V take: same blocks, same math, three different loads."""
    from sketchwalk.attention.triton_prefill import PrefillTuning, _use_tma, sparse_prefill

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA descriptor loads need compute capability 9.0 (Hopper) or newer")
    q, k, v = make_qkv(2, 32, 8, 1000, 128, dtype=torch.bfloat16, device="cuda", seed=13)
    sel = random_selection(2, 8, 1000, 64, 0.3, seed=14, device="cuda")
    k_strided = k.transpose(1, 2).contiguous().transpose(1, 2)
    v_strided = v.transpose(1, 2).contiguous().transpose(1, 2)
    default_tuning = PrefillTuning()
    assert _use_tma(q, k, v, default_tuning), "the D-128 default should use TMA loads here"
    assert not _use_tma(q, k_strided, v_strided, default_tuning)
    index = (sel.kv_num_blocks, sel.kv_indices, 64)
    default = sparse_prefill(q, k, v, *index)
    others = {
        "pointer loads": sparse_prefill(
            q, k, v, *index, tuning=PrefillTuning(tma=False, warp_spec=False)
        ),
        "non-contiguous K/V": sparse_prefill(q, k_strided, v_strided, *index),
    }
    for name, other in others.items():
        diff = (default.float() - other.float()).abs().max().item()
        print(f"max |TMA default - {name}| {diff:.3e}")
        assert diff == 0.0, name
    check_prefill(default, q, k, v, sel, label="TMA default")


def test_key_tile_override():
    """The sweep hook for the key tile (benchmarks/key_tile.py): a smaller tile computes the same
    attention within the rule; a tile that does not divide the block raises."""
    from sketchwalk.attention.triton_prefill import PrefillTuning, sparse_prefill

    device = "cuda" if CUDA else "cpu"
    q, k, v = make_qkv(1, 4, 2, 150, 64, dtype=torch.bfloat16, device=device, seed=21)
    sel = random_selection(1, 2, 150, 64, 0.4, seed=22, device=device)
    args = (q, k, v, sel.kv_num_blocks, sel.kv_indices, 64)
    out = sparse_prefill(*args, tuning=PrefillTuning(key_tile=32))
    check_prefill(out, q, k, v, sel, label="key tile 32")
    with pytest.raises(RuntimeError, match="does not divide"):
        sparse_prefill(*args, tuning=PrefillTuning(key_tile=48))
    with pytest.raises(ValueError, match="key_tile"):
        PrefillTuning(key_tile=-16)


CHUNK_CASES = [
    # (batch, q heads, kv heads, keys S, queries T, head_dim, block, granularity, density)
    (2, 6, 2, 150, 40, 64, 32, "kv_group", 0.4),  # chunk starts mid-block, tail block partial
    (1, 4, 2, 192, 64, 32, 64, "layer", 0.5),  # chunk = the last block exactly
    (1, 8, 1, 130, 97, 64, 16, "head", 0.3),  # many query blocks, head masks
    (2, 4, 4, 100, 1, 32, 16, "layer", 0.5),  # one query
]


@pytest.mark.parametrize("case", CHUNK_CASES, ids=lambda c: f"S{c[3]}-T{c[4]}-bs{c[6]}-{c[7]}")
def test_triton_prefill_query_chunk(case):
    """A query chunk (T queries at the end of S keys, chunked prefill): the kernel with the
    query offset against the fp32 reference under the tolerance rule, and bit-identical to the
    last T rows of the full prefill with the same selection rows."""
    from sketchwalk.attention.triton_prefill import sparse_prefill

    b, hq, hkv, s, t, d, bs, granularity, density = case
    device = "cuda" if CUDA else "cpu"
    q, k, v = make_qkv(b, hq, hkv, s, d, dtype=torch.bfloat16, device=device, seed=s + t)
    full = random_selection(
        b, mask_groups(granularity, hq, hkv), s, bs, density, seed=t, device=device
    )
    nk = full.block_mask.shape[-1]
    nq = nk - (s - t) // bs
    chunk = BlockSelection(
        full.block_mask[:, :, -nq:],
        bs,
        s,
        full.kv_num_blocks[:, :, -nq:],
        full.kv_indices[:, :, -nq:],
        None,
    )
    qc = q[:, :, s - t :]
    out = sparse_prefill(qc, k, v, chunk.kv_num_blocks, chunk.kv_indices, bs)
    assert out.shape == qc.shape
    q_pos = torch.arange(s - t, s, device=device)
    k_pos = torch.arange(s, device=device)
    rows = q_pos // bs - (nk - nq)
    allowed = chunk.head_mask(hq, hkv)[:, :, rows][..., k_pos // bs]
    allowed = allowed & (k_pos[None, :] <= q_pos[:, None])
    reference = sparse_attention(qc.float(), k.float(), v.float(), chunk)
    same_math = masked_attention_low_precision(qc, k, v, allowed)
    assert_within_rule(out, reference, same_math, f"chunk {case}")
    whole = sparse_prefill(q, k, v, full.kv_num_blocks, full.kv_indices, bs)
    assert torch.equal(out, whole[:, :, s - t :])
    # the dispatch takes the chunk to the kernel when asked (and "auto" does on CUDA)
    assert torch.equal(sparse_attention(qc, k, v, chunk, backend="triton"), out)
    assert nq < nk
    with pytest.raises(RuntimeError, match="expected ceil"):  # the square selection's rows
        sparse_prefill(qc, k, v, full.kv_num_blocks, full.kv_indices, bs)
