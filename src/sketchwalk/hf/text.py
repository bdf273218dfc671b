"""Real long text, offline: every sample a different passage cut to an exact token length.

Sources (``--text_source``):

- ``austen``: Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` package, read with the
  pure-Python ``rdata`` package from the R lazy-load database (``data/Rdata.rdx``/``.rdb``);
- ``stdlib``: the Python standard library's own ``.py`` files (every Python install has them);
- ``file``: ``--text_file``, plain text (one document) or ``.jsonl`` (one document per line, from
  its ``text`` field, else ``content``/``context``/``input``);
- ``auto`` (default): ``austen`` where installed, else ``stdlib``.

Passages are built by streaming documents (in a seeded order) through the tokenizer and cutting
consecutive, non-overlapping runs of tokens, so no two samples share text and no filler is
repeated. Each :class:`Passage` records its source, the document it starts in, the token offset in
that document and the SHA-256 of its token ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "JANEAUSTENR_DIRS",
    "Passage",
    "TextSourceError",
    "austen_available",
    "iter_documents",
    "make_passages",
    "resolve_source",
    "token_sha256",
]

SOURCES = ("auto", "austen", "stdlib", "file")
JANEAUSTENR_ENV = "SKETCHWALK_JANEAUSTENR_DIR"
JANEAUSTENR_DIRS = (
    "/usr/lib/R/site-library/janeaustenr",
    "/usr/local/lib/R/site-library/janeaustenr",
    "/usr/lib/R/library/janeaustenr",
)
JSONL_FIELDS = ("text", "content", "context", "input")


class TextSourceError(ValueError):
    """A text source is missing or holds too little text."""


@dataclass
class Passage:
    """One sample of real text.

    Attributes:
        input_ids: int64 ``(T,)`` token ids, exactly ``T = seq_len`` of them.
        source: ``"austen"``, ``"stdlib"`` or ``"file:<path>"``.
        document: the document the passage starts in (a novel, a module path, a line number).
        offset: token offset of the passage's first text token within ``document``.
        sha256: hex SHA-256 of the token ids (int64 little-endian bytes).
    """

    input_ids: torch.Tensor
    source: str
    document: str
    offset: int
    sha256: str

    def info(self) -> dict[str, Any]:
        """Plain-value description for metadata."""
        return {
            "text_source": self.source,
            "text_document": self.document,
            "text_offset": self.offset,
            "input_ids_sha256": self.sha256,
        }


def token_sha256(input_ids: torch.Tensor) -> str:
    """SHA-256 of token ids as int64 little-endian bytes (shape-independent)."""
    data = input_ids.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8").tobytes()
    return hashlib.sha256(data).hexdigest()


def _janeaustenr_dir() -> Path | None:
    candidates = [os.environ[JANEAUSTENR_ENV]] if os.environ.get(JANEAUSTENR_ENV) else []
    candidates += list(JANEAUSTENR_DIRS)
    for cand in candidates:
        path = Path(cand)
        if (path / "data" / "Rdata.rdx").is_file() and (path / "data" / "Rdata.rdb").is_file():
            return path
    return None


def austen_available() -> bool:
    """True when ``r-cran-janeaustenr`` and ``rdata`` are both installed."""
    try:
        import rdata  # noqa: F401
    except ImportError:
        return False
    return _janeaustenr_dir() is not None


def _decompress(blob: bytes) -> bytes:
    import bz2
    import lzma
    import zlib

    # An R lazy-load entry: 4-byte big-endian raw length, then the compressed serialization.
    body = blob[4:]
    for fn in (zlib.decompress, bz2.decompress, lzma.decompress):
        try:
            return fn(body)
        except (zlib.error, OSError, lzma.LZMAError, ValueError):
            continue
    # Type-tagged variants (R's compress = 2/3) carry one extra byte before the stream.
    for fn in (bz2.decompress, lzma.decompress, zlib.decompress):
        try:
            return fn(body[1:])
        except (zlib.error, OSError, lzma.LZMAError, ValueError):
            continue
    raise TextSourceError("cannot decompress an entry of janeaustenr's Rdata.rdb")


def _austen_documents() -> Iterator[tuple[str, str]]:
    import warnings

    import rdata

    folder = _janeaustenr_dir()
    if folder is None:
        raise TextSourceError(
            "text source 'austen' needs Debian's r-cran-janeaustenr (apt-get install "
            f"r-cran-janeaustenr) or {JANEAUSTENR_ENV} pointing at the janeaustenr folder"
        )
    index = rdata.read_rds(str(folder / "data" / "Rdata.rdx"))
    raw = (folder / "data" / "Rdata.rdb").read_bytes()
    for name, (offset, length) in sorted(index["variables"].items()):
        blob = raw[int(offset) : int(offset) + int(length)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rdata warns that a bare serialization "assumed RDS"
            lines = rdata.conversion.convert(rdata.parser.parse_data(_decompress(blob)))
        yield str(name), "\n".join(str(line) for line in lines)


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files)


def _file_documents(path: Path) -> Iterator[tuple[str, str]]:
    if not path.is_file():
        raise TextSourceError(f"--text_file {path} not found")
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TextSourceError(f"{path}:{lineno}: not valid JSON ({exc})") from None
                if isinstance(obj, str):
                    yield f"line {lineno}", obj
                    continue
                if not isinstance(obj, dict):
                    raise TextSourceError(
                        f"{path}:{lineno}: expected a JSON string or object, found "
                        f"{type(obj).__name__}"
                    )
                field = next((f for f in JSONL_FIELDS if isinstance(obj.get(f), str)), None)
                if field is None:
                    raise TextSourceError(
                        f"{path}:{lineno}: no text field; expected one of {JSONL_FIELDS}, "
                        f"found {sorted(obj)}"
                    )
                yield f"line {lineno}", obj[field]
    else:
        yield path.name, path.read_text(encoding="utf-8", errors="replace")


def resolve_source(source: str = "auto", text_file: str | os.PathLike | None = None) -> str:
    """The concrete source name for ``source`` (``auto`` picks austen, else stdlib)."""
    if text_file is not None and source in ("auto", "file"):
        return "file"
    if source not in SOURCES:
        raise TextSourceError(f"unknown text source {source!r}; choose from {SOURCES}")
    if source == "file":
        raise TextSourceError("text source 'file' needs --text_file")
    if source == "auto":
        return "austen" if austen_available() else "stdlib"
    return source


def iter_documents(
    source: str = "auto", text_file: str | os.PathLike | None = None, seed: int = 0
) -> Iterator[tuple[str, str]]:
    """Yield ``(document name, text)`` of a source, in an order shuffled by ``seed``."""
    concrete = resolve_source(source, text_file)
    if concrete == "file":
        docs: list[tuple[str, str]] | Iterator[tuple[str, str]] = _file_documents(Path(text_file))
        yield from docs  # a user's file keeps its own order
        return
    if concrete == "austen":
        docs = list(_austen_documents())
        random.Random(seed).shuffle(docs)
        yield from docs
        return
    files = _stdlib_files()
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    root = Path(sysconfig.get_paths()["stdlib"])
    for i in order:
        try:
            text = files[i].read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield str(files[i].relative_to(root)), text


def _bos_id(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer adds one by itself (Llama 3 does, SmolLM2 does not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def make_passages(
    tokenizer: Any,
    seq_len: int,
    num_samples: int,
    source: str = "auto",
    text_file: str | os.PathLike | None = None,
    seed: int = 0,
) -> list[Passage]:
    """Cut ``num_samples`` distinct passages of exactly ``seq_len`` tokens.

    Documents are tokenized whole (no special tokens) and joined with a blank line; each passage
    takes the next ``seq_len`` tokens (after a BOS token when the tokenizer uses one). Passages
    never overlap.

    Returns:
        ``num_samples`` :class:`Passage` objects, ``input_ids`` of shape ``(seq_len,)``.

    Raises:
        TextSourceError: the source holds fewer tokens than needed (the message says how many).
    """
    if seq_len < 2 or num_samples < 1:
        raise ValueError(f"need seq_len >= 2 and num_samples >= 1, got {seq_len}, {num_samples}")
    concrete = resolve_source(source, text_file)
    label = f"file:{text_file}" if concrete == "file" else concrete
    bos = _bos_id(tokenizer)
    body_len = seq_len - (1 if bos is not None else 0)
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    passages: list[Passage] = []
    buffer: list[int] = []
    start: tuple[str, int] | None = None
    total = 0
    for name, text in iter_documents(source, text_file, seed):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pos = 0
        while pos < len(ids):
            if start is None:
                start = (name, pos)
            take = min(body_len - len(buffer), len(ids) - pos)
            buffer.extend(ids[pos : pos + take])
            pos += take
            total += take
            if len(buffer) == body_len:
                full = ([bos] if bos is not None else []) + buffer
                tensor = torch.tensor(full, dtype=torch.int64)
                passages.append(Passage(tensor, label, start[0], start[1], token_sha256(tensor)))
                buffer, start = [], None
                if len(passages) == num_samples:
                    return passages
        if buffer:
            buffer.extend(separator[: body_len - len(buffer)])
    raise TextSourceError(
        f"text source {label!r} holds about {total} tokens: not enough for {num_samples} "
        f"passages of {seq_len} tokens ({num_samples * body_len} needed); use fewer or shorter "
        "samples, or a longer --text_file"
    )
