"""`SketchWalkConfig`: every knob of Sketch&Walk block selection, validated in one place.

The CLI maps its flags onto these fields one-to-one, and every result file carries
`config.to_dict()` so a number can always be traced back to the exact settings that made it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

Granularity = Literal["layer", "kv_group", "head"]
GRANULARITIES: tuple[str, ...] = ("layer", "kv_group", "head")
# How a density budget is spread: the same share per row, or one threshold over the layer.
ALLOCATIONS: tuple[str, ...] = ("row", "global")
HEAD_AGGREGATIONS: tuple[str, ...] = ("sum", "max")
# Decode-time ranking: the released-style walk over a query window, or the query-aware bound.
DECODE_RULES: tuple[str, ...] = ("walk", "quest", "recent")
# Operand type of the walk's matrix products (accumulation is float32 either way).
WALK_DTYPES: tuple[str, ...] = ("float32", "bfloat16")

# The released code computes block logits as (unnormalised Hadamard sketch) / sqrt(r) / 100.
# At head_dim = sketch_dim = 128 that equals (qb . kb) * sqrt(128) / 100, i.e. the true attention
# scale 1/sqrt(128) divided by a temperature of 100 / 128. Our normalised sketch keeps
# E[q~ . k~] = qb . kb, so this temperature reproduces the released logits at head_dim 128
# (docs/algorithm.md §1.4 and §5.5).
RELEASED_TEMPERATURE = 100.0 / 128.0


@dataclass(frozen=True)
class SketchWalkConfig:
    """Configuration of Sketch&Walk block selection (frozen and hashable: caches key on it).

    Budget precedence (the one rule; ``budget`` names the winner): ``density`` (if set) beats
    ``mass`` (if set), which beats ``top_k_blocks`` (if set), which beats ``kblocks_frac``.
    Exactly one of them decides how many ranked blocks each query-block row keeps; sink,
    window and diagonal blocks are forced on top of (``kblocks_frac``, ``top_k_blocks``,
    ``mass``) or inside (``density``) that budget. ``density`` comes first so that
    ``config.replace(density=d)`` re-selects at a matched density whatever the config's own
    budget was. `with_overrides` clears the budgets a user did not give when they give one.

    Args:
        block_size: tokens per query/key block (the selection granularity).
        sketch_dim: r, number of Hadamard coordinates kept. Clamped to the padded head dim n
            (next power of two >= head_dim); r == n makes the sketch an exact rotation.
        exact: skip the sketch and score pooled ``qb . kb`` directly (ablation of the sketch).
        temperature: block logits are ``q~ . k~ / (sqrt(head_dim) * temperature)``; the default
            reproduces the released scale at head_dim = sketch_dim = 128.
        sparsity_exponent: s in ``A <- rownorm(A ** s)``; equivalent to dividing the block logits'
            temperature by s (before head aggregation the two are the same knob).
        causal_sketch: mask future key blocks before the block softmax (the released prefill does
            not).
        granularity: one transition matrix per ``layer`` (released), per ``kv_group`` or per
            ``head``.
        head_aggregation: how a mask group (layer or KV group) combines its query heads'
            block probabilities into one transition row: ``sum`` (released; then row-normalised)
            or ``max`` (then row-normalised), which keeps a block that one head needs
            competitive when the other heads of the group ignore it. No effect per ``head``.
        walk: carry the previous sparse layer's walk into this layer (cross-layer term).
        degree: number of walk steps.
        damping: beta in ``state = (1 - beta) * A + beta * state @ A``.
        walk_dtype: operand type of the walk's products ``state @ A``: ``"float32"``, or
            ``"bfloat16"`` with float32 accumulation (tensor cores on CUDA; about 8 bits of
            mantissa per operand, the state and sums stay float32). Needs ``causal_sketch``
            (the tiled causal products) and not ``parity``.
        kblocks_frac: keep this fraction of each row's non-forced causal blocks.
        top_k_blocks: keep this many ranked blocks per row (besides the forced ones).
        density: target share of causal blocks kept overall, forced blocks included.
        mass: cumulative-mass budget: per row and mask group, the row's scores are normalised
            over its causal blocks; the forced blocks' share counts first, then the best-ranked
            other blocks are added, highest first, until the kept share reaches ``mass``
            (``mass`` = 1 keeps every causal block).
        allocation: how a ``density`` target is spread: ``"row"`` solves one share per
            query-block row (the same for every mask group); ``"global"`` ranks the
            row-normalised scores of all rows and mask groups of the layer (per sequence) and
            keeps the best until the total, forced blocks included, is
            round(density x causal blocks x groups). Only valid with a ``density`` budget.
        sink: fraction of the context forced as attention-sink blocks (at least one block).
        window: fraction of the context forced as local window before each row's diagonal.
        sink_blocks: sink size in blocks (0 allowed: no sink); overrides ``sink`` when set.
        window_blocks: window size in blocks, diagonal included (>= 1); overrides ``window``
            when set.
        dense_layers: the first ``dense_layers`` layers use full causal attention.
        dense_last_rows: the last query-block rows that stay dense.
        query_rows: the last ``query_rows`` query-block rows rank key blocks by the exact
            attention of their own queries (the softmax mass each key block receives, averaged
            over the row's queries and the mask group's heads) instead of by the walk, at the
            same budget. These rows hold the end of a prompt (the question, in a retrieval
            prompt): their exact scores cost O(query_rows x block_size x T) per head, a
            vanishing share of the attention they schedule. 0 = the walk ranks every row.
        query_tokens: the same for the query-block rows that hold any of the last
            ``query_tokens`` tokens: the rows ranked by their exact attention are the last
            ``max(query_rows, rows holding the last query_tokens tokens)``. Sized in tokens, a
            question of that many tokens is covered whatever the prompt's length modulo the
            block size (with a partial last block, ``query_rows`` rows cover as few as
            ``(query_rows - 1) x block_size + 1`` tokens). 0 = sized by ``query_rows`` alone.
        query_rows_budget: the rows ranked by their exact attention (``exact_rows(T)``) keep
            this many times the ranked blocks of an ordinary row of their length under a row
            budget (capped at every causal block): the ``density`` share is re-solved so that
            the overall density stays the target (the other rows give up the difference), a
            ``kblocks_frac`` or ``top_k_blocks`` count is multiplied. 1 = the same budget as
            every row; no effect under ``mass`` or the global allocation.
        decode_rule: decode-time ranking of key blocks: ``"walk"`` (the released-style walk
            over a window of recent queries), ``"quest"`` (per-block key min/max bound of
            the current query's logits; `sketchwalk.selection.decode`) or ``"recent"`` (the
            most recent blocks: StreamingLLM's pattern, what the streaming baseline decodes
            with).
        decode_pin_blocks: with ``decode_rule="quest"``, every decode step of a sparse layer
            keeps the ``decode_pin_blocks`` key blocks (per mask group) that the prompt's last
            rows attend to most: their exact attention (the ``query_rows`` scores of the last
            ``max(1, exact_rows(T))`` prompt rows, summed), computed once at the prefill. The
            pins count inside the decode budget (a row budget ranks them first after the
            forced blocks; ``mass`` and the global allocation add them to what they keep). The
            question decides what the answer needs; the bound of each new query alone can
            miss it among similar blocks. 0 = no pins.
        parity: reproduce the released arithmetic exactly (unnormalised transform and /100,
            tail mean over the full block, non-causal block softmax, strictly-greater per-row
            quantile threshold, window-sized sink).
        seed: seed of the per-layer random signs and coordinate permutation.
    """

    block_size: int = 64
    sketch_dim: int = 128
    exact: bool = False
    temperature: float = RELEASED_TEMPERATURE
    sparsity_exponent: float = 1.0
    causal_sketch: bool = True
    granularity: str = "layer"
    head_aggregation: str = "sum"
    walk: bool = True
    degree: int = 3
    damping: float = 0.25
    walk_dtype: str = "float32"
    kblocks_frac: float = 0.125
    top_k_blocks: int | None = None
    density: float | None = None
    mass: float | None = None
    allocation: str = "row"
    sink: float = 0.025
    window: float = 0.05
    sink_blocks: int | None = None
    window_blocks: int | None = None
    dense_layers: int = 2
    dense_last_rows: int = 4
    query_rows: int = 0
    query_tokens: int = 0
    query_rows_budget: float = 1.0
    decode_rule: str = "walk"
    decode_pin_blocks: int = 0
    parity: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        def need(cond: bool, name: str, expected: str) -> None:
            if not cond:
                raise ValueError(
                    f"SketchWalkConfig.{name} must be {expected}, got {getattr(self, name)!r}"
                )

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need(is_int(self.block_size) and self.block_size >= 1, "block_size", "an int >= 1")
        need(is_int(self.sketch_dim) and self.sketch_dim >= 1, "sketch_dim", "an int >= 1")
        need(isinstance(self.exact, bool), "exact", "a bool")
        need(is_num(self.temperature) and self.temperature > 0, "temperature", "a float > 0")
        need(
            is_num(self.sparsity_exponent) and self.sparsity_exponent > 0,
            "sparsity_exponent",
            "a float > 0",
        )
        need(isinstance(self.causal_sketch, bool), "causal_sketch", "a bool")
        need(self.granularity in GRANULARITIES, "granularity", f"one of {GRANULARITIES}")
        need(
            self.head_aggregation in HEAD_AGGREGATIONS,
            "head_aggregation",
            f"one of {HEAD_AGGREGATIONS}",
        )
        need(isinstance(self.walk, bool), "walk", "a bool")
        need(is_int(self.degree) and self.degree >= 1, "degree", "an int >= 1")
        need(is_num(self.damping) and 0.0 <= self.damping <= 1.0, "damping", "in [0, 1]")
        need(self.walk_dtype in WALK_DTYPES, "walk_dtype", f"one of {WALK_DTYPES}")
        need(
            self.walk_dtype == "float32" or (self.causal_sketch and not self.parity),
            "walk_dtype",
            "float32 without causal_sketch or with parity (bfloat16 products run on the "
            "tiled causal walk only)",
        )
        need(
            is_num(self.kblocks_frac) and 0.0 <= self.kblocks_frac <= 1.0,
            "kblocks_frac",
            "in [0, 1]",
        )
        need(
            self.top_k_blocks is None or (is_int(self.top_k_blocks) and self.top_k_blocks >= 0),
            "top_k_blocks",
            "None or an int >= 0",
        )
        need(
            self.density is None or (is_num(self.density) and 0.0 < self.density <= 1.0),
            "density",
            "None or in (0, 1]",
        )
        need(
            self.mass is None or (is_num(self.mass) and 0.0 < self.mass <= 1.0),
            "mass",
            "None or in (0, 1]",
        )
        need(self.allocation in ALLOCATIONS, "allocation", f"one of {ALLOCATIONS}")
        need(
            self.allocation == "row" or self.budget == "density",
            "allocation",
            f"'row' unless the budget is density (budget here: {self.budget})",
        )
        need(is_num(self.sink) and 0.0 <= self.sink <= 1.0, "sink", "in [0, 1]")
        need(is_num(self.window) and 0.0 <= self.window <= 1.0, "window", "in [0, 1]")
        need(
            self.sink_blocks is None or (is_int(self.sink_blocks) and self.sink_blocks >= 0),
            "sink_blocks",
            "None or an int >= 0",
        )
        need(
            self.window_blocks is None or (is_int(self.window_blocks) and self.window_blocks >= 1),
            "window_blocks",
            "None or an int >= 1 (the diagonal block is always kept)",
        )
        need(is_int(self.dense_layers) and self.dense_layers >= 0, "dense_layers", "an int >= 0")
        need(
            is_int(self.dense_last_rows) and self.dense_last_rows >= 0,
            "dense_last_rows",
            "an int >= 0",
        )
        need(is_int(self.query_rows) and self.query_rows >= 0, "query_rows", "an int >= 0")
        need(is_int(self.query_tokens) and self.query_tokens >= 0, "query_tokens", "an int >= 0")
        need(
            is_num(self.query_rows_budget) and self.query_rows_budget >= 1.0,
            "query_rows_budget",
            "a number >= 1",
        )
        need(self.decode_rule in DECODE_RULES, "decode_rule", f"one of {DECODE_RULES}")
        need(
            is_int(self.decode_pin_blocks) and self.decode_pin_blocks >= 0,
            "decode_pin_blocks",
            "an int >= 0",
        )
        need(
            self.decode_pin_blocks == 0 or self.decode_rule == "quest",
            "decode_pin_blocks",
            f"0 unless decode_rule is 'quest' (decode_rule here: {self.decode_rule!r})",
        )
        need(isinstance(self.parity, bool), "parity", "a bool")
        need(is_int(self.seed), "seed", "an int")
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "query_rows_budget", float(self.query_rows_budget))
        object.__setattr__(self, "sparsity_exponent", float(self.sparsity_exponent))

    @property
    def budget(self) -> str:
        """Which budget form decides the ranked blocks: 'density', 'mass', 'top_k_blocks' or
        'kblocks_frac' (precedence in that order)."""
        if self.density is not None:
            return "density"
        if self.mass is not None:
            return "mass"
        if self.top_k_blocks is not None:
            return "top_k_blocks"
        return "kblocks_frac"

    def exact_rows(self, seq_len: int) -> int:
        """How many trailing query-block rows of a ``seq_len``-token sequence are ranked by
        their exact attention: ``max(query_rows, rows holding the last query_tokens tokens)``,
        at most all ``ceil(seq_len / block_size)`` rows (0: the walk ranks every row)."""
        nb = -(-seq_len // self.block_size)
        by_tokens = 0
        if self.query_tokens:
            by_tokens = nb - max(0, seq_len - self.query_tokens) // self.block_size
        return min(nb, max(self.query_rows, by_tokens))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SketchWalkConfig:
        """Named starting points.

        - ``"default"``: this package's recommended settings, chosen by measured perplexity and
          needle retrieval at 32K tokens (README, "Evidence for the defaults"): one mask per KV
          group, a sink of one block and a window of two, no dense last rows, the last two
          query-block rows, and every row holding one of the last 128 tokens, ranked by their
          exact attention (``query_rows=2``, ``query_tokens=128``), query-aware
          decode selection. (``SketchWalkConfig()`` alone keeps the released structure.)
        - ``"paper"``: the authors' released defaults (block 64, sketch 128, kblocks_frac 0.125,
          sink 2.5%, window 5%, walk degree 3 with damping 0.25, non-causal block softmax).
        - ``"seed"``: the seed pipeline's CLI defaults (block 64, sketch 64, top_k_blocks 16,
          sparsity_exponent 8).
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SketchWalkConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SketchWalkConfig.from_dict: unknown fields {unknown}")
        return cls(**data)

    def replace(self, **changes: Any) -> SketchWalkConfig:
        return dataclasses.replace(self, **changes)

    def with_overrides(self, **given: Any) -> SketchWalkConfig:
        """This config with the fields a user gave explicitly (flags) replacing its own.

        The one place that decides which budget wins when a base config (a preset, or the config
        of an earlier run) meets explicit flags: an explicitly given budget flag (``density``,
        ``mass``, ``top_k_blocks`` or ``kblocks_frac``) clears every budget form the base set
        that was not given too, so ``--kblocks_frac 0.2`` on top of the seed preset (which sets
        ``top_k_blocks``) really selects by ``kblocks_frac``. A base ``allocation="global"``
        (which needs a density budget) goes back to ``"row"`` when the budget given is not a
        density and ``allocation`` was not given either.
        """
        if any(name in given for name in BUDGET_FIELDS):
            for name in BUDGET_FIELDS[:-1]:  # kblocks_frac always has a value
                given.setdefault(name, None)
            if given.get("density") is None:
                given.setdefault("allocation", "row")
        return dataclasses.replace(self, **given)


