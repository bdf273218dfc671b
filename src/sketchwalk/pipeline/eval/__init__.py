"""Evaluate block selectors end to end on a real model, at matched attention density.

Two tasks (``sketchwalk eval ppl`` and ``sketchwalk eval niah``; Python API
:func:`evaluate_ppl` and :func:`evaluate_niah`):

- ``ppl``: perplexity of the SECOND HALF of ``--num_samples`` real passages of ``--seq_len``
  tokens (``sketchwalk.hf.text.make_passages``: fixed by ``--seed``, recorded by the SHA-256
  of their token ids). One forward pass per passage and selector; the loss is computed from the
  final hidden states in slices of ``--loss_chunk`` positions, so no (T, vocab) float32 tensor
  is ever built.
- ``niah``: RULER-style needle retrieval through ``model.generate()`` (greedy) with the model's
  chat template (a plain prompt when it has none): "The special magic number for <key> is
  <value>." hidden at ``--depths`` (% of the filler) in real text, for each of ``--seq_lens``;
  ``--task multikey`` hides ``--num_needles`` needles with different keys and asks for one.
  Correct = the value appears in the answer. Every answer is saved.

Selectors (``--selectors``; each at every density of ``--densities``): ``dense`` (the stock
model), ``sketchwalk`` (the base config: ``--preset`` plus config flags), every ``--variant
NAME:key=value,...`` (more SketchWalk configs, e.g. ``paper:preset=paper``), ``oracle`` (true
attention mass per block), ``streaming`` (sink + most recent blocks), ``forced`` (only the
forced blocks: the floor) and ``gate`` (a SeerAttention gate checkpoint, ``--gate_path``). All
run through the same sparse attention path (`sketchwalk.hf.integration.enable_selector`) with
the same forced blocks and the same per-row budget (`sketchwalk.selection.baselines`), so only
the ranking differs and the realized densities match. The first ``dense_layers`` layers stay
dense for all. For niah, SketchWalk configs run with each ``--decode`` mode: ``dense``
(prefill-only) and ``sketchwalk`` (prefill + SketchWalk decode).

Outputs in ``--output_dir``: ``eval_<task>.json`` (every selector's config, realized density per
layer and overall, the passages' token hashes, per-item results and answers, the environment),
written atomically after every item; ``--resume`` skips the (selector, sample, length[, depth])
items already there. Also ``eval_<task>.md`` (tables) and plots (``eval_<task>.png``: metric
against realized density, one line per selector; ``eval_niah_heatmap.png``: accuracy by depth
and length). ``--timing`` adds time to first token and decode tokens/s, dense and with each
SketchWalk config, measured in the same process.

Under ``torchrun --nproc_per_node N -m sketchwalk eval ...`` the items are dealt out over the N
processes (`sketchwalk.pipeline.distributed`, docs/distributed.md); rank 0 alone reads, resumes
and writes, and the files are those of one process plus each item's ``rank`` and the settings'
``world_size``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from sketchwalk._version import __version__
from sketchwalk.atomic import write_json, write_text
from sketchwalk.blocks import DataError, UsageError
from sketchwalk.config import SketchWalkConfig, add_config_arguments, config_from_args
from sketchwalk.pipeline import distributed

__all__ = [
    "DECODE_MODES",
    "SELECTORS",
    "EvalInputError",
    "RunSpec",
    "build_niah_prompt",
    "build_runs",
    "evaluate_niah",
    "evaluate_ppl",
    "forced_density",
    "forced_warnings",
    "niah_prompts",
    "parse_variant",
]

SELECTORS = ("dense", "sketchwalk", "oracle", "streaming", "forced", "gate")
SKETCHWALK_KINDS = ("sketchwalk", "variant")
DECODE_MODES = ("dense", "sketchwalk")
TASKS = ("single", "multikey")
DEFAULT_DEPTHS = (0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 100.0)
RESULT_VERSION = 1

_KEY_WORDS_A = (
    "amber", "brisk", "cobalt", "dusty", "eager", "frozen", "gentle", "hollow", "ivory", "jolly",
    "keen", "lunar", "misty", "noble", "olive", "proud", "quiet", "rustic", "silver", "tidal",
)  # fmt: skip
_KEY_WORDS_B = (
    "anchor", "badger", "canyon", "dagger", "ember", "falcon", "garden", "harbor", "island",
    "jigsaw", "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quartz", "river",
    "saddle", "thistle",
)  # fmt: skip


class EvalInputError(UsageError):
    """A bad evaluation input (exit 2); the message says which and what was expected."""


# ---- what runs ------------------------------------------------------------------------------


@dataclasses.dataclass
class RunSpec:
    """One selector at one density.

    Attributes:
        name: unique label, e.g. ``"sketchwalk@0.2"``, ``"paper@0.2+decode"``, ``"dense"``.
        kind: ``"dense"``, ``"sketchwalk"``, ``"variant"``, ``"oracle"``, ``"streaming"``,
            ``"forced"`` or ``"gate"``.
        family: the line a plot draws it on (selector or variant name, ``+decode`` appended).
        density: the budget's target density (None for dense).
        config: the selection config (None for dense).
        decode: ``"dense"`` or ``"sketchwalk"`` (SketchWalk decode steps; SketchWalk kinds only).
    """

    name: str
    kind: str
    family: str
    density: float | None
    config: SketchWalkConfig | None
    decode: str = "dense"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        cfg = data.get("config")
        return cls(
            data["name"],
            data["kind"],
            data["family"],
            data["target_density"],
            SketchWalkConfig.from_dict(cfg) if cfg is not None else None,
            data.get("decode", "dense"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "family": self.family,
            "target_density": self.density,
            "decode": self.decode,
            "config": self.config.to_dict() if self.config is not None else None,
        }


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``"paper:preset=paper,walk=false"`` -> ``("paper", {"preset": "paper", "walk": False})``.

    Values take the type of the `SketchWalkConfig` field; ``none`` gives None; ``preset`` names
    the starting preset (default: the base config's). Raises EvalInputError on a bad spec.
    """
    if ":" not in spec:
        raise EvalInputError(f"--variant {spec!r}: expected NAME:key=value[,key=value...]")
    name, body = (s.strip() for s in spec.split(":", 1))
    if not name or name in SELECTORS or "@" in name or "|" in name:
        raise EvalInputError(f"--variant {spec!r}: bad name {name!r} (not a selector name, no @|)")
    fields = {f.name: f for f in dataclasses.fields(SketchWalkConfig)}
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in body.split(","))):
        if "=" not in item:
            raise EvalInputError(f"--variant {spec!r}: expected key=value, got {item!r}")
        key, raw = (s.strip() for s in item.split("=", 1))
        low = raw.lower()
        if key == "preset":
            out[key] = raw
            continue
        if key not in fields:
            raise EvalInputError(f"--variant {spec!r}: unknown SketchWalkConfig field {key!r}")
        kind = str(fields[key].type)
        try:
            if low == "none":
                out[key] = None
            elif kind == "bool":
                if low not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                out[key] = low in ("true", "1")
            elif kind.startswith("int"):
                out[key] = int(raw)
            elif kind.startswith("float"):
                out[key] = float(raw)
            else:
                out[key] = raw
        except ValueError:
            raise EvalInputError(f"--variant {spec!r}: bad value {raw!r} for {key}") from None
    return name, out


