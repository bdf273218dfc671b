"""RULER's synthetic tasks (Hsieh et al., 2024) as token-id prompts of a given length.

Task names and structure follow RULER; the filler comes from this package's text sources
(`sketchwalk.hf.text`: Jane Austen's novels, the Python standard library, a user's file) instead
of RULER's essays, and the prompts are written here:

- ``niah_single_1|2|3``: one needle "One of the special magic <kind> for <key> is: <value>." in
  repeated noise sentences (1) or real text (2, 3); word keys, number values (1, 2) or uuid
  values (3). The question asks for the key's value.
- ``niah_multikey_1|2|3``: the needle among distractor needles with other keys: three
  distractors in real text (1); a haystack made only of distractor needles (2: word keys and
  number values, 3: uuid keys and uuid values).
- ``niah_multivalue``: four needles with the same key and different values; all are asked for.
- ``niah_multiquery``: four needles with different keys; all four keys are asked for.
- ``vt`` (variable tracking): a chain "VAR X1 = <number>", "VAR X2 = VAR X1", ... of
  ``VT_HOPS`` hops hidden in noise; every variable that holds the number is asked for.
- ``cwe`` (common words): a numbered list where ``CWE_COMMON`` words appear ``CWE_COMMON_FREQ``
  times each and all others ``CWE_RARE_FREQ`` times (fewer times each in prompts too short for
  that, the common words at least twice as often); the common words are asked for.
- ``fwe`` (frequent words): coded words drawn with Zipf frequencies (exponent ``FWE_ALPHA``);
  the three most frequent are asked for.

Scoring is RULER's: each sample scores the fraction of its reference values found in the
answer (case-insensitive substring), so a sample asking for four values scores 0, .25, .5, .75
or 1 (`score_answer`).

Prompt variants (`PROMPT_VARIANTS`): the question after the context (``after``) or before and
after it (``both``), each with or without RULER's answer prefix (``_prefix``): the answer
prefix repeats the key, which lets a model copy it from the end of the prompt, so results with
and without it differ. The chat template is used where the tokenizer has one.

Splits: every sample is drawn from a random generator named by (split, seed, task, length,
sample) and takes its real-text filler from its split's half of the text source's token stream
(``tune``: the first half, ``report``: the second), so defaults chosen on ``tune`` are checked on
prompts, values and filler passages they never saw.
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
from collections.abc import Sequence
from typing import Any

from sketchwalk.blocks import UsageError
from sketchwalk.pipeline.eval.niah import _snap_to_sentence

__all__ = [
    "MAX_NEW_TOKENS",
    "PROMPT_VARIANTS",
    "SPLITS",
    "TASKS",
    "RulerSample",
    "TextPool",
    "build_sample",
    "score_answer",
]

TASKS = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
)
PROMPT_VARIANTS = ("after", "after_prefix", "both", "both_prefix")
SPLITS = ("tune", "report")
# Tokens generated per task (RULER's own caps; generation stops at the end of turn anyway):
# chat models often restate the question before the value, and some tokenizers spend one token
# per digit, so a cap sized for the bare value cuts answers off.
MAX_NEW_TOKENS = {
    "niah_single_1": 128, "niah_single_2": 128, "niah_single_3": 128,
    "niah_multikey_1": 128, "niah_multikey_2": 128, "niah_multikey_3": 128,
    "niah_multivalue": 128, "niah_multiquery": 128, "vt": 64, "cwe": 120, "fwe": 50,
}  # fmt: skip
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
VT_HOPS = 4
CWE_COMMON, CWE_COMMON_FREQ, CWE_RARE_FREQ = 10, 30, 3
FWE_ALPHA, FWE_TOP = 2.0, 3
MULTI = 4  # values of niah_multivalue, keys of niah_multiquery, needles of niah_multikey_1


class RulerInputError(UsageError):
    """A RULER task cannot be built as asked (exit 2); the message says why."""


@dataclasses.dataclass
class RulerSample:
    """One prompt of a task.

    Attributes:
        task: a name of `TASKS`.
        input_ids: the prompt's token ids (at most the asked length; real-text tasks exactly).
        refs: the values a correct answer contains.
        max_new_tokens: tokens to generate.
        info: what was hidden where (keys, values, token offsets of the inserted pieces).
    """

    task: str
    input_ids: list[int]
    refs: list[str]
    max_new_tokens: int
    info: dict[str, Any]


def score_answer(answer: str, refs: Sequence[str]) -> float:
    """RULER's score: the share of ``refs`` that occur in ``answer`` (case-insensitive)."""
    if not refs:
        raise ValueError("score_answer: no reference values")
    low = answer.lower()
    return sum(str(r).lower() in low for r in refs) / len(refs)


