"""Atomic file writes: every file this package writes appears under its final name complete or
not at all, so a run killed halfway never leaves a half-written result behind.

The content goes to a hidden temporary file in the destination folder (same filesystem), is
flushed to disk, and is then renamed over the final name (or hard-linked to it when overwriting
is refused, which fails if the name was taken meanwhile). The temporary file is removed on any
error. Imports nothing from the rest of the package.
"""

from __future__ import annotations

import json
import os
import tempfile
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
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
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


__all__ = ["TMP_SUFFIX", "atomic_write", "write_json", "write_text"]