def _check_densities(densities: Sequence[float]) -> list[float]:
    if not densities:
        raise EvalInputError("--densities: give at least one density")
    out = []
    for d in densities:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < float(d) <= 1.0:
            raise EvalInputError(f"--densities: each must be in (0, 1], got {d!r}")
        out.append(float(d))
    return out


def build_runs(
    selectors: Sequence[str],
    densities: Sequence[float],
    base_config: SketchWalkConfig | None = None,
    variants: Sequence[str] = (),
    decode_modes: Sequence[str] = ("dense",),
) -> list[RunSpec]:
    """Every (selector, density[, decode]) run, ``dense`` first.

    Every sparse run's config is ``base_config`` (or the variant's) with ``density`` set to the
    swept value, so all selectors at one density share forced blocks and per-row budgets. A
    variant that sets ``mass`` (the cumulative-mass budget) runs once, with that budget.
    """
    unknown = [s for s in selectors if s not in SELECTORS]
    if unknown:
        raise EvalInputError(f"unknown selector(s) {unknown}; choose from {list(SELECTORS)}")
    bad = [m for m in decode_modes if m not in DECODE_MODES]
    if bad or not decode_modes:
        raise EvalInputError(f"--decode: choose from {list(DECODE_MODES)}, got {list(bad)}")
    densities = _check_densities(densities)
    base = base_config if base_config is not None else SketchWalkConfig()
    parsed = [parse_variant(v) for v in variants]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise EvalInputError(f"--variant names must be unique, got {names}")

    def at(config: SketchWalkConfig, d: float) -> SketchWalkConfig:
        return config.replace(density=d, top_k_blocks=None)

    def variant_at(name: str, overrides: dict[str, Any], d: float | None) -> SketchWalkConfig:
        """The variant's config at density ``d`` (None: its own budget, for ``mass``)."""
        overrides = dict(overrides)
        preset = overrides.pop("preset", None)
        start = base if preset is None else SketchWalkConfig.preset(preset)
        budget = {"density": d, "top_k_blocks": None}
        if d is None:
            budget["kblocks_frac"] = start.kblocks_frac
        try:
            return start.replace(**{**budget, **overrides})
        except (TypeError, ValueError) as exc:
            raise EvalInputError(f"--variant {name}: {exc}") from None

    variant_configs = []
    for name, overrides in parsed:
        is_mass = overrides.get("mass") is not None
        if is_mass:
            overrides = {**overrides, "density": None}
        cfg = variant_at(name, overrides, None if is_mass else densities[0])  # checked early
        variant_configs.append((name, overrides, cfg))

    runs: list[RunSpec] = []
    if "dense" in selectors:
        runs.append(RunSpec("dense", "dense", "dense", None, None))
    for d in densities:
        tag = f"@{d:g}"
        for sel in selectors:
            if sel == "dense":
                continue
            if sel == "sketchwalk":
                for mode in decode_modes:
                    suffix = "+decode" if mode == "sketchwalk" else ""
                    runs.append(
                        RunSpec(f"sketchwalk{tag}{suffix}", sel, f"sketchwalk{suffix}", d,
                                at(base, d), mode)
                    )  # fmt: skip
            else:
                runs.append(RunSpec(f"{sel}{tag}", sel, sel, d, at(base, d)))
        for name, overrides, cfg in variant_configs:
            if cfg.mass is not None:
                continue  # a mass budget is not swept (below)
            cfg_d = variant_at(name, overrides, d)
            for mode in decode_modes:
                suffix = "+decode" if mode == "sketchwalk" else ""
                runs.append(
                    RunSpec(f"{name}{tag}{suffix}", "variant", f"{name}{suffix}", d, cfg_d, mode)
                )
    # A variant that sets the cumulative-mass budget keeps it: its density follows the scores
    # (reported as realized density), so it runs once, not once per swept density.
    for name, _, cfg in variant_configs:
        if cfg.mass is None:
            continue
        for mode in decode_modes:
            suffix = "+decode" if mode == "sketchwalk" else ""
            runs.append(
                RunSpec(f"{name}@mass{cfg.mass:g}{suffix}", "variant", f"{name}{suffix}", None,
                        cfg, mode)
            )  # fmt: skip
    if not runs:
        raise EvalInputError("no runs: give --selectors and/or --variant")
    return runs