class TextPool:
    """The token stream of a text source, cut in two halves (the two splits), and its words.

    Args:
        tokenizer: the model's tokenizer.
        source, text_file: as `sketchwalk.hf.text.make_passages`.
        max_tokens: tokens read at most (the standard library holds far more than needed).
    """

    def __init__(
        self, tokenizer: Any, source: str = "auto", text_file: str | None = None,
        max_tokens: int = 2_000_000,
    ) -> None:  # fmt: skip
        from sketchwalk.hf.text import iter_documents, resolve_source

        concrete = resolve_source(source, text_file)
        self.source = f"file:{text_file}" if concrete == "file" else concrete
        self.tokenizer = tokenizer
        sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        stream: list[int] = []
        words: set[str] = set()
        for _, text in iter_documents(source, text_file, seed=0):
            words.update(w.lower() for w in re.findall(r"\b[A-Za-z]{4,12}\b", text))
            stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + sep)
            if len(stream) >= max_tokens:
                break
        self.stream = stream[:max_tokens]
        self.words = sorted(words)
        if len(self.words) < 2000:
            raise RulerInputError(
                f"text source {self.source!r} has {len(self.words)} distinct words; the RULER "
                "tasks need at least 2000 (use --text_source austen or a longer --text_file)"
            )

    def filler(self, split: str, length: int, rng: random.Random) -> list[int]:
        """``length`` consecutive tokens from the split's half of the stream (wrapping)."""
        half = len(self.stream) // 2
        if length > half:
            raise RulerInputError(
                f"text source {self.source!r} holds {len(self.stream)} tokens; each split needs "
                f"{length} for one prompt (use shorter --seq_lens or a longer --text_file)"
            )
        base = 0 if split == "tune" else half
        start = rng.randrange(half)
        ids = self.stream[base + start : base + min(half, start + length)]
        if len(ids) < length:  # wrap within the half
            ids += self.stream[base : base + length - len(ids)]
        return ids


# ---- values ---------------------------------------------------------------------------------


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _word_key(rng: random.Random, words: Sequence[str]) -> str:
    return f"{rng.choice(words)}-{rng.choice(words)}"


def _distinct(make, count: int, taken: set[str] | None = None) -> list[str]:
    taken = set() if taken is None else taken
    out: list[str] = []
    while len(out) < count:
        v = make()
        if v not in taken:
            taken.add(v)
            out.append(v)
    return out


# ---- prompt assembly ------------------------------------------------------------------------


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _frame(
    tokenizer: Any, intro: str, question: str, prefix: str, variant: str
) -> tuple[list[int], list[int], bool]:
    """Token ids before and after the context, and whether the chat template was used."""
    marker = "@@CONTEXT@@"
    ask_first = variant.startswith("both")
    body = intro + (question + "\n\n" if ask_first else "") + marker + "\n\n" + question
    answer = prefix if variant.endswith("_prefix") else ""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
        )
        before, after = text.split(marker, 1)
        return _ids(tokenizer, before), _ids(tokenizer, after + answer), True
    before, after = body.split(marker, 1)
    bos = getattr(tokenizer, "bos_token_id", None)
    head = tokenizer(before, add_special_tokens=True)["input_ids"]
    if bos is not None and (not head or head[0] != bos):
        head = [bos, *head]
    return head, _ids(tokenizer, after + ("\n" + answer if answer else "\nAnswer:")), False


