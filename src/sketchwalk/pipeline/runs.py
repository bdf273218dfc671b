"""What validate, compare and eval share about a run: the device and compute dtype, result
file names, the sequences of a tensor folder in layer order (and which are half-written
samples), the work limit (``--max_seq_len``), the checksums of the input files (checked against
what collect recorded; every record is keyed by them), resuming a killed run (``--resume``), and
per-file record headers."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from sketchwalk.blocks import DataError, UsageError
from sketchwalk.config import SketchWalkConfig, config_from_args
from sketchwalk.pipeline import distributed
from sketchwalk.pipeline.flags import check_output_dir, flag_error, int_at_least
from sketchwalk.pipeline.tensorio import (
    TensorFileError,
    group_tensor_files,
    load_tensor_file,
    parse_tensor_filename,
    recorded_sha256,
    tensor_file_sha256,
)

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
    """``--max_seq_len``, ``--resume`` and ``--no_verify``, shared by validate and compare."""
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
        "the rest is appended to the same file (a record made from other input files is "
        "computed again; other settings are refused)",
    )
    parser.add_argument(
        "--no_verify",
        action="store_true",
        help="use tensor files whose sha256 differs from the one collect recorded in its "
        "summary_seq*.json (files edited on purpose); by default such a file is refused",
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
    some of them was never finished and is skipped rather than mixed with complete ones. A file
    whose name disagrees with its metadata (another layer or sample: a renamed file, not an
    interrupted collect) makes a sample look incomplete too, so the sample's other files are
    read before it is skipped.

    Args:
        seq: a sequence of `iter_sequences`; meta: the metadata of its first file (read).

    Raises:
        TensorFileError: one of the sample's files is mislabelled (names it and both values) or
            unreadable, or ``sample_layers`` is not a list of layer indices.
    """
    listed = meta.get("sample_layers")
    if not isinstance(listed, list):
        return None
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in listed):
        raise TensorFileError(
            seq["paths"][0], f"metadata sample_layers must list layer indices, got {listed!r:.80}"
        )
    missing = sorted(set(listed) - set(seq["layers"]))
    if not missing:
        return None
    for path in seq["paths"][1:]:
        load_tensor_file(path)  # raises on a name that disagrees with the metadata
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


# ---- what each record is computed from ----------------------------------------------------


def tensor_digests(
    sequences: list[dict[str, Any]], folder: Path, verify: bool = True
) -> tuple[dict[str, str], dict[str, Any]]:
    """The SHA-256 of every tensor file of ``sequences``, checked against the digests collect
    recorded in the folder's summaries.

    Args:
        sequences: `iter_sequences` of ``folder``.
        verify: refuse a file whose digest differs from a recorded one (``--no_verify``: don't).

    Returns:
        ``({file name: hex digest}, checks)``; ``checks`` (for the run's summary):
        ``{"files": n, "verified": files whose digest matched a recorded one, "warnings": [str]}``,
        the warnings saying which files no collect summary lists (nothing can verify them:
        collected before checksums were recorded, by a killed collect, or by another tool) or
        that ``--no_verify`` skipped the check.

    Raises:
        DataError: a file changed since collect wrote it (names the file and the summary).
    """
    recorded, warnings = recorded_sha256(folder)
    digests: dict[str, str] = {}
    unlisted: list[str] = []
    for seq in sequences:
        for path in seq["paths"]:
            digest = digests[path.name] = tensor_file_sha256(path)
            listed = recorded.get(path.name)
            if not listed:
                unlisted.append(path.name)
                continue
            for want, summary in listed if verify else ():
                if digest != want:
                    raise DataError(
                        f"{path}: its sha256 {digest[:16]}... differs from {want[:16]}... that "
                        f"collect recorded in {summary} (the file changed after it was "
                        "collected); collect it again, or pass --no_verify to use it as it is"
                    )
    total = len(digests)
    if not verify:
        warnings.append(
            f"--no_verify: the {total} tensor files of {folder} are not checked against the "
            "sha256 collect recorded"
        )
    elif len(unlisted) == total:
        warnings.append(
            f"no sha256 recorded for the {total} tensor files of {folder} (no collect summary "
            "lists them: collected before checksums were recorded, by a killed collect or by "
            "another tool): nothing can be verified"
        )
    elif unlisted:
        warnings.append(
            f"{len(unlisted)} of {total} tensor files of {folder} have no sha256 recorded by "
            f"collect (e.g. {unlisted[0]}): they cannot be verified"
        )
    verified = 0 if not verify else total - len(unlisted)
    return digests, {"files": total, "verified": verified, "warnings": warnings}