# ---- model, selectors, environment ----------------------------------------------------------


def _resolve_device(name: str | torch.device | None) -> torch.device:
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalInputError("--device cuda was asked for but CUDA is not available")
    return dev


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_context(model: Any) -> int | None:
    ctx = getattr(model.config, "max_position_embeddings", None)
    return int(ctx) if isinstance(ctx, int) and ctx > 0 else None


def _check_length(model: Any, length: int, model_id: str, flag: str) -> None:
    ctx = _max_context(model)
    if ctx is not None and length > ctx:
        raise EvalInputError(
            f"{flag} {length} is longer than the model's context of {ctx} tokens ({model_id})"
        )


def environment(model: Any, device: torch.device, device_map: Any = None) -> dict[str, Any]:
    """Versions, device (the inputs' device; ``device_map`` when the model is split) and model
    facts recorded in every result file."""
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        cuda = torch.version.cuda
    else:
        device_name = platform.processor() or platform.machine()
        cuda = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "triton": version("triton"),
        "sketchwalk": __version__,  # also right when run from a source tree
        "cuda": cuda,
        "device": str(device),
        **({} if device_map is None else {"device_map": device_map}),
        "device_name": device_name,
        "cpu_threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attn_implementation": model.config._attn_implementation,
        "num_layers": int(model.config.num_hidden_layers),
        "max_context": _max_context(model),
    }


@dataclasses.dataclass
class _Session:
    model: Any
    tokenizer: Any
    model_id: str
    device: torch.device
    gate_dir: str | None
    gates: Any = None


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars ("Loading weights") off while ``enabled`` is False
    (``--no_progress``), restored afterwards."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _open_session(
    model_path: str | None,
    model: Any,
    tokenizer: Any,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    gate_path: str | None,
    need_gate: bool,
    device_map: Any = None,
    progress: bool = True,
) -> _Session:
    from sketchwalk.hf.models import load_model

    dev = _resolve_device(device)
    gate_dir = gate_path
    if need_gate and gate_dir is None and (model is not None or _gate_dir_of(model_path) is None):
        raise EvalInputError(
            "selector 'gate' needs --gate_path (a SeerAttention gate checkpoint folder)"
        )  # refused before the model loads
    if model is None:
        placed = {} if device_map is None else {"device_map": device_map}
        with _transformers_progress(progress):
            model, tokenizer, resolved = load_model(model_path, device=dev, dtype=dtype, **placed)
        if device_map is not None:
            from sketchwalk.hf.device_map import input_device

            dev = input_device(model)  # inputs go to the embeddings' device
        model_id = resolved.model_id
        if gate_dir is None and resolved.gate_dir is not None:
            gate_dir = str(resolved.gate_dir)
    else:
        if tokenizer is None:
            raise EvalInputError("evaluate_*: pass tokenizer= together with model=")
        model_id = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        dev = next(model.parameters()).device
    session = _Session(model, tokenizer, model_id, dev, gate_dir)
    if need_gate:
        if gate_dir is None:
            raise EvalInputError(
                "selector 'gate' needs --gate_path (a SeerAttention gate checkpoint folder)"
            )
        from sketchwalk.gate.checkpoint import load_gate_checkpoint

        session.gates = load_gate_checkpoint(gate_dir, device=dev)
    return session


def _gate_dir_of(model_path: str | None) -> Any:
    """The gate folder of a SeerAttention checkpoint given as --model_path (None otherwise)."""
    from sketchwalk.hf.models import resolve_model

    return resolve_model(model_path).gate_dir


def _make_selector(run: RunSpec, session: _Session, selection_backend: str) -> Any:
    from sketchwalk.selection import baselines
    from sketchwalk.selection.prefill import SketchWalk

    cfg = run.config
    if run.kind in SKETCHWALK_KINDS:
        return SketchWalk(cfg, backend=selection_backend)
    if run.kind == "oracle":
        chunk = (
            1 << 28 if session.device.type == "cuda" else baselines.DEFAULT_ORACLE_CHUNK_ELEMENTS
        )
        return baselines.OracleSelector(cfg, chunk_elements=chunk)
    if run.kind == "streaming":
        return baselines.StreamingSelector(cfg)
    if run.kind == "forced":
        return baselines.ForcedOnlySelector(cfg)
    if run.kind == "gate":
        return baselines.GateSelector(session.gates, cfg)
    raise EvalInputError(f"unknown selector kind {run.kind!r}")


@contextlib.contextmanager
def _activate(
    session: _Session, run: RunSpec, backend: str, selection_backend: str
) -> Iterator[Any]:
    """The model with ``run``'s selector switched on (None for the stock dense model)."""
    if run.kind == "dense":
        yield None
        return
    from sketchwalk.hf.capture import attention_modules
    from sketchwalk.hf.integration import enable_selector

    selector = _make_selector(run, session, selection_backend)
    attach = getattr(selector, "attach", None)
    if attach is not None:
        attach(attention_modules(session.model))
    try:
        with enable_selector(session.model, selector, backend=backend, decode=run.decode) as sw:
            yield sw
    finally:
        if attach is not None:
            selector.detach()


