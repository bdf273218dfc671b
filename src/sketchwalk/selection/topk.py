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

import warnings

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


_VERIFIED: dict[str, bool] = {}


def kernel_verified(device: torch.device | str) -> bool:
    """Whether the Triton kernel gives the reference's result on ``device`` (checked once per
    device on a row set with ties, +inf and -inf entries, k from 0 to n; one host sync). If it
    fails to build or disagrees, ``backend="auto"`` uses the reference there, with a warning.
    Not checked (trusted) when first asked during CUDA graph capture."""
    key = str(torch.device(device))
    ok = _VERIFIED.get(key)
    if ok is not None:
        return ok
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return True
    from sketchwalk.selection.triton_topk import launch_top_k_compact

    g = torch.Generator().manual_seed(0)
    x = torch.randint(-4, 5, (4, 700), generator=g).float()
    x[:, 3] = float("inf")
    x[:, -5:] = float("-inf")
    k = torch.tensor([0, 37, 350, 700])
    want_idx, want_num = top_k_compact_reference(x, k)
    try:
        idx, num = launch_top_k_compact(x.to(device), k.to(device))
        idx, num = idx.cpu(), num.cpu()
        ok = torch.equal(num, want_num) and all(
            torch.equal(idx[r, : int(n)], want_idx[r, : int(n)]) for r, n in enumerate(want_num)
        )
        problem = "gives another result than the reference"
    except Exception as exc:  # a kernel that does not build here: the reference serves
        ok, problem = False, f"fails ({type(exc).__name__}: {exc})"
    if not ok:
        warnings.warn(
            f"top_k_compact: the Triton kernel {problem} on {key}; using the PyTorch "
            "reference (a sort) there",
            RuntimeWarning,
            stacklevel=2,
        )
    _VERIFIED[key] = ok
    return ok


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
    use_triton = backend == "triton" or (
        backend == "auto" and scores.is_cuda and kernel_verified(scores.device)
    )
    if not use_triton or scores.numel() == 0:
        return top_k_compact_reference(scores, k)
    from sketchwalk.selection.triton_topk import launch_top_k_compact

    shape = scores.shape
    flat = scores.reshape(-1, shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    idx, num = launch_top_k_compact(flat, k.reshape(-1))
    return idx.view(shape), num.view(shape[:-1])


__all__ = ["kernel_verified", "top_k_compact", "top_k_compact_reference"]
