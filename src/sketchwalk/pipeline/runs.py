"""What validate, compare and eval share about a run: the device and compute dtype, result
file names, the sequences of a tensor folder in layer order, and per-file record headers."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from sketchwalk.config import SketchWalkConfig
from sketchwalk.pipeline.tensorio import group_tensor_files, parse_tensor_filename

# The seed CLI's defaults, shown in --help (the values come from the "seed" preset).
SEED_DEFAULTS = {
    "preset": "seed",
    **{
        name: getattr(SketchWalkConfig.preset("seed"), name)
        for name in ("block_size", "sketch_dim", "top_k_blocks", "sparsity_exponent")
    },
}


def timestamp() -> str:
    return datetime.now().strftime("%Y%m%d_%H%M%S")


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but CUDA is not available; use --device cpu")
    return dev


def compute_dtype(name: str, device: torch.device, stored: torch.dtype) -> torch.dtype:
    """``auto``: the stored dtype on GPU, float32 on CPU (CPU bf16 matmuls are slow)."""
    if name == "auto":
        return stored if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def iter_sequences(tensor_dir: Path) -> list[dict[str, Any]]:
    """The sequences of a tensor folder, each with its files in layer order, its missing layers
    (gaps between 0 and the highest layer collected) and a warning naming them (or None)."""
    groups = group_tensor_files(tensor_dir)
    out = []
    for (seq_len, sample, ts), paths in groups.items():
        layers = [parse_tensor_filename(p.name)["layer_idx"] for p in paths]
        missing = sorted(set(range(max(layers) + 1)) - set(layers))
        warning = None
        if missing:
            warning = (
                f"seq_len={seq_len} sample={sample} ts={ts}: missing layers {missing} "
                "(the walk restarts after each gap)"
            )
        out.append(
            {
                "seq_len": seq_len,
                "sample": sample,
                "timestamp": ts,
                "paths": paths,
                "layers": layers,
                "missing_layers": missing,
                "warning": warning,
            }
        )
    return out


def file_record_header(path: Path, meta: dict[str, Any], sample: int) -> dict[str, Any]:
    """The fields every per-file record starts with (the seed's identifiers)."""
    return {
        "sample_id": path.stem,
        "file": str(path),
        "layer_idx": int(meta["layer_idx"]),
        "seq_len": int(meta["seq_len"]),
        "sample": sample,
        "num_heads": int(meta["num_heads"]),
        "num_kv_heads": int(meta["num_kv_heads"]),
    }


def budget_target_density(config: SketchWalkConfig, nb: int) -> float | None:
    """The density the budget asks for before forced blocks are added: ``density``;
    ``kblocks_frac``; or ``top_k_blocks`` per row over the causal blocks of the rows. None for
    the ``mass`` budget, whose density depends on the scores."""
    if config.budget == "mass":
        return None
    if config.budget == "density":
        return float(config.density)
    if config.budget == "kblocks_frac":
        return float(config.kblocks_frac)
    causal = nb * (nb + 1) / 2
    return sum(min(i + 1, config.top_k_blocks) for i in range(nb)) / causal