def forced_density(config: SketchWalkConfig, seq_len: int) -> float:
    """Share of the causal blocks that the forced blocks alone take at ``seq_len`` tokens."""
    from sketchwalk.blocks import num_blocks
    from sketchwalk.selection.select import forced_density as forced_block_density

    return forced_block_density(num_blocks(seq_len, config.block_size), config)


def forced_warnings(runs: Sequence[RunSpec], lengths: Sequence[int]) -> list[str]:
    """Warnings (printed and returned) for runs whose forced blocks alone exceed the target
    density: there every ranked selector keeps the same blocks and the comparison says nothing."""
    out = []
    for run in runs:
        if run.config is None or run.density is None:
            continue
        for length in lengths:
            floor = forced_density(run.config, length)
            if floor > run.density:
                out.append(
                    f"warning: {run.name} at {length} tokens: the forced blocks alone keep "
                    f"{floor:.3f} of the causal blocks (> {run.density:g}); no block is ranked, "
                    "so all selectors coincide (use longer sequences or smaller --sink, "
                    "--window, --dense_last_rows)"
                )
    for line in out:
        print(line, file=sys.stderr)
    return out


def _layer_densities(sw: Any, num_layers: int, seq_len: int) -> list[float]:
    """Prefill density of every layer in the last recorded pass of ``seq_len`` tokens."""
    if sw is None:
        return [1.0] * num_layers
    out = [1.0] * num_layers
    for call in sw.calls:
        if call.prefill and call.q_len == seq_len:
            out[call.layer_idx] = float(call.density)
    return out


def _decode_density(sw: Any) -> float | None:
    if sw is None:
        return None
    steps = [c.density for c in sw.calls if not c.prefill and c.mode == "sparse"]
    return sum(steps) / len(steps) if steps else None


def _density_summary(per_layer: list[float], dense_layers: int | None) -> dict[str, Any]:
    sparse = per_layer[dense_layers:] if dense_layers is not None else []
    return {
        "density_all_layers": sum(per_layer) / len(per_layer),
        "density_sparse_layers": (sum(sparse) / len(sparse)) if sparse else None,
    }


# ---- result files ---------------------------------------------------------------------------


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


def _check_block_lengths(runs: Sequence[RunSpec], lengths: Sequence[int], flag: str) -> None:
    """Every sequence must hold at least one block of every run's block size."""
    for run in runs:
        if run.config is None:
            continue
        short = [x for x in lengths if x < run.config.block_size]
        if short:
            raise EvalInputError(
                f"{flag} {short[0]} is shorter than one block of {run.config.block_size} tokens "
                f"({run.name}); use {flag} >= {run.config.block_size} or a smaller --block_size"
            )


def _check_positive(**values: Any) -> None:
    for flag, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EvalInputError(f"--{flag} must be an int >= 1, got {value!r}")


def _progress(total: int, desc: str, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=desc, unit="item", disable=not enabled)


class _ActiveRun:
    """Keeps one run's selector switched on across consecutive items of that run."""

    def __init__(self, session: _Session, backend: str, selection_backend: str):
        self.session, self.backend, self.selection_backend = session, backend, selection_backend
        self.run: RunSpec | None = None
        self.stack: contextlib.ExitStack | None = None
        self.sw: Any = None

    def use(self, run: RunSpec) -> Any:
        """The selector state of ``run`` (None for dense), switched on if it is not yet."""
        if self.run is not run:
            self.close()
            self.stack = contextlib.ExitStack()
            self.sw = self.stack.enter_context(
                _activate(self.session, run, self.backend, self.selection_backend)
            )
            self.run = run
        return self.sw

    def close(self) -> None:
        if self.stack is not None:
            self.stack.close()
        self.stack, self.run, self.sw = None, None, None


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
) -> None:
    """Compute the (run, key, payload) items, dealt out over the ranks round by round.

    ``compute(run, sw, payload)`` returns an item's record (``sw``: the run's selector state);
    each record gets the ``rank`` that computed it. Rank 0 adds each round's records to
    ``results`` in the order of ``todo`` (and so writes what one process would); an error on
    any rank stops every rank with it.
    """

    def one(entry: tuple[RunSpec, str, Any]) -> tuple[str, dict[str, Any]]:
        run, key, payload = entry
        sw = active.use(run)
        if sw is not None:
            sw.clear()
        return key, {**compute(run, sw, payload), "rank": w.rank}

    try:
        for done in distributed.map_rounds(todo, one, w):
            for key, item in done:
                if w.is_main:
                    results.add(key, item)
                if bar is not None:
                    bar.update(1)
                    if postfix is not None:
                        bar.set_postfix_str(postfix(item))
    finally:
        active.close()


# ---- perplexity -----------------------------------------------------------------------------


