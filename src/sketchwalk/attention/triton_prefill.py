"""Triton forward kernel for block-sparse prefill attention over a `BlockSelection`.

Each program owns one query block (``block_size`` queries) of one *unit*: a unit is a KV head
and all the query heads that share both its K/V and its mask (mask per layer or per KV group),
or a single query head when masks are per head. The unit's query heads are packed into the M
dimension of the tile (row ``r`` of the packed matrix is query ``r % block_size`` of the unit's
head ``r // block_size``), so every K/V tile a program loads is used by all of them: GQA without
repeating K/V. The program walks the row's ``kv_indices`` (sorted ascending), runs an online
softmax in fp32 (exp2 domain), and applies the causal/bounds mask only to the last kept block,
which is the only one that can reach the diagonal or the tail of the sequence.

On Hopper at head_dim 128 the unmasked K/V blocks are read with TMA descriptor loads (host
``TensorDescriptor`` over the contiguous (B * Hkv * T, D) view) and the key loop is warp
specialised; the masked last block keeps pointer loads, so the sequence tail is read exactly as
before and the output is bit-identical to the pointer-load kernel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    key_start,
    pos,
    seq_len,
    qk_scale,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    k_desc=None,
    v_desc=None,
    desc_row=0,
    USE_TMA: tl.constexpr = False,
):
    offs_n = key_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    if MASKED:
        key_ok = offs_n < seq_len
        k = tl.load(
            k_base + offs_n[:, None] * stride_kt + dims[None, :], mask=key_ok[:, None], other=0.0
        )
    elif USE_TMA:
        # Unmasked blocks lie inside the sequence: a bulk tensor copy of rows
        # desc_row + key_start .. + BLOCK_N of the (B * Hkv * T, D) view.
        k = k_desc.load([desc_row + key_start, 0])
    else:
        k = tl.load(k_base + offs_n[:, None] * stride_kt + dims[None, :])
    if UPCAST_DOT:
        qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
    else:
        qk = tl.dot(q, tl.trans(k))
    if MASKED:
        visible = (offs_n[None, :] <= pos[:, None]) & key_ok[None, :]
        qk = tl.where(visible, qk, float("-inf"))
    # The scale (> 0) commutes with the row max, so it folds into one FMA inside exp2 below.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    # A row with every key masked keeps m = -inf; shift by 0 instead so exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(qk * qk_scale - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if MASKED:
        v = tl.load(
            v_base + offs_n[:, None] * stride_vt + dims[None, :], mask=key_ok[:, None], other=0.0
        )
    elif USE_TMA:
        v = v_desc.load([desc_row + key_start, 0])
    else:
        v = tl.load(v_base + offs_n[:, None] * stride_vt + dims[None, :])
    if UPCAST_DOT:
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _sparse_prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    num_ptr,
    idx_ptr,
    k_desc,
    v_desc,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_nb,
    stride_ng,
    stride_nq,
    stride_ib,
    stride_ig,
    stride_iq,
    seq_len,
    q_offset,
    q_block_offset,
    num_units,
    heads_per_unit,
    group_size,
    num_q_blocks,
    tiles_per_q_block,
    qk_scale,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    USE_TMA: tl.constexpr,
    WARP_SPEC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_u = tl.program_id(1)
    batch = pid_u // num_units
    unit = pid_u % num_units
    # Late query blocks keep the most key blocks: launch them first for better tail balance.
    q_block = num_q_blocks - 1 - pid_m // tiles_per_q_block
    tile = pid_m % tiles_per_q_block

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    head_in_unit = rows // BLOCK_SIZE
    # pos: the query's position among the keys; a query chunk (chunked prefill) starts at key
    # position q_offset, its selection row 0 is key block q_block_offset, and the chunk's first
    # block may begin before its first query.
    pos = (q_block + q_block_offset) * BLOCK_SIZE + rows % BLOCK_SIZE
    query = pos - q_offset
    head = unit * heads_per_unit + head_in_unit
    row_ok = (head_in_unit < heads_per_unit) & (pos < seq_len) & (query >= 0)
    kv_head = (unit * heads_per_unit) // group_size
    dims = tl.arange(0, HEAD_DIM)

    q_ptrs = (
        q_ptr
        + batch.to(tl.int64) * stride_qb
        + head[:, None].to(tl.int64) * stride_qh
        + query[:, None].to(tl.int64) * stride_qt
        + dims[None, :]
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

    n_sel = tl.load(num_ptr + batch * stride_nb + unit * stride_ng + q_block * stride_nq)
    idx_row = idx_ptr + batch * stride_ib + unit * stride_ig + q_block * stride_iq
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Row of this (batch, KV head)'s first key in the (B * Hkv * T, D) descriptor view (the
    # TMA path needs contiguous K and V, so stride_kb // stride_kh is Hkv).
    desc_row = (batch * (stride_kb // stride_kh) + kv_head) * seq_len
    # Every kept block before the last lies strictly left of this query block: no mask at all.
    for e in tl.range(0, n_sel - 1, warp_specialize=WARP_SPEC):
        kv_block = tl.load(idx_row + e)
        for s in tl.static_range(BLOCK_SIZE // BLOCK_N):
            acc, m_i, l_i = _attend_block(
                acc,
                m_i,
                l_i,
                q,
                k_base,
                v_base,
                stride_kt,
                stride_vt,
                kv_block * BLOCK_SIZE + s * BLOCK_N,
                pos,
                seq_len,
                qk_scale,
                BLOCK_N,
                HEAD_DIM,
                False,
                UPCAST_DOT,
                k_desc,
                v_desc,
                desc_row,
                USE_TMA,
            )
    if n_sel > 0:
        kv_block = tl.load(idx_row + n_sel - 1)
        for s in tl.static_range(BLOCK_SIZE // BLOCK_N):
            acc, m_i, l_i = _attend_block(
                acc,
                m_i,
                l_i,
                q,
                k_base,
                v_base,
                stride_kt,
                stride_vt,
                kv_block * BLOCK_SIZE + s * BLOCK_N,
                pos,
                seq_len,
                qk_scale,
                BLOCK_N,
                HEAD_DIM,
                True,
                UPCAST_DOT,
            )

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = (
        o_ptr
        + batch.to(tl.int64) * stride_ob
        + head[:, None].to(tl.int64) * stride_oh
        + query[:, None].to(tl.int64) * stride_ot
        + dims[None, :]
    )
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)

# Launch configuration by head_dim: (max BLOCK_M, num_warps, num_stages). Chosen from the sweeps
# in benchmarks/attention.py and benchmarks/prefill_variants.py on an H100 (benchmarks/NOTES.md).
_CONFIGS: dict[int, tuple[int, int, int]] = {
    16: (128, 4, 3),
    32: (128, 4, 3),
    64: (64, 4, 3),
    128: (128, 4, 2),
    256: (64, 8, 2),
}
# Kernel variant by head_dim: TMA descriptor loads for the unmasked K/V blocks, and Triton's
# warp specialisation of the key loop. Both won at D 128 on an H100 (run 5: 1.17-1.24x over
# pointer loads); at D 64 they were within noise or slower, so pointer loads stay.
_VARIANTS: dict[int, dict[str, bool]] = {128: {"tma": True, "warp_spec": True}}


@dataclass(frozen=True)
class PrefillTuning:
    """Launch settings of `sparse_prefill` other than the defaults, for benchmark sweeps and
    tests; every field left at its default keeps the built-in choice.

    Attributes:
        configs: head_dim -> (max BLOCK_M, num_warps, num_stages), replacing ``_CONFIGS`` for
            those head dims.
        key_tile: the key tile BLOCK_N (0: `key_block_tile`); must divide the block size.
        tma, warp_spec: TMA descriptor loads of the unmasked K/V blocks and warp specialisation
            of the key loop (None: the head_dim's default in ``_VARIANTS``).
    """

    configs: Mapping[int, tuple[int, int, int]] = field(default_factory=dict, hash=False)
    key_tile: int = 0
    tma: bool | None = None
    warp_spec: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "configs", MappingProxyType(dict(self.configs)))
        if self.key_tile < 0:
            raise ValueError(f"key_tile must be >= 0 (0: default), got {self.key_tile}")

    def config(self, head_dim: int) -> tuple[int, int, int]:
        """(max BLOCK_M, num_warps, num_stages) for ``head_dim``."""
        return self.configs.get(head_dim, _CONFIGS[head_dim])

    def variant(self, head_dim: int) -> dict[str, bool]:
        """{"tma": ..., "warp_spec": ...} for ``head_dim``."""
        default = _VARIANTS.get(head_dim, {})
        return {
            name: default.get(name, False) if value is None else value
            for name, value in (("tma", self.tma), ("warp_spec", self.warp_spec))
        }


DEFAULT_TUNING = PrefillTuning()


def _use_tma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tuning: PrefillTuning) -> bool:
    """Bulk tensor copies (TMA) for the unmasked K/V blocks: Hopper or newer, contiguous K/V."""
    if not q.is_cuda or not tuning.variant(q.shape[-1])["tma"]:
        return False
    if torch.cuda.get_device_capability(q.device)[0] < 9:
        return False
    return k.is_contiguous() and v.is_contiguous()


def upcast_dot(q: torch.Tensor) -> bool:
    """True under the CPU interpreter, whose tl.dot mis-multiplies bfloat16 (triton 3.6 runs it
    as a numpy integer matmul on the raw bits); the kernels then upcast dot operands to fp32."""
    return not q.is_cuda and q.dtype == torch.bfloat16


def key_block_tile(block_size: int) -> int:
    """Largest key tile (BLOCK_N) in {64, 32, 16} that divides the selection's block size."""
    for n in (64, 32, 16):
        if block_size % n == 0:
            return n
    raise RuntimeError(f"triton backend needs block_size to be a multiple of 16, got {block_size}")


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> None:
    """Raise RuntimeError naming what the Triton kernels cannot run (dtype, head_dim, block)."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(f"triton backend supports bfloat16/float16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise RuntimeError(
            f"triton backend needs q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or v.shape[-1] != q.shape[-1]:
        raise RuntimeError(
            f"triton backend supports head_dim in {SUPPORTED_HEAD_DIMS} "
            f"(same for q, k, v), got {q.shape[-1]}/{v.shape[-1]}"
        )
    key_block_tile(block_size)


def _mask_layout(num_groups: int, num_q_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """(units, heads per unit) for a mask with ``num_groups`` groups."""
    group_size = num_q_heads // num_kv_heads
    if num_groups == num_q_heads and group_size > 1:
        return num_q_heads, 1
    if num_groups in (1, num_kv_heads):
        return num_kv_heads, group_size
    raise RuntimeError(
        f"selection has {num_groups} mask groups; expected 1, {num_kv_heads} "
        f"(KV heads) or {num_q_heads} (query heads)"
    )


def sparse_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block_size: int,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    tuning: PrefillTuning | None = None,
) -> torch.Tensor:
    """Block-sparse causal attention of T queries at the end of S >= T keys.

    Args:
        q: (B, Hq, T, D) bf16/fp16; query i sits at key position S - T + i (T == S: a prefill;
            T < S: a query chunk of chunked prefill, its first query anywhere in a block).
        k, v: (B, Hkv, S, D), same dtype, Hq % Hkv == 0.
        kv_num_blocks: int32 (B, G, nq), G in {1, Hkv, Hq}; nq = ceil(S / block_size) -
            (S - T) // block_size: the rows of the key blocks that hold the queries.
        kv_indices: int32 (B, G, nq, nk); each row's first kv_num_blocks entries are the kept key
            blocks, sorted ascending, none right of the row's own (diagonal) block.
        block_size: tokens per block (a multiple of 16).
        scale: softmax scale, default 1 / sqrt(D).
        out: optional (B, Hq, T, D) output buffer.
        tuning: launch settings for sweeps and tests (`PrefillTuning`); None: the defaults.

    Returns:
        (B, Hq, T, D) in q's dtype. Rows whose selection is empty are 0.
    """
    check_inputs(q, k, v, block_size)
    batch, num_q_heads, num_queries, head_dim = q.shape
    num_kv_heads, seq_len = k.shape[1], k.shape[2]
    if seq_len < num_queries:
        raise RuntimeError(f"prefill kernel needs S >= T keys, got T={num_queries}, S={seq_len}")
    q_offset = seq_len - num_queries
    q_block_offset = q_offset // block_size
    num_groups = kv_num_blocks.shape[1]
    units, heads_per_unit = _mask_layout(num_groups, num_q_heads, num_kv_heads)
    num_q_blocks = kv_num_blocks.shape[2]
    if num_q_blocks != math.ceil(seq_len / block_size) - q_block_offset:
        raise RuntimeError(
            f"selection has {num_q_blocks} query blocks, expected ceil({seq_len} / {block_size})"
            f" - {q_offset} // {block_size} for {num_queries} queries at the end of "
            f"{seq_len} keys"
        )
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    kv_num_blocks = kv_num_blocks.to(torch.int32)
    kv_indices = kv_indices.to(torch.int32)
    if kv_indices.stride(-1) != 1:
        kv_indices = kv_indices.contiguous()
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)

    tuning = DEFAULT_TUNING if tuning is None else tuning
    max_block_m, num_warps, num_stages = tuning.config(head_dim)
    rows = heads_per_unit * block_size
    block_m = max(16, min(max_block_m, triton.next_power_of_2(rows)))
    tiles = triton.cdiv(rows, block_m)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    group_stride = 0 if num_groups == 1 else 1
    grid = (num_q_blocks * tiles, batch * units)
    kwargs: dict[str, Any] = {}
    if q.is_cuda:
        kwargs = {"num_warps": num_warps, "num_stages": num_stages}
    block_n = tuning.key_tile or key_block_tile(block_size)
    if block_size % block_n:
        raise RuntimeError(f"key tile {block_n} does not divide block_size {block_size}")
    use_tma = _use_tma(q, k, v, tuning)
    k_desc: Any = k
    v_desc: Any = v
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_desc = TensorDescriptor.from_tensor(k.view(-1, head_dim), [block_n, head_dim])
        v_desc = TensorDescriptor.from_tensor(v.view(-1, head_dim), [block_n, head_dim])
    _sparse_prefill_kernel[grid](
        q,
        k,
        v,
        out,
        kv_num_blocks,
        kv_indices,
        k_desc,
        v_desc,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        kv_num_blocks.stride(0),
        kv_num_blocks.stride(1) * group_stride,
        kv_num_blocks.stride(2),
        kv_indices.stride(0),
        kv_indices.stride(1) * group_stride,
        kv_indices.stride(2),
        seq_len,
        q_offset,
        q_block_offset,
        units,
        heads_per_unit,
        num_q_heads // num_kv_heads,
        num_q_blocks,
        tiles,
        scale * LOG2E,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        UPCAST_DOT=upcast_dot(q),
        USE_TMA=use_tma,
        WARP_SPEC=q.is_cuda and tuning.variant(head_dim)["warp_spec"],
        **kwargs,
    )
    return out


__all__ = [
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "PrefillTuning",
    "check_inputs",
    "sparse_prefill",
]