def _insert(
    hay: list[list[int]] | list[int],
    pieces: list[list[int]],
    spots: list[int],
    offset: int,
) -> tuple[list[int], list[int]]:
    """Insert ``pieces`` at ``spots`` (indices into ``hay``'s units) and flatten; returns the
    ids and each piece's token offset (plus ``offset``) in them."""
    order = sorted(range(len(pieces)), key=lambda j: (spots[j], j))
    out: list[int] = []
    where = [0] * len(pieces)
    unit = 0
    for j in order:
        while unit < spots[j]:
            u = hay[unit]
            out.extend(u if isinstance(u, list) else [u])
            unit += 1
        where[j] = offset + len(out)
        out.extend(pieces[j])
    for u in hay[unit:]:
        out.extend(u if isinstance(u, list) else [u])
    return out, where


def _fit_units(unit_lens: Sequence[int], budget: int) -> int:
    """How many leading units fit in ``budget`` tokens."""
    total = 0
    for n, size in enumerate(unit_lens):
        if total + size > budget:
            return n
        total += size
    return len(unit_lens)


def build_sample(
    task: str,
    tokenizer: Any,
    pool: TextPool,
    length: int,
    rng: random.Random,
    split: str = "report",
    variant: str = "after",
) -> RulerSample:
    """One prompt of ``task`` of at most ``length`` tokens (real-text tasks: exactly).

    Args:
        task: a name of `TASKS`.
        tokenizer: the model's tokenizer.
        pool: the filler source (`TextPool`).
        length: prompt tokens.
        rng: the sample's seeded generator (keys, values, depths, filler offset).
        split: ``"tune"`` or ``"report"``: which half of the text the filler comes from.
        variant: a name of `PROMPT_VARIANTS`.
    """
    if task not in TASKS:
        raise RulerInputError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if variant not in PROMPT_VARIANTS:
        raise RulerInputError(f"unknown prompt variant {variant!r}; choose from {PROMPT_VARIANTS}")
    if split not in SPLITS:
        raise RulerInputError(f"unknown split {split!r}; choose from {SPLITS}")
    if task.startswith("niah"):
        return _niah(task, tokenizer, pool, length, rng, split, variant)
    return {"vt": _vt, "cwe": _cwe, "fwe": _fwe}[task](tokenizer, pool, length, rng, split, variant)


def _too_short(length: int, need: int, task: str) -> RulerInputError:
    return RulerInputError(
        f"--seq_lens {length} is too short for {task} (the prompt without context takes {need} "
        "tokens)"
    )


