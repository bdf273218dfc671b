"""The SeerAttention side of `compare`: the learned gate's selection stored in a tensor file
(``seerattention-gate``), or the seed's stand-in, a threshold on the TRUE block attention
(``oracle-threshold``, not a learned gate). Both use SeerAttention's selection rule
(`sketchwalk.gate.model.select_blocks_from_scores`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from sketchwalk.blocks import causal_block_mask, num_blocks
from sketchwalk.gate.model import select_blocks_from_scores

ORACLE_THRESHOLD = "oracle-threshold"
SEERATTENTION_GATE = "seerattention-gate"
DEFAULT_SEERATTN_THRESHOLD = 0.1


class CompareInputError(ValueError):
    """An input the comparison cannot use; the message names the file and the problem."""


@dataclasses.dataclass
class SeerSide:
    """The SeerAttention side of one file.

    Attributes:
        method: ``"seerattention-gate"`` or ``"oracle-threshold"``.
        rule: how the mask was made, in words (recorded in every result).
        mask: bool (B, Hq, nb, nb), causal.
        scores: float32 (B, Hq, nb, nb) score map the mask was selected from.
    """

    method: str
    rule: str
    mask: torch.Tensor
    scores: torch.Tensor


# ---- the SeerAttention side ----------------------------------------------------------------


def _select_seerattn(
    scores: torch.Tensor,
    threshold: float | None,
    nz_ratio: float | None,
    dense_last_rows: int,
    keep_diagonal: bool,
) -> torch.Tensor:
    """SeerAttention's selection rule on a (B, H, nb, nb) score map: threshold or nz_ratio top-k
    per row (:func:`sketchwalk.gate.model.select_blocks_from_scores`), then the last
    ``dense_last_rows`` rows dense, optionally the diagonal, lower-triangular."""
    mask = select_blocks_from_scores(scores, threshold, nz_ratio, last_block_dense=False)
    nb = scores.shape[-1]
    if dense_last_rows > 0:
        mask[..., max(0, nb - dense_last_rows) :, :] = True
    if keep_diagonal:
        mask |= torch.eye(nb, dtype=torch.bool, device=mask.device)
    return mask & causal_block_mask(nb, mask.device)


def _rule_text(threshold: float | None, nz_ratio: float | None, dense_last_rows: int) -> str:
    pick = f"score > {threshold:g}" if nz_ratio is None else f"nz_ratio={nz_ratio:g} top-k per row"
    return f"{pick}, last {dense_last_rows} rows dense"


def oracle_threshold_side(
    block_attention: torch.Tensor,
    threshold: float | None = DEFAULT_SEERATTN_THRESHOLD,
    nz_ratio: float | None = None,
    dense_last_rows: int = 2,
) -> SeerSide:
    """The seed's stand-in for SeerAttention: a threshold on the TRUE block attention.

    Args:
        block_attention: float32 (B, Hq, nb, nb) from ``true_block_attention(..., reduce="sum")``.
        threshold: keep tiles whose mass exceeds it (ignored when ``nz_ratio`` is given).
        nz_ratio: SeerAttention's top-k per row instead of a threshold.
        dense_last_rows: trailing query-block rows kept dense.

    Returns:
        `SeerSide` named ``oracle-threshold``; the diagonal is always kept.
    """
    if nz_ratio is not None:
        threshold = None
    mask = _select_seerattn(block_attention, threshold, nz_ratio, dense_last_rows, True)
    rule = "true block attention " + _rule_text(threshold, nz_ratio, dense_last_rows)
    return SeerSide(ORACLE_THRESHOLD, rule + ", diagonal kept", mask, block_attention)


def _to_heads(t: torch.Tensor, hq: int, hkv: int, name: str, path: Path) -> torch.Tensor:
    g = t.shape[1]
    if g == hq:
        return t
    if g == 1:
        return t.expand(t.shape[0], hq, *t.shape[2:])
    if g == hkv:
        return t.repeat_interleave(hq // hkv, dim=1)
    raise CompareInputError(f"{path}: {name} has {g} heads; expected 1, {hkv} or {hq}")


def gate_side(
    record: dict[str, Any],
    path: Path,
    block_size: int,
    threshold: float | None = None,
    nz_ratio: float | None = None,
    dense_last_rows: int = 2,
    device: torch.device | str = "cpu",
) -> SeerSide:
    """The learned SeerAttention gate's selection stored in a tensor file.

    Args:
        record: a loaded tensor file carrying ``seerattn_scores`` (B, G, nb, nb) and possibly
            ``seerattn_mask``.
        path: the file (named in errors).
        block_size: the comparison's block size; it must be the gate's.
        threshold, nz_ratio: re-select from the scores (at most one); with neither, the stored
            mask is used (or, without one, the default threshold 0.1).
        dense_last_rows: trailing rows kept dense when re-selecting.
        device: where the returned tensors live.

    Returns:
        `SeerSide` named ``seerattention-gate`` with per-head (B, Hq, nb, nb) tensors.
    """
    q, k = record["Q"], record["K"]
    hq, hkv, t = q.shape[1], k.shape[1], q.shape[2]
    nb = num_blocks(t, block_size)
    scores = record["seerattn_scores"]
    if tuple(scores.shape[-2:]) != (nb, nb):
        raise CompareInputError(
            f"{path}: seerattn_scores has {scores.shape[-2]}x{scores.shape[-1]} blocks but "
            f"--block_size {block_size} gives {nb}x{nb} for seq_len {t}; use the gate's block "
            "size"
        )
    scores = _to_heads(scores.to(device, torch.float32), hq, hkv, "seerattn_scores", path)
    stored = record.get("seerattn_mask")
    if threshold is None and nz_ratio is None and stored is not None:
        if tuple(stored.shape) != tuple(record["seerattn_scores"].shape):
            raise CompareInputError(
                f"{path}: seerattn_mask {tuple(stored.shape)} and seerattn_scores "
                f"{tuple(record['seerattn_scores'].shape)} differ in shape"
            )
        mask = _to_heads(stored.to(device).bool(), hq, hkv, "seerattn_mask", path)
        mask = mask & causal_block_mask(nb, mask.device)
        rule = "stored seerattn_mask (the checkpoint's own threshold or nz_ratio)"
        return SeerSide(SEERATTENTION_GATE, rule, mask.contiguous(), scores.contiguous())
    if threshold is None and nz_ratio is None:
        threshold = DEFAULT_SEERATTN_THRESHOLD
    mask = _select_seerattn(scores, threshold, nz_ratio, dense_last_rows, False)
    rule = "gate scores " + _rule_text(threshold, nz_ratio, dense_last_rows)
    return SeerSide(SEERATTENTION_GATE, rule, mask, scores.contiguous())


__all__ = [
    "DEFAULT_SEERATTN_THRESHOLD",
    "ORACLE_THRESHOLD",
    "SEERATTENTION_GATE",
    "CompareInputError",
    "SeerSide",
    "gate_side",
    "oracle_threshold_side",
]
