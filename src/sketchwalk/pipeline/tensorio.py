"""Tensor files of step 1: one file per (sequence length, layer, sample).

A file holds ``{'Q', 'K', 'V', 'input_ids', 'metadata'}`` plus optional extra tensors
(``'Q_pre'``, ``'K_pre'``, ``'seerattn_scores'``, ``'seerattn_mask'``):

- ``Q``: post-RoPE queries ``(B, Hq, T, D)``; ``K``, ``V``: ``(B, Hkv, T, D)``; ``Hq % Hkv == 0``.
- ``input_ids``: int64 ``(B, T)``, the token ids of the passage.
- ``metadata``: a dict of plain values (str, int, float, bool, None, lists and dicts of these).

Two formats: ``.pt`` (a plain dict readable with ``torch.load(path, weights_only=True)``) and
``.safetensors`` (metadata stored as one JSON string under the key ``"sketchwalk_metadata"``).
Writes are atomic (temporary file in the same folder, then a rename) and never overwrite an
existing file unless asked to. ``collect`` records the SHA-256 of every file it writes in its
``summary_seq{L}_{timestamp}.json`` (``samples[j].file_sha256``); `recorded_sha256` reads those
back so that a reader can refuse a file changed since.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from sketchwalk.atomic import atomic_write, file_sha256

__all__ = [
    "METADATA_KEY",
    "REQUIRED_METADATA",
    "TensorFileError",
    "group_tensor_files",
    "load_tensor_file",
    "parse_tensor_filename",
    "recorded_sha256",
    "save_tensor_file",
    "tensor_file_sha256",
    "tensor_filename",
    "validate_tensor_record",
]

FORMATS = ("pt", "safetensors")
METADATA_KEY = "sketchwalk_metadata"
REQUIRED_TENSORS = ("Q", "K", "V", "input_ids")
# The seed's metadata keys; every file must carry them.
REQUIRED_METADATA = (
    "layer_idx",
    "seq_len",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "hidden_size",
    "batch_size",
    "timestamp",
    "model_path",
)
SUMMARY_GLOB = "summary_seq*_*.json"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_FILENAME_RE = re.compile(
    r"^tensors_seq(?P<seq_len>\d+)_layer(?P<layer_idx>\d+)_sample(?P<sample>\d+)"
    r"_(?P<timestamp>\d{8}_\d{6}(?:_\w+)?)\.(?P<format>pt|safetensors)$"
)


class TensorFileError(ValueError):
    """A tensor file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def tensor_filename(
    seq_len: int, layer_idx: int, sample: int, timestamp: str, format: str = "pt"
) -> str:
    """The seed's name: ``tensors_seq{L}_layer{i}_sample{j}_{timestamp}.{pt|safetensors}``."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    return f"tensors_seq{seq_len}_layer{layer_idx}_sample{sample}_{timestamp}.{format}"


def parse_tensor_filename(name: str | os.PathLike) -> dict[str, Any]:
    """Parse a tensor file name.

    Returns:
        ``dict(seq_len=int, layer_idx=int, sample=int, timestamp=str, format=str)``.

    Raises:
        ValueError: the name does not follow ``tensors_seq{L}_layer{i}_sample{j}_{timestamp}``.
    """
    base = Path(name).name
    match = _FILENAME_RE.match(base)
    if match is None:
        raise ValueError(
            f"not a tensor file name: {base!r} "
            "(expected tensors_seq{L}_layer{i}_sample{j}_{YYYYmmdd_HHMMSS}.pt|.safetensors)"
        )
    return {
        "seq_len": int(match["seq_len"]),
        "layer_idx": int(match["layer_idx"]),
        "sample": int(match["sample"]),
        "timestamp": match["timestamp"],
        "format": match["format"],
    }


def group_tensor_files(directory: str | os.PathLike) -> dict[tuple[int, int, str], list[Path]]:
    """Group the tensor files of a folder by ``(seq_len, sample, timestamp)``.

    Returns:
        An insertion-ordered dict sorted by key; each value lists the files of that group in
        increasing layer order. Files whose names do not parse are ignored.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tensor folder not found: {directory}")
    groups: dict[tuple[int, int, str], list[tuple[int, Path]]] = {}
    for path in directory.iterdir():
        try:
            info = parse_tensor_filename(path.name)
        except ValueError:
            continue
        key = (info["seq_len"], info["sample"], info["timestamp"])
        groups.setdefault(key, []).append((info["layer_idx"], path))
    return {key: [p for _, p in sorted(groups[key])] for key in sorted(groups)}