def input_keys(sequences: list[dict[str, Any]], digests: dict[str, str]) -> dict[str, dict]:
    """What each file's record is computed from, by sample id (file stem).

    Returns:
        ``{sample_id: {"file_sha256": the file's digest, "inputs_sha256": SHA-256 over the
        (layer, file digest) pairs of its sequence up to and including the file}}``: the walk
        carries state from a sequence's earlier layers, so a record depends on their files too.
    """
    out: dict[str, dict] = {}
    for seq in sequences:
        chain = hashlib.sha256()
        for layer, path in zip(seq["layers"], seq["paths"], strict=True):
            digest = digests[path.name]
            chain.update(f"{layer}:{digest}\n".encode())
            out[path.stem] = {"file_sha256": digest, "inputs_sha256": chain.hexdigest()}
    return out


# ---- resuming a killed run ----------------------------------------------------------------

_STAMP = re.compile(r"^(?P<kind>\w+?)_results_(?P<ts>\d{8}_\d{6})\.json$")
_ABSENT = "<absent>"


def differences(there: Any, here: dict[str, Any], limit: int = 4) -> str:
    """The fields in which an earlier run's settings ``there`` differ from ``here``, in words."""
    if not isinstance(there, dict):
        return f"the earlier records hold {type(there).__name__}, not settings"
    keys = [
        k for k in sorted(set(there) | set(here)) if there.get(k, _ABSENT) != here.get(k, _ABSENT)
    ]
    words = [f"{k}: {there.get(k, _ABSENT)!r} there, {here.get(k, _ABSENT)!r} now" for k in keys]
    more = f" and {len(words) - limit} more" if len(words) > limit else ""
    return "; ".join(words[:limit]) + more


def _check_record(path: Path, index: int, rec: Any, required: dict[str, type]) -> None:
    if not isinstance(rec, dict):
        raise DataError(
            f"--resume: {path}: entry {index} is {type(rec).__name__}, not a record; move the "
            "file away"
        )
    for field, kind in {"sample_id": str, **required}.items():
        value = rec.get(field)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DataError(
                f"--resume: {path}: entry {index} field {field!r} is {value!r:.60} (expected "
                f"{kind.__name__}); move the file away"
            )