# Named starting points (see SketchWalkConfig.preset).
PRESETS: dict[str, dict[str, Any]] = {
    # Chosen on Qwen2.5-Coder-1.5B at 32K tokens of real text (README, "Evidence for the
    # defaults"; benchmarks/results/eval_qwen/): one mask per KV group, one sink block and a
    # two-block window instead of context fractions, no dense last rows, the query-aware
    # decode rule (the released-style rule loses needles that dense decoding finds), and block
    # logits at half the released temperature (sharper block softmax: +2.24% -> +1.69%
    # perplexity at density 0.1, +0.21% -> -0.17% at 0.2; eval_qwen/sweep_32000), and the
    # last two query-block rows ranked by their own queries' exact attention (RULER tune
    # split at 32K, density 0.1: task average 54.4 -> 70.6, dense 75.2; eval_qwen/ruler_tune),
    # sized so that they also cover the last 128 tokens when the prompt ends in a partial block
    # (the same two rows on the tune split's block-aligned prompts).
    # The walk's products take bfloat16 operands with float32 accumulation (tensor cores; the
    # selection-time benchmark in benchmarks/results/attention/ has its cost).
    "default": dict(
        granularity="kv_group",
        sink_blocks=1,
        window_blocks=2,
        dense_last_rows=0,
        decode_rule="quest",
        temperature=RELEASED_TEMPERATURE / 2,
        query_rows=2,
        query_tokens=128,
        walk_dtype="bfloat16",
    ),
    "paper": dict(causal_sketch=False),
    "seed": dict(sketch_dim=64, top_k_blocks=16, sparsity_exponent=8.0),
}
# The four budget forms, highest precedence first (SketchWalkConfig.budget).
BUDGET_FIELDS = ("density", "mass", "top_k_blocks", "kblocks_frac")


