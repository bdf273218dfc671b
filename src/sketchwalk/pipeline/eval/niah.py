"""``sketchwalk eval niah``: RULER-style needle retrieval through ``model.generate()``.

`build_niah_prompt` hides "The special magic number for <key> is <value>." needles in real
text at a given depth, inside the model's chat template (a plain prompt when it has none);
`niah_prompts` builds every (length, depth, sample) prompt from the seed, the same for any
engine that runs them. `evaluate_niah` generates greedily with each run (prefill-only and with
SketchWalk decode) and scores an answer correct when it holds the value; `_aggregate_niah` gives
accuracy overall, by length and by (length, depth).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sketchwalk.atomic import write_text
from sketchwalk.config import SketchWalkConfig
from sketchwalk.pipeline import distributed
from sketchwalk.pipeline.eval.report import _plot_heatmaps, _plot_metric, niah_markdown
from sketchwalk.pipeline.eval.results import (
    _mean,
    _open_results,
    _progress,
    _run_densities,
    _run_items,
    _start_results,
)
from sketchwalk.pipeline.eval.runs import (
    EvalInputError,
    RunSpec,
    _check_block_lengths,
    _check_positive,
    build_runs,
    forced_warnings,
)
from sketchwalk.pipeline.eval.session import (
    _ActiveRun,
    _check_length,
    _decode_density,
    _dense_layers,
    _density_summary,
    _layer_densities,
    _open_session,
    _sync,
    environment,
)
from sketchwalk.pipeline.eval.timing import measure_timing

TASKS = ("single", "multikey")
DEFAULT_DEPTHS = (0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 100.0)

_KEY_WORDS_A = (
    "amber", "brisk", "cobalt", "dusty", "eager", "frozen", "gentle", "hollow", "ivory", "jolly",
    "keen", "lunar", "misty", "noble", "olive", "proud", "quiet", "rustic", "silver", "tidal",
)  # fmt: skip
_KEY_WORDS_B = (
    "anchor", "badger", "canyon", "dagger", "ember", "falcon", "garden", "harbor", "island",
    "jigsaw", "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quartz", "river",
    "saddle", "thistle",
)  # fmt: skip


def _needle(key: str, value: int) -> str:
    return f"The special magic number for {key} is {value}."


def _make_needles(rng: random.Random, count: int) -> list[tuple[str, int]]:
    keys: set[str] = set()
    out = []
    while len(out) < count:
        key = f"{rng.choice(_KEY_WORDS_A)}-{rng.choice(_KEY_WORDS_B)}"
        if key in keys:
            continue
        keys.add(key)
        out.append((key, rng.randint(100_000, 9_999_999)))
    return out


def _prompt_parts(tokenizer: Any, key: str) -> tuple[list[int], list[int], bool]:
    """Token ids before and after the haystack, and whether the chat template was used."""
    intro = (
        "Some special magic numbers are hidden within the following text. Make sure to "
        "memorize them. I will quiz you about the numbers afterwards.\n\n"
    )
    question = (
        f"\n\nWhat is the special magic number for {key} mentioned in the provided text? "
        "Answer with the number only."
    )
    answer_prefix = f"The special magic number for {key} mentioned in the provided text is"
    marker = "@@HAYSTACK@@"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": intro + marker + question}],
            tokenize=False,
            add_generation_prompt=True,
        )
        before, after = text.split(marker, 1)
        after = after + answer_prefix
        ids_before = tokenizer(before, add_special_tokens=False)["input_ids"]
        ids_after = tokenizer(after, add_special_tokens=False)["input_ids"]
        return ids_before, ids_after, True
    ids_before = tokenizer(intro, add_special_tokens=True)["input_ids"]
    ids_after = tokenizer(question + "\n" + answer_prefix, add_special_tokens=False)["input_ids"]
    return ids_before, ids_after, False


def _snap_to_sentence(tokenizer: Any, filler: list[int], pos: int, window: int = 48) -> int:
    """Move an insertion point back to just after a sentence or line end, if one is near."""
    for p in range(pos, max(0, pos - window) - 1, -1):
        if p == 0 or p == len(filler):
            return p
        if tokenizer.decode([filler[p - 1]]).rstrip(" ").endswith((".", "!", "?", "\n")):
            return p
    return pos


def build_niah_prompt(
    tokenizer: Any,
    filler: Sequence[int],
    length: int,
    depth: float,
    rng: random.Random,
    num_needles: int = 1,
) -> dict[str, Any]:
    """One RULER-style retrieval prompt of exactly ``length`` tokens.

    The target needle goes at ``depth`` percent of the haystack (snapped back to a sentence end
    when one is within a few tokens), distractor needles (``num_needles - 1``, other keys) at
    random depths; the question asks for the target's key.

    Args:
        tokenizer: the model's tokenizer.
        filler: real-text token ids, at least as many as the haystack needs.
        length: total prompt tokens.
        depth: 0..100.
        rng: seeded generator for the needles.
        num_needles: needles in the haystack (1: single needle).

    Returns:
        dict with ``input_ids`` (int64 (length,)), ``key``, ``value``, ``needles``,
        ``needle_positions`` (token offsets in the prompt), ``chat_template``.
    """
    needles = _make_needles(rng, num_needles)
    key, value = needles[0]
    before, after, chat = _prompt_parts(tokenizer, key)
    needle_ids = [tokenizer(" " + _needle(k, v) + " ", add_special_tokens=False)["input_ids"]
                  for k, v in needles]  # fmt: skip
    hay = length - len(before) - len(after) - sum(len(n) for n in needle_ids)
    if hay < 1:
        raise EvalInputError(
            f"--seq_lens {length} is too short for the needle prompt "
            f"({length - hay + 1} tokens without any haystack)"
        )
    if len(filler) < hay:
        raise EvalInputError(f"filler has {len(filler)} tokens, the haystack needs {hay}")
    hay_ids = list(filler[:hay])
    depths = [depth] + [rng.uniform(0.0, 100.0) for _ in needles[1:]]
    spots = [_snap_to_sentence(tokenizer, hay_ids, round(d / 100.0 * hay)) for d in depths]
    # insert from the back so earlier offsets stay valid
    order = sorted(range(len(needles)), key=lambda j: spots[j], reverse=True)
    for j in order:
        hay_ids[spots[j] : spots[j]] = needle_ids[j]
    ids = before + hay_ids + after
    assert len(ids) == length, (len(ids), length)
    positions = []
    for j in range(len(needles)):
        shift = sum(len(needle_ids[m]) for m in range(len(needles)) if spots[m] < spots[j])
        shift += sum(len(needle_ids[m]) for m in range(j) if spots[m] == spots[j])
        positions.append(len(before) + spots[j] + shift)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.int64),
        "key": key,
        "value": value,
        "needles": [{"key": k, "value": v} for k, v in needles],
        "needle_positions": positions,
        "chat_template": chat,
    }


def _niah_fillers(
    tokenizer: Any,
    lengths: Sequence[int],
    num_samples: int,
    text_source: str,
    text_file: str | None,
    seed: int,
) -> dict[int, list[Any]]:
    """Real-text filler passages per length (each at least as long as that prompt)."""
    from sketchwalk.hf.text import make_passages

    return {
        length: make_passages(tokenizer, length, num_samples, text_source, text_file, seed=seed)
        for length in lengths
    }


def _filler_ids(tokenizer: Any, passage: Any) -> list[int]:
    ids = passage.input_ids.tolist()
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and ids and ids[0] == bos:
        ids = ids[1:]
    return ids


def niah_prompts(
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    num_samples: int,
    task: str,
    num_needles: int,
    text_source: str = "auto",
    text_file: str | None = None,
    seed: int = 0,
) -> tuple[dict[int, list[Any]], dict[tuple[int, float, int], dict[str, Any]]]:
    """The needle prompts of `evaluate_niah` (the same for any engine that runs them): the
    filler passages per length and, per (length, depth, sample), `build_niah_prompt`'s dict,
    seeded by seed, length, depth, sample and task."""
    fillers = _niah_fillers(tokenizer, lengths, num_samples, text_source, text_file, seed)
    prompts: dict[tuple[int, float, int], dict[str, Any]] = {}
    for length in lengths:
        for depth in depths:
            for s in range(num_samples):
                rng = random.Random(f"niah:{seed}:{length}:{depth:g}:{s}:{task}")
                filler = _filler_ids(tokenizer, fillers[length][s])
                prompts[(length, depth, s)] = build_niah_prompt(
                    tokenizer, filler, length, depth, rng, num_needles
                )
    return fillers, prompts


def evaluate_niah(
    model_path: str | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    seq_lens: Sequence[int] = (4096,),
    depths: Sequence[float] = DEFAULT_DEPTHS,
    num_samples: int = 1,
    task: str = "single",
    num_needles: int = 4,
    max_new_tokens: int = 12,
    densities: Sequence[float] = (0.1, 0.2, 0.3),
    selectors: Sequence[str] = ("dense", "sketchwalk", "oracle", "streaming"),
    variants: Sequence[str] = (),
    decode: Sequence[str] = ("dense", "sketchwalk"),
    base_config: SketchWalkConfig | None = None,
    text_source: str = "auto",
    text_file: str | None = None,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    selection_backend: str = "auto",
    gate_path: str | None = None,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    timing: bool = False,
    timing_decode_tokens: int = 32,
    progress: bool = True,
    plots: bool = True,
    device_map: Any = None,
) -> dict[str, Any]:
    """Needle retrieval accuracy per selector (prefill-only and prefill + SketchWalk decode).

    Returns:
        The result dict (also ``output_dir/eval_niah.json``): ``settings``, ``environment``,
        ``runs``, ``items`` (per run, length, depth and sample: the key, value, answer,
        correctness, prompt hash, per-layer prefill density, decode density, seconds),
        ``results`` (per run: accuracy overall, by length and by (length, depth), realized
        densities) and ``timing`` when asked.
    """
    if task not in TASKS:
        raise EvalInputError(f"--task must be one of {TASKS}, got {task!r}")
    lengths = list(seq_lens)
    if not lengths or any(isinstance(x, bool) or not isinstance(x, int) or x < 8 for x in lengths):
        raise EvalInputError(f"--seq_lens must be ints >= 8, got {list(seq_lens)}")
    depth_list = [float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else math.nan
                  for d in depths]  # fmt: skip
    if not depth_list or any(not 0.0 <= d <= 100.0 for d in depth_list):
        raise EvalInputError(f"--depths must be percentages in [0, 100], got {list(depths)}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise EvalInputError(f"--num_samples must be an int >= 1, got {num_samples!r}")
    needles = num_needles if task == "multikey" else 1
    if isinstance(needles, bool) or not isinstance(needles, int) or needles < 1:
        raise EvalInputError(f"--num_needles must be >= 1, got {num_needles}")
    _check_positive(max_new_tokens=max_new_tokens, timing_decode_tokens=timing_decode_tokens)
    runs = build_runs(selectors, densities, base_config, variants, decode)
    _check_block_lengths(runs, lengths, "--seq_lens")
    w = distributed.world()
    results = _open_results(output_dir, "niah", resume, w)
    session = _open_session(
        model_path, model, tokenizer, distributed.device_for(device, w), dtype, gate_path,
        any(r.kind == "gate" for r in runs), device_map, progress,
    )  # fmt: skip
    for length in lengths:
        _check_length(session.model, length, session.model_id, "--seq_lens")
    tok = session.tokenizer
    fillers, prompts = niah_prompts(
        tok, lengths, depth_list, num_samples, task, needles, text_source, text_file, seed
    )
    from sketchwalk.hf.text import token_sha256

    settings = {
        "model": session.model_id,
        "task": task,
        "num_needles": needles,
        "seq_lens": lengths,
        "depths": depth_list,
        "num_samples": num_samples,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "text_source": fillers[lengths[0]][0].source,
        "prompts_sha256": sorted(token_sha256(p["input_ids"]) for p in prompts.values()),
        "backend": backend,
        "world_size": w.world_size,
    }
    num_layers = int(session.model.config.num_hidden_layers)
    data = results.data
    data["environment"] = environment(session.model, session.device, device_map)
    data["fillers"] = {str(length): [p.info() for p in ps] for length, ps in fillers.items()}
    all_runs, done = _start_results(results, settings, runs, w)
    if w.is_main:
        data["warnings"] = forced_warnings(runs, lengths)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    todo = [(run, key, cell) for run in runs for cell in prompts
            if (key := f"{run.name}|L{cell[0]}|d{cell[1]:g}|s{cell[2]}") not in done]  # fmt: skip

    def compute(run: RunSpec, sw: Any, cell: tuple[int, float, int]) -> dict[str, Any]:
        length, depth, s = cell
        prompt = prompts[cell]
        ids = prompt["input_ids"][None].to(session.device)
        _sync(session.device)
        t0 = time.perf_counter()
        out = session.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
        _sync(session.device)
        seconds = time.perf_counter() - t0
        new = out[0, length:].tolist()
        answer = tok.decode(new, skip_special_tokens=True)
        per_layer = _layer_densities(sw, num_layers, length)
        return {
            "run": run.name,
            "length": length,
            "depth": depth,
            "sample": s,
            "key": prompt["key"],
            "value": prompt["value"],
            "needles": prompt["needles"],
            "needle_positions": prompt["needle_positions"],
            "chat_template": prompt["chat_template"],
            "prompt_sha256": token_sha256(prompt["input_ids"]),
            "filler_sha256": fillers[length][s].sha256,
            "answer": answer,
            "answer_ids": new,
            "correct": str(prompt["value"]) in answer,
            "layer_density": per_layer,
            **_density_summary(per_layer, _dense_layers(run)),
            "decode_density": _decode_density(sw),
            "wall_s": seconds,
        }

    active = _ActiveRun(session, backend, selection_backend)
    with _progress(len(todo), f"niah ({task})", progress and w.is_main) as bar, torch.no_grad():
        _run_items(todo, compute, results, active, w, bar)
    if not w.is_main:
        return data  # rank 0 aggregates and writes
    data["results"] = _aggregate_niah(all_runs, data["items"])
    if timing:
        longest = max(lengths)
        data["timing"] = measure_timing(
            session,
            runs,
            prompts[(longest, depth_list[0], 0)]["input_ids"],
            timing_decode_tokens,
            backend,
            selection_backend,
        )
    results.save()
    if output_dir is not None:
        write_text(Path(output_dir) / "eval_niah.md", niah_markdown(data))
        if plots:
            _plot_metric(data, Path(output_dir) / "eval_niah.png", "accuracy", "accuracy")
            _plot_heatmaps(data, Path(output_dir) / "eval_niah_heatmap.png")
    return data


def _aggregate_niah(runs: list[RunSpec], items: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for run in runs:
        mine = [it for it in items.values() if it["run"] == run.name]
        if not mine:
            continue
        by_length: dict[str, list[bool]] = {}
        by_cell: dict[str, list[bool]] = {}
        for it in mine:
            by_length.setdefault(str(it["length"]), []).append(it["correct"])
            by_cell.setdefault(f"{it['length']}|{it['depth']:g}", []).append(it["correct"])
        out[run.name] = {
            **run.to_dict(),
            "items": len(mine),
            "accuracy": sum(it["correct"] for it in mine) / len(mine),
            "accuracy_by_length": {k: sum(v) / len(v) for k, v in by_length.items()},
            "accuracy_by_length_depth": {k: sum(v) / len(v) for k, v in by_cell.items()},
            **_run_densities(run, mine),
            "decode_density": _mean(it["decode_density"] for it in mine),
            "wall_s": sum(it["wall_s"] for it in mine),
        }
    return out
