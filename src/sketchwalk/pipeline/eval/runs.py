"""What an evaluation runs: the selectors, ``--variant`` configs and densities expanded into one
`RunSpec` per (selector, density[, decode mode]), and the checks of the inputs that shape the
runs (densities, sequence lengths against the block size, counts, forced blocks that leave no
block to rank)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from sketchwalk.blocks import UsageError
from sketchwalk.config import SketchWalkConfig
from sketchwalk.selection.selectors import PEER_SELECTORS, SELECTOR_NAMES

SELECTORS = ("dense", *SELECTOR_NAMES)
# Selectors whose runs take every --decode mode even where the others decode densely: the
# peers (their needle accuracy with sparse decoding is part of their comparison) and quest
# (dense in prefill: it differs from dense only with sparse decode steps).
DECODING_SELECTORS = ("sketchwalk", "quest", *PEER_SELECTORS)
SKETCHWALK_KINDS = ("sketchwalk", "variant")
DECODE_MODES = ("dense", "sketchwalk")


class EvalInputError(UsageError):
    """A bad evaluation input (exit 2); the message says which and what was expected."""


@dataclasses.dataclass
class RunSpec:
    """One selector at one density.

    Attributes:
        name: unique label, e.g. ``"sketchwalk@0.2"``, ``"paper@0.2+decode"``, ``"dense"``.
        kind: ``"dense"``, ``"variant"`` (a ``--variant`` SketchWalk config) or a selector
            name of `sketchwalk.selection.selectors.SELECTOR_NAMES` (``"sketchwalk"``,
            ``"oracle"``, ``"streaming"``, ``"forced"``, ``"gate"``, ``"quest"``, the peers).
        family: the line a plot draws it on (selector or variant name, ``+decode`` appended).
        density: the budget's target density (None for dense).
        config: the selection config (None for dense).
        decode: ``"dense"`` or ``"sketchwalk"`` (sparse decode steps, ranked by the config's
            ``decode_rule``).
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
    decode_all: bool = False,
) -> list[RunSpec]:
    """Every (selector, density[, decode]) run, ``dense`` first.

    The SketchWalk runs, the peers' and quest's run once per decode mode (``+decode`` appended
    for sparse decode steps); the other baselines decode densely unless ``decode_all``, which
    gives every sparse selector every decode mode (a like-for-like comparison of prefill and
    decode together).

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
            if sel in DECODING_SELECTORS or decode_all:
                for mode in decode_modes:
                    suffix = "+decode" if mode == "sketchwalk" else ""
                    runs.append(
                        RunSpec(f"{sel}{tag}{suffix}", sel, f"{sel}{suffix}", d, at(base, d), mode)
                    )
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