# ---- command-line flags (one per field) ---------------------------------------------------

_FLAG_HELP = {
    "block_size": "tokens per block",
    "sketch_dim": "Hadamard sketch dimension r (clamped to the padded head dim)",
    "exact": "score pooled qb.kb directly (no sketch)",
    "temperature": "block-logit temperature relative to 1/sqrt(head_dim)",
    "sparsity_exponent": "sharpening exponent s: A <- rownorm(A ** s)",
    "causal_sketch": "mask future key blocks before the block softmax",
    "granularity": "one mask per layer, per KV group or per head",
    "head_aggregation": "combine the block probabilities of a mask group's heads by their sum "
    "(released) or their maximum",
    "walk": "carry the previous layer's walk (cross-layer term)",
    "degree": "walk steps per layer",
    "damping": "walk damping beta",
    "walk_dtype": "operand type of the walk's products (float32 accumulation either way)",
    "kblocks_frac": "keep this fraction of each row's non-forced causal blocks",
    "top_k_blocks": "keep this many ranked blocks per row besides the forced ones",
    "density": "target share of causal blocks kept, forced ones included",
    "mass": "keep blocks until their share of each row's normalised score reaches this "
    "(forced blocks counted first)",
    "allocation": "spread a density target per row, or by one threshold over the layer's rows "
    "and mask groups",
    "sink": "fraction of the context forced as sink blocks",
    "window": "fraction of the context forced as local window",
    "sink_blocks": "sink size in blocks (overrides --sink)",
    "window_blocks": "window size in blocks, diagonal included (overrides --window)",
    "dense_layers": "number of leading layers kept dense",
    "dense_last_rows": "number of trailing query-block rows kept dense",
    "query_rows": "number of trailing query-block rows ranked by their exact attention",
    "query_tokens": "rank the query-block rows holding the last N tokens by their exact "
    "attention too (at least query_rows rows)",
    "query_rows_budget": "the exact query rows keep this many times an ordinary row's ranked "
    "blocks (the density stays the target)",
    "decode_pin_blocks": "decode steps keep the N key blocks the prompt's last rows attend to "
    "most (quest rule; inside the budget)",
    "decode_rule": "decode-time ranking: walk over recent queries, the quest key bound, or "
    "recency (the streaming baseline)",
    "parity": "reproduce the released arithmetic exactly",
    "seed": "seed of the sketch's random draws",
}