def second_half_nll(
    model: Any, input_ids: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over the second half of one sequence, without a (T, vocab) tensor.

    Args:
        model: a causal LM with ``get_decoder()`` and ``get_output_embeddings()``.
        input_ids: int64 (1, T).
        chunk: positions per slice of logits (each slice is (chunk, vocab) float32).

    Returns:
        (float64 scalar tensor on the model's device: sum of -log p(x_t | x_<t) for
        t = T // 2 .. T - 1, number of scored tokens T - T // 2). No host sync inside.
    """
    t = input_ids.shape[1]
    start = t // 2
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state[0]
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    states = hidden[start - 1 : t - 1]
    targets = input_ids[0, start:]
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for s in range(0, states.shape[0], chunk):
        logits = head(states[s : s + chunk]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        # with a device map the head may live on another device than the inputs
        target = targets[s : s + chunk].to(logits.device)
        loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        total = total + loss.double().to(total.device)
    return total, int(targets.numel())


def evaluate_ppl(
    model_path: str | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    seq_len: int = 4096,
    num_samples: int = 2,
    densities: Sequence[float] = (0.1, 0.2, 0.3),
    selectors: Sequence[str] = ("dense", "sketchwalk", "oracle", "streaming"),
    variants: Sequence[str] = (),
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
    loss_chunk: int = 1024,
    progress: bool = True,
    plots: bool = True,
    device_map: Any = None,
) -> dict[str, Any]:
    """Perplexity of the second half of real passages, per selector, at matched densities.

    Returns:
        The result dict (also written to ``output_dir/eval_ppl.json`` when given): ``settings``,
        ``environment``, ``passages`` (token hashes), ``runs`` (configs), ``items`` (per run and
        sample: NLL, tokens, per-layer density, seconds), ``results`` (per run: perplexity,
        delta vs dense, realized density overall / sparse layers / per layer, wall time) and
        ``timing`` when asked.
    """
    from sketchwalk.hf.text import make_passages

    if not isinstance(seq_len, int) or seq_len < 4:
        raise EvalInputError(f"--seq_len must be an int >= 4, got {seq_len!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise EvalInputError(f"--num_samples must be an int >= 1, got {num_samples!r}")
    _check_positive(loss_chunk=loss_chunk, timing_decode_tokens=timing_decode_tokens)
    runs = build_runs(selectors, densities, base_config, variants)
    _check_block_lengths(runs, [seq_len], "--seq_len")
    w = distributed.world()
    results = _open_results(output_dir, "ppl", resume, w)
    session = _open_session(
        model_path, model, tokenizer, distributed.device_for(device, w), dtype, gate_path,
        any(r.kind == "gate" for r in runs), device_map, progress,
    )  # fmt: skip
    _check_length(session.model, seq_len, session.model_id, "--seq_len")
    passages = make_passages(
        session.tokenizer, seq_len, num_samples, text_source, text_file, seed=seed
    )
    settings = {
        "model": session.model_id,
        "seq_len": seq_len,
        "num_samples": num_samples,
        "seed": seed,
        "text_source": passages[0].source,
        "passages_sha256": [p.sha256 for p in passages],
        "backend": backend,
        "world_size": w.world_size,
    }
    num_layers = int(session.model.config.num_hidden_layers)
    data = results.data
    data["environment"] = environment(session.model, session.device, device_map)
    data["passages"] = [p.info() for p in passages]
    all_runs, done = _start_results(results, settings, runs, w)
    if w.is_main:
        data["warnings"] = forced_warnings(runs, [seq_len])
    todo = [(run, key, i) for run in runs for i in range(num_samples)
            if (key := f"{run.name}|T{seq_len}|s{i}") not in done]  # fmt: skip

    def compute(run: RunSpec, sw: Any, i: int) -> dict[str, Any]:
        ids = passages[i].input_ids[None].to(session.device)
        _sync(session.device)
        t0 = time.perf_counter()
        nll, count = second_half_nll(session.model, ids, loss_chunk)
        nll_value = float(nll)
        _sync(session.device)
        seconds = time.perf_counter() - t0
        per_layer = _layer_densities(sw, num_layers, seq_len)
        return {
            "run": run.name,
            "sample": i,
            "seq_len": seq_len,
            "input_ids_sha256": passages[i].sha256,
            "nll_sum": nll_value,
            "tokens": count,
            "perplexity": math.exp(nll_value / count),
            "layer_density": per_layer,
            **_density_summary(per_layer, _dense_layers(run)),
            "wall_s": seconds,
        }

    active = _ActiveRun(session, backend, selection_backend)
    bar_on = progress and w.is_main
    with _progress(len(todo), f"ppl T={seq_len}", bar_on) as bar, torch.no_grad():
        _run_items(todo, compute, results, active, w, bar,
                   lambda it: f"{it['run']} ppl {it['perplexity']:.3f}")  # fmt: skip
    if not w.is_main:
        return data  # rank 0 aggregates and writes
    data["results"] = _aggregate_ppl(all_runs, data["items"])
    if timing:
        data["timing"] = measure_timing(
            session, runs, passages[0].input_ids, timing_decode_tokens, backend, selection_backend
        )
    results.save()
    if output_dir is not None:
        write_text(Path(output_dir) / "eval_ppl.md", ppl_markdown(data))
        if plots:
            _plot_metric(data, Path(output_dir) / "eval_ppl.png", "perplexity", "perplexity")
    return data


def _dense_layers(run: RunSpec) -> int | None:
    return run.config.dense_layers if run.config is not None else None


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


def _aggregate_ppl(runs: list[RunSpec], items: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for run in runs:
        mine = [it for it in items.values() if it["run"] == run.name]
        if not mine:
            continue
        nll = sum(it["nll_sum"] for it in mine)
        tokens = sum(it["tokens"] for it in mine)
        out[run.name] = {
            **run.to_dict(),
            "samples": len(mine),
            "tokens": tokens,
            "perplexity": math.exp(nll / tokens),
            "perplexity_per_sample": [it["perplexity"] for it in mine],
            **_run_densities(run, mine),
            "wall_s": sum(it["wall_s"] for it in mine),
        }
    dense = out.get("dense")
    for res in out.values():
        if dense is not None:
            delta = res["perplexity"] - dense["perplexity"]
            res["delta_vs_dense"] = delta
            res["delta_vs_dense_pct"] = 100.0 * delta / dense["perplexity"]
        else:
            res["delta_vs_dense"] = res["delta_vs_dense_pct"] = None
    return out


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def ppl_markdown(data: dict[str, Any]) -> str:
    """The perplexity table (and the timing table when measured)."""
    s = data["settings"]
    lines = [
        f"# Perplexity: {s['model']}, second half of {s['num_samples']} x {s['seq_len']} "
        f"tokens of {s['text_source']} text",
        "",
        "| selector | decode | target density | realized density (all layers) | "
        "realized density (sparse layers) | perplexity | delta vs dense | delta % | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in data.get("results", {}).items():
        lines.append(
            f"| {name} | {r['decode']} | {_fmt(r['target_density'], '.2f')} | "
            f"{_fmt(r['density_all_layers'], '.4f')} | {_fmt(r['density_sparse_layers'], '.4f')}"
            f" | {r['perplexity']:.4f} | {_fmt(r['delta_vs_dense'], '+.4f')} | "
            f"{_fmt(r['delta_vs_dense_pct'], '+.2f')} | {r['wall_s']:.1f} |"
        )
    return "\n".join(lines + _layer_markdown(data) + _timing_markdown(data)) + "\n"


# ---- needle in a haystack -------------------------------------------------------------------


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


def niah_markdown(data: dict[str, Any]) -> str:
    """Accuracy tables: overall and per length, then depth x length per selector."""
    s = data["settings"]
    lengths = [str(x) for x in s["seq_lens"]]
    lines = [
        f"# Needle retrieval ({s['task']}, {s['num_needles']} needle(s)): {s['model']}, "
        f"{s['num_samples']} sample(s) per cell, {s['text_source']} filler",
        "",
        "| selector | decode | target density | realized density (sparse layers) | "
        "decode density | accuracy | " + " | ".join(f"acc @ {x}" for x in lengths) + " |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * len(lengths),
    ]
    res = data.get("results", {})
    for name, r in res.items():
        per = " | ".join(_fmt(r["accuracy_by_length"].get(x), ".3f") for x in lengths)
        lines.append(
            f"| {name} | {r['decode']} | {_fmt(r['target_density'], '.2f')} | "
            f"{_fmt(r['density_sparse_layers'], '.4f')} | {_fmt(r['decode_density'], '.4f')} | "
            f"{r['accuracy']:.3f} | {per} |"
        )
    depths = [f"{d:g}" for d in s["depths"]]
    lines += ["", "## Accuracy by length (rows) and depth % (columns)", ""]
    for name, r in res.items():
        lines += [f"### {name}", "", "| length | " + " | ".join(depths) + " |",
                  "|---:|" + "---:|" * len(depths)]  # fmt: skip
        for x in lengths:
            cells = " | ".join(
                _fmt(r["accuracy_by_length_depth"].get(f"{x}|{d}"), ".2f") for d in depths
            )
            lines.append(f"| {x} | {cells} |")
        lines.append("")
    return "\n".join(lines + _layer_markdown(data) + _timing_markdown(data)) + "\n"


# ---- timing ---------------------------------------------------------------------------------


def _cache_argument(model: Any) -> str:
    """The name under which this transformers version takes the KV cache (``cache`` in recent
    5.x, ``past_key_values`` before)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _time_generation(
    model: Any, ids: torch.Tensor, decode_tokens: int, device: torch.device
) -> tuple[float, float]:
    """(seconds to the first token, decode tokens per second) of one greedy generation."""
    name = _cache_argument(model)
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    ttft = time.perf_counter() - t0
    cache = getattr(out, name)
    t1 = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(input_ids=token, use_cache=True, **{name: cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        cache = getattr(out, name)
    _sync(device)
    seconds = time.perf_counter() - t1
    return ttft, decode_tokens / seconds if seconds > 0 else float("nan")


def measure_timing(
    session: _Session,
    runs: list[RunSpec],
    input_ids: torch.Tensor,
    decode_tokens: int,
    backend: str,
    selection_backend: str,
    repeats: int = 2,
) -> dict[str, Any]:
    """Time to first token and decode tokens/s at ``input_ids``' length, dense and with every
    SketchWalk run, each both prefill-only and with SketchWalk decode, in this process. Each is
    measured once as warm-up (kernel compilation, CUDA graph capture) and then ``repeats`` times
    (median)."""
    ids = input_ids[None].to(session.device)
    chosen = [RunSpec("dense", "dense", "dense", None, None)]
    names = {r.name for r in runs}
    for r in runs:
        if r.kind not in SKETCHWALK_KINDS:
            continue
        chosen.append(r)
        # prefill-only runs (ppl) are also timed with SketchWalk decode
        if r.decode == "dense" and f"{r.name}+decode" not in names:
            chosen.append(
                dataclasses.replace(
                    r, name=f"{r.name}+decode", family=f"{r.family}+decode", decode="sketchwalk"
                )
            )
    out: dict[str, Any] = {"seq_len": int(ids.shape[1]), "decode_tokens": decode_tokens,
                           "repeats": repeats, "runs": {}}  # fmt: skip
    with torch.no_grad():
        for run in chosen:
            with _activate(session, run, backend, selection_backend) as sw:
                samples = []
                for _ in range(1 + repeats):
                    if sw is not None:
                        sw.clear()
                    samples.append(_time_generation(session.model, ids, decode_tokens,
                                                    session.device))  # fmt: skip
                measured = samples[1:]
                ttft = sorted(t for t, _ in measured)[len(measured) // 2]
                tps = sorted(r for _, r in measured)[len(measured) // 2]
                out["runs"][run.name] = {
                    "decode": run.decode,
                    "target_density": run.density,
                    "ttft_s": ttft,
                    "decode_tokens_per_s": tps,
                    "samples": [{"ttft_s": t, "decode_tokens_per_s": r} for t, r in measured],
                }
    dense = out["runs"]["dense"]
    for r in out["runs"].values():
        r["ttft_speedup_vs_dense"] = dense["ttft_s"] / r["ttft_s"]
        r["decode_speedup_vs_dense"] = r["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
    return out


def _layer_markdown(data: dict[str, Any]) -> list[str]:
    """Realized prefill density of every layer (mean over items), one row per sparse run."""
    rows = [(n, r) for n, r in data.get("results", {}).items() if r["kind"] != "dense"]
    if not rows:
        return []
    layers = len(rows[0][1]["layer_density"])
    lines = [
        "",
        "## Realized density per layer (prefill)",
        "",
        "| run | " + " | ".join(str(i) for i in range(layers)) + " |",
        "|---|" + "---:|" * layers,
    ]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(_fmt(v, ".3f") for v in r["layer_density"]) + " |")
    return lines


def _timing_markdown(data: dict[str, Any]) -> list[str]:
    timing = data.get("timing")
    if not timing:
        return []
    lines = [
        "",
        f"## Timing at {timing['seq_len']} tokens ({timing['decode_tokens']} decode tokens, "
        f"median of {timing['repeats']} after a warm-up; {data['environment']['device_name']})",
        "",
        "| run | decode | TTFT s | TTFT speedup | decode tok/s | decode speedup |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, r in timing["runs"].items():
        lines.append(
            f"| {name} | {r['decode']} | {r['ttft_s']:.3f} | {r['ttft_speedup_vs_dense']:.2f}x | "
            f"{r['decode_tokens_per_s']:.1f} | {r['decode_speedup_vs_dense']:.2f}x |"
        )
    return lines


# ---- plots ----------------------------------------------------------------------------------


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_metric(data: dict[str, Any], path: Path, field: str, label: str) -> None:
    """Metric against realized density (sparse layers), one line per selector family."""
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    families: dict[str, list[tuple[float, float]]] = {}
    for r in data.get("results", {}).values():
        if r["kind"] == "dense":
            ax.axhline(r[field], color="black", linestyle="--", label="dense")
            continue
        x = r["density_sparse_layers"]
        if x is not None:
            families.setdefault(r["family"], []).append((x, r[field]))
    for family, points in families.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=family)
    ax.set_xlabel("realized density (sparse layers)")
    ax.set_ylabel(label)
    ax.set_title(f"{data['settings']['model']}: {label} vs density")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_figure(fig, path)
    plt.close(fig)


def _save_figure(fig: Any, path: Path) -> None:
    from sketchwalk.atomic import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:], dpi=120))


def _plot_heatmaps(data: dict[str, Any], path: Path) -> None:
    """Accuracy by depth (x) and length (y), one panel per run."""
    plt = _pyplot()
    if plt is None:
        return
    res = data.get("results", {})
    if not res:
        return
    s = data["settings"]
    depths = [f"{d:g}" for d in s["depths"]]
    lengths = [str(x) for x in s["seq_lens"]]
    n = len(res)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.5 * len(lengths) + 2 * rows),
                             squeeze=False, constrained_layout=True)  # fmt: skip
    for ax, (name, r) in zip(axes.flat, res.items(), strict=False):
        grid = [[r["accuracy_by_length_depth"].get(f"{x}|{d}", float("nan")) for d in depths]
                for x in lengths]  # fmt: skip
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), depths, fontsize=7)
        ax.set_yticks(range(len(lengths)), lengths, fontsize=7)
        ax.set_title(f"{name} ({r['accuracy']:.2f})", fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.6, label="accuracy")
    _save_figure(fig, path)
    plt.close(fig)


