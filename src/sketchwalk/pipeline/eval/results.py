"""The runner every task family goes through: its result file and its item loop.

`_Results` is ``eval_<task>.json`` (settings, runs, per-item records), written atomically after
every item and read back, checked, by ``--resume``; `_open_results` / `_start_results` open and
start it on rank 0 of a torchrun launch; `_run_items` computes the items not yet done, dealt out
over the ranks (`sketchwalk.pipeline.distributed`), and records them in the order one process
would; `_mean` / `_run_densities` average a run's items. A task family names the fields each of
its items must carry in `_ITEM_FIELDS` (keyed by task name), which ``--resume`` checks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sketchwalk.atomic import write_json
from sketchwalk.blocks import DataError
from sketchwalk.pipeline import distributed
from sketchwalk.pipeline.eval.runs import EvalInputError, RunSpec
from sketchwalk.pipeline.eval.session import _ActiveRun

RESULT_VERSION = 1


class _Results:
    """The result JSON of one task: settings, runs, per-item records; atomic and resumable."""

    def __init__(self, output_dir: str | os.PathLike | None, task: str, resume: bool):
        self.path = Path(output_dir) / f"eval_{task}.json" if output_dir is not None else None
        self.task = task
        self.data: dict[str, Any] = {"version": RESULT_VERSION, "task": task, "items": {}}
        if output_dir is not None:
            from sketchwalk.atomic import remove_stale_tmp
            from sketchwalk.pipeline.flags import check_output_dir

            check_output_dir(output_dir)
            remove_stale_tmp(output_dir)  # what a killed earlier run was writing
        if self.path is not None and self.path.exists():
            old = self._read()
            if not resume:
                raise EvalInputError(
                    f"{self.path} exists; pass --resume to continue it or choose another "
                    "--output_dir"
                )
            self.data = old

    def _read(self) -> dict[str, Any]:
        """The existing result file, checked; DataError (naming the file, which is left as it
        is) when it cannot be read or is not an eval result of this task."""
        import json

        assert self.path is not None
        try:
            old = json.loads(self.path.read_text(encoding="utf-8"))
            _check_result_file(old, self.task)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise DataError(
                f"{self.path}: not a readable eval_{self.task} result ({reason}); it is left as "
                "it is: move it away or choose another --output_dir"
            ) from None
        return old

    def start(self, settings: dict[str, Any]) -> None:
        old = self.data.get("settings")
        if old is not None and (diff := _settings_diff(old, settings)):
            raise EvalInputError(
                f"{self.path}: --resume with different settings ({', '.join(diff)}); use the "
                "same flags or another --output_dir"
            )
        self.data["settings"] = settings

    def set_runs(self, runs: list[RunSpec]) -> list[RunSpec]:
        """Record ``runs``; a resumed file keeps its earlier runs too. Returns every run the
        file knows, earlier ones first. A run whose config changed since it was saved raises."""
        saved = self.data.get("runs", {})
        for run in runs:
            old = saved.get(run.name)
            if old is not None and old != run.to_dict():
                raise EvalInputError(
                    f"{self.path}: run {run.name!r} was saved with another configuration; "
                    "use the same flags or another --output_dir"
                )
        merged = {**saved, **{r.name: r.to_dict() for r in runs}}
        self.data["runs"] = merged
        out = []
        for name, d in merged.items():
            try:
                out.append(RunSpec.from_dict(d))
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(
                    f"{self.path}: run {name!r} has an unreadable configuration ({exc}); move "
                    "the file away or choose another --output_dir"
                ) from None
        return out

    def done(self, key: str) -> bool:
        return key in self.data["items"]

    def add(self, key: str, item: dict[str, Any]) -> None:
        self.data["items"][key] = item
        self.save()

    def save(self) -> None:
        if self.path is not None:
            write_json(self.path, self.data)


# settings of one launch, not of the results: a resumed run may change them
_PER_LAUNCH_SETTINGS = ("world_size",)


def _settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The settings (but those of one launch) that differ, sorted."""
    keys = (set(old) | set(new)) - set(_PER_LAUNCH_SETTINGS)
    return sorted(k for k in keys if old.get(k) != new.get(k))


_ITEM_FIELDS = {
    "ppl": {"run": str, "nll_sum": (int, float), "tokens": int, "perplexity": (int, float),
            "layer_density": list, "wall_s": (int, float)},
    "niah": {"run": str, "length": int, "depth": (int, float), "correct": bool,
             "layer_density": list, "wall_s": (int, float)},
    "ruler": {"run": str, "task": str, "length": int, "score": (int, float), "refs": list,
              "layer_density": list, "wall_s": (int, float)},
}  # fmt: skip