_FLAG_CHOICES = {
    "granularity": GRANULARITIES,
    "head_aggregation": HEAD_AGGREGATIONS,
    "allocation": ALLOCATIONS,
    "decode_rule": DECODE_RULES,
    "walk_dtype": WALK_DTYPES,
}


def add_config_arguments(parser: Any, defaults: dict[str, Any] | None = None) -> None:
    """Add one flag per `SketchWalkConfig` field (plus ``--preset``) to an argparse parser.

    Flags default to None ("not given") so that `config_from_args` can tell what the user set;
    ``defaults`` documents the values the command falls back to (shown in --help).
    """
    import argparse

    defaults = defaults or {}
    group = parser.add_argument_group("SketchWalk configuration (one flag per config field)")
    group.add_argument(
        "--preset",
        choices=["seed", "paper", "default"],
        default=None,
        help="starting configuration; explicit flags override it "
        f"(default: {defaults.get('preset', 'seed')})",
    )
    for f in dataclasses.fields(SketchWalkConfig):
        name = f.name
        shown = defaults.get(name, "from preset")
        text = f"{_FLAG_HELP[name]} (default: {shown})"
        if f.type in ("bool",):
            group.add_argument(
                f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=text
            )
        elif name in _FLAG_CHOICES:
            group.add_argument(f"--{name}", choices=_FLAG_CHOICES[name], default=None, help=text)
        elif f.type in ("int", "int | None"):
            group.add_argument(f"--{name}", type=int, default=None, help=text)
        else:
            group.add_argument(f"--{name}", type=float, default=None, help=text)


def config_from_args(args: Any, default_preset: str = "seed") -> SketchWalkConfig:
    """Resolve a `SketchWalkConfig` from parsed flags: the preset, then every flag given
    (`SketchWalkConfig.with_overrides` decides which budget wins)."""
    preset = getattr(args, "preset", None) or default_preset
    return SketchWalkConfig.preset(preset).with_overrides(**given_config_flags(args))


def given_config_flags(args: Any) -> dict[str, Any]:
    """The `SketchWalkConfig` fields a parsed command line set explicitly (flags default to
    None, meaning "not given")."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(SketchWalkConfig)
        if getattr(args, f.name, None) is not None
    }


__all__ = [
    "ALLOCATIONS",
    "BUDGET_FIELDS",
    "DECODE_RULES",
    "GRANULARITIES",
    "PRESETS",
    "RELEASED_TEMPERATURE",
    "SketchWalkConfig",
    "add_config_arguments",
    "config_from_args",
    "given_config_flags",
]