def _niah(task, tokenizer, pool, length, rng, split, variant) -> RulerSample:
    words = pool.words
    uuid_values = task in ("niah_single_3", "niah_multikey_3")
    kind, kind_one = ("uuids", "uuid") if uuid_values else ("numbers", "number")
    make_value = (lambda: _uuid(rng)) if uuid_values else (lambda: _number(rng))
    if task == "niah_multikey_3":
        make_key = lambda: _uuid(rng)  # noqa: E731
    else:
        make_key = lambda: _word_key(rng, words)  # noqa: E731
    taken: set[str] = set()
    if task == "niah_multiquery":
        keys = _distinct(make_key, MULTI, taken)
        needles = [(key, make_value()) for key in keys]
        asked = keys
    elif task == "niah_multivalue":
        key = make_key()
        taken.add(key)
        needles = [(key, v) for v in _distinct(make_value, MULTI)]
        asked = [key]
    else:
        key = make_key()
        taken.add(key)
        needles = [(key, make_value())]
        if task == "niah_multikey_1":
            needles += [(k, make_value()) for k in _distinct(make_key, MULTI - 1, taken)]
        asked = [key]
    refs = [v for k, v in needles if k in asked]
    plural = len(refs) > 1
    ask = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
    intro = (
        f"Some special magic {kind} are hidden within the following text. Make sure to memorize "
        f"them. I will quiz you about the {kind} afterwards.\n\n"
    )
    if plural:
        question = (
            f"What are all the special magic {kind} for {ask} mentioned in the provided text?"
        )
        prefix = f"The special magic {kind} for {ask} mentioned in the provided text are"
    else:
        question = f"What is the special magic {kind_one} for {ask} mentioned in the provided text?"
        prefix = f"The special magic {kind_one} for {ask} mentioned in the provided text is"
    before, after, chat = _frame(tokenizer, intro, question, prefix, variant)

    def needle_ids(k: str, v: str) -> list[int]:
        return _ids(tokenizer, f" One of the special magic {kind} for {k} is: {v}. ")

    pieces = [needle_ids(k, v) for k, v in needles]
    budget = length - len(before) - len(after) - sum(map(len, pieces))
    if budget < 1:
        raise _too_short(length, length - budget + 1, task)
    depths = [rng.uniform(0.0, 100.0) for _ in pieces]
    if task in ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue",
                "niah_multiquery"):  # fmt: skip
        hay: list[Any] = pool.filler(split, budget, rng)
        spots = [_snap_to_sentence(tokenizer, hay, round(d / 100 * len(hay))) for d in depths]
    else:
        if task == "niah_single_1":
            unit = _ids(tokenizer, " " + NOISE)
            hay = [unit] * (budget // len(unit))
        else:  # multikey_2/3: the haystack is distractor needles
            hay, used = [], 0
            while True:
                k = make_key()
                if k in taken:
                    continue
                taken.add(k)
                piece = needle_ids(k, make_value())
                if used + len(piece) > budget:
                    break
                hay.append(piece)
                used += len(piece)
        spots = [round(d / 100 * len(hay)) for d in depths]
    context, where = _insert(hay, pieces, spots, len(before))
    ids = before + context + after
    return RulerSample(
        task, ids, refs, MAX_NEW_TOKENS[task],
        {"needles": [{"key": k, "value": v} for k, v in needles], "asked": asked,
         "needle_positions": where, "chat_template": chat, "variant": variant},
    )  # fmt: skip


def _vt(tokenizer, pool, length, rng, split, variant) -> RulerSample:
    names = _distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), VT_HOPS + 1)
    value = str(rng.randint(10_000, 99_999))
    lines = [f"VAR {names[0]} = {value}"] + [
        f"VAR {names[i]} = VAR {names[i - 1]}" for i in range(1, len(names))
    ]
    intro = "Memorize and track the chain of variable assignments hidden in the following text.\n\n"
    question = (
        f"Question: Find all variables that are assigned the value {value} in the text above."
    )
    prefix = (
        f"Answer: According to the chain of variable assignments in the text above, "
        f"{len(names)} variables are assigned the value {value}, they are:"
    )
    before, after, chat = _frame(tokenizer, intro, question, prefix, variant)
    pieces = [_ids(tokenizer, f" {line}.") for line in lines]
    budget = length - len(before) - len(after) - sum(map(len, pieces))
    unit = _ids(tokenizer, " " + NOISE)
    if budget < len(unit):
        raise _too_short(length, length - budget + len(unit), "vt")
    hay = [unit] * (budget // len(unit))
    spots = sorted(rng.randint(0, len(hay)) for _ in pieces)
    context, where = _insert(hay, pieces, spots, len(before))
    return RulerSample(
        "vt", before + context + after, names, MAX_NEW_TOKENS["vt"],
        {"value": value, "chain": lines, "positions": where, "chat_template": chat,
         "variant": variant},
    )  # fmt: skip


def _cwe(tokenizer, pool, length, rng, split, variant) -> RulerSample:
    words = list(pool.words)
    rng.shuffle(words)
    common, rare_pool = words[:CWE_COMMON], words[CWE_COMMON:]
    intro = (
        "Below is a numbered list of words. Some of them appear more often than others. "
        "Memorize the ones that appear most often.\n\n"
    )
    question = f"Question: What are the {CWE_COMMON} most common words in the list above?"
    prefix = f"Answer: The top {CWE_COMMON} words that appear most often in the list are:"
    before, after, chat = _frame(tokenizer, intro, question, prefix, variant)
    budget = length - len(before) - len(after)
    per_line = max(1, len(_ids(tokenizer, "\n1234. " + " ".join(words[:50]))) // 50 + 4)
    lines_fit = budget // per_line
    # RULER's frequencies where they fit; shorter prompts keep the common words at least
    # twice as frequent as the others
    common_freq = max(2, min(CWE_COMMON_FREQ, lines_fit // (2 * CWE_COMMON)))
    rare_freq = CWE_RARE_FREQ if common_freq >= 2 * CWE_RARE_FREQ else 1
    rare = max(0, min(len(rare_pool), (lines_fit - CWE_COMMON * common_freq) // rare_freq))
    for _ in range(50):  # shrink the rare words until the list fits
        seq = common * common_freq + rare_pool[:rare] * rare_freq
        order = random.Random(rng.random()).sample(seq, len(seq))
        lines = _ids(tokenizer, "".join(f"{i + 1}. {w}\n" for i, w in enumerate(order)))
        if len(lines) <= budget:
            break
        if rare == 0:
            raise _too_short(length, len(before) + len(after) + len(lines), "cwe")
        rare = max(0, rare - max(1, (len(lines) - budget) // (per_line * rare_freq) + 1))
    return RulerSample(
        "cwe", before + lines + after, common, MAX_NEW_TOKENS["cwe"],
        {"rare_words": rare, "common_freq": common_freq, "rare_freq": rare_freq,
         "chat_template": chat, "variant": variant},
    )  # fmt: skip


def _fwe(tokenizer, pool, length, rng, split, variant) -> RulerSample:
    intro = "Read the following coded text and track how often each coded word appears.\n\n"
    question = (
        f"Question: Do not give an explanation. What are the {FWE_TOP} most frequently "
        "appearing coded words in the text above?"
    )
    prefix = f"Answer: The {FWE_TOP} most frequently appearing coded words in the text are:"
    before, after, chat = _frame(tokenizer, intro, question, prefix, variant)
    budget = length - len(before) - len(after)
    words = _distinct(lambda: "".join(rng.choices(string.ascii_lowercase, k=6)), 2000)
    per_word = max(1, len(_ids(tokenizer, " " + " ".join(words[:100]))) // 100)
    total = max(60, budget // per_word)
    for _ in range(50):
        vocab = words[: max(10, min(len(words), total // 4))]  # fewer coded words when short
        weights = [1.0 / (r + 1) ** FWE_ALPHA for r in range(len(vocab))]
        scale = total / sum(weights)
        counts = [max(1, round(w * scale)) for w in weights]
        seq = [w for w, c in zip(vocab, counts, strict=True) for _ in range(c)]
        random.Random(rng.random()).shuffle(seq)
        text = _ids(tokenizer, " " + " ".join(seq) + " .")
        if len(text) <= budget:
            break
        total = int(total * budget / len(text) * 0.98)
        if total < 60:
            raise _too_short(length, len(before) + len(after) + len(text), "fwe")
    return RulerSample(
        "fwe", before + text + after, vocab[:FWE_TOP], MAX_NEW_TOKENS["fwe"],
        {"counts_top": counts[: FWE_TOP + 2], "chat_template": chat, "variant": variant},
    )  # fmt: skip
