"""Block-sparse attention over a paged KV cache (`sketchwalk.attention.paged`): the Triton kernels
against the PyTorch references under the tolerance rule of `sketchwalk.testing.assert_within_rule`
(fp32 reference, bf16/fp16 PyTorch same-math), and bit-identical to the contiguous kernels on the
same data. Pages are shuffled (a random permutation of a pool larger than needed) and every slot
no sequence owns, the tails of last pages and the block tables' unused columns included, holds
large finite garbage, so reading a wrong page or a key past the sequence shows in the output.
Without CUDA the kernels run under the Triton CPU interpreter (tests/conftest.py).
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from sketchwalk.attention.api import sparse_attention, sparse_decode
from sketchwalk.attention.paged import (
    chunk_selection,
    gather_pages,
    paged_sparse_decode,
    paged_sparse_prefill,
)
from sketchwalk.blocks import BlockSelection
from sketchwalk.testing import (
    assert_within_rule,
    make_qkv,
    mask_groups,
    masked_attention_low_precision,
    random_selection,
)

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


class Paged(NamedTuple):
    k_pages: torch.Tensor  # (P, page_size, Hkv, D), maybe a transposed view
    v_pages: torch.Tensor
    block_table: torch.Tensor  # int32 (B, max_pages)
    seq_lens: torch.Tensor  # int32 (B,)


def make_paged(
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: list[int],
    page_size: int,
    seed: int = 0,
    layout: str = "NHD",
    spare_pages: int = 5,
) -> Paged:
    """The first seq_lens[b] tokens of k/v (B, Hkv, S_max, D) in a shuffled page pool.

    ``layout="HND"`` stores the pool as (P, Hkv, page_size, D) and returns its transpose(1, 2)
    view. Unowned slots and the block table's spare column hold garbage (large values, valid
    page numbers of other pages)."""
    gen = torch.Generator().manual_seed(seed)
    batch, num_kv_heads, _, head_dim = k.shape
    used = [-(-s // page_size) for s in seq_lens]
    num_pages = sum(used) + spare_pages
    max_pages = max(used) + 1
    physical = torch.randperm(num_pages, generator=gen)
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    pools = []
    for src in (k, v):
        garbage = 8.0 + 4.0 * torch.randn(shape, generator=gen)
        pool = garbage.to(src.device, src.dtype)
        pools.append(pool)
    table = torch.randint(0, num_pages, (batch, max_pages), generator=gen, dtype=torch.int32)
    nxt = 0
    for b, (s, n) in enumerate(zip(seq_lens, used, strict=True)):
        table[b, :n] = physical[nxt : nxt + n].to(torch.int32)
        nxt += n
        for j in range(n):
            rows = min(page_size, s - j * page_size)
            for pool, src in zip(pools, (k, v), strict=True):
                tokens = src[b, :, j * page_size : j * page_size + rows].transpose(0, 1)
                pool[table[b, j], :rows] = tokens
    if layout == "HND":
        pools = [p.transpose(1, 2).contiguous().transpose(1, 2) for p in pools]
    else:
        assert layout == "NHD"
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return Paged(pools[0], pools[1], table.to(k.device), lens.to(k.device))


def kept_blocks(num: torch.Tensor, idx: torch.Tensor, nk: int) -> torch.Tensor:
    """bool (..., nk) of the kept blocks of an index form (any order)."""
    valid = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
    cols = torch.where(valid & (idx < nk), idx.long(), nk)
    kept = torch.zeros(*idx.shape[:-1], nk + 1, dtype=torch.bool, device=idx.device)
    return kept.scatter_(-1, cols, True)[..., :nk]


def head_rows(kept: torch.Tensor, hq: int, hkv: int) -> torch.Tensor:
    """(B, G, ...) -> (B, Hq, ...) by the mask-group rule."""
    g = kept.shape[1]
    if g == hq:
        return kept
    if g == 1:
        return kept.expand(kept.shape[0], hq, *kept.shape[2:])
    return kept.repeat_interleave(hq // hkv, 1)


def shuffle_rows(num: torch.Tensor, idx: torch.Tensor, seed: int) -> torch.Tensor:
    """Each row's kept entries in a random order (padding stays after them)."""
    gen = torch.Generator().manual_seed(seed)
    n = idx.shape[-1]
    keys = torch.rand(idx.shape, generator=gen).to(idx.device)
    valid = torch.arange(n, device=idx.device) < num[..., None]
    order = torch.argsort(torch.where(valid, keys, 2.0 + keys), -1)
    return torch.gather(idx, -1, order)


