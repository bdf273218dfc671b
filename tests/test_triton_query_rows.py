"""The Triton query-row kernel (`sketchwalk.selection.triton_query_rows`) against the PyTorch
reference of `sketchwalk.selection.query_rows`, and the dispatch between them.

Tolerance rule (`sketchwalk.testing.assert_within_rule`): a float64 definition from the same
inputs, the reference path at the inputs' dtype as the same-math program (for bfloat16 inputs it
rounds the logits to bfloat16; the kernel accumulates them in float32), the float64 values'
rounding to float32, plus, for float32 inputs, the allowance of ``tf32x3`` dots on the GPU
(2^-17 x max|score|, as in tests/test_triton_transition.py).

Without CUDA the kernels run under the CPU interpreter (tests/conftest.py) at tiny shapes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch

from sketchwalk import SketchWalk, SketchWalkConfig
from sketchwalk.blocks import num_blocks
from sketchwalk.selection.query_rows import query_row_backend, query_row_scores
from sketchwalk.testing import assert_within_rule, make_qkv, mask_groups

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
triton = pytest.importorskip("triton")


def mass64(q: torch.Tensor, k: torch.Tensor, rows: int, block_size: int) -> torch.Tensor:
    """(B, Hq, rows, nb) float64 per-head scores: every scored query's causal softmax over all
    keys, summed per key block, averaged over the queries of its row present in q."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    nb = num_blocks(s, block_size)
    positions = torch.arange(s - t, s, device=q.device)
    row = positions // block_size - (nb - rows)
    scored = row >= 0
    keys = k.double().repeat_interleave(hq // hkv, 1)
    logits = q.double()[:, :, scored] @ keys.transpose(-1, -2) / math.sqrt(d)
    future = torch.arange(s, device=q.device)[None, :] > positions[scored][:, None]
    probs = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
    probs = torch.nn.functional.pad(probs, (0, nb * block_size - s))
    per_block = probs.view(b, hq, -1, nb, block_size).sum(-1)
    out = torch.zeros(b, hq, rows, nb, dtype=torch.float64, device=q.device)
    out.index_add_(2, row[scored], per_block)
    count = torch.bincount(row[scored], minlength=rows).clamp_min(1)
    return out / count[:, None]


class RowsCase(NamedTuple):
    batch: int
    q_heads: int
    kv_heads: int
    seq: int
    block_size: int
    rows: int
    dtype: torch.dtype
    chunk: int = 0  # queries: the last seq - chunk positions
    split_tiles: int | None = None
    max_query_rows: int = 256
    note: str = ""

    @property
    def id(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        parts = [
            f"B{self.batch}-H{self.q_heads}/{self.kv_heads}-T{self.seq}-bs{self.block_size}",
            f"rows{self.rows}-{dtype}",
        ]
        if self.chunk:
            parts.append(f"chunk{self.chunk}")
        if self.split_tiles:
            parts.append(f"span{self.split_tiles}")
        if self.max_query_rows != 256:
            parts.append(f"m{self.max_query_rows}")
        return "-".join(parts)

    def inputs(self, device, head_dim=16, seed=0):
        q, k, _ = make_qkv(
            self.batch, self.q_heads, self.kv_heads, self.seq, head_dim, self.dtype, device, seed
        )
        return q[:, :, self.chunk :], k


def _allowance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    return 2.0**-17 * reference.abs().max().item() if dtype == torch.float32 else 0.0


def check(case: RowsCase, device, head_dim=16, seed=0, precision="tf32x3") -> torch.Tensor:
    from sketchwalk.selection.query_rows import _query_row_mass_reference
    from sketchwalk.selection.triton_query_rows import query_row_mass_triton

    q, k = case.inputs(device, head_dim, seed)
    out = query_row_mass_triton(
        q,
        k,
        case.rows,
        case.block_size,
        precision=precision,
        split_tiles=case.split_tiles,
        max_query_rows=case.max_query_rows,
    )
    ref = mass64(q, k, case.rows, case.block_size)
    same_math = _query_row_mass_reference(q, k, case.rows, case.block_size, None)
    assert out.dtype == torch.float32
    assert_within_rule(out, ref, same_math, case.id, allowance=_allowance(case.dtype, ref))
    # softmax: each query's masses sum to 1, so each head's row mean does (rows with a query)
    nb = num_blocks(case.seq, case.block_size)
    first = (nb - case.rows) * case.block_size
    present = torch.tensor(
        [
            max(first + r * case.block_size, case.chunk)
            < min(first + (r + 1) * case.block_size, case.seq)
            for r in range(case.rows)
        ],
        device=device,
    )
    sums = out.double().sum(-1)
    err = (sums - present.double()).abs().max().item()
    print(f"{case.id}: row-sum error {err:.2e}")
    assert err < 1e-5, f"row sums off by {err:.2e}"
    future = torch.ones(case.rows, nb, dtype=torch.bool, device=device).triu(nb - case.rows + 1)
    assert (out[..., future] == 0).all(), "mass on future blocks"
    return out


SMALL_CASES = [
    RowsCase(2, 4, 4, 64, 16, 1, torch.float32, note="MHA, batch 2"),
    RowsCase(1, 8, 2, 100, 16, 3, torch.float32, split_tiles=2, note="partial last block, spans"),
    RowsCase(1, 8, 1, 257, 32, 2, torch.float32, note="MQA, one token in the last block"),
    RowsCase(1, 8, 2, 257, 32, 3, torch.bfloat16, note="bf16"),
    RowsCase(2, 6, 2, 100, 16, 2, torch.bfloat16, split_tiles=3, note="3 heads per KV head"),
    RowsCase(1, 4, 2, 64, 32, 2, torch.float32, max_query_rows=32, note="every row, 1 head/prog"),
    RowsCase(1, 4, 2, 100, 24, 2, torch.float32, note="block 24 padded to 32"),
    RowsCase(1, 4, 1, 10, 16, 1, torch.float32, note="T < block: the diagonal block alone"),
    RowsCase(1, 4, 2, 100, 16, 3, torch.float32, chunk=60, note="chunk inside the scored rows"),
    RowsCase(1, 8, 2, 257, 32, 3, torch.bfloat16, chunk=200, split_tiles=2, note="bf16 chunk"),
    RowsCase(1, 4, 2, 100, 16, 3, torch.float32, chunk=90, note="chunk: row 0 has no query"),
]


@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.id)
def test_query_row_kernel_small(case):
    """Compiled on CUDA, the CPU interpreter otherwise (CI)."""
    out = check(case, DEVICE)
    if case.note == "chunk: row 0 has no query":
        assert torch.count_nonzero(out[:, :, 0]) == 0


@pytest.mark.parametrize("granularity", ["layer", "kv_group", "head"])
def test_query_row_scores_backends_agree(granularity):
    """The public function's group mean is the same on both backends."""
    q, k, _ = make_qkv(1, 8, 2, 90, 16, device=DEVICE, seed=4)
    groups = mask_groups(granularity, 8, 2)
    got = query_row_scores(q, k, 2, 16, groups, backend="triton")
    want = query_row_scores(q, k, 2, 16, groups, backend="reference")
    err = (got - want).abs().max().item()
    print(f"{granularity}: max difference {err:.2e}")
    assert got.shape == want.shape == (1, groups, 2, num_blocks(90, 16))
    assert err < 1e-5


def test_query_row_backend_resolution(monkeypatch):
    q = torch.zeros(1, 2, 8, 16)
    assert query_row_backend(q, "auto") == "reference"  # the interpreter is no fast path
    assert query_row_backend(q, "triton") == "triton"
    assert query_row_backend(q.double(), "reference") == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        query_row_backend(q, "flex")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not CUDA:
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            query_row_scores(q, torch.zeros(1, 1, 8, 16), 1, 8, 1, backend="triton")


def test_query_row_kernel_rejects_bad_inputs():
    from sketchwalk.selection.triton_query_rows import query_row_mass_triton

    q, k = torch.zeros(1, 4, 40, 16), torch.zeros(1, 2, 40, 16)
    with pytest.raises(ValueError, match=r"q must be \(batch, num_heads, seq, head_dim\)"):
        query_row_mass_triton(q[0], k, 1, 16)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        query_row_mass_triton(q, torch.zeros(1, 3, 40, 16), 1, 16)
    for rows in (0, 4):
        with pytest.raises(ValueError, match=r"rows must be in \[1, 3\]"):
            query_row_mass_triton(q, k, rows, 16)
    with pytest.raises(ValueError, match="more queries"):
        query_row_mass_triton(q, k[:, :, :30], 1, 16)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        query_row_mass_triton(q.double(), k.double(), 1, 16)
    with pytest.raises(ValueError, match="block_size"):
        query_row_mass_triton(q, k, 1, 0)
    with pytest.raises(ValueError, match="split_tiles"):
        query_row_mass_triton(q, k, 1, 16, split_tiles=0)
    with pytest.raises(ValueError, match="mask groups"):
        query_row_scores(q, k, 1, 16, 3)
    with pytest.raises(ValueError, match="more queries"):
        query_row_scores(q, k[:, :, :30], 1, 16, 1)


def test_sketchwalk_query_rows_backend_on_the_cpu():
    """On the CPU both SketchWalk backends score the rows with the reference, and say so."""
    cfg = SketchWalkConfig.preset("default", density=0.3, dense_layers=0, block_size=16)
    q, k, _ = make_qkv(1, 4, 2, 16 * 40, 16, seed=2)
    for backend in ("auto", "reference"):
        sw = SketchWalk(cfg, backend=backend)
        sw.select(q, k, 0)
        assert sw.query_rows_backend == "reference"


GPU_CASES = [
    RowsCase(1, 32, 8, 8192, 64, 2, torch.bfloat16, note="Llama-3.1-8B at 8K"),
    RowsCase(1, 32, 8, 32768, 64, 2, torch.bfloat16, note="Llama-3.1-8B at 32K"),
    RowsCase(2, 32, 8, 8192 + 37, 64, 3, torch.bfloat16, note="batch 2, partial block"),
    RowsCase(1, 32, 8, 32768, 64, 2, torch.bfloat16, chunk=32768 - 100, note="a 100-query chunk"),
    RowsCase(1, 9, 3, 8192, 64, 2, torch.bfloat16, note="SmolLM2: 3 heads per KV head"),
    RowsCase(1, 32, 8, 8192, 64, 2, torch.float16, note="fp16"),
    RowsCase(1, 32, 8, 8192, 64, 2, torch.float32, note="fp32: 2 heads per program"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_query_row_kernel_gpu(case):
    check(case, "cuda", head_dim=128, seed=5)


@pytest.mark.gpu
def test_query_row_kernel_gpu_ieee():
    check(GPU_CASES[-1], "cuda", head_dim=128, seed=6, precision="ieee")


@pytest.mark.gpu
def test_sketchwalk_query_rows_kernel_on_cuda():
    """SketchWalk runs the kernel on CUDA when its backend is "triton"; the last rows'
    scores agree to float32 level and their masks keep the same attention mass (blocks may
    swap only at near-ties)."""
    cfg = SketchWalkConfig.preset("default", density=0.2, dense_layers=0)
    q, k, _ = make_qkv(1, 32, 8, 8192, 128, torch.float32, "cuda", seed=8)
    fast, ref = SketchWalk(cfg, backend="triton"), SketchWalk(cfg, backend="reference")
    a, b = fast.select(q, k, 0), ref.select(q, k, 0)
    assert (fast.query_rows_backend, ref.query_rows_backend) == ("triton", "reference")
    rows = cfg.query_rows
    tail_a, tail_b = a.scores[:, :, -rows:], b.scores[:, :, -rows:]
    err = (tail_a - tail_b).abs().max().item()
    print(f"tail score difference {err:.2e}")
    assert err < 1e-5
    kept_a = (tail_b * a.block_mask[:, :, -rows:]).sum(-1)
    kept_b = (tail_b * b.block_mask[:, :, -rows:]).sum(-1)
    assert torch.equal(a.kv_num_blocks[:, :, -rows:], b.kv_num_blocks[:, :, -rows:])
    assert (kept_a - kept_b).abs().max().item() < 1e-4
