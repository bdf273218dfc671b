"""What every layer of sketchwalk shares: block counts, the causal block mask, the
`BlockSelection` a selector hands to an attention kernel, the q/k/v input checks, and the two
kinds of user error every command raises (`UsageError`: a flag value, exit code 2; `DataError`:
an input file or request, exit code 1; `sketchwalk.cli.main` turns them into one stderr line).

Imports nothing from the rest of the package (only the configuration may sit beside it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EXIT_DATA = 1
EXIT_USAGE = 2


class SketchwalkError(Exception):
    """Base of the errors a user can fix; ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_DATA


class UsageError(SketchwalkError, ValueError):
    """A flag value or combination that cannot work (exit 2); the message names the flag."""

    exit_code = EXIT_USAGE


class DataError(SketchwalkError, ValueError):
    """An input file or request that cannot be used (exit 1); the message names the file."""

    exit_code = EXIT_DATA


def num_blocks(seq_len: int, block_size: int) -> int:
    """Number of blocks covering ``seq_len`` tokens (the last one may be partial)."""
    return -(-seq_len // block_size)


@dataclass
class BlockSelection:
    """A causal block mask plus the index form kernels consume.

    Attributes:
        block_mask: bool (B, G, nq, nk); G = 1 (per layer), Hkv (per KV group) or Hq (per head).
            nq == nk for a prefill; nq < nk for a query chunk at the end of the keys (chunked
            prefill: the rows are the last nq of the nk key blocks, the first one possibly
            partial, `SketchWalk.select_chunk`).
        block_size: tokens per block.
        seq_len: the number of key tokens (= query tokens for a prefill).
        kv_num_blocks: int32 (B, G, nq), kept blocks per row.
        kv_indices: int32 (B, G, nq, nk), each row's kept key blocks ascending, then 0-padding.
        density_value: the density if already known (else computed on first access of
            ``density``: kept causal blocks / causal blocks, over all batch rows and groups).
        scores: optional float (B, G, nq, nk) walk matrix the selection ranked (diagnostics).
    """

    block_mask: torch.Tensor
    block_size: int
    seq_len: int
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    density_value: float | None = None
    scores: torch.Tensor | None = None

    @property
    def density(self) -> float:
        """Kept causal blocks / causal blocks, over all batch rows and groups (computed on first
        use: reading it waits for the device)."""
        if self.density_value is None:
            b, g, nq, nk = self.block_mask.shape
            total_causal = b * g * (nk * (nk + 1) // 2 - (nk - nq) * (nk - nq + 1) // 2)
            kept = int(self.kv_num_blocks.sum(dtype=torch.int64))
            self.density_value = kept / max(1, total_causal)
        return self.density_value

    @classmethod
    def from_mask(
        cls,
        block_mask: torch.Tensor,
        block_size: int,
        seq_len: int,
        scores: torch.Tensor | None = None,
    ) -> BlockSelection:
        """Build from a bool (B, G, nq, nk) mask; entries above the diagonal are dropped."""
        if block_mask.dim() != 4 or block_mask.dtype != torch.bool:
            raise ValueError(
                "block_mask must be a bool tensor (batch, groups, q_blocks, kv_blocks), got "
                f"{block_mask.dtype} of shape {tuple(block_mask.shape)}"
            )
        nb = num_blocks(seq_len, block_size)
        if block_mask.shape[-2:] != (nb, nb):
            raise ValueError(
                f"block_mask must have {nb}x{nb} blocks for seq_len={seq_len}, "
                f"block_size={block_size}; got {tuple(block_mask.shape[-2:])}"
            )
        mask = block_mask & causal_block_mask(nb, block_mask.device)
        kv_num_blocks, kv_indices = compact_mask(mask)
        return cls(mask, block_size, seq_len, kv_num_blocks, kv_indices, None, scores)

    @classmethod
    def full(
        cls,
        batch: int,
        groups: int,
        seq_len: int,
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> BlockSelection:
        """The full causal selection (dense attention)."""
        nb = num_blocks(seq_len, block_size)
        mask = causal_block_mask(nb, device).expand(batch, groups, nb, nb).contiguous()
        return cls.from_mask(mask, block_size, seq_len)

    @property
    def num_groups(self) -> int:
        return self.block_mask.shape[1]

    @property
    def num_blocks(self) -> int:
        return self.block_mask.shape[-1]

    def group_of_head(self, head: int, num_q_heads: int, num_kv_heads: int) -> int:
        """Mask group used by query head ``head``."""
        g = self.num_groups
        if g == 1:
            return 0
        if g == num_q_heads:
            return head
        if g == num_kv_heads:
            return head // (num_q_heads // num_kv_heads)
        raise ValueError(
            f"selection has {g} mask groups; expected 1, num_kv_heads={num_kv_heads} or "
            f"num_q_heads={num_q_heads}"
        )

    def head_mask(self, num_q_heads: int, num_kv_heads: int) -> torch.Tensor:
        """The block mask expanded to one mask per query head: bool (B, Hq, nq, nk) (a view
        where possible)."""
        g = self.num_groups
        b, _, nq, nk = self.block_mask.shape
        if g == num_q_heads:
            return self.block_mask
        if g == 1:
            return self.block_mask.expand(b, num_q_heads, nq, nk)
        if g == num_kv_heads:
            group = num_q_heads // num_kv_heads
            return (
                self.block_mask[:, :, None]
                .expand(b, g, group, nq, nk)
                .reshape(b, num_q_heads, nq, nk)
            )
        raise ValueError(
            f"selection has {g} mask groups; expected 1, num_kv_heads={num_kv_heads} or "
            f"num_q_heads={num_q_heads}"
        )

    def blocks_per_row(self) -> float:
        """Mean number of kept key blocks per query-block row."""
        return float(self.kv_num_blocks.float().mean().item())


def compact_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index form of a bool block mask (..., nk): (kv_num_blocks int32 (...), kv_indices int32
    (..., nk) with each row's kept blocks ascending, then 0-padding).

    Kept block j goes to slot (number of kept blocks before j); the others go to a scratch
    column nk that is dropped. No sort needed.
    """
    nk = mask.shape[-1]
    slot = mask.cumsum(dim=-1, dtype=torch.int32)
    kv_num_blocks = slot[..., -1].contiguous()
    slot = torch.where(mask, slot - 1, nk).long()
    cols = torch.arange(nk, device=mask.device, dtype=torch.int32).expand_as(mask)
    buf = torch.zeros(*mask.shape[:-1], nk + 1, dtype=torch.int32, device=mask.device)
    return kv_num_blocks, buf.scatter_(-1, slot, cols)[..., :nk]


def causal_block_mask(
    nb: int, device: torch.device | str = "cpu", num_key_blocks: int | None = None
) -> torch.Tensor:
    """bool (nb, nk), True where key block j may be attended by query block i: j <= i for a square
    mask (prefill), j <= i + nk - nb when ``num_key_blocks`` (nk) is larger (the query blocks are
    the last ``nb`` of ``nk``, as in decode or chunked prefill)."""
    nk = nb if num_key_blocks is None else num_key_blocks
    rows = torch.arange(nb, device=device)[:, None] + (nk - nb)
    return torch.arange(nk, device=device)[None, :] <= rows  # (bool .tril() is slow on some CPUs)


def check_qk(q: torch.Tensor, k: torch.Tensor, where: str = "SketchWalk.select") -> None:
    """Shared input checks for (B, Hq, T, D) queries and (B, Hkv, S, D) keys."""
    for name, x, heads in (("q", q, "num_heads"), ("k", k, "num_kv_heads")):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"{where}: {name} must be (batch, {heads}, seq, head_dim), got shape "
                f"{tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"{where}: {name} must be a float tensor, got {x.dtype}")
        if x.shape[2] == 0:
            raise ValueError(f"{where}: {name} has an empty sequence (seq = 0)")
    if q.device != k.device:
        raise ValueError(f"{where}: q is on {q.device} but k is on {k.device}")
    if q.dtype != k.dtype:
        raise ValueError(f"{where}: q is {q.dtype} but k is {k.dtype}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"{where}: batch of q ({q.shape[0]}) != batch of k ({k.shape[0]})")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{where}: head_dim of q ({q.shape[3]}) != head_dim of k ({k.shape[3]})")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"{where}: num_heads of q ({q.shape[1]}) must be a multiple of num_kv_heads of k "
            f"({k.shape[1]})"
        )


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, where: str) -> None:
    """`check_qk` plus v: k's shape, device and dtype; no more queries than keys."""
    check_qk(q, k, where)
    if not isinstance(v, torch.Tensor) or v.shape != k.shape:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{where}: v must have k's shape {tuple(k.shape)}, got {shape}")
    if v.device != k.device or v.dtype != k.dtype:
        raise ValueError(f"{where}: v is {v.dtype} on {v.device}, k is {k.dtype} on {k.device}")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"{where}: more queries ({q.shape[2]}) than keys ({k.shape[2]})")


def check_selection(
    selection: BlockSelection,
    q: torch.Tensor,
    k: torch.Tensor,
    where: str,
    finite: dict[str, torch.Tensor] | None = None,
) -> None:
    """The selection must cover q/k's sequence, have a mask group per layer, KV head or head, and
    an index form that describes its mask (`check_index_form`). ``finite`` tensors are checked
    for NaN/Inf in the same pass (`check_finite`), so on CUDA all of it costs one host sync."""
    if not isinstance(selection, BlockSelection):
        raise ValueError(
            f"{where}: selection must be a BlockSelection, got {type(selection).__name__}"
        )
    b, hq, t, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if s < t:
        raise ValueError(f"{where}: more queries ({t}) than keys ({s})")
    nk = num_blocks(s, selection.block_size)
    nq = nk - (s - t) // selection.block_size  # the query chunk's blocks, the first maybe partial
    got = tuple(selection.block_mask.shape)
    if selection.seq_len != s or got[0] != b or got[2:] != (nq, nk):
        raise ValueError(
            f"{where}: selection is for seq_len={selection.seq_len} with mask {got}; q/k need "
            f"seq_len={s} and a mask (batch={b}, groups, {nq}, {nk}) ({t} queries at the end "
            f"of {s} keys)"
        )
    if selection.num_groups not in (1, hkv, hq):
        raise ValueError(
            f"{where}: selection has {selection.num_groups} mask groups; expected 1, "
            f"num_kv_heads={hkv} or num_heads={hq}"
        )
    if selection.block_mask.device != q.device:
        raise ValueError(
            f"{where}: selection is on {selection.block_mask.device} but q is on {q.device}"
        )
    _check_index_shapes(selection, where)
    if _capturing(q):
        return  # no host sync while a CUDA graph is being captured
    ok = _index_form_ok(selection)
    finite_ok = _finite_sums(finite or {})
    if bool(ok & finite_ok):  # the one host sync
        return
    if not bool(ok):
        raise ValueError(_INCONSISTENT.format(where=where))
    _raise_non_finite(where, finite or {})


_INCONSISTENT = (
    "{where}: selection is inconsistent: its kv_num_blocks / kv_indices do not describe its "
    "causal block_mask (was the mask changed after construction? build a new one with "
    "BlockSelection.from_mask)"
)


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_index_shapes(selection: BlockSelection, where: str) -> None:
    mask, num, idx = selection.block_mask, selection.kv_num_blocks, selection.kv_indices
    if mask.dtype != torch.bool or mask.dim() != 4:
        raise ValueError(f"{where}: selection.block_mask must be a bool (B, G, nq, nk) tensor")
    if tuple(num.shape) != tuple(mask.shape[:3]) or tuple(idx.shape) != tuple(mask.shape):
        raise ValueError(
            f"{where}: selection index form kv_num_blocks {tuple(num.shape)} / kv_indices "
            f"{tuple(idx.shape)} does not match its mask {tuple(mask.shape)}"
        )
    if num.is_floating_point() or idx.is_floating_point() or num.dtype == torch.bool:
        raise ValueError(f"{where}: kv_num_blocks and kv_indices must be integer tensors")
    if num.device != mask.device or idx.device != mask.device:
        raise ValueError(f"{where}: selection tensors are on different devices")


def _index_form_ok(selection: BlockSelection) -> torch.Tensor:
    """0-d bool tensor: the index form equals the compacted causal mask, nothing above the
    diagonal (one pass over the (B, G, nq, nk) mask, no host sync)."""
    mask = selection.block_mask
    causal = causal_block_mask(mask.shape[-1], mask.device)[-mask.shape[-2] :]
    want_num, want_idx = compact_mask(mask & causal)
    ok = (selection.kv_num_blocks == want_num).all()
    ok &= (selection.kv_indices.to(want_idx.dtype) == want_idx).all()
    return ok & ~(mask & ~causal).any()


def check_index_form(selection: BlockSelection, where: str) -> None:
    """The index form (what kernels read) must describe the mask (what the reference reads): a
    selection mutated after construction would make the two silently disagree. Empty rows are
    allowed (they attend to nothing and give 0)."""
    _check_index_shapes(selection, where)
    if not _capturing(selection.block_mask) and not bool(_index_form_ok(selection)):
        raise ValueError(_INCONSISTENT.format(where=where))


def _finite_sums(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """0-d bool tensor: every tensor's float32 sum is finite (true when each tensor is finite,
    unless finite values overflow float32; `_raise_non_finite` then looks at the elements)."""
    if not tensors:
        return torch.tensor(True)
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors.values()])
    return torch.isfinite(sums).all()


def _raise_non_finite(where: str, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {name} contains NaN or Inf")


def check_finite(where: str, **tensors: torch.Tensor) -> None:
    """Raise ValueError naming the first tensor holding NaN or Inf.

    One float32 sum per tensor (no tensor-sized temporary) and one host sync on CUDA; only a
    non-finite sum triggers the exact element check. Skipped while a CUDA graph is being
    captured (no sync possible).
    """
    if not tensors or _capturing(next(iter(tensors.values()))):
        return
    if not bool(_finite_sums(tensors)):
        _raise_non_finite(where, tensors)


__all__ = [
    "EXIT_DATA",
    "EXIT_USAGE",
    "BlockSelection",
    "DataError",
    "SketchwalkError",
    "UsageError",
    "causal_block_mask",
    "check_finite",
    "check_index_form",
    "check_qk",
    "check_qkv",
    "check_selection",
    "compact_mask",
    "num_blocks",
]
