"""``sketchwalk eval ruler``: RULER's synthetic tasks for every selector at matched density.

The prompts come from `sketchwalk.pipeline.eval.ruler_tasks` (RULER's task names, this
package's text sources as filler, prompt variants, a ``tune`` and a ``report`` split); each run
generates greedily through ``model.generate()`` with the selector switched on for the prefill
and, with ``--decode sketchwalk``, for the decode steps. A sample scores the share of its
reference values found in the answer (RULER's score).

Results per (run, task, length): the mean score with its 95% Wilson interval (the score of a
sample asking for several values is fractional; the interval treats the mean as a proportion
of ``n`` samples), the task average, and whether streaming at the same budget scores clearly
below dense (its interval's upper end under dense's lower end): a task where it does not
cannot rank selectors (`separation`).

Items are computed in rounds of ``ROUND`` samples per cell, every run within a round, so a run
stopped early (a time limit) holds the same samples for every run; ``--resume`` continues.
With ``--batch_size B``, up to B prompts of one run, round and answer cap go through
``generate()`` together, left-padded to the longest (the real-text needle tasks are exactly
the length asked; the others a few tokens shorter): the SketchWalk integration runs every
row on its own tokens (`sketchwalk.hf.integration`, left-padded batches), and every row is cut
at its own end of sequence. An answer equals the one-at-a-time answer up to the kernels'
batch-dependent rounding; the per-layer densities recorded for each item are the batch's
mean (the selector records one call per layer and batch).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import sketchwalk.pipeline.eval.ruler_tasks as rt
from sketchwalk.atomic import write_text
from sketchwalk.config import SketchWalkConfig
from sketchwalk.pipeline import distributed
from sketchwalk.pipeline.eval.report import _fmt, _layer_markdown, _plot_metric
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

__all__ = ["DEFAULT_TASKS", "evaluate_ruler", "ruler_markdown", "ruler_prompts", "wilson"]

# The tasks run when none are named: every task of RULER's synthetic suite.
DEFAULT_TASKS = rt.TASKS
ROUND = 4
Z95 = 1.959963984540054


def wilson(mean: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``mean`` observed over ``n`` samples."""
    if n < 1:
        raise ValueError("wilson: n must be >= 1")
    denom = 1.0 + z * z / n
    center = (mean + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(0.0, mean * (1 - mean)) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def ruler_prompts(
    tokenizer: Any,
    tasks: Sequence[str],
    lengths: Sequence[int],
    num_samples: int,
    prompt_variants: Sequence[str] = ("after",),
    split: str = "report",
    text_source: str = "auto",
    text_file: str | None = None,
    seed: int = 0,
    length_jitter: int = 0,
) -> tuple[rt.TextPool, dict[tuple[str, str, int, int], rt.RulerSample]]:
    """Every (task, prompt variant, length, sample) prompt, seeded by split, seed, task, length
    and sample (the variants of one sample hide the same values); the same for any engine.

    ``length_jitter`` J > 0: a sample's prompt is built for ``length - j`` tokens, j drawn
    uniformly from 0..J once per round of `ROUND` samples (seeded by split, seed, length and
    round; the same for every task of the round, so a batch of real-text prompts, which are
    exactly as long as asked, needs no padding), so prompts end anywhere in a block as real
    ones do; the cell keeps the nominal length. J = 0 gives the prompts of before, token for
    token."""
    pool = rt.TextPool(tokenizer, text_source, text_file)
    prompts = {}
    for task in tasks:
        for length in lengths:
            for s in range(num_samples):
                jitter = random.Random(f"ruler-jitter:{split}:{seed}:{length}:{s // ROUND}")
                cut = jitter.randint(0, length_jitter)
                for variant in prompt_variants:
                    rng = random.Random(f"ruler:{split}:{seed}:{task}:{length}:{s}")
                    prompts[(task, variant, length, s)] = rt.build_sample(
                        task, tokenizer, pool, length - cut, rng, split, variant
                    )
    return pool, prompts


def _check_choices(values: Sequence[str], allowed: Sequence[str], flag: str) -> list[str]:
    values = list(values)
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise EvalInputError(f"{flag}: choose from {', '.join(allowed)}; got {bad or 'nothing'}")
    if len(set(values)) != len(values):
        raise EvalInputError(f"{flag}: each value once, got {values}")
    return values


def evaluate_ruler(
    model_path: str | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    seq_lens: Sequence[int] = (4096,),
    tasks: Sequence[str] = DEFAULT_TASKS,
    num_samples: int = 4,
    prompt_variants: Sequence[str] = ("after",),
    split: str = "report",
    densities: Sequence[float] = (0.1, 0.2),
    selectors: Sequence[str] = ("dense", "sketchwalk", "oracle", "streaming"),
    variants: Sequence[str] = (),
    decode: Sequence[str] = ("sketchwalk",),
    max_new_tokens: int | None = None,
    batch_size: int = 1,
    length_jitter: int = 0,
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
    progress: bool = True,
    plots: bool = True,
    device_map: Any = None,
) -> dict[str, Any]:
    """RULER task scores per selector, task and length.

    Returns:
        The result dict (also ``output_dir/eval_ruler.json``): ``settings``, ``environment``,
        ``runs``, ``items`` (per run, task, prompt variant, length and sample: the references,
        answer, score, prompt hash, per-layer prefill density, decode density, seconds),
        ``results`` (per run: score per task and length with its Wilson interval, task averages,
        realized densities) and ``separation`` (per task and length: dense's interval and
        whether streaming at each density scores clearly below it).
    """
    tasks = _check_choices(tasks, rt.TASKS, "--tasks")
    prompt_variants = _check_choices(prompt_variants, rt.PROMPT_VARIANTS, "--prompts")
    if split not in rt.SPLITS:
        raise EvalInputError(f"--split must be one of {rt.SPLITS}, got {split!r}")
    lengths = list(seq_lens)
    if not lengths or any(isinstance(x, bool) or not isinstance(x, int) or x < 64 for x in lengths):
        raise EvalInputError(f"--seq_lens must be ints >= 64, got {list(seq_lens)}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise EvalInputError(f"--num_samples must be an int >= 1, got {num_samples!r}")
    if max_new_tokens is not None and (
        isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):  # fmt: skip
        raise EvalInputError(f"--max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvalInputError(f"--batch_size must be an int >= 1, got {batch_size!r}")
    if (
        isinstance(length_jitter, bool) or not isinstance(length_jitter, int)
        or not 0 <= length_jitter < min(lengths) // 2
    ):  # fmt: skip
        raise EvalInputError(
            f"--length_jitter must be an int in [0, {min(lengths) // 2}) for --seq_lens "
            f"{lengths}, got {length_jitter!r}"
        )
    runs = build_runs(selectors, densities, base_config, variants, decode, decode_all=True)
    _check_block_lengths(runs, lengths, "--seq_lens")
    w = distributed.world()
    results = _open_results(output_dir, "ruler", resume, w)
    session = _open_session(
        model_path, model, tokenizer, distributed.device_for(device, w), dtype, gate_path,
        any(r.kind == "gate" for r in runs), device_map, progress,
    )  # fmt: skip
    for length in lengths:
        _check_length(session.model, length, session.model_id, "--seq_lens")
    tok = session.tokenizer
    pool, prompts = ruler_prompts(
        tok, tasks, lengths, num_samples, prompt_variants, split, text_source, text_file, seed,
        length_jitter,
    )  # fmt: skip
    from sketchwalk.hf.text import token_sha256

    def sha(sample: rt.RulerSample) -> str:
        return token_sha256(torch.tensor(sample.input_ids, dtype=torch.int64))

    settings = {
        "model": session.model_id,
        "tasks": tasks,
        "seq_lens": lengths,
        "num_samples": num_samples,
        "prompt_variants": prompt_variants,
        "split": split,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "text_source": pool.source,
        "prompts_sha256": sorted(sha(p) for p in prompts.values()),
        "backend": backend,
        "world_size": w.world_size,
    }
    if length_jitter:  # recorded only when used: files written before it resume unchanged
        settings["length_jitter"] = length_jitter
    num_layers = int(session.model.config.num_hidden_layers)
    data = results.data
    data["environment"] = environment(session.model, session.device, device_map)
    all_runs, done = _start_results(results, settings, runs, w)
    if w.is_main:
        data["warnings"] = forced_warnings(runs, lengths)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cells = sorted(prompts, key=lambda c: (c[3] // ROUND, c[2], c[0], c[1], c[3]))

    def cap_of(cell: tuple[str, str, int, int]) -> int:
        return max_new_tokens or prompts[cell].max_new_tokens

    todo: list[tuple[RunSpec, Any, Any]] = []
    for r0 in range(0, num_samples, ROUND):
        in_round = [c for c in cells if r0 <= c[3] < r0 + ROUND]
        for run in runs:
            open_batches: dict[int, tuple[list[str], list[Any]]] = {}
            for cell in in_round:
                key = f"{run.name}|{cell[0]}|{cell[1]}|L{cell[2]}|s{cell[3]}"
                if key in done:
                    continue
                group = cap_of(cell)
                keys, members = open_batches.setdefault(group, ([], []))
                if not keys:
                    todo.append((run, keys, members))  # filled in place, in cell order
                keys.append(key)
                members.append(cell)
                if len(keys) == batch_size:
                    del open_batches[group]

    eos_ids = _eos_ids(session.model, tok)

    def compute_batch(
        run: RunSpec, sw: Any, batch: list[tuple[str, str, int, int]]
    ) -> list[dict[str, Any]]:
        """The batch's records; a batch that runs out of device memory is run again as two
        halves (recursively, down to single prompts), each item recording the batch it ran in:
        a long sweep does not stop at the first batch too large for the device."""
        try:
            return one_batch(run, sw, batch)
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
        if str(session.device).startswith("cuda"):
            torch.cuda.empty_cache()
        half = (len(batch) + 1) // 2
        print(
            f"eval ruler: {run.name}: a batch of {len(batch)} prompts ran out of device "
            f"memory; running it as {half} + {len(batch) - half}",
            file=sys.stderr,
            flush=True,
        )
        records = []
        for part in (batch[:half], batch[half:]):
            if sw is not None:
                sw.clear()  # what the failed call left in the selector state
            records += compute_batch(run, sw, part)
        return records

    def one_batch(
        run: RunSpec, sw: Any, batch: list[tuple[str, str, int, int]]
    ) -> list[dict[str, Any]]:
        samples = [prompts[cell] for cell in batch]
        width = max(len(smp.input_ids) for smp in samples)
        # left padding to the longest prompt (what generate() expects of a decoder-only
        # model); the SketchWalk integration runs each row on its own tokens
        ids = torch.full((len(samples), width), pad_id, dtype=torch.int64)
        mask = torch.zeros((len(samples), width), dtype=torch.int64)
        for row, smp in enumerate(samples):
            ids[row, width - len(smp.input_ids) :] = torch.tensor(smp.input_ids)
            mask[row, width - len(smp.input_ids) :] = 1
        ids, mask = ids.to(session.device), mask.to(session.device)
        _sync(session.device)
        t0 = time.perf_counter()
        cap = cap_of(batch[0])
        out = session.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=cap,
            do_sample=False,
            pad_token_id=pad_id,
        )
        _sync(session.device)
        seconds = time.perf_counter() - t0
        per_layer = _layer_densities(sw, num_layers, ids.shape[1])
        decode_density = _decode_density(sw)
        records = []
        for row, (cell, sample) in enumerate(zip(batch, samples, strict=True)):
            task, variant, length, s = cell
            new = _until_eos(out[row, ids.shape[1] :].tolist(), eos_ids)
            answer = tok.decode(new, skip_special_tokens=True)
            records.append({
                "run": run.name,
                "task": task,
                "variant": variant,
                "length": length,
                "prompt_tokens": len(sample.input_ids),
                "sample": s,
                "refs": sample.refs,
                "info": sample.info,
                "prompt_sha256": sha(sample),
                "answer": answer,
                "answer_tokens": len(new),
                # generation stopped by the cap, not by the model: the answer may be cut off
                "hit_cap": len(new) >= cap,
                "score": rt.score_answer(answer, sample.refs),
                "layer_density": per_layer,
                **_density_summary(per_layer, _dense_layers(run)),
                "decode_density": decode_density,
                # the batch's seconds shared equally among its items
                "wall_s": seconds / len(batch),
                **({"batch": len(batch)} if batch_size > 1 else {}),
            })  # fmt: skip
        return records

    active = _ActiveRun(session, backend, selection_backend)
    with _progress(len(todo), "ruler", progress and w.is_main) as bar, torch.no_grad():
        _run_items(todo, compute_batch, results, active, w, bar,
                   lambda it: f"{it['run']} {it['task']} {it['score']:.2f}",
                   batched=True)  # fmt: skip
    if not w.is_main:
        return data  # rank 0 aggregates and writes
    data["results"] = _aggregate_ruler(all_runs, data["items"])
    data["separation"] = _separation(data["results"], tasks, lengths)
    results.save()
    if output_dir is not None:
        write_text(Path(output_dir) / "eval_ruler.md", ruler_markdown(data))
        if plots:
            _plot_metric(data, Path(output_dir) / "eval_ruler.png", "task_average",
                         "RULER task average")  # fmt: skip
    return data


def _eos_ids(model: Any, tok: Any) -> set[int]:
    """The token ids that end a generated answer (the generation config's and the
    tokenizer's end-of-sequence ids)."""
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tok.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return ids


def _until_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """``tokens`` up to and including the first end-of-sequence id: what ``generate()``
    returns for a batch row that finished before the others (they are followed by padding)."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens


def _cell_stats(scores: list[float]) -> dict[str, Any]:
    mean = sum(scores) / len(scores)
    lo, hi = wilson(mean, len(scores))
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(scores)}


def _aggregate_ruler(runs: list[RunSpec], items: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for run in runs:
        mine = [it for it in items.values() if it["run"] == run.name]
        if not mine:
            continue
        cells: dict[str, dict[str, list[float]]] = {}
        for it in mine:
            cells.setdefault(it["task"], {}).setdefault(str(it["length"]), []).append(it["score"])
        by_task = {t: {x: _cell_stats(v) for x, v in per.items()} for t, per in cells.items()}
        lengths = sorted({x for per in by_task.values() for x in per}, key=int)
        average_by_length = {
            x: _mean(per[x]["mean"] for per in by_task.values() if x in per) for x in lengths
        }
        out[run.name] = {
            **run.to_dict(),
            "items": len(mine),
            # None where the items predate the record (results of an earlier version)
            "answers_at_cap": (
                sum(it["hit_cap"] for it in mine) if all("hit_cap" in it for it in mine) else None
            ),
            "scores": by_task,
            "task_average_by_length": average_by_length,
            "task_average": _mean(average_by_length.values()),
            **_run_densities(run, mine),
            "decode_density": _mean(it["decode_density"] for it in mine),
            "wall_s": sum(it["wall_s"] for it in mine),
        }
    return out


def _separation(
    res: dict[str, Any], tasks: Sequence[str], lengths: Sequence[int]
) -> dict[str, Any]:
    """Per task and length: dense's interval and, per streaming run, whether its interval lies
    entirely below dense's (the task separates a sink-plus-window baseline from dense)."""
    dense = res.get("dense")
    out: dict[str, Any] = {}
    if dense is None:
        return out
    for task in tasks:
        for length in map(str, lengths):
            d = dense["scores"].get(task, {}).get(length)
            if d is None:
                continue
            entry: dict[str, Any] = {"dense": d, "streaming": {}}
            for name, r in res.items():
                s = r["scores"].get(task, {}).get(length)
                if r["kind"] == "streaming" and s is not None:
                    entry["streaming"][name] = {**s, "separates": s["hi"] < d["lo"]}
            out[f"{task}|{length}"] = entry
    return out


def _pct(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return "-"
    return f"{100 * stats['mean']:.0f} [{100 * stats['lo']:.0f}, {100 * stats['hi']:.0f}]"


def ruler_markdown(data: dict[str, Any]) -> str:
    """Score tables per length (runs x tasks, with 95% intervals), the separation table and the
    realized density per layer."""
    s = data["settings"]
    res = data.get("results", {})
    tasks = s["tasks"]
    dense = res.get("dense")
    lines = [
        f"# RULER tasks: {s['model']}, {s['split']} split, {s['num_samples']} sample(s) per "
        f"cell, prompts {', '.join(s['prompt_variants'])}, {s['text_source']} filler",
        "",
        "Score in % (RULER's: share of the reference values in the answer), 95% Wilson "
        "interval in brackets; * = outside dense's interval. Answers at the cap: generation "
        "stopped by --max_new_tokens, not by the model (such an answer may be cut off).",
    ]
    for length in map(str, s["seq_lens"]):
        lines += [
            "",
            f"## {length} tokens",
            "",
            "| run | decode | density (sparse layers) | answers at the cap | average | "
            + " | ".join(tasks)
            + " |",
            "|---|---|---:|---:|---:|" + "---:|" * len(tasks),
        ]
        for name, r in res.items():
            cells = []
            for task in tasks:
                st = r["scores"].get(task, {}).get(length)
                ref = None if dense is None else dense["scores"].get(task, {}).get(length)
                mark = ""
                if st is not None and ref is not None and r["kind"] != "dense":
                    mark = "*" if not ref["lo"] <= st["mean"] <= ref["hi"] else ""
                cells.append(_pct(st) + mark)
            avg = r["task_average_by_length"].get(length)
            cap, average = _fmt(r["answers_at_cap"], "d"), _fmt(avg and 100 * avg, ".1f")
            lines.append(
                f"| {name} | {r['decode']} | {_fmt(r['density_sparse_layers'], '.3f')} | "
                f"{cap} | {average} | " + " | ".join(cells) + " |"
            )
    sep = data.get("separation", {})
    if sep:
        lines += [
            "",
            "## Does the task separate streaming (sink + window at the same budget) from dense?",
            "",
            "| task | length | dense | streaming run | streaming | separates |",
            "|---|---:|---:|---|---:|---|",
        ]
        for key, entry in sep.items():
            task, length = key.split("|")
            for name, st in entry["streaming"].items():
                lines.append(
                    f"| {task} | {length} | {_pct(entry['dense'])} | {name} | {_pct(st)} | "
                    f"{'yes' if st['separates'] else 'no'} |"
                )
    return "\n".join(lines + _layer_markdown(data)) + "\n"
