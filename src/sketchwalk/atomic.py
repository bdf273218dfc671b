"""Atomic file writes: every file this package writes appears under its final name complete or
not at all, so a run killed halfway never leaves a half-written result behind.

The content goes to a hidden temporary file in the destination folder (same filesystem), is
flushed to disk, and is then renamed over the final name (or hard-linked to it when overwriting
is refused, which fails if the name was taken meanwhile). The temporary file is removed on any
error; a temporary file left by a killed process (its name carries the writer's process id) is
removed by `remove_stale_tmp`, which every command runs on its output folder first. `file_sha256`
hashes what was written (a later reader can tell a changed file). Imports nothing from the rest of
the package.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def atomic_write(
    path: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = True
) -> Path:
    """Create ``path`` atomically: ``write(tmp_path)`` fills a temporary file, then it is renamed.

    Args:
        path: the final file name (its folder is created if missing).
        write: fills the file at the path it is given (``torch.save``, ``save_file``, ...).
        overwrite: replace an existing file; if False, raise FileExistsError instead (checked
            again at the rename, so two writers never silently replace each other).

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} exists; refusing to overwrite it") from None
            except OSError:  # filesystems without hard links
                os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# .<final name>.<pid>.<random>.tmp (the random part from mkstemp has no dots)
_TMP_RE = re.compile(r"^\..+\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp$")
_LEGACY_TMP_RE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
# temporary files without a process id (older versions) count as stale after this long
_LEGACY_TMP_AGE_S = 3600.0


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_tmp(folder: str | os.PathLike) -> list[Path]:
    """Delete the hidden temporary files that killed writers left in ``folder``.

    A file ``.<name>.<pid>.<random>.tmp`` is removed when process ``pid`` no longer runs (a
    writer that is still running keeps its file); one without a process id when it is over an
    hour old. Returns the paths removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for entry in folder.iterdir():
        name = entry.name
        if _LEGACY_TMP_RE.match(name) is None or not entry.is_file():
            continue
        match = _TMP_RE.match(name)
        try:
            if match is not None:
                stale = not _alive(int(match["pid"]))
            else:
                stale = now - entry.stat().st_mtime > _LEGACY_TMP_AGE_S
            if stale:
                entry.unlink()
                removed.append(entry)
        except FileNotFoundError:  # removed meanwhile
            continue
    return removed


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read ``chunk`` bytes at a time (any size, bounded memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # tensors and numpy values
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    """Atomically write a UTF-8 text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite)


def write_json(path: str | os.PathLike, data: Any, overwrite: bool = True) -> Path:
    """Atomically write ``data`` as indented JSON (tensors as lists, paths as strings)."""
    return write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n", overwrite)


__all__ = [
    "TMP_SUFFIX",
    "atomic_write",
    "file_sha256",
    "remove_stale_tmp",
    "write_json",
    "write_text",
]
