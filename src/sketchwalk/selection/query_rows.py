"""Exact block scores for the last query-block rows of a prompt (``SketchWalkConfig.query_rows``).

The last rows of a prompt hold what it asks (the question of a retrieval prompt, the
instruction of a chat turn): the block that answers it may look unremarkable to pooled,
sketched block scores, since a block's mean query or key averages away the one token that
matters. For those rows the attention they would compute is cheap to know exactly: the last
``rows`` query blocks hold at most ``rows x block_size`` queries, and their logits against all T
keys cost O(rows x block_size x T x D) per head, against the O(T^2 x D) of the prefill's
attention.

`query_row_scores` returns, per mask group and per trailing query-block row, the softmax mass
each key block receives from the row's queries (causal within the diagonal block), averaged
over the row's queries and over the mask group's query heads: the oracle's score
(`sketchwalk.selection.baselines.OracleSelector`) restricted to those rows. SketchWalk ranks
those rows by it instead of by the walk (`sketchwalk.selection.prefill`); the budget, forced
blocks and the walk state carried to the next layer are unchanged.

Two implementations, chosen by ``backend``: the PyTorch reference below (the definition, any
device: one KV head at a time, its (B, g, rows x block_size, S) float32 probabilities in memory)
and, on CUDA, the Triton kernel of `sketchwalk.selection.triton_query_rows` (two passes over the
keys, an online softmax then the block sums, with no tensor of size (rows x block_size, S)).
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch

from sketchwalk.blocks import check_qk, num_blocks

__all__ = ["QUERY_ROW_BACKENDS", "SELECTION_BACKEND", "query_row_backend", "query_row_scores"]

QUERY_ROW_BACKENDS = ("reference", "triton", "auto")
# What the selectors (`SketchWalk` unless asked for "triton", the decoder's pins) run: the
# kernel is tested against the reference under the CPU interpreter but has not yet run its GPU
# tests (tests/test_triton_query_rows.py -m gpu); "auto" once it has.
SELECTION_BACKEND = "reference"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def query_row_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """The backend `query_row_scores` runs for queries ``q``: ``"auto"`` resolved to
    ``"triton"`` (CUDA tensors of a 16-bit or float32 dtype, triton installed) or
    ``"reference"``; an explicit backend is returned as given.

    Raises:
        ValueError: unknown backend.
    """
    if backend not in QUERY_ROW_BACKENDS:
        raise ValueError(
            f"query_row_scores: backend must be one of {QUERY_ROW_BACKENDS}, got {backend!r}"
        )
    if backend != "auto":
        return backend
    if q.is_cuda and q.dtype in _KERNEL_DTYPES and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "reference"


def query_row_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: int,
    block_size: int,
    groups: int,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Exact attention mass per key block of the last ``rows`` query-block rows.

    Args:
        q: (B, Hq, T, D) queries at the END of the keys (positions S - T .. S - 1); a prefill
            has T = S, a query chunk T < S.
        k: (B, Hkv, S, D) keys; Hq must be a multiple of Hkv.
        rows: trailing query-block rows to score, 1 <= rows <= ceil(S / block_size). Rows
            whose queries lie partly before the chunk are scored from the queries it has; a
            row with none of its queries in the chunk scores zero everywhere.
        block_size: tokens per block.
        groups: mask groups (1, Hkv or Hq): heads are averaged within consecutive groups.
        scale: softmax scale (default 1 / sqrt(D)).
        backend: ``"reference"`` (the PyTorch definition below, any device), ``"triton"``
            (`sketchwalk.selection.triton_query_rows`: no (rows x block_size, S) tensor; CUDA,
            or the CPU interpreter under ``TRITON_INTERPRET=1``) or ``"auto"`` (Triton on CUDA
            where it can run, else the reference; `query_row_backend` says which).

    Returns:
        float32 (B, groups, rows, nb), nb = ceil(S / block_size): for row r (query block
        nb - rows + r), entry j is the mean over the row's queries and the group's heads of the
        probability mass the query puts on key block j (zero for future blocks; each query's
        masses sum to 1 over the causal blocks).
    """
    check_qk(q, k, "query_row_scores")
    b, hq, t = q.shape[:3]
    s = k.shape[2]
    if hq % groups:
        raise ValueError(
            f"query_row_scores: {hq} query heads do not split into {groups} mask groups"
        )
    if t > s:
        raise ValueError(f"query_row_scores: more queries ({t}) than keys ({s})")
    nb = num_blocks(s, block_size)
    if not 1 <= rows <= nb:
        raise ValueError(f"query_row_scores: rows must be in [1, {nb}], got {rows}")
    chosen = query_row_backend(q, backend)
    if chosen == "triton":
        if importlib.util.find_spec("triton") is None:
            raise RuntimeError("query_row_scores: backend 'triton' needs the triton package")
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"query_row_scores: backend 'triton' needs CUDA tensors, got {q.device} (or "
                "TRITON_INTERPRET=1 set before triton is imported, for the CPU interpreter)"
            )
        from sketchwalk.selection.triton_query_rows import query_row_mass_triton

        per_head = query_row_mass_triton(q, k, rows, block_size, scale)
    else:
        per_head = _query_row_mass_reference(q, k, rows, block_size, scale)
    return per_head.view(b, groups, hq // groups, rows, nb).mean(dim=2)


def _query_row_mass_reference(
    q: torch.Tensor, k: torch.Tensor, rows: int, block_size: int, scale: float | None
) -> torch.Tensor:
    """`query_row_scores` per query head, (B, Hq, rows, nb) float32, in PyTorch: the scored
    rows' queries present in q, one KV head and its query heads at a time: logits against all
    S keys in q's dtype, in float32 scaled and masked to the causal keys, softmax, summed per
    key block, accumulated into the query's row and divided by the row's query count."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    nb = num_blocks(s, block_size)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    first = (nb - rows) * block_size  # first key position of the scored rows
    start = max(first, s - t)  # first query position the chunk holds among them
    queries = q[:, :, start - (s - t) :]  # (B, Hq, n, D)
    n = queries.shape[2]
    out = torch.zeros(b, hq, rows, nb, dtype=torch.float32, device=q.device)
    if n == 0:
        return out
    positions = torch.arange(start, s, device=q.device)
    future = torch.arange(s, device=q.device)[None, :] > positions[:, None]  # (n, S)
    row_of = positions // block_size - (nb - rows)  # (n,) in [0, rows)
    counts = torch.zeros(rows, dtype=torch.float32, device=q.device)
    counts.index_add_(0, row_of, torch.ones(n, dtype=torch.float32, device=q.device))
    pad = nb * block_size - s
    g = hq // hkv
    for j in range(hkv):  # one KV head and its g query heads at a time: (B, g, n, S) floats
        qh = queries[:, j * g : (j + 1) * g]
        logits = torch.matmul(qh, k[:, j, None].transpose(-1, -2)).float() * scale
        logits.masked_fill_(future, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        del logits
        if pad:
            probs = torch.nn.functional.pad(probs, (0, pad))
        per_block = probs.view(b, g, n, nb, block_size).sum(dim=-1)  # (B, g, n, nb)
        del probs
        out[:, j * g : (j + 1) * g].index_add_(2, row_of, per_block)
    out /= counts.clamp_min(1.0)[:, None]
    return out
