"""Decode attention over selected KV blocks: reference semantics and the Triton split-K kernel,
under the tolerance rule of `sketchwalk.testing.assert_within_rule` (fp32 reference, bf16/fp16
PyTorch same-math). Without CUDA the Triton kernel runs under the CPU interpreter
(tests/conftest.py).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch

from sketchwalk.attention.api import sparse_decode
from sketchwalk.attention.reference import dense_attention
from sketchwalk.testing import assert_within_rule, mask_groups, masked_attention_low_precision

CUDA = torch.cuda.is_available()


class DecodeCase(NamedTuple):
    batch: int
    q_heads: int
    kv_heads: int
    queries: int
    cache_len: int
    head_dim: int
    block_size: int
    granularity: str
    density: float
    dtype: torch.dtype
    note: str = ""

    @property
    def id(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"B{self.batch}-H{self.q_heads}/{self.kv_heads}-q{self.queries}-S{self.cache_len}"
            f"-D{self.head_dim}-bs{self.block_size}-{self.granularity}-{dtype}-d{self.density}"
        )

    def inputs(self, device, seed=0):
        """q, k, v, kv_num_blocks, kv_indices of this case (`make_decode_inputs`)."""
        return make_decode_inputs(
            self.batch,
            self.q_heads,
            self.kv_heads,
            self.queries,
            self.cache_len,
            self.head_dim,
            self.block_size,
            mask_groups(self.granularity, self.q_heads, self.kv_heads),
            self.density,
            self.dtype,
            device,
            seed,
        )


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


def check_decode(case: DecodeCase, device, seed=0, num_splits=None, tuning=None) -> None:
    """The Triton decode kernel on ``case`` against the fp32 reference under the tolerance
    rule; with the default launch settings the ``sparse_decode`` dispatch gives the same bits."""
    from sketchwalk.attention.triton_decode import sparse_decode_triton

    q, k, v, num, idx = case.inputs(device, seed)
    bs = case.block_size
    out = sparse_decode_triton(q, k, v, num, idx, bs, num_splits=num_splits, tuning=tuning)
    assert out.dtype == q.dtype
    reference = sparse_decode(q.float(), k.float(), v.float(), num, idx, bs)
    mask = token_mask(num, idx, case.q_heads, case.kv_heads, case.queries, case.cache_len, bs)
    same_math = masked_attention_low_precision(q, k, v, mask)
    assert_within_rule(out, reference, same_math, f"triton {case.id} ({case.note})")
    if num_splits is None and tuning is None:
        assert torch.equal(sparse_decode(q, k, v, num, idx, bs, backend="triton"), out)


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
    case = DecodeCase(2, 8, 2, 2, 300, 32, 32, "kv_group", 0.4, torch.float64)
    q, k, v, num, idx = case.inputs("cpu")
    bs = case.block_size
    mask = token_mask(num, idx, case.q_heads, case.kv_heads, case.queries, case.cache_len, bs)
    expected = masked_attention_low_precision(q, k, v, mask, 1.0 / math.sqrt(case.head_dim))
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


SMALL_CASES = [
    DecodeCase(2, 6, 2, 1, 300, 64, 32, "kv_group", 0.5, torch.bfloat16, "batch 2"),
    DecodeCase(1, 9, 3, 3, 500, 64, 64, "layer", 0.4, torch.bfloat16, "SmolLM2 heads"),
    DecodeCase(2, 4, 4, 2, 130, 32, 16, "head", 0.5, torch.float16, "MHA, block 16"),
    DecodeCase(1, 8, 2, 1, 200, 128, 64, "head", 0.5, torch.bfloat16, "head masks"),
    DecodeCase(1, 32, 8, 1, 256, 128, 64, "layer", 0.3, torch.bfloat16, "4 heads per unit"),
]


@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.id)
def test_triton_decode_small(case):
    """Small shapes: compiled on CUDA, the CPU interpreter otherwise (CI)."""
    check_decode(case, "cuda" if CUDA else "cpu")


@pytest.mark.parametrize("num_splits", [1, 3, 70])
def test_triton_decode_split_counts(num_splits):
    """The combine merges 1 split, a few, and more than one SPLIT_CHUNK (64) of them, most
    empty (fewer kept blocks than splits)."""
    case = DecodeCase(1, 8, 2, 2, 700, 64, 32, "kv_group", 0.5, torch.bfloat16, "split counts")
    check_decode(case, "cuda" if CUDA else "cpu", seed=3, num_splits=num_splits)


def test_triton_decode_tuning():
    """`DecodeTuning` (the benchmark sweep's hook): a split count and a row tile other than the
    defaults compute the same attention within the rule; an explicit num_splits wins over the
    tuning's split count, and a negative split count is refused."""
    from sketchwalk.attention.triton_decode import DecodeTuning, sparse_decode_triton

    device = "cuda" if CUDA else "cpu"
    case = DecodeCase(1, 8, 2, 2, 700, 64, 32, "kv_group", 0.5, torch.bfloat16, "tuned")
    tuning = DecodeTuning(splits=5, block_m=32, num_warps=8, num_stages=2)
    check_decode(case, device, seed=4, tuning=tuning)
    q, k, v, num, idx = case.inputs(device, seed=4)
    explicit = sparse_decode_triton(q, k, v, num, idx, 32, num_splits=3)
    both = sparse_decode_triton(q, k, v, num, idx, 32, num_splits=3, tuning=DecodeTuning(splits=9))
    assert torch.equal(both, explicit)
    with pytest.raises(ValueError, match="splits"):
        DecodeTuning(splits=-1)


GPU_CASES = [
    DecodeCase(1, 32, 8, 1, 20000, 128, 64, "layer", 0.2, torch.bfloat16, "Llama"),
    DecodeCase(8, 32, 8, 1, 9000, 128, 64, "kv_group", 0.2, torch.bfloat16, "Llama, batch 8"),
    DecodeCase(4, 9, 3, 4, 12345, 64, 64, "head", 0.3, torch.float16, "SmolLM2, 4 queries"),
    DecodeCase(2, 32, 8, 16, 4096, 128, 64, "kv_group", 0.3, torch.bfloat16, "rows span 2 tiles"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_triton_decode_gpu(case):
    check_decode(case, "cuda", seed=5)


def test_on_device_switches_only_to_another_gpu():
    """`on_device` is a no-op on the CPU (and for the current GPU): the kernels' launches are
    wrapped in it so that a layer on another GPU (device maps) launches on its own GPU."""
    import contextlib

    from sketchwalk.attention.api import on_device

    assert isinstance(on_device(torch.zeros(1)), contextlib.nullcontext)
    if torch.cuda.is_available():
        here = torch.zeros(1, device="cuda")
        assert isinstance(on_device(here), contextlib.nullcontext)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_key_start_decodes_each_left_padded_row_as_alone(backend):
    """``key_start``: one call over a left-padded batch, each row on its own block grid from
    its first real key, equals decoding each row alone on its unpadded cache (the reference
    exactly, the kernel within its rounding: compiled on CUDA, interpreted on the CPU)."""
    _check_key_start(backend, "cuda" if CUDA and backend == "triton" else "cpu")


@pytest.mark.gpu
def test_key_start_gpu():
    _check_key_start("triton", "cuda")


def _check_key_start(backend, device):
    dtype = torch.bfloat16 if backend == "triton" else torch.float32
    s, bs, hq, hkv, d = 300, 32, 6, 2, 32
    starts = [0, 37, 100]  # row b holds keys starts[b] .. s - 1; before that: padding
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(3, hq, 1, d, generator=gen)
    k = torch.randn(3, hkv, s, d, generator=gen)
    v = torch.randn(3, hkv, s, d, generator=gen)
    nums, idxs = [], []
    for b, start in enumerate(starts):
        _, _, _, num, idx = make_decode_inputs(1, hq, hkv, 1, s - start, d, bs, hkv, 0.5,
                                               torch.float32, "cpu", seed=b)  # fmt: skip
        nums.append(num)
        idxs.append(idx)
        k[b, :, :start] = 1e4  # padding that would dominate if it were ever read
    width = max(i.shape[-1] for i in idxs)
    num = torch.cat(nums)
    idx = torch.cat([torch.nn.functional.pad(i, (0, width - i.shape[-1])) for i in idxs])
    to = dict(device=device, dtype=dtype)
    q, k, v = q.to(**to), k.to(**to), v.to(**to)
    num, idx = num.to(device), idx.to(device)
    out = sparse_decode(q, k, v, num, idx, bs, backend=backend,
                        key_start=torch.tensor(starts))  # fmt: skip
    for b, start in enumerate(starts):
        alone = sparse_decode(q[b : b + 1], k[b : b + 1, :, start:], v[b : b + 1, :, start:],
                              num[b : b + 1], idxs[b].to(device), bs, backend=backend)  # fmt: skip
        if backend == "reference":
            torch.testing.assert_close(out[b : b + 1], alone, rtol=0, atol=0)
        else:
            torch.testing.assert_close(out[b : b + 1].float(), alone.float(), rtol=2e-2,
                                       atol=2e-2)  # fmt: skip
    assert not torch.allclose(out[1].float(), sparse_decode(
        q[1:2], k[1:2], v[1:2], num[1:2], idx[1:2], bs, backend=backend)[0].float())  # fmt: skip
    with pytest.raises(ValueError, match="key_start"):
        sparse_decode(q, k, v, num, idx, bs, key_start=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="key_start must lie"):
        sparse_decode(q, k, v, num, idx, bs, key_start=torch.tensor([0, 1, s]))
