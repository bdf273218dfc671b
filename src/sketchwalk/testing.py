"""Seeded input factories and the kernels' tolerance rule, shared by the test suite and the
benchmarks."""

from __future__ import annotations

import math
import re

import torch

from sketchwalk.blocks import BlockSelection, causal_block_mask, num_blocks


def make_qkv(
    batch: int,
    num_heads: int,
    num_kv_heads: int,
    seq_len: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    structured: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q (B, Hq, T, D), k and v (B, Hkv, T, D) from a seeded generator.

    ``structured`` adds what real attention has and i.i.d. noise lacks: a shared direction that
    makes early "sink" keys attractive, and slowly drifting content so nearby blocks score
    higher than far ones. Either way the inputs are finite and different on every seed.
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_heads, seq_len, head_dim, generator=gen)
    k = torch.randn(batch, num_kv_heads, seq_len, head_dim, generator=gen)
    v = torch.randn(batch, num_kv_heads, seq_len, head_dim, generator=gen)
    if structured:
        drift = torch.randn(batch, num_kv_heads, 1, head_dim, generator=gen)
        pos = torch.linspace(0, 6.28, seq_len)[None, None, :, None]
        content = torch.sin(pos + drift) * 1.5
        k = k + content
        group = num_heads // num_kv_heads
        q = q + content.repeat_interleave(group, dim=1)
        k[:, :, :4] += 3.0 * drift.sign()
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def random_selection(
    batch: int,
    groups: int,
    seq_len: int,
    block_size: int,
    density: float,
    seed: int = 0,
    device: torch.device | str = "cpu",
    keep_diagonal: bool = True,
) -> BlockSelection:
    """A random causal block selection keeping about ``density`` of the causal blocks."""
    gen = torch.Generator().manual_seed(seed)
    nb = num_blocks(seq_len, block_size)
    mask = torch.rand(batch, groups, nb, nb, generator=gen) < density
    if keep_diagonal:
        mask |= torch.eye(nb, dtype=torch.bool)
    mask &= causal_block_mask(nb)
    return BlockSelection.from_mask(mask.to(device), block_size, seq_len)


def mask_groups(granularity: str, num_q_heads: int, num_kv_heads: int) -> int:
    """Mask groups G of a granularity: 1 (``layer``), Hkv (``kv_group``) or Hq (``head``)."""
    return {"layer": 1, "kv_group": num_kv_heads, "head": num_q_heads}[granularity]


def masked_attention_low_precision(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """The attention a plain low-precision PyTorch program computes: scores and P @ V as matmuls
    in q's dtype, softmax in fp32; O(Tq * S) memory, small shapes only.

    Args:
        q: (B, Hq, Tq, D); k, v: (B, Hkv, S, D), Hq a multiple of Hkv.
        allowed: bool, broadcastable to (B, Hq, Tq, S): the keys each query may see. A row
            with none gives 0.
        scale: softmax scale, default 1 / sqrt(D).
    """
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ kk.transpose(-1, -2)).float() * scale
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return probs.to(q.dtype) @ vv


def assert_within_rule(
    out: torch.Tensor,
    reference: torch.Tensor,
    same_math: torch.Tensor,
    label: str = "",
    allowance: float = 0.0,
) -> None:
    """The tolerance rule for a low-precision kernel: its error against a high-precision
    reference is at most twice the error of a plain PyTorch program doing the same math at the
    kernel's precision, plus the reference's own rounding to the kernel's output dtype:

        max |out - reference| <= 2 * max |same_math - reference|
                                 + max |reference.to(out.dtype) - reference| + allowance

    ``allowance`` is for a documented, known precision loss the same-math program does not
    share (e.g. TF32 dot products). Prints the kernel's max and mean error, the same-math error,
    the rounding and the bound, then asserts (a non-finite output fails first).
    """
    assert out.shape == reference.shape, f"{label}: shape {out.shape} != {reference.shape}"
    assert torch.isfinite(out).all(), f"{label}: non-finite output (unwritten rows?)"
    ref = reference.double()
    err = (out.double() - ref).abs()
    same = (same_math.double() - ref).abs().max().item()
    rounding = (ref.to(out.dtype).double() - ref).abs().max().item()
    bound = 2 * same + rounding + allowance
    worst = err.max().item()
    print(
        f"{label}: kernel max {worst:.3e} mean {err.mean().item():.3e}; same-math max "
        f"{same:.3e}; rounding {rounding:.3e}; allowance {allowance:.3e}; bound {bound:.3e}"
    )
    assert worst <= bound, f"{label}: max error {worst:.3e} > bound {bound:.3e}"


def write_tensor_dir(
    directory,
    seq_len: int = 300,
    num_layers: int = 4,
    samples: int = 1,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    timestamp: str = "20260101_000000",
    layers: list[int] | None = None,
    seed: int = 0,
    format: str = "pt",
) -> list:
    """Write synthetic tensor files in the collect step's format (for tests and examples).

    Returns the list of paths written, in (sample, layer) order.
    """
    from pathlib import Path

    from sketchwalk.pipeline.tensorio import save_tensor_file, tensor_filename

    directory = Path(directory)
    paths = []
    for sample in range(samples):
        for layer in layers if layers is not None else range(num_layers):
            q, k, v = make_qkv(
                1, num_heads, num_kv_heads, seq_len, head_dim, seed=seed + 1000 * sample + layer
            )
            ids = torch.randint(
                0, 1000, (1, seq_len), generator=torch.Generator().manual_seed(seed + sample)
            )
            meta = {
                "layer_idx": layer,
                "seq_len": seq_len,
                "num_heads": num_heads,
                "num_kv_heads": num_kv_heads,
                "head_dim": head_dim,
                "hidden_size": num_heads * head_dim,
                "batch_size": 1,
                "timestamp": timestamp,
                "model_path": "synthetic",
            }
            path = directory / tensor_filename(seq_len, layer, sample, timestamp, format)
            save_tensor_file(path, {"Q": q, "K": k, "V": v, "input_ids": ids}, meta)
            paths.append(path)
    return paths


_PROGRESS_BAR = re.compile(r"^\s*[\w\- ]*:?\s*\d+%\|")


def stderr_lines(err: str) -> list[str]:
    """The lines of a command's stderr that are not tqdm progress-bar updates."""
    parts = re.split(r"[\r\n]", err)
    return [p for p in parts if p.strip() and not _PROGRESS_BAR.match(p)]


__all__ = [
    "assert_within_rule",
    "make_qkv",
    "mask_groups",
    "masked_attention_low_precision",
    "random_selection",
    "stderr_lines",
    "write_tensor_dir",
]