# ---- decode ---------------------------------------------------------------------------------


class DecodeCase(NamedTuple):
    seq_lens: tuple[int, ...]
    q_heads: int
    kv_heads: int
    queries: int
    head_dim: int
    page_size: int
    granularity: str
    density: float
    dtype: torch.dtype = torch.bfloat16
    layout: str = "NHD"

    @property
    def id(self) -> str:
        lens = "_".join(map(str, self.seq_lens))
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"S{lens}-H{self.q_heads}/{self.kv_heads}-q{self.queries}-D{self.head_dim}"
            f"-ps{self.page_size}-{self.granularity}-{dtype}-{self.layout}"
        )


def decode_inputs(case: DecodeCase, device: str, seed: int = 0):
    """q, the paged caches, a random selection (always the first and last blocks, sorted), and
    the contiguous k, v."""
    batch, s_max = len(case.seq_lens), max(case.seq_lens)
    q, k, v = make_qkv(
        batch, case.q_heads, case.kv_heads, s_max, case.head_dim, case.dtype, device, seed
    )
    q = q[:, :, : case.queries].contiguous()
    for b, s in enumerate(case.seq_lens):
        # each sequence's last key draws most of the attention of the queries that see it, so
        # an earlier query (Tq > 1) seeing it would show
        k[b, :, s - 1] += (4.0 * q[b].float().mean((0, 1))).to(k.dtype)
    paged = make_paged(k, v, list(case.seq_lens), case.page_size, seed + 1, case.layout)
    groups = mask_groups(case.granularity, case.q_heads, case.kv_heads)
    nk = -(-s_max // case.page_size)
    gen = torch.Generator().manual_seed(seed + 2)
    keep = torch.rand(batch, groups, nk, generator=gen) < case.density
    keep[..., 0] = True
    blocks = torch.arange(nk)
    for b, s in enumerate(case.seq_lens):
        last = (s - 1) // case.page_size
        keep[b, :, last] = True
        keep[b, :, last + 1 :] = False
    num = keep.sum(-1).to(torch.int32)
    idx = torch.sort(torch.where(keep, blocks, nk + blocks), -1).values
    idx = torch.where(blocks < num[..., None], idx, 0).to(torch.int32)
    return q, paged, num.to(device), idx.to(device), k, v


def check_decode(case: DecodeCase, device: str, seed: int = 0, shuffle: bool = True) -> None:
    q, paged, num, idx, k, v = decode_inputs(case, device, seed)
    if shuffle:
        idx = shuffle_rows(num, idx, seed + 3)
    ps = case.page_size
    out = paged_sparse_decode(q, *paged, num, idx, ps, backend="triton")
    assert out.shape == q.shape and out.dtype == q.dtype
    pages32 = [paged.k_pages.float(), paged.v_pages.float()]
    reference = paged_sparse_decode(
        q.float(), *pages32, paged.block_table, paged.seq_lens, num, idx, ps, backend="reference"
    )
    same_math = torch.empty_like(q)
    kept = head_rows(kept_blocks(num, idx, idx.shape[-1] + 1), case.q_heads, case.kv_heads)
    for b, s in enumerate(case.seq_lens):
        keys = torch.arange(s, device=device)
        pos = s - case.queries + torch.arange(case.queries, device=device)
        allowed = kept[b : b + 1, :, None, keys // ps] & (keys[None, :] <= pos[:, None])
        same_math[b : b + 1] = masked_attention_low_precision(
            q[b : b + 1], k[b : b + 1, :, :s], v[b : b + 1, :, :s], allowed
        )
    assert_within_rule(out, reference, same_math, f"paged decode {case.id}")


DECODE_CASES = [
    DecodeCase((150, 97, 33), 4, 2, 1, 32, 16, "kv_group", 0.5),
    DecodeCase((200, 64), 4, 1, 2, 64, 32, "layer", 0.5, torch.float16, "HND"),
    DecodeCase((77, 130, 129), 8, 2, 1, 32, 16, "head", 0.4),
    DecodeCase((100,), 2, 2, 3, 64, 64, "kv_group", 1.0, torch.bfloat16, "HND"),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: c.id)
def test_paged_decode_matches_reference(case):
    """Shuffled pages and kept blocks in random order; lengths off the page edges, differing
    across the batch; GQA groups 1/2/4; masks per layer / KV group / head; both pool layouts."""
    check_decode(case, DEVICE)


def check_decode_equals_contiguous(case: DecodeCase, device: str, seed: int = 0) -> None:
    """Equal lengths: the paged kernel gives the contiguous kernel's bits on the same data."""
    assert len(set(case.seq_lens)) == 1
    q, paged, num, idx, k, v = decode_inputs(case, device, seed)
    contiguous = sparse_decode(q, k, v, num, idx, case.page_size, backend="triton")
    out = paged_sparse_decode(q, *paged, num, idx, case.page_size, backend="triton")
    assert torch.equal(out, contiguous)
    # and the gathered pages are the contiguous cache
    assert torch.equal(gather_pages(paged.k_pages, paged.block_table, case.seq_lens[0]), k)


def test_paged_decode_equals_contiguous_kernel():
    check_decode_equals_contiguous(
        DecodeCase((90, 90), 8, 2, 2, 32, 16, "kv_group", 0.5, layout="HND"), DEVICE, seed=4
    )


# ---- prefill (a query chunk per sequence) -------------------------------------------------


class ChunkCase(NamedTuple):
    seq_lens: tuple[int, ...]
    queries: int  # T, the chunk at the end of each sequence
    q_heads: int
    kv_heads: int
    head_dim: int
    page_size: int
    granularity: str
    density: float
    dtype: torch.dtype = torch.bfloat16
    layout: str = "NHD"

    @property
    def id(self) -> str:
        lens = "_".join(map(str, self.seq_lens))
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"S{lens}-T{self.queries}-H{self.q_heads}/{self.kv_heads}-D{self.head_dim}"
            f"-ps{self.page_size}-{self.granularity}-{dtype}-{self.layout}"
        )


def chunk_inputs(case: ChunkCase, device: str, seed: int = 0):
    """q (B, Hq, T, D) (the chunk), the paged caches, a selection (B, G, NQ) / (B, G, NQ, nk)
    from a random causal selection of each sequence (its rows for the chunk, padded to the
    longest), and the contiguous q, k, v of the longest sequence."""
    batch, s_max, t = len(case.seq_lens), max(case.seq_lens), case.queries
    ps = case.page_size
    qf, k, v = make_qkv(
        batch, case.q_heads, case.kv_heads, s_max, case.head_dim, case.dtype, device, seed
    )
    q = torch.stack(
        [qf[b, :, s - t : s] for b, s in enumerate(case.seq_lens)]
    )  # each sequence's last T queries
    paged = make_paged(k, v, list(case.seq_lens), ps, seed + 1, case.layout)
    groups = mask_groups(case.granularity, case.q_heads, case.kv_heads)
    nk_max = -(-s_max // ps)
    rows = [-(-s // ps) - (s - t) // ps for s in case.seq_lens]
    nq_max = max(rows)
    num = torch.zeros(batch, groups, nq_max, dtype=torch.int32, device=device)
    idx = torch.zeros(batch, groups, nq_max, nk_max, dtype=torch.int32, device=device)
    for b, s in enumerate(case.seq_lens):
        full = random_selection(1, groups, s, ps, case.density, seed=seed + 10 + b, device=device)
        nk = full.block_mask.shape[-1]
        num[b, :, : rows[b]] = full.kv_num_blocks[0, :, -rows[b] :]
        idx[b, :, : rows[b], :nk] = full.kv_indices[0, :, -rows[b] :]
    return q, paged, num, idx, k, v


def check_chunk(case: ChunkCase, device: str, seed: int = 0, shuffle: bool = True) -> None:
    q, paged, num, idx, k, v = chunk_inputs(case, device, seed)
    if shuffle:
        idx = shuffle_rows(num, idx, seed + 3)
    ps, t = case.page_size, case.queries
    out = paged_sparse_prefill(q, *paged, num, idx, ps, backend="triton")
    assert out.shape == q.shape and out.dtype == q.dtype
    pages32 = [paged.k_pages.float(), paged.v_pages.float()]
    reference = paged_sparse_prefill(
        q.float(), *pages32, paged.block_table, paged.seq_lens, num, idx, ps, backend="reference"
    )
    same_math = torch.empty_like(q)
    for b, s in enumerate(case.seq_lens):
        sel = chunk_selection(num[b : b + 1], idx[b : b + 1], s, t, ps)
        q_pos = torch.arange(s - t, s, device=device)
        k_pos = torch.arange(s, device=device)
        rows = q_pos // ps - (s - t) // ps
        allowed = sel.head_mask(case.q_heads, case.kv_heads)[:, :, rows][..., k_pos // ps]
        allowed = allowed & (k_pos[None, :] <= q_pos[:, None])
        same_math[b : b + 1] = masked_attention_low_precision(
            q[b : b + 1], k[b : b + 1, :, :s], v[b : b + 1, :, :s], allowed
        )
    assert_within_rule(out, reference, same_math, f"paged chunk {case.id}")


CHUNK_CASES = [
    ChunkCase((150, 150), 40, 4, 2, 32, 16, "kv_group", 0.4),  # chunk starts mid-page
    ChunkCase((150, 103, 61), 40, 4, 1, 32, 16, "head", 0.5),  # lengths differ
    ChunkCase((130, 77), 77, 8, 2, 64, 32, "layer", 0.4, torch.float16, "HND"),  # a whole seq
    ChunkCase((96,), 1, 2, 2, 64, 32, "kv_group", 0.5),  # one query on a page edge
]


@pytest.mark.parametrize("case", CHUNK_CASES, ids=lambda c: c.id)
def test_paged_prefill_matches_reference(case):
    """Chunk edges off page edges, shuffled pages and kept blocks, lengths that differ (a
    shorter sequence has fewer selection rows: the rest are padding the kernel ignores)."""
    check_chunk(case, DEVICE)


def check_chunk_equals_contiguous(case: ChunkCase, device: str, seed: int = 0) -> None:
    """Equal lengths: the paged kernel gives the contiguous prefill kernel's bits on the same
    data and the same (sorted) selection rows."""
    assert len(set(case.seq_lens)) == 1
    s, ps = case.seq_lens[0], case.page_size
    q, paged, num, idx, k, v = chunk_inputs(case, device, seed)
    nk = -(-s // ps)
    mask = kept_blocks(num, idx, nk)
    chunk = BlockSelection(mask, ps, s, num, idx, None)
    contiguous = sparse_attention(q, k, v, chunk, backend="triton")
    out = paged_sparse_prefill(q, *paged, num, idx, ps, backend="triton")
    assert torch.equal(out, contiguous)


@pytest.mark.parametrize("t", [45, 100])
def test_paged_prefill_equals_contiguous_kernel(t):
    check_chunk_equals_contiguous(ChunkCase((100, 100), t, 4, 2, 32, 16, "kv_group", 0.5), DEVICE)


# ---- helpers and errors ---------------------------------------------------------------------


def test_gather_pages_and_layouts():
    """gather_pages undoes make_paged for each sequence, from either pool layout."""
    _, k, v = make_qkv(2, 2, 2, 70, 16, seed=1)
    for layout in ("NHD", "HND"):
        paged = make_paged(k, v, [70, 37], 16, seed=2, layout=layout)
        assert torch.equal(gather_pages(paged.k_pages, paged.block_table[0], 70), k[:1])
        assert torch.equal(gather_pages(paged.v_pages, paged.block_table[1:], 37), v[1:, :, :37])
    with pytest.raises(ValueError, match="block_table has"):
        gather_pages(paged.k_pages, paged.block_table, 16 * paged.block_table.shape[1] + 1)


def test_reference_full_selection_is_dense():
    """All blocks kept: the paged references equal dense causal attention of each sequence."""
    from sketchwalk.attention.reference import dense_attention

    lens, ps, t = [50, 33], 16, 5
    qf, k, v = make_qkv(2, 4, 2, 50, 16, torch.float64, seed=3)
    paged = make_paged(k, v, lens, ps, seed=4)
    nk = 4
    num = torch.tensor([[4], [3]], dtype=torch.int32)
    idx = torch.tensor([[[3, 1, 0, 2]], [[2, 0, 1, 0]]], dtype=torch.int32)
    q1 = torch.stack([qf[b, :, s - 1 : s] for b, s in enumerate(lens)])
    out = paged_sparse_decode(q1, *paged, num, idx, ps, backend="reference")
    qt = torch.stack([qf[b, :, s - t : s] for b, s in enumerate(lens)])
    # queries 45..49 / 28..32: two block rows each; every block kept (those right of a row's
    # block are dropped as causal)
    rows = num[:, :, None].expand(2, 1, 2)
    chunk = paged_sparse_prefill(
        qt, *paged, rows, idx[:, :, None].expand(2, 1, 2, nk), ps, backend="reference"
    )
    for b, s in enumerate(lens):
        dense = dense_attention(qf[b : b + 1, :, :s], k[b : b + 1, :, :s], v[b : b + 1, :, :s])
        torch.testing.assert_close(out[b], dense[0, :, -1:])
        torch.testing.assert_close(chunk[b], dense[0, :, -t:])


def _error_inputs():
    q = torch.zeros(2, 4, 1, 32, dtype=torch.bfloat16)
    pages = torch.zeros(6, 16, 2, 32, dtype=torch.bfloat16)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    lens = torch.tensor([40, 17], dtype=torch.int32)
    num = torch.ones(2, 2, dtype=torch.int32)
    idx = torch.zeros(2, 2, 3, dtype=torch.int32)
    return q, pages, table, lens, num, idx


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {"q": a["q"][0]}, "q must be"),
        (lambda a: {"k_pages": a["k_pages"][:, :, :, :16]}, "v_pages"),
        (lambda a: {"v_pages": a["v_pages"].float()}, "v_pages must have q's dtype"),
        (lambda a: {"page_size": 32}, "page_size=32"),
        (lambda a: {"page_size": 0}, "page_size must be a positive int"),
        (lambda a: {"block_table": a["block_table"].float()}, "block_table must be"),
        (lambda a: {"block_table": a["block_table"][:1]}, "block_table has 1 rows"),
        (lambda a: {"seq_lens": a["seq_lens"][None]}, "seq_lens must be"),
        (lambda a: {"seq_lens": torch.tensor([49, 17])}, "block_table is too short"),
        (lambda a: {"seq_lens": torch.tensor([40, 0])}, "seq_lens must be >= the 1 queries"),
        (lambda a: {"block_table": torch.tensor([[0, 1, 9], [3, 4, 5]])}, "num_pages=6"),
        (lambda a: {"kv_indices": torch.full((2, 2, 3), 2)}, "kv_indices' kept entries"),
        (lambda a: {"kv_num_blocks": torch.full((2, 2), 4)}, "kv_num_blocks must lie"),
        (
            lambda a: {
                "kv_num_blocks": torch.ones(2, 3, dtype=torch.int32),
                "kv_indices": torch.zeros(2, 3, 3, dtype=torch.int32),
            },
            "mask groups",
        ),
        (lambda a: {"kv_indices": torch.zeros(2, 2, dtype=torch.int32)}, "kv_num_blocks must"),
    ],
)
def test_decode_input_errors(change, match):
    q, pages, table, lens, num, idx = _error_inputs()
    args = {
        "q": q,
        "k_pages": pages,
        "v_pages": pages,
        "block_table": table,
        "seq_lens": lens,
        "kv_num_blocks": num,
        "kv_indices": idx,
        "page_size": 16,
    }
    args.update(change(args))
    with pytest.raises(ValueError, match=match):
        paged_sparse_decode(**args, backend="reference")


def test_kernel_only_errors_and_auto():
    """What only the kernel needs (page_size a multiple of 16, unit last stride) raises for an
    explicit "triton" and falls back to the reference for "auto"; a table entry past the
    sequence is never read, and validate=False skips the value checks."""
    q, _, table, lens, num, idx = _error_inputs()
    pages8 = torch.randn(12, 8, 2, 32).bfloat16()
    table8 = torch.arange(12, dtype=torch.int32).view(2, 6)
    with pytest.raises(ValueError, match="multiple of 16"):
        paged_sparse_decode(q, pages8, pages8, table8, lens, num, idx, 8, backend="triton")
    out = paged_sparse_decode(q, pages8, pages8, table8, lens, num, idx, 8, backend="auto")
    assert out.shape == q.shape
    strided = torch.randn(6, 16, 2, 64).bfloat16()[..., ::2]
    with pytest.raises(ValueError, match="contiguous last dim"):
        paged_sparse_decode(q, strided, strided, table, lens, num, idx, 16, backend="triton")
    pages = torch.randn(6, 16, 2, 32).bfloat16()
    # Sequence 1 (17 tokens, 2 pages) also "keeps" block 2, whose table entry is no page: the
    # kernel skips a block past the sequence without reading its entry.
    bad_table, far_num, far_idx = table.clone(), num.clone(), idx.clone()
    bad_table[1, 2] = 1000
    far_num[1] = 2
    far_idx[1, :, 1] = 2
    with pytest.raises(ValueError, match="kv_indices' kept entries"):
        paged_sparse_decode(q, pages, pages, bad_table, lens, far_num, far_idx, 16)
    a = paged_sparse_decode(
        q, pages, pages, bad_table, lens, far_num, far_idx, 16, backend="triton", validate=False
    )
    b = paged_sparse_decode(q, pages, pages, table, lens, num, idx, 16, backend="triton")
    assert torch.equal(a, b)
    bad_lens = torch.tensor([40, 60], dtype=torch.int32)
    with pytest.raises(ValueError, match="too short"):
        paged_sparse_decode(q, pages, pages, table, bad_lens, num, idx, 16, backend="triton")
    paged_sparse_decode(
        q, pages, pages, table, lens, num, idx, 16, backend="triton", validate=False
    )


def test_prefill_input_errors():
    _, pages, table, _, _, _ = _error_inputs()
    q = torch.zeros(2, 4, 20, 32, dtype=torch.bfloat16)
    lens = torch.tensor([40, 20], dtype=torch.int32)
    # sequence 0: 40 tokens, queries 20..39 in blocks 1, 2; sequence 1: 20 tokens, blocks 0, 1
    num = torch.ones(2, 2, 2, dtype=torch.int32)
    idx = torch.zeros(2, 2, 2, 3, dtype=torch.int32)
    paged_sparse_prefill(q, pages, pages, table, lens, num, idx, 16, backend="reference")
    with pytest.raises(ValueError, match="query-block rows"):
        paged_sparse_prefill(q, pages, pages, table, lens, num[:, :, :1], idx[:, :, :1], 16)
    with pytest.raises(ValueError, match="kv_num_blocks must be"):
        paged_sparse_prefill(q, pages, pages, table, lens, num[..., 0], idx, 16)
    with pytest.raises(ValueError, match="do not match"):
        paged_sparse_prefill(q, pages, pages, table, lens, num, idx[:1], 16)
    with pytest.raises(ValueError, match="seq_lens must be >= the 20 queries"):
        paged_sparse_prefill(q, pages, pages, table, torch.tensor([40, 19]), num, idx, 16)


# ---- GPU: bigger shapes ---------------------------------------------------------------------

GPU_DECODE = [
    DecodeCase((32768, 31001, 20000, 32700), 32, 8, 1, 128, 64, "kv_group", 0.2),
    DecodeCase((32768, 12345), 32, 8, 4, 128, 64, "layer", 0.2, torch.bfloat16, "HND"),
    DecodeCase((30000, 32768), 28, 4, 1, 128, 64, "head", 0.2, torch.float16),
]
GPU_CHUNK = [
    ChunkCase((32768, 32768), 1000, 32, 8, 128, 64, "kv_group", 0.2),
    ChunkCase((32768, 30001, 25000), 700, 32, 8, 128, 64, "layer", 0.2, torch.bfloat16, "HND"),
    ChunkCase((9000, 7777), 7777, 28, 4, 128, 64, "head", 0.2, torch.float16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_DECODE, ids=lambda c: c.id)
def test_paged_decode_gpu(case):
    check_decode(case, "cuda", seed=5)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CHUNK, ids=lambda c: c.id)
def test_paged_prefill_gpu(case):
    check_chunk(case, "cuda", seed=5)


@pytest.mark.gpu
def test_paged_equals_contiguous_gpu():
    check_decode_equals_contiguous(
        DecodeCase((32768,) * 2, 32, 8, 1, 128, 64, "kv_group", 0.2), "cuda", seed=6
    )
    check_chunk_equals_contiguous(
        ChunkCase((32768,) * 2, 1000, 32, 8, 128, 64, "kv_group", 0.2), "cuda", seed=6
    )