def _check_result_file(data: Any, task: str) -> None:
    """Raise ValueError unless ``data`` has the layout of an ``eval_<task>.json`` this version
    writes (what --resume reads back)."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, found {type(data).__name__}")
    if data.get("version") != RESULT_VERSION or data.get("task") != task:
        raise ValueError(
            f"version {data.get('version')!r} task {data.get('task')!r}, expected version "
            f"{RESULT_VERSION} task {task!r}"
        )
    for key in ("items", "runs", "settings"):
        if key in data and not isinstance(data[key], dict):
            raise ValueError(f"{key!r} must be a JSON object")
    if not isinstance(data.get("items"), dict):
        raise ValueError("no 'items'")
    for name, run in data.get("runs", {}).items():
        if not isinstance(run, dict):
            raise ValueError(f"run {name!r} must be a JSON object")
    for key, item in data["items"].items():
        if not isinstance(item, dict):
            raise ValueError(f"item {key!r} must be a JSON object")
        for field, kind in _ITEM_FIELDS[task].items():
            value = item.get(field)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"item {key!r}: bad or missing {field!r}")
        if task == "ppl" and item["tokens"] < 1:
            raise ValueError(f"item {key!r}: bad or missing 'tokens'")


def _progress(total: int, desc: str, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=desc, unit="item", disable=not enabled)


def _open_results(
    output_dir: str | os.PathLike | None, task: str, resume: bool, w: distributed.World
) -> _Results:
    """The result file on rank 0 (its errors raised on every rank); a file-less stand-in on
    the other ranks, which write nothing."""
    results = distributed.on_main(lambda: _Results(output_dir, task, resume), w)
    return results if results is not None else _Results(None, task, False)


def _start_results(
    results: _Results, settings: dict[str, Any], runs: list[RunSpec], w: distributed.World
) -> tuple[list[RunSpec], set[str]]:
    """Record settings and runs on rank 0; returns (every run the file knows, the keys of
    the items already done), the same on every rank."""

    def start() -> list[RunSpec]:
        results.start(settings)
        return results.set_runs(runs)

    all_runs = distributed.on_main(start, w)
    done = distributed.broadcast(set(results.data["items"]) if w.is_main else None, w)
    return (all_runs if all_runs is not None else runs), done


def _run_items(
    todo: list[tuple[RunSpec, str, Any]],
    compute: Callable[[RunSpec, Any, Any], dict[str, Any]],
    results: _Results,
    active: _ActiveRun,
    w: distributed.World,
    bar: Any,
    postfix: Callable[[dict[str, Any]], str] | None = None,
    batched: bool = False,
) -> None:
    """Compute the (run, key, payload) items, dealt out over the ranks round by round.

    ``compute(run, sw, payload)`` returns an item's record (``sw``: the run's selector state);
    each record gets the ``rank`` that computed it. Rank 0 adds each round's records to
    ``results`` in the order of ``todo`` (and so writes what one process would); an error on
    any rank stops every rank with it. With ``batched``, an entry is ``(run, keys, payloads)``
    (several items computed together) and ``compute`` returns their records in that order.
    """

    def one(entry: tuple[RunSpec, Any, Any]) -> list[tuple[str, dict[str, Any]]]:
        run, key, payload = entry
        sw = active.use(run)
        if sw is not None:
            sw.clear()
        if not batched:
            return [(key, {**compute(run, sw, payload), "rank": w.rank})]
        records = compute(run, sw, payload)
        return [(k, {**r, "rank": w.rank}) for k, r in zip(key, records, strict=True)]

    try:
        for done in distributed.map_rounds(todo, one, w):
            for key, item in (pair for pairs in done for pair in pairs):
                if w.is_main:
                    results.add(key, item)
                if bar is not None:
                    bar.update(1)
                    if postfix is not None:
                        bar.set_postfix_str(postfix(item))
    finally:
        active.close()


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _run_densities(run: RunSpec, items: list[dict[str, Any]]) -> dict[str, Any]:
    per_layer = [_mean(col) for col in zip(*(it["layer_density"] for it in items), strict=True)]
    return {
        "layer_density": per_layer,
        "density_all_layers": _mean(it["density_all_layers"] for it in items),
        "density_sparse_layers": _mean(it["density_sparse_layers"] for it in items),
    }