def tensor_file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a tensor file's bytes.

    Raises:
        TensorFileError: the path is a folder, missing or unreadable.
    """
    path = Path(path)
    if path.is_dir():
        raise TensorFileError(path, "is a folder, expected a tensor file")
    try:
        return file_sha256(path)
    except OSError as exc:
        raise TensorFileError(path, f"cannot read it ({exc.strerror or exc})") from None


def recorded_sha256(
    directory: str | os.PathLike,
) -> tuple[dict[str, list[tuple[str, Path]]], list[str]]:
    """The SHA-256 that ``collect`` recorded for the tensor files of a folder.

    Every ``summary_seq*_*.json`` of the folder lists, per sample, ``file_sha256``: ``{file
    name: hex digest}`` (summaries written before checksums were recorded have none).

    Returns:
        ``({file name: [(hex digest, summary path), ...]}, notes)``; a summary that cannot be
        read or is not a collect summary gives a note and is skipped.

    Raises:
        TensorFileError: a summary whose ``file_sha256`` entry is malformed (names the summary
            and the field).
    """
    recorded: dict[str, list[tuple[str, Path]]] = {}
    notes: list[str] = []
    for summary in sorted(Path(directory).glob(SUMMARY_GLOB)):
        try:
            data = json.loads(summary.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            notes.append(f"{summary}: unreadable ({exc}); the files it lists are not verified")
            continue
        samples = data.get("samples") if isinstance(data, dict) else None
        if not isinstance(samples, list):
            notes.append(f"{summary}: not a collect summary (no 'samples' list); ignored")
            continue
        for j, sample in enumerate(samples):
            digests = sample.get("file_sha256") if isinstance(sample, dict) else None
            if digests is None:
                continue
            where = f"samples[{j}].file_sha256"
            if not isinstance(digests, dict):
                raise TensorFileError(
                    summary, f"{where} must map file names to sha256, got {type(digests).__name__}"
                )
            for name, digest in digests.items():
                if not isinstance(digest, str) or _SHA256_RE.match(digest) is None:
                    raise TensorFileError(
                        summary, f"{where}[{name!r}] is not a sha256 hex digest: {digest!r:.80}"
                    )
                recorded.setdefault(name, []).append((digest, summary))
    return recorded, notes


def _check_plain(value: Any, where: str) -> None:
    if value is None or isinstance(value, (str, int, float, bool)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"metadata key {where}.{key!r} must be a string")
            _check_plain(item, f"{where}.{key}")
        return
    raise TypeError(
        f"metadata value {where} has type {type(value).__name__}; only str, int, float, bool, "
        "None, lists and dicts of these are stored"
    )


def _plain(value: Any) -> Any:
    """Tuples become lists so that both formats give back the same metadata."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def save_tensor_file(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    format: str | None = None,
    overwrite: bool = False,
    validate: bool = True,
) -> Path:
    """Write one tensor file atomically.

    Args:
        path: destination; its suffix gives the format when ``format`` is None.
        tensors: at least ``'Q'`` (B, Hq, T, D), ``'K'``/``'V'`` (B, Hkv, T, D) and
            ``'input_ids'`` (B, T); extra tensors are stored too.
        metadata: plain values, including the seed's keys (:data:`REQUIRED_METADATA`).
        format: ``"pt"`` or ``"safetensors"``.
        overwrite: replace an existing file; otherwise an existing file raises.
        validate: check shapes and values before writing (the same checks as on load).

    Returns:
        The path written.

    Raises:
        FileExistsError: the file exists and ``overwrite`` is False.
        TensorFileError: the content would not pass validation.
    """
    path = Path(path)
    if format is None:
        format = path.suffix.lstrip(".") or "pt"
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if path.suffix != f".{format}":
        raise ValueError(f"{path}: suffix does not match format {format!r}")
    _check_plain(dict(metadata), "metadata")
    meta = _plain(dict(metadata))
    record: dict[str, Any] = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if "metadata" in record:
        raise ValueError("'metadata' is reserved; pass it through the metadata argument")
    if validate:
        validate_tensor_record({**record, "metadata": meta}, path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    record_with_meta = {**record, "metadata": meta}

    def write(tmp: Path) -> None:
        if format == "pt":
            torch.save(record_with_meta, tmp)
        else:
            from safetensors.torch import save_file

            save_file(record, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})

    atomic_write(path, write, overwrite=overwrite)
    return path


