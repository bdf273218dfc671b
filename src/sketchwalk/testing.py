"""Seeded input factories shared by the test suite and the benchmarks."""

from __future__ import annotations

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


__all__ = ["make_qkv", "random_selection", "stderr_lines", "write_tensor_dir"]
