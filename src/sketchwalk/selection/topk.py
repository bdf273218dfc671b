"""Top-k of each row as a compacted index list (the decode selection's last step).

`top_k_compact` keeps, per row of ``scores`` (..., n), the ``k`` highest entries (ties broken by
the lower index) and writes their indices in ascending order to the front of an int32 row, with
the count beside it: the ``(kv_num_blocks, kv_indices)`` form the sparse kernels read. ``k``
lives on the device, so a CUDA graph can replay the step with a budget that changes as the cache
grows, and no sort is needed: the sorted ``torch.topk`` over the whole row that a static shape
would otherwise need (the first ``k`` entries must be the best when ``k`` varies) is the slowest
part of the decode selection. On CUDA it is one Triton launch
(`sketchwalk.selection.triton_topk`); `top_k_compact_reference` (a stable descending sort) is the
definition and runs elsewhere.
"""

from __future__ import annotations

import torch


def top_k_compact_reference(
    scores: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch definition of `top_k_compact` (a stable sort: among equal scores the lower index
    comes first)."""
    shape = scores.shape
    rows = scores.reshape(-1, shape[-1])
    n = rows.shape[1]
    ks = k.reshape(-1).to(torch.int64).clamp(0, n).expand(rows.shape[0])
    order = torch.sort(rows, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(n, device=rows.device).expand_as(order)
    )
    keep = rank < ks[:, None]
    # kept indices first, ascending: sort by (not kept, index)
    key = (~keep).to(torch.int64) * n + torch.arange(n, device=rows.device)
    idx = key.sort(dim=-1).values % n
    return idx.to(torch.int32).view(shape), ks.to(torch.int32).view(shape[:-1])


def top_k_compact(
    scores: torch.Tensor, k: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the indices of the ``k`` highest scores, ascending, at the front of the row.

    Args:
        scores: float32 (..., n); +inf entries (forced) are kept first, -inf (excluded) last.
        k: integer tensor on the scores' device, one per row (``scores.shape[:-1]`` elements)
            or one for all (one element); clamped to [0, n].
        backend: ``"triton"``, ``"reference"`` or ``"auto"`` (Triton on CUDA).

    Returns:
        (indices int32 (..., n): the first ``count`` entries of a row are its kept indices in
        ascending order, the rest unspecified; count int32 (...)). No host sync.
    """
    if scores.dtype != torch.float32:
        raise TypeError(f"top_k_compact: scores must be float32, got {scores.dtype}")
    if k.is_floating_point() or k.device != scores.device:
        raise ValueError("top_k_compact: k must be an integer tensor on the scores' device")
    rows = scores.numel() // max(1, scores.shape[-1])
    if k.numel() not in (1, rows):
        raise ValueError(
            f"top_k_compact: k has {k.numel()} elements; expected 1 or one per row ({rows})"
        )
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"top_k_compact: unknown backend {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and scores.is_cuda)
    if not use_triton or scores.numel() == 0:
        return top_k_compact_reference(scores, k)
    from sketchwalk.selection.triton_topk import launch_top_k_compact

    shape = scores.shape
    flat = scores.reshape(-1, shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    idx, num = launch_top_k_compact(flat, k.reshape(-1))
    return idx.view(shape), num.view(shape[:-1])


__all__ = ["top_k_compact", "top_k_compact_reference"]
