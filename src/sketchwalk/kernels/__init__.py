"""Fast paths for block-sparse attention: Triton kernels and FlexAttention.

`get_backend(name, q)` resolves a backend name for a query tensor and returns
``(resolved_name, fn)`` with ``fn(q, k, v, selection, scale) -> (B, Hq, T, D)``:

- ``"triton"``: `sketchwalk.kernels.triton_prefill` (CUDA, or CPU under ``TRITON_INTERPRET=1``;
  bf16/fp16; head_dim 16..256, power of two; block size a multiple of 16).
- ``"flex"``: `sketchwalk.kernels.flex` (CUDA; FlexAttention from torch).
- ``"auto"``: the fastest available for a CUDA tensor, in the order measured by
  ``benchmarks/attention.py`` on an H100 (``AUTO_ORDER``), else ``"reference"`` (always on the
  CPU); the resolved name says which ran.

Explicit backends raise RuntimeError with the reason when they cannot run; they never fall back.
Triton and the kernel modules are imported only when a backend is resolved.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch

BACKENDS = ("triton", "flex", "auto")
# Fastest first; from benchmarks/results (the Triton kernel beat FlexAttention on every shape).
AUTO_ORDER = ("triton", "flex")
_LOW_PRECISION = (torch.bfloat16, torch.float16)

AttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, Any, "float | None"], torch.Tensor
]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_triton(q: torch.Tensor) -> None:
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("triton backend needs the triton package (pip install triton)")
    if not q.is_cuda and not _interpreting():
        raise RuntimeError(
            f"triton backend needs a CUDA tensor, got device {q.device} "
            "(or set TRITON_INTERPRET=1 before importing triton for the CPU "
            "interpreter)"
        )
    if q.dtype not in _LOW_PRECISION:
        raise RuntimeError(f"triton backend supports bfloat16/float16, got {q.dtype}")
    head_dim = q.shape[-1]
    if head_dim not in (16, 32, 64, 128, 256):
        raise RuntimeError(f"triton backend supports head_dim 16/32/64/128/256, got {head_dim}")


def _check_flex(q: torch.Tensor) -> None:
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        raise RuntimeError(
            f"flex backend needs torch.nn.attention.flex_attention "
            f"(torch {torch.__version__} lacks it)"
        )
    if not q.is_cuda:
        raise RuntimeError(f"flex backend needs a CUDA tensor, got device {q.device}")
    if q.dtype not in (*_LOW_PRECISION, torch.float32):
        raise RuntimeError(f"flex backend supports bf16/fp16/fp32, got {q.dtype}")
    head_dim = q.shape[-1]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise RuntimeError(f"flex backend needs a power-of-two head_dim >= 16, got {head_dim}")


def _triton_fn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: Any, scale: float | None
) -> torch.Tensor:
    from sketchwalk.kernels.triton_prefill import sparse_prefill

    return sparse_prefill(
        q, k, v, selection.kv_num_blocks, selection.kv_indices, selection.block_size, scale
    )


def _flex_fn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: Any, scale: float | None
) -> torch.Tensor:
    from sketchwalk.kernels.flex import flex_sparse_attention

    if k.shape[2] != q.shape[2]:
        raise RuntimeError(
            f"flex backend needs keys as long as queries, got T={q.shape[2]}, S={k.shape[2]}"
        )
    return flex_sparse_attention(
        q, k, v, selection.kv_num_blocks, selection.kv_indices, selection.block_size, scale
    )


def _reference_fn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection: Any, scale: float | None
) -> torch.Tensor:
    from sketchwalk.attention import sparse_attention

    return sparse_attention(q, k, v, selection, backend="reference", scale=scale)


_CHECKS: dict[str, tuple[Callable[[torch.Tensor], None], AttentionFn]] = {
    "triton": (_check_triton, _triton_fn),
    "flex": (_check_flex, _flex_fn),
}


def get_backend(name: str, q: torch.Tensor) -> tuple[str, AttentionFn]:
    """Resolve an attention backend for query ``q`` (B, Hq, T, D).

    Args:
        name: "triton", "flex" or "auto".
        q: the query tensor the backend will run on (device, dtype and head_dim decide).

    Returns:
        (resolved_name, fn) with fn(q, k, v, selection, scale) -> (B, Hq, T, D). For "auto"
        the resolved name is the backend chosen ("triton", "flex" or "reference").

    Raises:
        RuntimeError: an explicit backend cannot run here (the message says why).
        ValueError: unknown name.
    """
    if name in _CHECKS:
        check, fn = _CHECKS[name]
        check(q)
        return name, fn
    if name == "auto":
        for candidate in AUTO_ORDER:
            check, fn = _CHECKS[candidate]
            if not q.is_cuda:
                break  # the Triton interpreter is a test tool, not a fast path
            try:
                check(q)
            except RuntimeError:
                continue
            return candidate, fn
        return "reference", _reference_fn
    raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")


__all__ = ["AUTO_ORDER", "BACKENDS", "get_backend"]
