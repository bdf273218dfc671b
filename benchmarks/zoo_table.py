"""One table of every selector at matched density on one model: perplexity, RULER task average
and needle accuracy with sparse decoding, realized density, and the per-layer selection time.

    PYTHONPATH=src python3 benchmarks/zoo_table.py \\
        --ppl benchmarks/results/eval_qwen/zoo_ppl_32000 \\
        --ruler benchmarks/results/eval_qwen/zoo_ruler \\
        --attention benchmarks/results/attention/select_cost_h100/prefill_32k_128k.json \\
        --out benchmarks/results/eval_qwen/zoo_table

writes ``zoo_table.md`` and ``zoo_table.json`` (atomically). ``--ppl`` takes folders written by
``sketchwalk eval ppl`` (``eval_ppl.json``: stages ppl32, ruler_ppl, zoo_ppl of
benchmarks/eval_qwen_gpu.sh), ``--ruler`` folders written by ``sketchwalk eval ruler``
(``eval_ruler.json``: stages ruler_report, zoo_ruler), ``--attention`` JSON files written by
benchmarks/attention.py (``--mode prefill``; its peer selectors are timed unless it ran with an
empty ``--selectors``). Every value is computed from the per-item records, so a run stopped by a
time limit (no ``results`` block yet) still counts, its item count shown beside the expected one.

One row per run (selector or ``--variant``, at one density; a RULER run with sparse decode steps
shares the row of its prefill-only namesake and is preferred over it). Columns:

- perplexity over all scored tokens of the run, and its change against the dense run of the
  same file (the same passages);
- RULER task average: the mean over the tasks present of each task's mean score, with a 95%
  Wilson interval that treats the average as a proportion over all N items of the run (RULER's
  fractional scores included). When every task has the same number of items this is exactly
  the Wilson interval of the pooled per-item scores; it is the convention of the per-task
  intervals of ``eval ruler`` (`sketchwalk.pipeline.eval.ruler.wilson`);
- needle accuracy with sparse decoding: the same average and interval over the
  ``niah_single_*`` tasks only, for runs with ``--decode sketchwalk`` sparse decode steps (and
  dense, the reference); a prefill-only run leaves it ``-``;
- realized density of the sparse layers (mean over the run's items) in the ppl and the RULER
  run;
- selection time per layer in ms (% of SDPA cuDNN causal attention timed in the same process)
  at each ``--select-lengths`` length: benchmarks/attention.py times ``sketchwalk_select``
  (the ``default`` preset, the ``sketchwalk`` row; of its timed configurations only the
  preset's own ``query_rows`` / ``walk_dtype`` and the ``auto`` backend count) and the peers'
  ``<name>_select``; every other row, and a missing timing, is ``-`` with a footnote.

Below the table, per density: the best peer (xattention, minference, flexprefill) on task average
and on perplexity (marked in the table), whether ``sketchwalk`` is at least as good as every
peer on the task average by point estimate (overlapping intervals are reported as ties within
interval, not as equal), and whether its perplexity is within 0.2% of the best peer's.

Every ppl file must hold one model; lengths: the only one present, else ``--ppl-length`` /
``--ruler-length``; RULER files must share a split; attention files a GPU, and ``--shape`` picks
their attention shape when they hold several. A missing or unreadable file, or one source of
the same cell in two files, is an error naming the files (exit 1); a bad flag exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sketchwalk.atomic import write_json, write_text
from sketchwalk.blocks import DataError, SketchwalkError, UsageError
from sketchwalk.config import SketchWalkConfig
from sketchwalk.pipeline.eval.report import _fmt
from sketchwalk.pipeline.eval.results import _check_result_file, _mean
from sketchwalk.pipeline.eval.ruler import wilson
from sketchwalk.selection.selectors import PEER_SELECTORS

DECODE_SUFFIX = "+decode"
NEEDLE_PREFIX = "niah_single_"
# selectors first in this order within a density, then the variants in the order they appear
ROW_ORDER = (
    "oracle",
    "sketchwalk",
    "paper",
    "gate",
    "streaming",
    "forced",
    "quest",
    *PEER_SELECTORS,
)
# the table's selector -> the method benchmarks/attention.py records its selection time under
SELECT_METHODS = {"sketchwalk": "sketchwalk_select", **{p: f"{p}_select" for p in PEER_SELECTORS}}
# config fields a budget sets (the density swept), not the preset
_BUDGET_FIELDS = ("density", "mass", "top_k_blocks", "kblocks_frac")
PPL_TOLERANCE_PCT = 0.2
BEST_TASK, BEST_PPL = "†", "‡"


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file ({what})") from None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise DataError(f"{path}: not a readable {what} ({reason})") from None


def load_eval(folder: str | Path, task: str) -> tuple[Path, dict[str, Any]]:
    """The ``eval_<task>.json`` of an ``sketchwalk eval <task>`` output folder (or that file).

    Returns:
        (the file's path, its checked content).

    Raises:
        DataError: naming the file, when it is missing, unreadable or not such a result.
    """
    path = Path(folder)
    if path.is_dir() or path.suffix != ".json":
        path = path / f"eval_{task}.json"
    data = _read_json(path, f"eval_{task}.json")
    try:
        _check_result_file(data, task)
        if not isinstance(data.get("settings"), dict) or not isinstance(data.get("runs"), dict):
            raise ValueError("no 'settings' or 'runs'")
        for key in ("model", *(("seq_len",) if task == "ppl" else ("split", "num_samples"))):
            if key not in data["settings"]:
                raise ValueError(f"settings has no {key!r}")
    except ValueError as exc:
        raise DataError(f"{path}: not a readable eval_{task} result ({exc})") from None
    return path, data


def load_attention(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """A benchmarks/attention.py result, checked (its prefill records need what the table reads).

    Raises:
        DataError: naming the file, when it is missing, unreadable or not such a result.
    """
    path = Path(path)
    data = _read_json(path, "benchmarks/attention.py result")
    try:
        if not isinstance(data, dict) or not isinstance(data.get("environment"), dict):
            raise ValueError("no 'environment'")
        if not isinstance(data.get("records"), list):
            raise ValueError("no 'records'")
        for i, rec in enumerate(data["records"]):
            if not isinstance(rec, dict) or rec.get("kind") != "prefill":
                continue
            need = ("method", "shape", "seq_len", "ms")
            if rec.get("method", "").endswith("_select"):
                need += ("density",)
            missing = [k for k in need if k not in rec]
            if missing:
                raise ValueError(f"record {i} has no {missing[0]!r}")
    except ValueError as exc:
        raise DataError(f"{path}: not a benchmarks/attention.py result ({exc})") from None
    return path, data


def _one(values: set[Any], flag: str, given: Any, what: str) -> Any:
    """The value ``flag`` gave (it must be one of ``values``), else the one of ``values``;
    UsageError when ambiguous or absent."""
    if given is not None:
        if values and given not in values:
            raise UsageError(f"{flag} {given}: the files hold {sorted(values)}")
        return given
    if len(values) > 1:
        shown = ", ".join(map(str, sorted(values)))
        raise UsageError(f"{flag}: the files hold several {what} ({shown}); pass one")
    return next(iter(values), None)


def _same(values: dict[Any, Path], what: str) -> None:
    """DataError unless the files (value -> a file holding it) agree on ``what``."""
    if len(values) > 1:
        shown = "; ".join(f"{p}: {v}" for v, p in values.items())
        raise DataError(f"the files hold different {what} ({shown}); one table takes one")


def _row_id(run_name: str) -> str:
    return run_name.removesuffix(DECODE_SUFFIX)


def _label(run_name: str) -> str:
    return run_name.split("@", 1)[0]


def interval(mean: float, n: int) -> dict[str, Any]:
    """The 95% Wilson interval of ``mean`` treated as a proportion over ``n`` items."""
    lo, hi = wilson(mean, n)
    return {"mean": mean, "lo": lo, "hi": hi, "n": n}


def task_average(items: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The mean over tasks of each task's mean item score, with `interval` over all items.

    Args:
        items: RULER item records (``task``, ``score``) of one run at one length.

    Returns:
        ``{"mean", "lo", "hi", "n", "tasks"}`` or None without items.
    """
    by_task: dict[str, list[float]] = {}
    for it in items:
        by_task.setdefault(it["task"], []).append(float(it["score"]))
    if not by_task:
        return None
    mean = sum(sum(v) / len(v) for v in by_task.values()) / len(by_task)
    return {**interval(mean, len(items)), "tasks": sorted(by_task)}


def _sole(found: dict[Any, tuple[Path, Any]], key: Any, path: Path, value: Any, what: str) -> None:
    if key in found:
        raise DataError(f"{found[key][0]} and {path} both hold {what}; pass one of them")
    found[key] = (path, value)


def ppl_rows(
    sources: Sequence[tuple[Path, dict[str, Any]]], length: int
) -> dict[str, dict[str, Any]]:
    """Per table row: the ppl run at ``length`` tokens (perplexity over all its scored tokens,
    change against the same file's dense run, realized density of the sparse layers)."""
    found: dict[str, tuple[Path, Any]] = {}
    for path, data in sources:
        if data["settings"]["seq_len"] != length:
            continue
        per_run: dict[str, list[dict[str, Any]]] = {}
        for it in data["items"].values():
            per_run.setdefault(it["run"], []).append(it)
        stats = {}
        for name, items in per_run.items():
            nll, tokens = sum(it["nll_sum"] for it in items), sum(it["tokens"] for it in items)
            stats[name] = {
                "run": name,
                "file": str(path),
                "perplexity": math.exp(nll / tokens),
                "samples": len(items),
                "tokens": tokens,
                "density_sparse_layers": _mean(it.get("density_sparse_layers") for it in items),
            }
        dense = stats.get("dense")
        for name, st in stats.items():
            st["delta_vs_dense_pct"] = (
                None
                if dense is None
                else 100.0 * (st["perplexity"] - dense["perplexity"]) / dense["perplexity"]
            )
            _sole(found, _row_id(name), path, st, f"ppl run {name!r} at {length} tokens")
    return {key: value for key, (_, value) in found.items()}


def ruler_rows(
    sources: Sequence[tuple[Path, dict[str, Any]]], length: int
) -> dict[str, dict[str, Any]]:
    """Per table row: the RULER run at ``length`` tokens (sparse decode steps preferred over
    the prefill-only run of the same name): task average and needle accuracy with intervals,
    items against the items expected, realized density of the sparse layers."""
    found: dict[str, tuple[Path, Any]] = {}
    for path, data in sources:
        s = data["settings"]
        expected = len(s.get("tasks", [])) * len(s.get("prompt_variants", ["after"]))
        expected *= s["num_samples"]
        per_run: dict[str, list[dict[str, Any]]] = {}
        for it in data["items"].values():
            if it["length"] == length:
                per_run.setdefault(it["run"], []).append(it)
        chosen: dict[str, str] = {}
        for name in per_run:
            row = _row_id(name)
            if name.endswith(DECODE_SUFFIX) or row not in chosen:
                chosen[row] = name
        for row, name in chosen.items():
            items = per_run[name]
            decode = data["runs"].get(name, {}).get("decode", "dense")
            sparse_decode = decode == "sketchwalk" or name == "dense"
            needles = [it for it in items if it["task"].startswith(NEEDLE_PREFIX)]
            st = {
                "run": name,
                "file": str(path),
                "decode": decode,
                "task_average": task_average(items),
                "needle": task_average(needles) if sparse_decode else None,
                "items": len(items),
                "expected_items": expected,
                "density_sparse_layers": _mean(it.get("density_sparse_layers") for it in items),
            }
            _sole(found, row, path, st, f"RULER run {name!r} at {length} tokens")
    return {key: value for key, (_, value) in found.items()}


def _default_preset_record(rec: dict[str, Any]) -> bool:
    """Whether a ``sketchwalk_select`` timing ran the default preset's own selection config
    (a record without the field ran the preset of its day: attention.py then set none)."""
    preset = SketchWalkConfig.preset("default")
    return (
        rec.get("query_rows", preset.query_rows) == preset.query_rows
        and rec.get("walk_dtype", preset.walk_dtype) == preset.walk_dtype
        and rec.get("select_backend", "auto") == "auto"
    )


def selection_times(
    sources: Sequence[tuple[Path, dict[str, Any]]], shape: str, lengths: Sequence[int]
) -> dict[tuple[str, float, int], dict[str, Any]]:
    """(selector, density, length) -> the selection time (ms, cuDNN's ms of the same file,
    shape and length, realized density, file); failed timings carry ``error``."""
    found: dict[Any, tuple[Path, Any]] = {}
    by_method = {m: sel for sel, m in SELECT_METHODS.items()}
    for path, data in sources:
        pre = [r for r in data["records"] if r.get("kind") == "prefill" and r["shape"] == shape]
        cudnn = {r["seq_len"]: r["ms"] for r in pre if r["method"] == "sdpa_cudnn"}
        for rec in pre:
            selector = by_method.get(rec["method"])
            if selector is None or rec["seq_len"] not in lengths:
                continue
            if selector == "sketchwalk" and not _default_preset_record(rec):
                continue
            ms = rec["ms"]
            failed = ms is None or ms != ms or "error" in rec
            value = {
                "ms": None if failed else ms,
                "cudnn_ms": cudnn.get(rec["seq_len"]),
                "actual_density": rec.get("actual_density"),
                "file": str(path),
                **({"error": rec.get("error", "no time")} if failed else {}),
            }
            key = (selector, round(float(rec["density"]), 6), rec["seq_len"])
            what = f"{rec['method']} at density {rec['density']:g}, {rec['seq_len']} tokens"
            _sole(found, key, path, value, what)
    return {key: value for key, (_, value) in found.items()}


def _preset_differences(config: dict[str, Any] | None) -> list[str]:
    """Fields (but the budget) where a run's saved config differs from the default preset."""
    if config is None:
        return []
    preset = SketchWalkConfig.preset("default").to_dict()
    return sorted(
        k
        for k, v in config.items()
        if k in preset and k not in _BUDGET_FIELDS and k != "seed" and v != preset[k]
    )


def _order(rows: dict[str, dict[str, Any]]) -> list[str]:
    def key(row_id: str) -> tuple:
        r = rows[row_id]
        label = r["selector"]
        rank = ROW_ORDER.index(label) if label in ROW_ORDER else len(ROW_ORDER)
        if label == "dense":
            group: tuple = (0, 0.0)
        else:
            group = (2, 0.0) if r["density"] is None else (1, r["density"])
        return (group, rank, r["first_seen"])

    return sorted(rows, key=key)


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["lo"] <= b["hi"] and b["lo"] <= a["hi"]


def compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per density: the best peer on task average and on perplexity, and how ``sketchwalk``
    stands against the peers (marks the best peers' rows in place)."""
    out: dict[str, Any] = {}
    densities = sorted({r["density"] for r in rows if r["density"] is not None})
    for d in densities:
        at = {r["selector"]: r for r in rows if r["density"] == d and r["kind"] != "variant"}
        peers = [at[p] for p in PEER_SELECTORS if p in at]
        sw = at.get("sketchwalk")
        entry: dict[str, Any] = {}
        # task averages compare like with like: runs that decode as sketchwalk's run does
        decode = sw["ruler"]["decode"] if sw and sw["ruler"] else "sketchwalk"
        ruled = [p for p in peers if p["ruler"] and p["ruler"]["task_average"]]
        scored = [p for p in ruled if p["ruler"]["decode"] == decode]
        if len(scored) < len(ruled):
            entry["other_decode"] = {
                "decode": decode,
                "peers": [p["selector"] for p in ruled if p not in scored],
            }
        if scored:
            best = max(p["ruler"]["task_average"]["mean"] for p in scored)
            winners = [p for p in scored if p["ruler"]["task_average"]["mean"] == best]
            for p in winners:
                p["best_peer"]["task_average"] = True
            entry["best_peer_task_average"] = {
                "selectors": [p["selector"] for p in winners],
                "mean": best,
            }
            sw_avg = sw["ruler"]["task_average"] if sw and sw["ruler"] else None
            if sw_avg is not None:
                versus = {}
                for p in scored:
                    pa = p["ruler"]["task_average"]
                    versus[p["selector"]] = {
                        "sketchwalk": sw_avg["mean"],
                        "peer": pa["mean"],
                        "at_least_as_good": sw_avg["mean"] >= pa["mean"],
                        "ties_within_interval": _overlap(sw_avg, pa),
                    }
                entry["sketchwalk_task_average"] = {
                    "decode": decode,
                    "at_least_as_good_as_every_peer": all(
                        v["at_least_as_good"] for v in versus.values()
                    ),
                    "missing_peers": [p for p in PEER_SELECTORS if p not in versus],
                    "versus": versus,
                }
        with_ppl = [p for p in peers if p["perplexity"]]
        if with_ppl:
            best = min(p["perplexity"]["perplexity"] for p in with_ppl)
            winners = [p for p in with_ppl if p["perplexity"]["perplexity"] == best]
            for p in winners:
                p["best_peer"]["perplexity"] = True
            entry["best_peer_perplexity"] = {
                "selectors": [p["selector"] for p in winners],
                "perplexity": best,
            }
            if sw and sw["perplexity"]:
                pct = 100.0 * (sw["perplexity"]["perplexity"] - best) / best
                entry["sketchwalk_perplexity"] = {
                    "perplexity": sw["perplexity"]["perplexity"],
                    "vs_best_peer_pct": pct,
                    "within_tolerance": pct <= PPL_TOLERANCE_PCT,
                    "missing_peers": [
                        p for p in PEER_SELECTORS if p not in {q["selector"] for q in with_ppl}
                    ],
                }
        out[f"{d:g}"] = entry
    return out


def build_table(
    ppl: Sequence[tuple[Path, dict[str, Any]]],
    ruler: Sequence[tuple[Path, dict[str, Any]]],
    attention: Sequence[tuple[Path, dict[str, Any]]],
    *,
    ppl_length: int | None = None,
    ruler_length: int | None = None,
    shape: str | None = None,
    select_lengths: Sequence[int] = (32768, 131072),
) -> dict[str, Any]:
    """The table as a dict: ``header``, ``rows``, ``comparisons`` (per density), ``footnotes``.

    Args:
        ppl, ruler, attention: (path, loaded content) of each source file.
        ppl_length, ruler_length: the length whose runs make the columns (None: the only one).
        shape: benchmarks/attention.py's shape (None: the only one the files hold).
        select_lengths: the lengths of the selection-time columns.

    Raises:
        DataError: sources that do not fit together (models, splits, GPUs, one cell twice).
        UsageError: a length or shape that is ambiguous or absent.
    """
    _same({d["settings"]["model"]: p for p, d in (*ppl, *ruler)}, "models")
    _same({d["settings"]["split"]: p for p, d in ruler}, "RULER splits")
    _same({d["environment"].get("gpu"): p for p, d in attention}, "GPUs")
    ppl_lengths = {d["settings"]["seq_len"] for _, d in ppl}
    ppl_length = _one(ppl_lengths, "--ppl-length", ppl_length, "lengths")
    ruler_lengths = {it["length"] for _, d in ruler for it in d["items"].values()}
    ruler_length = _one(ruler_lengths, "--ruler-length", ruler_length, "lengths")
    shapes = {r["shape"] for _, d in attention for r in d["records"] if r.get("kind") == "prefill"}
    shape = _one(shapes, "--shape", shape, "shapes")

    ppl_by_row = ppl_rows(ppl, ppl_length) if ppl else {}
    ruler_by_row = ruler_rows(ruler, ruler_length) if ruler else {}
    times = selection_times(attention, shape, select_lengths) if attention else {}

    runs: dict[str, dict[str, Any]] = {}
    for _, data in (*ppl, *ruler):
        for name, spec in data["runs"].items():
            runs.setdefault(_row_id(name), spec)
    rows: dict[str, dict[str, Any]] = {}
    footnotes: list[str] = []
    for path, data in (*ppl, *ruler):
        used = {
            r["run"]
            for r in (*ppl_by_row.values(), *ruler_by_row.values())
            if r["file"] == str(path)
        }
        if not used:
            footnotes.append(f"{path}: no run at the table's length; not in the table.")
        for name in sorted(used):
            spec = data["runs"].get(name, {})
            if spec.get("kind") == "sketchwalk" and (diff := _preset_differences(spec["config"])):
                footnotes.append(
                    f"{name} in {path}: its config differs from the default preset in "
                    f"{', '.join(diff)} (the selection time is the default preset's)."
                )
    for row_id in [*ppl_by_row, *(r for r in ruler_by_row if r not in ppl_by_row)]:
        spec = runs.get(row_id) or runs.get(row_id + DECODE_SUFFIX) or {}
        density = spec.get("target_density")
        selector = _label(row_id)
        kind = spec.get("kind", "dense" if row_id == "dense" else "variant")
        rows[row_id] = {
            "run": row_id,
            "selector": selector,
            "kind": kind,
            "density": density,
            "perplexity": ppl_by_row.get(row_id),
            "ruler": ruler_by_row.get(row_id),
            "select_ms": {},
            "best_peer": {"task_average": False, "perplexity": False},
            "first_seen": len(rows),
        }
    ordered = [rows[r] for r in _order(rows)]
    for row in ordered:
        del row["first_seen"]
        timed = row["selector"] in SELECT_METHODS and row["kind"] != "variant" and row["density"]
        for length in select_lengths:
            hit = None
            if timed:
                hit = times.get((row["selector"], round(row["density"], 6), length))
                if hit is None and attention:
                    footnotes.append(
                        f"{row['run']}: no {SELECT_METHODS[row['selector']]} timing at "
                        f"{length} tokens in the attention files."
                    )
                elif hit is not None and hit["ms"] is None:
                    footnotes.append(
                        f"{row['run']}: its selection timing at {length} tokens "
                        f"failed ({hit['error']})."
                    )
            row["select_ms"][str(length)] = hit
    untimed = list(
        dict.fromkeys(
            r["selector"]
            for r in ordered
            if r["selector"] != "dense"
            and (r["selector"] not in SELECT_METHODS or r["kind"] == "variant")
        )
    )
    if untimed and attention:
        footnotes.append(
            "selection time: benchmarks/attention.py times sketchwalk (the default preset) and "
            f"the peers only; not timed there: {', '.join(untimed)}."
        )
    for row in ordered:
        r = row["ruler"]
        if r is not None and r["items"] < r["expected_items"]:
            footnotes.append(
                f"{row['run']}: RULER run {r['run']} holds {r['items']} of its "
                f"{r['expected_items']} items (stopped early); its averages cover those."
            )
        if r is not None and r["needle"] is None and r["decode"] != "sketchwalk":
            footnotes.append(
                f"{row['run']}: RULER run {r['run']} decodes densely (prefill "
                "only sparse): no needle accuracy with sparse decoding."
            )
    comparisons = compare(ordered)
    header = _header(ppl, ruler, attention, ppl_length, ruler_length, shape, select_lengths)
    return {"header": header, "rows": ordered, "comparisons": comparisons, "footnotes": footnotes}


def _header(ppl, ruler, attention, ppl_length, ruler_length, shape, select_lengths) -> dict:
    model = next((d["settings"]["model"] for _, d in (*ppl, *ruler)), None)
    head: dict[str, Any] = {"model": model}
    if ppl:
        head["ppl"] = {
            "length": ppl_length,
            "passages": sorted({d["settings"]["num_samples"] for _, d in ppl}),
            "text_source": sorted({str(d["settings"].get("text_source")) for _, d in ppl}),
            "files": [str(p) for p, _ in ppl],
        }
    if ruler:
        s0 = ruler[0][1]["settings"]
        head["ruler"] = {
            "length": ruler_length,
            "split": s0["split"],
            "prompts_per_cell": sorted({d["settings"]["num_samples"] for _, d in ruler}),
            "tasks": sorted({t for _, d in ruler for t in d["settings"].get("tasks", [])}),
            "files": [str(p) for p, _ in ruler],
        }
    if attention:
        env = attention[0][1]["environment"]
        rec = next(
            r
            for _, d in attention
            for r in d["records"]
            if r.get("kind") == "prefill" and r["shape"] == shape
        )
        head["attention"] = {
            "gpu": env.get("gpu"),
            "torch": env.get("torch"),
            "triton": env.get("triton"),
            "shape": shape,
            "num_q_heads": rec.get("num_q_heads"),
            "num_kv_heads": rec.get("num_kv_heads"),
            "head_dim": rec.get("head_dim"),
            "lengths": list(select_lengths),
            "files": [str(p) for p, _ in attention],
        }
    head["interval"] = (
        "95% Wilson interval of the average treated as a proportion over all items of the run "
        "(the pooled per-item scores when every task has as many items)"
    )
    return head


def _pct(stats: dict[str, Any] | None, mark: str = "") -> str:
    if stats is None:
        return "-"
    return f"{100 * stats['mean']:.1f}{mark} [{100 * stats['lo']:.1f}, {100 * stats['hi']:.1f}]"


def _ms(hit: dict[str, Any] | None) -> str:
    if hit is None or hit["ms"] is None:
        return "-"
    share = f" ({100 * hit['ms'] / hit['cudnn_ms']:.1f}%)" if hit["cudnn_ms"] else ""
    return f"{hit['ms']:.2f}{share}"


def _length_name(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def markdown(table: dict[str, Any]) -> str:
    """The table, its header and the per-density comparison as markdown."""
    head = table["header"]
    lines = [f"# Selectors at matched density: {head['model'] or '-'}", ""]
    if "ppl" in head:
        p = head["ppl"]
        lines.append(
            f"- Perplexity: second half of {'/'.join(map(str, p['passages']))} passage(s) of "
            f"{p['length']} tokens ({', '.join(p['text_source'])} text); change vs the dense "
            "run of the same file."
        )
    if "ruler" in head:
        r = head["ruler"]
        lines.append(
            f"- RULER: {r['split']} split, {r['length']} tokens, "
            f"{'/'.join(map(str, r['prompts_per_cell']))} prompt(s) per (task, length) cell, "
            f"tasks {', '.join(r['tasks'])}. Task average in %: mean over the tasks present of "
            f"each task's mean score, with its {head['interval']}. Needles: the same over the "
            f"{NEEDLE_PREFIX}* tasks, only for runs with --decode sketchwalk (sparse decode "
            "steps; dense is the reference)."
        )
    if "attention" in head:
        a = head["attention"]
        lines.append(
            f"- Selection time: per layer, ms (% of SDPA cuDNN causal attention in the same "
            f"process), benchmarks/attention.py on {a['gpu']} (torch {a['torch']}, triton "
            f"{a['triton']}), shape {a['shape']} ({a['num_q_heads']} query / "
            f"{a['num_kv_heads']} KV heads, head dim {a['head_dim']}), batch 1, bf16, block 64."
        )
    lines.append(
        f"- {BEST_TASK} best peer on task average, {BEST_PPL} best peer on perplexity "
        f"(peers: {', '.join(PEER_SELECTORS)}) at that density."
    )
    lengths = head.get("attention", {}).get("lengths", [])
    sel_head = "".join(f" select ms {_length_name(x)} |" for x in lengths)
    lines += [
        "",
        "| run | density | ppl | ppl vs dense | task average % [95%] | items | decode | "
        "needles % [95%] | density ppl | density RULER |" + sel_head,
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|" + "---:|" * len(lengths),
    ]
    for row in table["rows"]:
        p, r = row["perplexity"], row["ruler"]
        ppl_cell = (
            "-"
            if p is None
            else (f"{p['perplexity']:.3f}{BEST_PPL if row['best_peer']['perplexity'] else ''}")
        )
        mark = BEST_TASK if row["best_peer"]["task_average"] else ""
        cells = [
            row["run"],
            _fmt(row["density"], "g"),
            ppl_cell,
            "-" if p is None else _fmt(p["delta_vs_dense_pct"], "+.2f") + "%",
            "-" if r is None else _pct(r["task_average"], mark),
            "-" if r is None else f"{r['items']}/{r['expected_items']}",
            "-" if r is None else r["decode"],
            "-" if r is None else _pct(r["needle"]),
            "-" if p is None else _fmt(p["density_sparse_layers"], ".3f"),
            "-" if r is None else _fmt(r["density_sparse_layers"], ".3f"),
            *(_ms(row["select_ms"].get(str(x))) for x in lengths),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## SketchWalk against the peers, per density", ""]
    for d, entry in table["comparisons"].items():
        lines.append(f"- density {d}: " + _verdict(entry))
    if not table["comparisons"]:
        lines.append("- no density holds both sketchwalk and a peer")
    if table["footnotes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in table["footnotes"]]
    return "\n".join(lines) + "\n"


def _verdict(entry: dict[str, Any]) -> str:
    parts = []
    best = entry.get("best_peer_task_average")
    other = entry.get("other_decode")
    if other is not None:
        parts.append(
            f"task average compared among runs with {other['decode']} decoding only "
            f"(not {', '.join(other['peers'])})"
        )
    if best is None:
        parts.append("no peer has a RULER task average")
    else:
        parts.append(
            f"best peer on task average {'/'.join(best['selectors'])} {100 * best['mean']:.1f}"
        )
        sw = entry.get("sketchwalk_task_average")
        if sw is None:
            parts.append("sketchwalk has no task average")
        else:
            ties = [p for p, v in sw["versus"].items() if v["ties_within_interval"]]
            below = [p for p, v in sw["versus"].items() if not v["at_least_as_good"]]
            own = next(iter(sw["versus"].values()))["sketchwalk"]
            text = (
                f"sketchwalk {100 * own:.1f}: at least as good as every peer on task "
                f"average: {'yes' if sw['at_least_as_good_as_every_peer'] else 'no'}"
            )
            if below:
                text += f" (below {', '.join(below)})"
            if ties:
                text += f"; ties within interval with {', '.join(ties)}"
            if sw["missing_peers"]:
                text += f"; no task average for {', '.join(sw['missing_peers'])}"
            parts.append(text)
    best = entry.get("best_peer_perplexity")
    if best is None:
        parts.append("no peer has a perplexity")
    else:
        parts.append(
            f"best peer on perplexity {'/'.join(best['selectors'])} {best['perplexity']:.3f}"
        )
        sw = entry.get("sketchwalk_perplexity")
        if sw is None:
            parts.append("sketchwalk has no perplexity")
        else:
            within = "yes" if sw["within_tolerance"] else "no"
            text = (
                f"sketchwalk {sw['perplexity']:.3f} ({sw['vs_best_peer_pct']:+.2f}% vs the "
                f"best peer): within {PPL_TOLERANCE_PCT:g}%: {within}"
            )
            if sw["missing_peers"]:
                text += f"; no perplexity for {', '.join(sw['missing_peers'])}"
            parts.append(text)
    return "; ".join(parts) + "."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--ppl", nargs="+", default=[], metavar="DIR", help="sketchwalk eval ppl output folders"
    )
    p.add_argument(
        "--ruler", nargs="+", default=[], metavar="DIR", help="sketchwalk eval ruler output folders"
    )
    p.add_argument(
        "--attention",
        nargs="+",
        default=[],
        metavar="FILE",
        help="benchmarks/attention.py result JSON files",
    )
    p.add_argument(
        "--out", required=True, metavar="PREFIX", help="writes PREFIX.md and PREFIX.json"
    )
    p.add_argument("--ppl-length", type=int, help="the ppl runs' length (default: the only one)")
    p.add_argument(
        "--ruler-length", type=int, help="the RULER items' length (default: the only one)"
    )
    p.add_argument("--shape", help="benchmarks/attention.py shape (default: the only one)")
    p.add_argument(
        "--select-lengths",
        nargs="+",
        type=int,
        default=[32768, 131072],
        help="lengths of the selection-time columns",
    )
    args = p.parse_args(argv)
    try:
        if not (args.ppl or args.ruler):
            raise UsageError("--ppl / --ruler: give at least one eval folder")
        table = build_table(
            [load_eval(x, "ppl") for x in args.ppl],
            [load_eval(x, "ruler") for x in args.ruler],
            [load_attention(x) for x in args.attention],
            ppl_length=args.ppl_length,
            ruler_length=args.ruler_length,
            shape=args.shape,
            select_lengths=args.select_lengths,
        )
        text = markdown(table)
        write_json(f"{args.out}.json", table)
        write_text(f"{args.out}.md", text)
    except SketchwalkError as exc:
        print(f"zoo_table.py: error: {exc}", file=sys.stderr)
        return exc.exit_code
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
