"""Evidence for SketchWalk's defaults: attention recall of each design choice at equal density.

Usage:
    python scripts/evidence_defaults.py --tensor_dir ./tensor_data --densities 0.1 0.2 0.3 \
        --output benchmarks/results/defaults_evidence/defaults_evidence

For every sequence in the folder (layers fed in order, so the walk runs across layers) and every
variant below, SketchWalk selects blocks with the ``density`` budget (the same share of causal
blocks for every variant, forced blocks included) and we measure attention recall: the share of
the true softmax mass inside the kept blocks. The true block attention is computed once per
layer; recall from it is exact. Dense layers (0 and 1) are excluded from the averages.

Variants (each changes one thing from the base configuration):
    base                  our defaults (SketchWalkConfig() with density=d)
    causal_sketch off     released non-causal block softmax
    walk off              no cross-layer term
    exact                 pooled qb.kb, no sketch
    sketch r=32 / r=16    sketch smaller than the head dim (the only case where it saves work)
    kv_group / head       one mask per KV group / per head
    exponent 8            the seed's sparsity_exponent
    damping 0.75          a walk that leans on the previous layer
    released forced       sink 2.5% + window 5% (the released forced budget)
    small forced          sink 1 block + window 1 block
    window 2.5%           half the released window
    dense_last_rows 0     no dense trailing query-block rows
    oracle (shared)       the true top blocks of the head-averaged attention, same per-row budget
    oracle (per head)     the true top blocks of each head, same per-row budget (the ceiling)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from sketchwalk import SketchWalk, SketchWalkConfig, metrics
from sketchwalk.atomic import write_json
from sketchwalk.blocks import BlockSelection
from sketchwalk.pipeline.runs import iter_sequences
from sketchwalk.pipeline.tensorio import load_tensor_file


def variants(density: float) -> dict[str, SketchWalkConfig]:
    base = SketchWalkConfig(density=density)
    return {
        "base": base,
        "causal_sketch off": base.replace(causal_sketch=False),
        "walk off": base.replace(walk=False),
        "exact (no sketch)": base.replace(exact=True),
        "sketch r=32": base.replace(sketch_dim=32),
        "sketch r=16": base.replace(sketch_dim=16),
        "granularity kv_group": base.replace(granularity="kv_group"),
        "granularity head": base.replace(granularity="head"),
        "sparsity_exponent 8": base.replace(sparsity_exponent=8.0),
        "damping 0.75": base.replace(damping=0.75),
        "released forced (sink 2.5%, window 5%)": base.replace(sink=0.025, window=0.05),
        "small forced (1 + 1 block)": base.replace(sink=0.0, window=0.0),
        "window 2.5%": base.replace(window=0.025),
        "dense_last_rows 0": base.replace(dense_last_rows=0),
    }


def per_head_oracle(block_attn: torch.Tensor, like: BlockSelection) -> BlockSelection:
    hq = block_attn.shape[1]
    counts = like.kv_num_blocks.expand(-1, hq, -1) if like.num_groups == 1 else None
    if counts is None:
        raise ValueError("per-head oracle expects a layer-granularity selection")
    mask_like = BlockSelection(
        like.block_mask.expand(-1, hq, -1, -1),
        like.block_size,
        like.seq_len,
        counts,
        like.kv_indices.expand(-1, hq, -1, -1),
        like.density,
    )
    return metrics.oracle_selection(block_attn, mask_like)


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    sequences = iter_sequences(Path(args.tensor_dir))
    if not sequences:
        raise SystemExit(f"no tensor files in {args.tensor_dir}")
    names = [*list(variants(args.densities[0])), "oracle (shared mask)", "oracle (per head)"]
    recalls = {d: {n: [] for n in names} for d in args.densities}
    achieved = {d: {n: [] for n in names} for d in args.densities}
    by_layer = {d: {n: {} for n in names} for d in args.densities}
    model = None
    t0 = time.time()
    total = sum(len(s["paths"]) for s in sequences)
    bar = tqdm(total=total, desc="layers", file=sys.stderr)
    for seq in sequences:
        walkers = {d: {n: SketchWalk(c) for n, c in variants(d).items()} for d in args.densities}
        for path in seq["paths"]:
            rec = load_tensor_file(path)
            model = rec["metadata"].get("model_path", model)
            layer = int(rec["metadata"]["layer_idx"])
            q, k = rec["Q"].float(), rec["K"].float()
            block_attn = None
            for d in args.densities:
                base_sel = None
                for name, walker in walkers[d].items():
                    sel = walker.select(q, k, layer)
                    if layer < walker.config.dense_layers:
                        continue
                    if block_attn is None:
                        block_attn = metrics.true_block_attention(q, k, walker.config.block_size)
                    r = metrics.recall_from_block_attention(block_attn, sel)
                    recalls[d][name].append(r)
                    achieved[d][name].append(sel.density)
                    by_layer[d][name].setdefault(layer, []).append(r)
                    if name == "base":
                        base_sel = sel
                if base_sel is None:
                    continue
                for name, sel in (
                    (
                        "oracle (shared mask)",
                        metrics.oracle_selection(block_attn.mean(1, keepdim=True), base_sel),
                    ),
                    ("oracle (per head)", per_head_oracle(block_attn, base_sel)),
                ):
                    r = metrics.recall_from_block_attention(block_attn, sel)
                    recalls[d][name].append(r)
                    achieved[d][name].append(sel.density)
                    by_layer[d][name].setdefault(layer, []).append(r)
            bar.update(1)
    bar.close()
    table = {
        str(d): {
            n: {
                "recall": statistics.fmean(recalls[d][n]) if recalls[d][n] else None,
                "density": statistics.fmean(achieved[d][n]) if achieved[d][n] else None,
                "recall_by_layer": {
                    str(layer): statistics.fmean(v) for layer, v in sorted(by_layer[d][n].items())
                },
            }
            for n in names
        }
        for d in args.densities
    }
    return {
        "tensor_dir": str(args.tensor_dir),
        "model_path": model,
        "sequences": [
            {
                "seq_len": s["seq_len"],
                "sample": s["sample"],
                "timestamp": s["timestamp"],
                "layers": len(s["paths"]),
            }
            for s in sequences
        ],
        "densities": args.densities,
        "seconds": time.time() - t0,
        "torch_version": torch.__version__,
        "command": " ".join(sys.argv),
        "results": table,
    }


def to_markdown(result: dict) -> str:
    dens = result["densities"]
    lines = [
        f"Attention recall at equal density (model: {result['model_path']}; "
        f"{len(result['sequences'])} sequence(s) of "
        f"{sorted({s['seq_len'] for s in result['sequences']})} tokens; sparse layers only).",
        "",
        "| variant | " + " | ".join(f"recall @ {d:.0%}" for d in dens) + " |",
        "|---|" + "---:|" * len(dens),
    ]
    names = list(result["results"][str(dens[0])])
    for n in names:
        cells = []
        for d in dens:
            r = result["results"][str(d)][n]
            cells.append("-" if r["recall"] is None else f"{r['recall']:.4f} ({r['density']:.3f})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cells: mean attention recall (achieved density in parentheses).",
        f"Command: `{result['command']}`",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tensor_dir", required=True)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument(
        "--output",
        default="benchmarks/results/defaults_evidence/defaults_evidence",
        help="path prefix for the .json and .md outputs",
    )
    args = parser.parse_args(argv)
    result = run(args)
    out = Path(args.output)
    write_json(out.with_suffix(".json"), result)
    md = to_markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