def load_tensor_file(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", validate: bool = True
) -> dict[str, Any]:
    """Read and validate one tensor file (``.pt`` or ``.safetensors``).

    Never unpickles arbitrary objects (``torch.load(..., weights_only=True)``).

    Returns:
        dict with ``'Q'`` (B, Hq, T, D), ``'K'``, ``'V'`` (B, Hkv, T, D), ``'input_ids'`` (B, T),
        ``'metadata'`` (dict) and any extra tensors stored.

    Raises:
        TensorFileError: unreadable (corrupt, truncated), missing keys or metadata, wrong ranks or
            shapes, ``Hq % Hkv != 0``, NaN/Inf values, or ``seq_len`` disagreeing with the tensors
            or the file name.
    """
    path = Path(path)
    if path.is_dir():
        raise TensorFileError(path, "is a folder, expected a tensor file")
    if not path.is_file():
        raise TensorFileError(path, "file not found")
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            record: dict[str, Any] = {}
            with safe_open(str(path), framework="pt", device=str(map_location)) as fh:
                raw_meta = (fh.metadata() or {}).get(METADATA_KEY)
                for key in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
                    record[key] = fh.get_tensor(key)
        except Exception as exc:  # safetensors raises several types
            raise TensorFileError(
                path, f"cannot read safetensors file (corrupt or truncated?): {exc}"
            ) from None
        if raw_meta is None:
            raise TensorFileError(path, f"no {METADATA_KEY!r} entry in the safetensors metadata")
        try:
            record["metadata"] = json.loads(raw_meta)
        except json.JSONDecodeError as exc:
            raise TensorFileError(path, f"metadata is not valid JSON: {exc}") from None
    else:
        record = load_weights_only(path, map_location, TensorFileError, ".pt file")
        if not isinstance(record, dict):
            raise TensorFileError(path, f"expected a dict, found {type(record).__name__}")
    if validate:
        validate_tensor_record(record, path)
    return record


def load_weights_only(
    path: str | os.PathLike,
    map_location: str | torch.device,
    error: Callable[[str | os.PathLike, str], Exception],
    what: str,
) -> Any:
    """``torch.load(weights_only=True)`` of an untrusted file: a pickle that would build other
    objects than tensors and plain containers (and could run code) is refused, like a corrupt or
    truncated file, with ``error(path, problem)``."""
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        blocked = next((line for line in lines if "GLOBAL" in line), None)
        if blocked is not None:
            return _raise(
                error(
                    path,
                    f"cannot read {what}: it holds Python objects besides tensors and plain "
                    f"values, refused because loading them could run code ({blocked[:200]})",
                )
            )
        first = lines[-1] if lines else "unreadable pickle"
        return _raise(error(path, f"cannot read {what} (corrupt or truncated?): {first[:200]}"))
    except IsADirectoryError:
        return _raise(error(path, "is a folder, expected a file"))
    except Exception as exc:  # zip, EOF and storage errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _raise(error(path, f"cannot read {what} (corrupt or truncated?): {first[:200]}"))


