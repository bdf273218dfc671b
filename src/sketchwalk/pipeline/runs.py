"""What validate, compare and eval share about a run: the device and compute dtype, result
file names, the sequences of a tensor folder in layer order (and which are half-written
samples), the work limit (``--max_seq_len``), resuming a killed run (``--resume``), and per-file
record headers."""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from sketchwalk.blocks import DataError, UsageError
from sketchwalk.config import SketchWalkConfig, config_from_args
from sketchwalk.pipeline.flags import flag_error, int_at_least
from sketchwalk.pipeline.tensorio import group_tensor_files, parse_tensor_filename

# Longest sequence validate / compare accept unless --max_seq_len says otherwise: their exact
# dense attention (and the true block attention) is O(T^2) work per layer.
DEFAULT_MAX_SEQ_LEN = 32768

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
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available; use --device cpu")
    return dev


# The damped walk converges geometrically; more steps than this only burn time (each is an
# (nb x nb) matrix product per mask group and layer, run from Python).
MAX_WALK_DEGREE = 1000


def run_config(args: argparse.Namespace, default_preset: str = "seed") -> SketchWalkConfig:
    """`config_from_args` with a bad value reported as the flag's error (exit 2)."""
    try:
        config = config_from_args(args, default_preset=default_preset)
    except ValueError as exc:
        raise flag_error(exc) from None
    check_work(config)
    return config


def check_work(config: SketchWalkConfig) -> None:
    """Refuse settings whose selection work has no useful bound."""
    if config.walk and config.degree > MAX_WALK_DEGREE:
        raise UsageError(
            f"--degree {config.degree}: the walk would run {config.degree} matrix products per "
            f"layer (it converges within tens of steps); use at most {MAX_WALK_DEGREE}"
        )


def add_run_arguments(parser: argparse.ArgumentParser, results: str) -> None:
    """``--max_seq_len`` and ``--resume``, shared by validate and compare."""
    parser.add_argument(
        "--max_seq_len",
        type=int_at_least(1),
        default=DEFAULT_MAX_SEQ_LEN,
        help="refuse tensor files longer than this many tokens before any work (exact dense "
        "attention is O(T^2)); default: %(default)s",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help=f"continue the latest {results}_*.json in --output_dir: finished files are kept, "
        "the rest is appended to the same file",
    )


def dense_cost_text(batch: int, heads: int, seq_len: int, head_dim: int) -> str:
    """The work of one exact dense attention pass, in words (4 * B * H * T^2 * D flops)."""
    flops = 4.0 * batch * heads * seq_len * seq_len * head_dim
    return f"~{flops / 1e12:.3g} TFLOP per dense pass"


def check_seq_len(seq_len: int, max_seq_len: int, where: str, cost: str | None = None) -> None:
    """Refuse a sequence longer than ``--max_seq_len`` before any O(T^2) work."""
    if seq_len > max_seq_len:
        ratio = (seq_len / max_seq_len) ** 2
        extra = f"; {cost}" if cost else ""
        raise DataError(
            f"{where}: {seq_len} tokens exceed --max_seq_len {max_seq_len} (exact attention is "
            f"O(T^2): {ratio:.3g}x the work of {max_seq_len} tokens{extra}); pass --max_seq_len "
            f"{seq_len} to run it anyway"
        )


def compute_dtype(name: str, device: torch.device, stored: torch.dtype) -> torch.dtype:
    """``auto``: the stored dtype on GPU, float32 on CPU (CPU bf16 matmuls are slow)."""
    if name == "auto":
        return stored if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def tensor_folder(path: str | Path, flag: str = "--tensor_dir") -> Path:
    """A tensor folder given on the command line: it must exist and be a folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{flag} {path}: tensor folder not found")
    if not path.is_dir():
        raise DataError(f"{flag} {path}: not a folder (expected a folder of tensor files)")
    return path


def incomplete_sample(seq: dict[str, Any], meta: dict[str, Any]) -> str | None:
    """Why a sequence is a partial sample (collect killed while writing it), or None.

    Collect records every layer of a sample in each file's ``sample_layers``; a sequence lacking
    some of them was never finished and is skipped rather than mixed with complete ones."""
    listed = meta.get("sample_layers")
    if not isinstance(listed, list):
        return None
    missing = sorted(set(listed) - set(seq["layers"]))
    if not missing:
        return None
    return (
        f"seq_len={seq['seq_len']} sample={seq['sample']} ts={seq['timestamp']}: incomplete "
        f"sample (layers {missing} were never written: an interrupted collect?); skipped"
    )


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


# ---- resuming a killed run ----------------------------------------------------------------

_STAMP = re.compile(r"^(?P<kind>\w+?)_results_(?P<ts>\d{8}_\d{6})\.json$")


def resume_results(
    out_dir: Path, kind: str, resume: bool, config: SketchWalkConfig
) -> tuple[str, dict[str, dict[str, Any]], Path | None]:
    """Timestamp and finished records of the run to continue.

    Returns:
        ``(timestamp, {sample_id: record}, results_path or None)``: a new timestamp and no
        records unless ``resume`` finds ``{kind}_results_*.json`` in ``out_dir``.

    Raises:
        DataError: the results file is unreadable or was made with another configuration.
    """
    if not resume:
        return timestamp(), {}, None
    found = sorted(
        p for p in out_dir.glob(f"{kind}_results_*.json") if _STAMP.match(p.name) is not None
    )
    if not found:
        return timestamp(), {}, None
    path = found[-1]
    try:
        records = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"--resume: {path} is unreadable ({exc}); move it away") from None
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and isinstance(r.get("sample_id"), str) for r in records
    ):
        raise DataError(f"--resume: {path} is not a list of {kind} records; move it away")
    want = config.to_dict()
    for rec in records:
        if rec.get("config") != want:
            raise UsageError(
                f"--resume: {path} was made with another SketchWalk configuration; give the "
                "same flags, or drop --resume to start a new run"
            )
    ts = _STAMP.match(path.name)["ts"]
    return ts, {r["sample_id"]: r for r in records}, path


def tensor_sequences(tensor_dir: str | Path, max_seq_len: int) -> tuple[Path, list[dict[str, Any]]]:
    """The sequences of a ``--tensor_dir`` (`iter_sequences`), refused up front when the folder
    holds no tensor file or a sequence is longer than ``--max_seq_len`` (from the file names,
    before any work)."""
    folder = tensor_folder(tensor_dir)
    sequences = iter_sequences(folder)
    if not sequences:
        raise DataError(
            f"no tensor files (tensors_seq*_layer*_sample*_*.pt|.safetensors) in {folder}"
        )
    for seq in sequences:
        check_seq_len(seq["seq_len"], max_seq_len, str(seq["paths"][0]))
    return folder, sequences