# ---- command line ---------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser) -> None:
    from sketchwalk.hf.device_map import add_argument as add_device_map_argument
    from sketchwalk.pipeline.flags import int_at_least

    # The config's flags first: this parser resolves conflicts, so the passage --seed below
    # replaces the config's --seed, which moves to --sketch_seed.
    add_config_arguments(p, {"preset": "default"})
    p.add_argument("--sketch_seed", dest="seed", type=int, default=None,
                   help="seed of the sketch's random draws (SketchWalkConfig.seed)")  # fmt: skip
    p.add_argument("--model_path", default=None, help="alias, HF folder, .gguf or gate folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs (torchrun: cuda:LOCAL_RANK)")  # fmt: skip
    add_device_map_argument(p)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32", "float16"],
        help="model dtype (auto: bf16 on CUDA, float32 on CPU)",
    )
    p.add_argument("--selectors", nargs="+", default=["dense", "sketchwalk", "oracle",
                   "streaming"], choices=SELECTORS, metavar="SELECTOR",
                   help=f"selectors to run, from {', '.join(SELECTORS)}")  # fmt: skip
    p.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                   help="extra SketchWalk config, e.g. paper:preset=paper")  # fmt: skip
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--gate_path", default=None, help="SeerAttention gate folder (selector gate)")
    p.add_argument("--text_source", default="auto", choices=["auto", "austen", "stdlib", "file"])
    p.add_argument("--text_file", default=None)
    p.add_argument("--seed", dest="text_seed", type=int, default=0,
                   help="seed of the passages and needles")  # fmt: skip
    p.add_argument("--num_samples", type=int_at_least(1), default=None)
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "flex"],
                   help="sparse attention backend")  # fmt: skip
    p.add_argument("--selection_backend", default="auto", choices=["auto", "reference", "triton"])
    p.add_argument("--output_dir", default="eval_results")
    p.add_argument("--resume", action="store_true", help="skip items already in the JSON")
    p.add_argument("--timing", action="store_true",
                   help="also time TTFT and decode tokens/s, dense vs SketchWalk")  # fmt: skip
    p.add_argument("--timing_decode_tokens", type=int_at_least(1), default=32)
    p.add_argument("--no_plots", action="store_true")
    p.add_argument("--no_progress", action="store_true")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sketchwalk.pipeline.flags import int_at_least

    sub = parser.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    ppl = sub.add_parser("ppl", help="perplexity of the second half of real passages",
                         description=evaluate_ppl.__doc__, conflict_handler="resolve")  # fmt: skip
    _add_common(ppl)
    ppl.add_argument("--seq_len", type=int, default=4096)
    ppl.add_argument(
        "--loss_chunk", type=int_at_least(1), default=1024, help="positions per logits slice"
    )
    niah = sub.add_parser("niah", help="needle-in-a-haystack retrieval (RULER-style)",
                          description=evaluate_niah.__doc__,
                          conflict_handler="resolve")  # fmt: skip
    _add_common(niah)
    niah.add_argument("--seq_lens", type=int, nargs="+", default=[4096])
    niah.add_argument("--depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS))
    niah.add_argument("--task", default="single", choices=TASKS)
    niah.add_argument(
        "--num_needles", type=int_at_least(1), default=4, help="needles for --task multikey"
    )
    niah.add_argument("--max_new_tokens", type=int_at_least(1), default=12)
    niah.add_argument("--decode", nargs="+", default=["dense", "sketchwalk"],
                      choices=DECODE_MODES,
                      help="decode modes of SketchWalk runs: dense = prefill-only")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    dtype = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32,
             "float16": torch.float16}[args.dtype]  # fmt: skip
    common = dict(
        model_path=args.model_path,
        densities=args.densities,
        selectors=args.selectors,
        variants=args.variant,
        text_source=args.text_source,
        text_file=args.text_file,
        seed=args.text_seed,
        device=args.device,
        dtype=dtype,
        backend=args.backend,
        selection_backend=args.selection_backend,
        gate_path=args.gate_path,
        output_dir=args.output_dir,
        resume=args.resume,
        timing=args.timing,
        timing_decode_tokens=args.timing_decode_tokens,
        progress=not args.no_progress,
        plots=not args.no_plots,
    )
    if args.text_file is not None and not Path(args.text_file).is_file():
        raise UsageError(f"--text_file {args.text_file}: file not found")
    if args.text_source == "file" and args.text_file is None:
        raise UsageError("--text_source file needs --text_file")
    if args.device_map is not None:
        from sketchwalk.hf.device_map import check_world

        check_world(args.device_map, distributed.requested_world_size())
        if args.device != "auto":
            raise UsageError(
                f"--device {args.device} and --device_map: give one (the map places the model)"
            )
        common["device_map"] = args.device_map
    start = time.perf_counter()
    with distributed.session(args.device) as w:
        return _run_task(args, common, start, w)