def _raise(exc: Exception) -> Any:
    raise exc from None


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def validate_tensor_record(record: Mapping[str, Any], path: str | os.PathLike = "<memory>") -> None:
    """Check a loaded or about-to-be-saved record; raise :class:`TensorFileError` on a problem."""
    missing = [k for k in (*REQUIRED_TENSORS, "metadata") if k not in record]
    if missing:
        raise TensorFileError(path, f"missing keys {missing} (has {sorted(record)})")
    meta = record["metadata"]
    if not isinstance(meta, dict):
        raise TensorFileError(path, f"'metadata' must be a dict, found {type(meta).__name__}")
    missing_meta = [k for k in REQUIRED_METADATA if k not in meta]
    if missing_meta:
        raise TensorFileError(path, f"metadata is missing {missing_meta}")
    for key, value in record.items():
        if key != "metadata" and not isinstance(value, torch.Tensor):
            raise TensorFileError(path, f"{key!r} must be a tensor, found {type(value).__name__}")
    for key, value in record.items():
        if key == "metadata":
            continue
        # A broadcast view (stride 0) saves a few bytes yet loads as a huge tensor: a small file
        # could declare a length whose O(T^2) attention never ends. Real data fills its storage.
        need = value.numel() * value.element_size()
        have = value.untyped_storage().nbytes() - value.storage_offset() * value.element_size()
        if value.numel() and have < need:
            raise TensorFileError(
                path,
                f"{key} has shape {_shape(value)} ({need} bytes) but stores only {have} bytes "
                "(a broadcast view, not real data)",
            )
    q, k, v, ids = record["Q"], record["K"], record["V"], record["input_ids"]
    for name, t in (("Q", q), ("K", k), ("V", v)):
        if t.dim() != 4:
            raise TensorFileError(
                path, f"{name} must be (batch, heads, seq, head_dim), got shape {_shape(t)}"
            )
        if not t.is_floating_point():
            raise TensorFileError(path, f"{name} must be floating point, got {t.dtype}")
        if 0 in t.shape:
            raise TensorFileError(path, f"{name} is empty: shape {_shape(t)}")
    if k.shape != v.shape:
        raise TensorFileError(path, f"K {_shape(k)} and V {_shape(v)} shapes differ")
    b, hq, t_len, d = q.shape
    if k.shape[0] != b or k.shape[2] != t_len or k.shape[3] != d:
        raise TensorFileError(
            path, f"Q {_shape(q)} and K {_shape(k)} disagree on batch, seq or head_dim"
        )
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise TensorFileError(path, f"query heads {hq} not a multiple of KV heads {hkv}")
    if ids.dim() != 2 or tuple(ids.shape) != (b, t_len):
        raise TensorFileError(path, f"input_ids must be ({b}, {t_len}), got {_shape(ids)}")
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TensorFileError(path, f"input_ids must be integer, got {ids.dtype}")
    expected = {
        "seq_len": t_len,
        "num_heads": hq,
        "num_kv_heads": hkv,
        "head_dim": d,
        "batch_size": b,
    }
    for key in ("layer_idx", *expected):
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TensorFileError(path, f"metadata {key} must be an integer >= 0, got {value!r}")
    scaling = meta.get("attention_scaling")
    if scaling is not None and (
        isinstance(scaling, bool)
        or not isinstance(scaling, (int, float))
        or not math.isfinite(scaling)
        or scaling <= 0
    ):
        raise TensorFileError(
            path, f"metadata attention_scaling must be a number > 0, got {scaling!r}"
        )
    for key, value in expected.items():
        if meta[key] != value:
            raise TensorFileError(
                path, f"metadata {key}={meta[key]!r} but the tensors give {value}"
            )
    if str(path) != "<memory>":
        try:
            info = parse_tensor_filename(path)
        except ValueError:
            info = None
        if info is not None:
            if info["seq_len"] != t_len:
                raise TensorFileError(
                    path, f"file name says seq_len {info['seq_len']}, tensors have {t_len}"
                )
            if info["layer_idx"] != meta["layer_idx"]:
                raise TensorFileError(
                    path,
                    f"file name says layer {info['layer_idx']}, metadata {meta['layer_idx']}",
                )
            sample = meta.get("sample")  # optional (the seed's files lack it)
            if sample is not None and sample != info["sample"]:
                raise TensorFileError(
                    path, f"file name says sample {info['sample']}, metadata {sample!r}"
                )
    extra_shapes = {"Q_pre": (b, hq, t_len, d), "K_pre": (b, hkv, t_len, d)}
    for key, shape in extra_shapes.items():
        if key in record and tuple(record[key].shape) != shape:
            raise TensorFileError(path, f"{key} must be {shape}, got {_shape(record[key])}")
    for key in ("seerattn_scores", "seerattn_mask"):
        if key in record:
            t = record[key]
            if t.dim() != 4 or t.shape[0] != b or t.shape[1] not in (1, hkv, hq):
                raise TensorFileError(path, f"{key} must be (B, Hq, nq, nk), got {_shape(t)}")
    for key, t in record.items():
        if key == "metadata" or not t.is_floating_point():
            continue
        bad = (~torch.isfinite(t)).sum().item()
        if bad:
            kind = "NaN" if torch.isnan(t).any() else "Inf"
            raise TensorFileError(path, f"{key} holds {bad} non-finite values ({kind})")
