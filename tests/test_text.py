"""Real text sources give distinct passages of exact token length (sketchwalk.hf.text)."""

from __future__ import annotations

import json

import pytest
import torch

from sketchwalk.hf.text import (
    TextSourceError,
    austen_available,
    iter_documents,
    make_passages,
    resolve_source,
    token_sha256,
)


class ByteTokenizer:
    """Minimal tokenizer: one id per UTF-8 byte, optional BOS (id 256) added by default."""

    def __init__(self, bos: bool = False):
        self.bos_token_id = 256 if bos else None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = list(text.encode("utf-8"))
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return {"input_ids": ids}


def check_distinct_exact(passages, seq_len):
    hashes = {p.sha256 for p in passages}
    assert len(hashes) == len(passages), "passages repeat"
    for p in passages:
        assert p.input_ids.shape == (seq_len,) and p.input_ids.dtype == torch.int64
        assert p.sha256 == token_sha256(p.input_ids)
    # non-overlapping: no two passages end in the same 64 tokens (every passage counts; the
    # last 64 tokens never hold the BOS id 256, so bytes() takes them)
    bodies = [bytes(p.input_ids.tolist()[-64:]) for p in passages]
    assert len(set(bodies)) == len(bodies) == len(passages)


@pytest.mark.parametrize("bos", [False, True])
def test_stdlib_passages(bos):
    tok = ByteTokenizer(bos=bos)
    passages = make_passages(tok, 3000, 4, source="stdlib")
    check_distinct_exact(passages, 3000)
    assert all(p.source == "stdlib" for p in passages)
    assert passages[0].document.endswith(".py")
    if bos:
        assert all(int(p.input_ids[0]) == 256 for p in passages)
        assert all(int(p.input_ids[1:].max()) < 256 for p in passages)
    # the recorded offset points at the passage's text inside its document
    first = passages[0]
    text = dict(iter_documents("stdlib"))[first.document]
    start = 1 if bos else 0
    assert (
        list(text.encode()[first.offset : first.offset + 50])
        == first.input_ids[start : start + 50].tolist()
    )


def test_seed_changes_order_and_is_reproducible():
    tok = ByteTokenizer()
    a = make_passages(tok, 500, 2, source="stdlib", seed=0)
    b = make_passages(tok, 500, 2, source="stdlib", seed=0)
    c = make_passages(tok, 500, 2, source="stdlib", seed=1)
    assert [p.sha256 for p in a] == [p.sha256 for p in b]
    assert a[0].sha256 != c[0].sha256


def test_plain_text_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("".join(f"Sentence number {i} of a long book. " for i in range(400)))
    passages = make_passages(ByteTokenizer(), 1000, 5, text_file=path)
    check_distinct_exact(passages, 1000)
    assert [p.offset for p in passages] == [0, 1000, 2000, 3000, 4000]
    assert passages[0].source == f"file:{path}" and passages[0].document == "book.txt"
    with pytest.raises(TextSourceError, match="not enough"):
        make_passages(ByteTokenizer(), 1000, 50, text_file=path)


def test_jsonl_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "alpha " * 100}, {"content": "beta " * 100}, {"id": 3, "text": "gamma " * 100}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    passages = make_passages(ByteTokenizer(), 400, 3, text_file=path)
    check_distinct_exact(passages, 400)
    assert passages[0].document == "line 1"
    assert bytes(passages[0].input_ids[:5].tolist()) == b"alpha"
    path.write_text(json.dumps({"title": "no text"}) + "\n")
    with pytest.raises(TextSourceError, match="no text field"):
        make_passages(ByteTokenizer(), 10, 1, text_file=path)
    path.write_text("{broken\n")
    with pytest.raises(TextSourceError, match="not valid JSON"):
        make_passages(ByteTokenizer(), 10, 1, text_file=path)


def test_source_errors(tmp_path):
    with pytest.raises(TextSourceError, match="unknown text source"):
        resolve_source("wikipedia")
    with pytest.raises(TextSourceError, match="needs --text_file"):
        resolve_source("file")
    with pytest.raises(TextSourceError, match="not found"):
        make_passages(ByteTokenizer(), 10, 1, text_file=tmp_path / "missing.txt")
    assert resolve_source("auto") == ("austen" if austen_available() else "stdlib")


@pytest.mark.skipif(not austen_available(), reason="r-cran-janeaustenr not installed")
def test_austen_passages():
    passages = make_passages(ByteTokenizer(), 2000, 3, source="austen")
    check_distinct_exact(passages, 2000)
    names = {name for name, _ in iter_documents("austen")}
    assert "prideprejudice" in names and len(names) == 6