def resume_results(
    out_dir: Path,
    kind: str,
    resume: bool,
    config: SketchWalkConfig,
    settings: dict[str, Any] | None = None,
    keys: dict[str, dict] | None = None,
    required: dict[str, type] | None = None,
) -> tuple[str, dict[str, dict[str, Any]], Path | None, list[str]]:
    """Timestamp and reusable records of the run to continue.

    A record is reused only when it was computed from the same inputs (its ``inputs_sha256``
    equals the one in ``keys``); one made from other files, or written before records carried
    the key, is left out (computed again) and a note says so.

    Args:
        settings: the run's settings besides the config (flags that change the numbers), as
            every record's ``run_settings`` holds them.
        keys: `input_keys` of this run's tensor files.
        required: fields (and types) a reused record must have.

    Returns:
        ``(timestamp, {sample_id: record}, results_path or None, notes)``: a new timestamp and
        no records unless ``resume`` finds ``{kind}_results_*.json`` in ``out_dir``.

    Raises:
        DataError: the results file is unreadable or malformed (names the entry and field).
        UsageError: it was made with another configuration or settings (names the difference).
    """
    if not resume:
        return timestamp(), {}, None, []
    found = sorted(
        p for p in out_dir.glob(f"{kind}_results_*.json") if _STAMP.match(p.name) is not None
    )
    if not found:
        return timestamp(), {}, None, []
    path = found[-1]
    try:
        records = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"--resume: {path} is unreadable ({exc}); move it away") from None
    if not isinstance(records, list):
        raise DataError(f"--resume: {path} is not a list of {kind} records; move it away")
    for index, rec in enumerate(records):
        _check_record(path, index, rec, {})
    want = config.to_dict()
    settings = settings or {}
    for rec in records:
        if rec.get("config") != want:
            raise UsageError(
                f"--resume: {path} was made with another SketchWalk configuration "
                f"({differences(rec.get('config'), want)}); give the same flags, or drop "
                "--resume to start a new run"
            )
        if "run_settings" in rec and rec["run_settings"] != settings:
            raise UsageError(
                f"--resume: {path} was made with other settings "
                f"({differences(rec['run_settings'], settings)}); give the same flags, or drop "
                "--resume to start a new run"
            )
    keys = keys or {}
    finished: dict[str, dict[str, Any]] = {}
    changed: list[str] = []
    unkeyed = 0
    for index, rec in enumerate(records):
        key = keys.get(rec["sample_id"])
        if key is None:
            continue  # no such file now: the record is dropped
        if "inputs_sha256" not in rec:
            unkeyed += 1
        elif rec["inputs_sha256"] != key["inputs_sha256"]:
            changed.append(rec["sample_id"])
        else:
            _check_record(path, index, rec, required or {})
            finished[rec["sample_id"]] = rec
    notes = []
    if changed:
        notes.append(
            f"{len(changed)} records of {path} were computed from other input files than those "
            f"of this --tensor_dir (e.g. {changed[0]}: other content of the file or of an "
            "earlier layer of its sequence); computed again"
        )
    if unkeyed:
        notes.append(
            f"{unkeyed} records of {path} do not say which input files they were computed from "
            "(written before records carried inputs_sha256); computed again"
        )
    ts = _STAMP.match(path.name)["ts"]
    return ts, finished, path, notes


def open_run(
    args: argparse.Namespace,
    kind: str,
    tensor_dir: Path,
    sequences: list[dict[str, Any]],
    config: SketchWalkConfig,
    settings: dict[str, Any],
    required: dict[str, type],
    w: distributed.World,
    prune: Callable[[Path, dict[str, dict[str, Any]], list[str]], None] | None = None,
) -> dict[str, Any]:
    """Start a validate or compare run: rank 0 makes ``--output_dir`` (removing a killed run's
    temporary files), hashes and checks the input files (`tensor_digests`) and picks what
    ``--resume`` reuses (`resume_results`); every rank gets the outcome, and rank 0 prints the
    warnings and notes.

    Args:
        kind: ``"validation"`` or ``"comparison"`` (the results file's prefix).
        settings, required: as in `resume_results`.
        prune: called on rank 0 with ``(out_dir, finished, notes)`` to drop more records from
            ``finished`` (adding a note says why).

    Returns:
        ``{"out_dir", "timestamp", "finished", "keys" (`input_keys`), "input_checks"}``.
    """
    from sketchwalk.atomic import remove_stale_tmp

    def on_main() -> tuple[Any, ...]:
        out_dir = check_output_dir(args.output_dir)
        remove_stale_tmp(out_dir)
        digests, checks = tensor_digests(sequences, tensor_dir, not args.no_verify)
        keys = input_keys(sequences, digests)
        ts, finished, path, notes = resume_results(
            out_dir, kind, args.resume, config, settings, keys, required
        )
        if prune is not None:
            prune(out_dir, finished, notes)
        return out_dir, digests, checks, ts, finished, path, notes

    opened = distributed.on_main(on_main, w)
    out_dir, digests, checks, ts, finished, path, notes = distributed.broadcast(opened, w)
    if w.is_main:
        for why in checks["warnings"]:
            print(f"warning: {why}")
        if path is not None:
            print(f"resuming {path}: {len(finished)} files already done")
        for note in notes:
            print(f"note: {note}")
    return {
        "out_dir": out_dir,
        "timestamp": ts,
        "finished": finished,
        "keys": input_keys(sequences, digests),
        "input_checks": checks,
    }


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
