"""How the CPU selection grows with the sequence: `SketchWalk.select` of the ``default`` preset
(one mask per KV group) against the same with one mask per layer.

Usage (from the repository root; CPU, a few minutes at the default lengths):

    PYTHONPATH=src python3 benchmarks/select_scaling.py
    PYTHONPATH=src python3 benchmarks/select_scaling.py --seq-lens 16384 65536 --repeats 5

For each T: random (seeded) Q (1, 32, T, 128) and K (1, 8, T, 128), the Llama-3.1-8B shape, of
two consecutive sparse layers (2 and 3, so the walk's cross-layer term runs on layer 3). One
sample is the mean time of the two layers' `SketchWalk.select` calls (``backend="reference"``,
the CPU path); the table gives the median over ``--repeats`` samples after ``--warmup`` ones, for

- ``default``: ``SketchWalkConfig.preset("default", density=D)``;
- ``layer``: the same with ``granularity="layer"`` (one mask per layer), measured in the same
  process, the baseline of the ratio ``default / layer``;

each with the walk the preset runs (tiled causal products, bfloat16 operands: on the CPU
rounded and multiplied in float32) and, as "dense (before)", with every walk step a dense
float32 product;

and where the time of one layer-3 call goes (pooling, exact query rows, transition, walk,
selection), each part timed alone on the same inputs (median of 3 after the warm-up).
Growth: time at T over time at the shortest T. Results: JSON + markdown in ``--out-dir`` (default
benchmarks/results/select_scaling/), with the machine (CPU model, cores, torch version),
shapes, dtype, repeats and medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch

import sketchwalk.selection.prefill as prefill
from sketchwalk.atomic import write_json, write_text
from sketchwalk.config import SketchWalkConfig
from sketchwalk.selection.prefill import SketchWalk, _causal_walk, _rank_scores
from sketchwalk.selection.query_rows import query_row_scores
from sketchwalk.selection.select import select_blocks
from sketchwalk.selection.sketch import block_pool
from sketchwalk.selection.walk import transition_from_pooled, walk_step

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
LAYERS = (2, 3)
# name -> (granularity, the walk as before: dense products even for causal matrices)
VARIANTS = {
    "default": ("kv_group", False),
    "layer": ("layer", False),
    "default_dense_walk": ("kv_group", True),
    "layer_dense_walk": ("layer", True),
}
# The steps whose work grows with the square (or, in a dense walk, the cube) of the block
# count; pooling and the exact query rows grow linearly with T.
CORE = ("transition", "walk", "select")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_inputs(t: int, dtype: torch.dtype, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Q (1, Hq, T, D) and K (1, Hkv, T, D) of each layer in ``LAYERS``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + t)
    out = []
    for _ in LAYERS:
        q = torch.randn(1, HEADS, t, HEAD_DIM, generator=gen).to(dtype)
        k = torch.randn(1, KV_HEADS, t, HEAD_DIM, generator=gen).to(dtype)
        out.append((q, k))
    return out


def _dense_walk(a, previous, degree, damping, causal=False, bf16_products=False):
    """The walk before the tiled causal products: dense float32 products."""
    return walk_step(a, previous, degree, damping)


def time_select(cfg: SketchWalkConfig, inputs: list, dense_walk: bool) -> float:
    """Seconds per layer of `SketchWalk.select`, mean over the layers of ``inputs``;
    ``dense_walk``: every walk step as a dense product (the path before the causal walk)."""
    sw = SketchWalk(cfg, backend="reference")
    total = 0.0
    with mock.patch.object(prefill, "walk_step", _dense_walk if dense_walk else walk_step):
        for layer, (q, k) in zip(LAYERS, inputs, strict=True):
            start = time.perf_counter()
            sw.select(q, k, layer)
            total += time.perf_counter() - start
    return total / len(LAYERS)


def time_parts(cfg: SketchWalkConfig, inputs: list, dense_walk: bool) -> dict[str, float]:
    """Seconds of each step of the last layer's selection, each run alone."""
    sw = SketchWalk(cfg, backend="reference")
    for layer, (q, k) in zip(LAYERS[:-1], inputs[:-1], strict=True):
        sw.select(q, k, layer)
    previous = sw.walk_state
    q, k = inputs[-1]
    layer = LAYERS[-1]
    t = q.shape[2]
    parts: dict[str, float] = {}

    def clock(name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        parts[name] = time.perf_counter() - start
        return out

    qb = clock("pool", block_pool, q, cfg.block_size, cfg.parity)
    kb = block_pool(k, cfg.block_size, cfg.parity)
    start = time.perf_counter()
    block_pool(k, cfg.block_size, cfg.parity)
    parts["pool"] += time.perf_counter() - start
    groups = {"layer": 1, "kv_group": KV_HEADS}[cfg.granularity]
    tail = None
    rows = cfg.exact_rows(q.shape[2])
    if rows:
        tail = clock("query_rows", query_row_scores, q, k, rows, cfg.block_size, groups)
    a = clock("transition", transition_from_pooled, qb, kb, cfg, layer)
    causal = _causal_walk(cfg) and not dense_walk
    bf16 = causal and cfg.walk_dtype == "bfloat16"
    r = clock("walk", walk_step, a, previous, cfg.degree, cfg.damping, causal, bf16)
    clock("select", select_blocks, _rank_scores(r, tail), t, cfg)
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/select_scaling"))
    args = parser.parse_args(argv)
    if any(t < 64 for t in args.seq_lens):
        parser.error("--seq-lens: every length must be >= 64")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    dtype = getattr(torch, args.dtype)
    configs = {
        name: SketchWalkConfig.preset("default", density=args.density, granularity=gran)
        for name, (gran, _) in VARIANTS.items()
    }
    rows: list[dict[str, Any]] = []
    for t in sorted(args.seq_lens):
        inputs = make_inputs(t, dtype, args.seed)
        row: dict[str, Any] = {"seq_len": t, "num_blocks": -(-t // 64)}
        # Interleaved samples (default, layer, default, ...): a shared machine's load
        # drifts, and both configs see the same drift.
        samples: dict[str, list[float]] = {name: [] for name in configs}
        for i in range(args.warmup + args.repeats):
            for name, cfg in configs.items():
                seconds = time_select(cfg, inputs, VARIANTS[name][1])
                if i >= args.warmup:
                    samples[name].append(seconds)
        for name, cfg in configs.items():
            runs = [time_parts(cfg, inputs, VARIANTS[name][1]) for _ in range(args.warmup + 3)]
            parts = {p: statistics.median(r[p] for r in runs[args.warmup :]) for p in runs[-1]}
            row[name] = {
                "median_s": statistics.median(samples[name]),
                "samples_s": samples[name],
                "parts_s": parts,
                "core_s": sum(parts[p] for p in CORE),
            }
        for suffix in ("", "_dense_walk"):
            row[f"default_over_layer{suffix}"] = (
                row[f"default{suffix}"]["median_s"] / row[f"layer{suffix}"]["median_s"]
            )
        rows.append(row)
        print(
            f"T={t}: " + ", ".join(f"{n} {row[n]['median_s']:.3f} s" for n in VARIANTS),
            file=sys.stderr,
        )
        del inputs
    first = rows[0]
    for row in rows:
        for name in configs:
            row[name]["growth"] = row[name]["median_s"] / first[name]["median_s"]
            row[name]["core_growth"] = row[name]["core_s"] / first[name]["core_s"]
        for suffix in ("", "_dense_walk"):
            row[f"core_default_over_layer{suffix}"] = (
                row[f"default{suffix}"]["core_s"] / row[f"layer{suffix}"]["core_s"]
            )
    result = {
        "benchmark": "select_scaling",
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "shape": {"batch": 1, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM},
        "dtype": args.dtype,
        "density": args.density,
        "layers": list(LAYERS),
        "backend": "reference",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "configs": {name: cfg.to_dict() for name, cfg in configs.items()},
        "rows": rows,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "select_scaling" + (f"_{args.tag}" if args.tag else "")
    write_json(args.out_dir / f"{stem}.json", result)
    write_text(args.out_dir / f"{stem}.md", markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"CPU: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch "
        f"{m['torch']}; Q/K {result['dtype']} (1, {HEADS}/{KV_HEADS}, T, {HEAD_DIM}); density "
        f"{result['density']}; mean of layers {result['layers']}, median of "
        f"{result['repeats']} (warm-up {result['warmup']}).",
        "",
        "| T | walk | default (kv_group) s | layer s | default / layer | growth default / layer "
        "| default: pool / query rows / transition / walk / select s "
        "| core (transition + walk + select) default / layer s | core default / layer "
        "| core growth default / layer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        for suffix, walk in (("_dense_walk", "dense (before)"), ("", "causal tiles")):
            d, lay = row[f"default{suffix}"], row[f"layer{suffix}"]
            parts = " / ".join(
                f"{d['parts_s'].get(p, 0.0):.3f}"
                for p in ("pool", "query_rows", "transition", "walk", "select")
            )
            lines.append(
                f"| {row['seq_len']} | {walk} | {d['median_s']:.3f} | {lay['median_s']:.3f} | "
                f"{row[f'default_over_layer{suffix}']:.2f}x | {d['growth']:.2f}x / "
                f"{lay['growth']:.2f}x | {parts} | {d['core_s']:.3f} / {lay['core_s']:.3f} | "
                f"{row[f'core_default_over_layer{suffix}']:.2f}x | {d['core_growth']:.2f}x / "
                f"{lay['core_growth']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
