"""The one entry point for attention: input checks, then ONE dispatch for prefill and decode.

Backends, the same names everywhere (`sparse_attention`, `sparse_decode`, the transformers
integration, the CLI):

- ``"reference"``: plain PyTorch (`sketchwalk.attention.reference`), any device, fp32 math.
- ``"triton"``: the Triton kernels (`triton_prefill`, `triton_decode`): CUDA, or the CPU
  interpreter under ``TRITON_INTERPRET=1``; bf16/fp16; head_dim 16..256, a power of two.
- ``"flex"``: FlexAttention (`flex`; prefill only, CUDA).
- ``"auto"``: the fastest backend that can run on the query's device, in the order measured by
  ``benchmarks/attention.py`` (``AUTO_ORDER``), else ``"reference"``; `resolve_backend` says
  which it picks.

An explicit backend that cannot run raises RuntimeError with the reason; only ``"auto"`` falls
back. Kernel modules (and triton) are imported only when a kernel backend is resolved.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch

from sketchwalk.attention.reference import sparse_attention_reference, sparse_decode_reference
from sketchwalk.blocks import BlockSelection, check_qkv, check_selection

BACKENDS = ("reference", "triton", "flex", "auto")
MODES = ("prefill", "decode")
# Fastest first, per mode; from benchmarks/results (the Triton kernel beat FlexAttention on
# every shape).
AUTO_ORDER = {"prefill": ("triton", "flex"), "decode": ("triton",)}
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_triton(q: torch.Tensor) -> None:
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("triton backend needs the triton package (pip install triton)")
    if not q.is_cuda and not interpreting():
        raise RuntimeError(
            f"triton backend needs a CUDA tensor, got device {q.device} "
            "(or set TRITON_INTERPRET=1 before importing triton for the CPU interpreter)"
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


def _no_flex_decode(q: torch.Tensor) -> None:
    raise RuntimeError("flex backend has no decode kernel; use 'triton', 'reference' or 'auto'")


# ---- the kernels behind each (mode, backend): fn(q, k, v, kv_num_blocks, kv_indices,
# block_size, scale) -> (B, Hq, T, D) ------------------------------------------------------


def _prefill_triton(q, k, v, kv_num_blocks, kv_indices, block_size, scale):
    from sketchwalk.attention.triton_prefill import sparse_prefill

    return sparse_prefill(q, k, v, kv_num_blocks, kv_indices, block_size, scale)


def _prefill_flex(q, k, v, kv_num_blocks, kv_indices, block_size, scale):
    from sketchwalk.attention.flex import flex_sparse_attention

    return flex_sparse_attention(q, k, v, kv_num_blocks, kv_indices, block_size, scale)


def _decode_triton(q, k, v, kv_num_blocks, kv_indices, block_size, scale, key_start=None):
    from sketchwalk.attention.triton_decode import sparse_decode_triton

    return sparse_decode_triton(
        q, k, v, kv_num_blocks, kv_indices, block_size, scale, key_start=key_start
    )


def _decode_reference(q, k, v, kv_num_blocks, kv_indices, block_size, scale, key_start=None):
    return sparse_decode_reference(
        q, k, v, kv_num_blocks, kv_indices, block_size, scale, key_start=key_start
    )


KernelFn = Callable[..., torch.Tensor]
_KERNELS: dict[tuple[str, str], tuple[Callable[[torch.Tensor], None], KernelFn]] = {
    ("prefill", "triton"): (_check_triton, _prefill_triton),
    ("prefill", "flex"): (_check_flex, _prefill_flex),
    ("decode", "triton"): (_check_triton, _decode_triton),
    ("decode", "flex"): (_no_flex_decode, _decode_reference),
}


def resolve_backend(backend: str, q: torch.Tensor, mode: str = "prefill") -> str:
    """The backend `sparse_attention` (mode "prefill") or `sparse_decode` (mode "decode") would
    run for query ``q``: ``"auto"`` resolved, an explicit backend checked.

    Raises:
        ValueError: unknown backend or mode.
        RuntimeError: an explicit backend cannot run here (the message says why).
    """
    if mode not in MODES:
        raise ValueError(f"attention mode must be one of {MODES}, got {mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return backend
    if backend != "auto":
        _KERNELS[(mode, backend)][0](q)
        return backend
    if q.is_cuda:  # the Triton interpreter is a test tool, not a fast path
        for candidate in AUTO_ORDER[mode]:
            try:
                _KERNELS[(mode, candidate)][0](q)
            except RuntimeError:
                continue
            return candidate
    return "reference"


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    backend: str = "reference",
    scale: float | None = None,
) -> torch.Tensor:
    """Exact softmax attention restricted to the selected key blocks (prefill).

    Args:
        q: (B, Hq, T, D); k, v: (B, Hkv, S, D) with S >= T; Hq a multiple of Hkv. T < S is a
            query chunk at the end of the keys (query i at position S - T + i; chunked
            prefill), with a selection of the last nq of the nk key blocks
            (`SketchWalk.select_chunk`).
        selection: `BlockSelection` for these queries and keys (mask groups 1, Hkv or Hq).
        backend: ``"reference"``, ``"triton"``, ``"flex"`` or ``"auto"`` (module docstring).
            A query chunk (T < S) runs on ``"triton"`` or ``"reference"`` (``"flex"`` takes no
            query offset and raises RuntimeError).
        scale: softmax scale, default 1 / sqrt(D).

    Returns:
        (B, Hq, T, D) in q's dtype.
    """
    check_qkv(q, k, v, "sparse_attention")
    # shapes, the selection's consistency and NaN/Inf in q/k/v: one host sync on CUDA
    check_selection(selection, q, k, "sparse_attention", finite={"q": q, "k": k, "v": v})
    name = resolve_backend(backend, q, "prefill")
    if q.shape[2] < k.shape[2] and name == "flex":
        # A query chunk at the end of the keys (chunked prefill): the Triton kernel and the
        # reference take the query offset; the FlexAttention path does not.
        raise RuntimeError(
            f"sparse_attention: backend 'flex' has no query offset: a query chunk "
            f"({q.shape[2]} queries at the end of {k.shape[2]} keys) runs on backend "
            "'triton' or 'reference' (or 'auto', which chooses one)"
        )
    if name == "reference":
        return sparse_attention_reference(q, k, v, selection, scale)
    fn = _KERNELS[("prefill", name)][1]
    with on_device(q):
        return fn(
            q, k, v, selection.kv_num_blocks, selection.kv_indices, selection.block_size, scale
        )


def _normalise_selection(
    kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if kv_num_blocks.dim() == 3 and kv_indices.dim() == 4:
        if kv_num_blocks.shape[2] != 1 or kv_indices.shape[2] != 1:
            raise ValueError(
                "decode selection in BlockSelection layout must have one query-block "
                f"row, got kv_num_blocks {tuple(kv_num_blocks.shape)}"
            )
        kv_num_blocks, kv_indices = kv_num_blocks[:, :, 0], kv_indices[:, :, 0]
    if kv_num_blocks.dim() != 2 or kv_indices.dim() != 3:
        raise ValueError(
            "kv_num_blocks must be (batch, groups) and kv_indices "
            f"(batch, groups, nk), got {tuple(kv_num_blocks.shape)} and "
            f"{tuple(kv_indices.shape)}"
        )
    if kv_num_blocks.shape[0] != batch or kv_indices.shape[:2] != kv_num_blocks.shape:
        raise ValueError(
            f"selection batch/groups {tuple(kv_indices.shape[:2])} do not match "
            f"kv_num_blocks {tuple(kv_num_blocks.shape)} and batch {batch}"
        )
    if kv_num_blocks.dtype.is_floating_point or kv_indices.dtype.is_floating_point:
        raise ValueError("kv_num_blocks and kv_indices must be integer tensors")
    return kv_num_blocks, kv_indices


def sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block_size: int,
    backend: str = "reference",
    scale: float | None = None,
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the last ``Tq`` positions over the kept blocks of a KV cache.

    Args:
        q: (B, Hq, Tq, D), query ``i`` at cache position ``S - Tq + i``.
        k_cache, v_cache: (B, Hkv, S, D), Hq % Hkv == 0, S >= Tq.
        kv_num_blocks: int32 (B, G) (or (B, G, 1)), G in {1, Hkv, Hq}.
        kv_indices: int32 (B, G, nk) (or (B, G, 1, nk)), sorted ascending, padded with 0.
        block_size: tokens per key block.
        backend: ``"reference"``, ``"triton"`` or ``"auto"`` (module docstring).
        scale: softmax scale, default 1 / sqrt(D).
        key_start: int (B,), the cache position where row b's block 0 begins: a left-padded
            batch gives each row its own block grid from its first real key (block j holds
            positions ``key_start[b] + j * block_size ..``; positions before it are never
            read), so one call decodes rows of different prompt lengths as each would alone.
            Its values are checked when it is on the CPU (a device tensor is taken as it is:
            checking it would wait for the device). None: 0 for every row.

    Returns:
        (B, Hq, Tq, D) in q's dtype.
    """
    if q.dim() != 4:
        raise ValueError(f"query must be (batch, heads, queries, head_dim), got {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be (batch, kv_heads, seq, head_dim), got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    batch, num_q_heads, num_queries, head_dim = q.shape
    if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} does not match query {tuple(q.shape)}")
    num_kv_heads, cache_len = k_cache.shape[1], k_cache.shape[2]
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"query heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})"
        )
    if not 1 <= num_queries <= cache_len:
        raise ValueError(f"need 1 <= Tq <= S, got Tq={num_queries}, S={cache_len}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    kv_num_blocks, kv_indices = _normalise_selection(kv_num_blocks, kv_indices, batch)
    if kv_num_blocks.shape[1] not in (1, num_kv_heads, num_q_heads):
        raise ValueError(
            f"selection has {kv_num_blocks.shape[1]} groups; expected 1, "
            f"{num_kv_heads} or {num_q_heads}"
        )
    if key_start is not None:
        if (
            not isinstance(key_start, torch.Tensor) or key_start.shape != (batch,)
            or key_start.dtype.is_floating_point or key_start.dtype == torch.bool
        ):  # fmt: skip
            raise ValueError(
                f"key_start must be an int tensor of shape ({batch},), got "
                f"{getattr(key_start, 'dtype', type(key_start))} "
                f"{tuple(getattr(key_start, 'shape', ()))}"
            )
        if key_start.device.type == "cpu":  # checked where it costs no device sync
            low, high = int(key_start.min()), int(key_start.max())
            if low < 0 or high > cache_len - num_queries:
                raise ValueError(
                    f"key_start must lie in [0, S - Tq] = [0, {cache_len - num_queries}], got "
                    f"[{low}, {high}]"
                )
            key_start = key_start.to(q.device)
    name = resolve_backend(backend, q, "decode")
    fn = _decode_reference if name == "reference" else _KERNELS[("decode", name)][1]
    with on_device(q):
        return fn(q, k_cache, v_cache, kv_num_blocks, kv_indices, block_size, scale, key_start)


def on_device(x: torch.Tensor) -> Any:
    """Make ``x``'s GPU the current device (a no-op context on the CPU). Triton launches on the
    CURRENT device, not on the device of its arguments: a layer on cuda:1 (a model split over
    GPUs) launched while cuda:0 is current would read another GPU's addresses."""
    if x.is_cuda and x.device.index is not None and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "MODES",
    "interpreting",
    "resolve_backend",
    "sparse_attention",
    "sparse_decode",
]