def _run_task(
    args: argparse.Namespace, common: dict[str, Any], start: float, w: distributed.World
) -> int:
    from sketchwalk.gate.checkpoint import GateCheckpointError
    from sketchwalk.hf.models import ModelNotFoundError
    from sketchwalk.hf.text import TextSourceError

    try:
        common["base_config"] = config_from_args(args, default_preset="default")
        if args.eval_task == "ppl":
            data = evaluate_ppl(
                seq_len=args.seq_len,
                num_samples=2 if args.num_samples is None else args.num_samples,
                loss_chunk=args.loss_chunk,
                **common,
            )
        else:
            data = evaluate_niah(
                seq_lens=args.seq_lens,
                depths=args.depths,
                num_samples=1 if args.num_samples is None else args.num_samples,
                task=args.task,
                num_needles=args.num_needles,
                max_new_tokens=args.max_new_tokens,
                decode=args.decode,
                **common,
            )
    except (ModelNotFoundError, TextSourceError, GateCheckpointError, DataError):
        raise  # data errors: one line and exit 1 (sketchwalk.cli.run_main)
    except UsageError:
        raise
    except ValueError as exc:  # config validation (SketchWalkConfig): a bad flag value
        from sketchwalk.pipeline.flags import flag_error

        raise flag_error(exc) from None
    if not w.is_main:
        return 0  # rank 0 reports
    print(ppl_markdown(data) if args.eval_task == "ppl" else niah_markdown(data))
    out = Path(args.output_dir) / f"eval_{args.eval_task}.json"
    print(f"wrote {out} and its .md/.png ({time.perf_counter() - start:.1f} s)")
    return 0
