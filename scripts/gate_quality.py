"""Quality of the learned SeerAttention gate against SketchWalk and the oracle, by layer.

On held-out real text (passages after the ones the gate was trained on), for every layer and
every target density d:

1. SketchWalk (``SketchWalkConfig(density=d, dense_layers=0, ...)``, one mask per layer) selects
   blocks; its per-row block counts define the budget. Its forced blocks default to the
   smallest set (one sink block, the diagonal, no dense last rows: ``--sink 0 --window 0
   --dense_last_rows 0``) so that low targets are reachable: with the library defaults the forced
   blocks alone are about 38% of a 2048-token context;
2. the learned gate keeps, per head and row, its top-scored causal blocks with exactly that
   budget (matched density);
3. the oracle keeps the blocks with the most true attention mass, per head, with the same budget;
4. the gate's own threshold selection (``seerattn_threshold`` of the checkpoint) is reported with
   its density.

Recall = share of the dense causal softmax mass inside the kept blocks (1.0 = nothing lost),
computed from the exact block-summed attention (``true_block_attention(reduce="sum")``); the
script cross-checks it against ``attention_recall`` on one layer.

Usage:
    python scripts/gate_quality.py                           # default gate, trained on first use
    python scripts/gate_quality.py --gate_dir gates/smollm2-135m --seq_len 2048 --num_samples 2 \
        --densities 0.1 0.2 0.3 --output_dir gate_quality
Writes ``gate_quality.md`` and ``gate_quality.json`` into ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch


def topk_rows(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep each row's ``counts`` best causal blocks.

    Args:
        scores: (B, H, nb, nb) block scores (higher is better).
        counts: (B, H, nb) blocks to keep per row.

    Returns:
        bool (B, H, nb, nb), causal.
    """
    nb = scores.shape[-1]
    causal = torch.ones(nb, nb, dtype=torch.bool, device=scores.device).tril()
    ranked = scores.float().masked_fill(~causal, float("-inf"))
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    keep_sorted = torch.arange(nb, device=scores.device) < counts[..., None]
    mask = torch.zeros_like(causal.expand_as(ranked))
    mask = mask.scatter(-1, order, keep_sorted)
    return mask & causal


def recall_from_blocks(block_sum: torch.Tensor, mask: torch.Tensor, seq_len: int, bs: int):
    """Attention recall from exact block sums.

    Args:
        block_sum: (B, H, nb, nb) mean over each query block's rows of the mass on each key block.
        mask: bool (B, H, nb, nb) kept blocks.

    Returns:
        (H,) float64 recall per head (averaged over batch and query rows).
    """
    nb = block_sum.shape[-1]
    rows = torch.full((nb,), float(bs), dtype=torch.float64)
    rows[-1] = seq_len - bs * (nb - 1)
    kept = (block_sum.double() * mask).sum(-1)  # (B, H, nb)
    return (kept * rows).sum(-1).mean(0) / seq_len


def density(mask: torch.Tensor) -> float:
    nb = mask.shape[-1]
    causal = mask.shape[0] * mask.shape[1] * nb * (nb + 1) // 2
    return float(mask.sum().item()) / causal


def heldout_passages(tokenizer, info: dict, seq_len: int, num_samples: int, seed_offset: int):
    """Passages after every passage the gate saw (same source and seed, skipping its tokens)."""
    from sketchwalk.hf.text import make_passages

    tc = info.get("train_config", {})
    lengths = tc.get("seq_lengths", [2048])
    used = max(lengths) * (tc.get("num_samples", 8) + tc.get("heldout_samples", 2)) * len(lengths)
    skip = math.ceil(used / seq_len) + 1 + seed_offset
    passages = make_passages(
        tokenizer,
        seq_len=seq_len,
        num_samples=skip + num_samples,
        source=tc.get("text_source", "auto"),
        text_file=tc.get("text_file"),
        seed=tc.get("seed", 0),
    )
    return passages[skip:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gate_dir", default=None, help="gate checkpoint (default: cached one)")
    parser.add_argument("--model_path", default=None, help="base model (default: base_model)")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--num_samples", type=int, default=2)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--sink", type=float, default=0.0, help="SketchWalk sink fraction")
    parser.add_argument("--window", type=float, default=0.0, help="SketchWalk window fraction")
    parser.add_argument("--dense_last_rows", type=int, default=0, help="SketchWalk dense rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output_dir", default="gate_quality")
    args = parser.parse_args(argv)

    from sketchwalk.blocks import BlockSelection
    from sketchwalk.config import SketchWalkConfig
    from sketchwalk.gate.checkpoint import load_gate_checkpoint
    from sketchwalk.gate.train import INFO_NAME, ensure_default_gate
    from sketchwalk.hf.capture import capture_attention
    from sketchwalk.hf.models import load_model
    from sketchwalk.metrics import attention_recall, true_block_attention
    from sketchwalk.selection.prefill import SketchWalk

    t_start = time.perf_counter()
    gate_dir = Path(args.gate_dir) if args.gate_dir else ensure_default_gate(device=args.device)
    gates = load_gate_checkpoint(gate_dir, device=args.device)
    info_path = gate_dir / INFO_NAME
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    model_path = args.model_path or gates.config.base_model
    model, tokenizer, resolved = load_model(model_path, device=args.device)
    passages = heldout_passages(tokenizer, info, args.seq_len, args.num_samples, 0)
    bs = gates.config.block_size
    hq, hkv = gates.config.num_q_heads, gates.config.num_kv_heads

    # results[layer][method][density] -> list of per-sample recalls
    results: dict[int, dict[str, dict[str, list[float]]]] = {}
    thr_stats: dict[int, dict[str, list[float]]] = {}
    actual_density: dict[str, list[float]] = {str(d): [] for d in args.densities}
    check: dict[str, float] = {}
    for si, passage in enumerate(passages):
        ids = passage.input_ids.reshape(1, -1).to(args.device)
        with capture_attention(model, dtype=torch.float32, pre_rope=True) as cap:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
            layers = cap.layers
        walkers = {
            d: SketchWalk(
                SketchWalkConfig(
                    density=d,
                    dense_layers=0,
                    sink=args.sink,
                    window=args.window,
                    dense_last_rows=args.dense_last_rows,
                )
            )
            for d in args.densities
        }
        for layer in sorted(layers):
            rec = layers[layer]
            q, k = rec["Q"], rec["K"]
            block_sum = true_block_attention(q, k, bs, reduce="sum")
            scores = gates.block_scores(layer, rec["Q_pre"], rec["K_pre"])
            own = gates.select(scores)
            ts = thr_stats.setdefault(layer, {"recall": [], "density": []})
            ts["recall"].append(float(recall_from_blocks(block_sum, own, q.shape[2], bs).mean()))
            ts["density"].append(density(own))
            per_layer = results.setdefault(layer, {})
            for d in args.densities:
                sel = walkers[d].select(q, k, layer)
                sw_mask = sel.head_mask(hq, hkv)
                counts = sw_mask.sum(-1)
                masks = {
                    "sketchwalk": sw_mask,
                    "seerattention-gate": topk_rows(scores, counts),
                    "oracle": topk_rows(block_sum, counts),
                }
                actual_density[str(d)].append(sel.density)
                for name, mask in masks.items():
                    r = float(recall_from_blocks(block_sum, mask, q.shape[2], bs).mean())
                    per_layer.setdefault(name, {}).setdefault(str(d), []).append(r)
                if si == 0 and layer == max(layers) and d == args.densities[0]:
                    sel_gate = BlockSelection.from_mask(masks["seerattention-gate"], bs, q.shape[2])
                    check = {
                        "from_blocks": per_layer["seerattention-gate"][str(d)][-1],
                        "attention_recall": float(attention_recall(q, k, sel_gate)),
                    }
            layers[layer] = {}
        print(f"sample {si}: {passage.document} offset {passage.offset} done")

    def mean(x: list[float]) -> float:
        return sum(x) / len(x)

    methods = ["seerattention-gate", "sketchwalk", "oracle"]
    table = {
        str(layer): {m: {d: mean(v) for d, v in per.items()} for m, per in res.items()}
        for layer, res in results.items()
    }
    overall = {
        m: {
            str(d): mean([table[str(layer)][m][str(d)] for layer in results])
            for d in args.densities
        }
        for m in methods
    }
    thr = {str(layer): {k: mean(v) for k, v in s.items()} for layer, s in thr_stats.items()}
    out = {
        "gate_dir": str(gate_dir),
        "model": resolved.model_id,
        "seq_len": args.seq_len,
        "num_samples": len(passages),
        "passages": [p.info() for p in passages],
        "densities_target": args.densities,
        "densities_sketchwalk_actual": {d: mean(v) for d, v in actual_density.items()},
        "gate_threshold": gates.config.threshold,
        "sketchwalk_forced": {
            "sink": args.sink,
            "window": args.window,
            "dense_last_rows": args.dense_last_rows,
        },
        "recall_by_layer": table,
        "recall_mean_over_layers": overall,
        "gate_threshold_selection_by_layer": thr,
        "recall_cross_check": check,
        "heldout_kl": {
            "before": info.get("heldout_kl_mean_before"),
            "after": info.get("heldout_kl_mean_after"),
        },
        "torch": torch.__version__,
        "machine": platform.machine(),
        "seconds": time.perf_counter() - t_start,
    }
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gate_quality.json").write_text(json.dumps(out, indent=2) + "\n")

    lines = [
        f"Attention recall at matched density: {resolved.model_id}, {len(passages)} held-out "
        f"passages of {args.seq_len} tokens, block {bs}. Budget per row = SketchWalk's "
        "(density target d, one mask per layer); the gate and the oracle keep that many blocks "
        "per head and row.",
        "",
        "| layer | "
        + " | ".join(f"{m} @{d}" for d in args.densities for m in methods)
        + " | gate @thr recall (density) |",
        "| --- | " + " | ".join("---" for _ in args.densities for _ in methods) + " | --- |",
    ]
    for layer in sorted(results):
        cells = [f"{table[str(layer)][m][str(d)]:.3f}" for d in args.densities for m in methods]
        t = thr[str(layer)]
        lines.append(
            f"| {layer} | " + " | ".join(cells) + f" | {t['recall']:.3f} ({t['density']:.2f}) |"
        )
    cells = [f"**{overall[m][str(d)]:.3f}**" for d in args.densities for m in methods]
    lines.append("| mean | " + " | ".join(cells) + " | |")
    lines += [
        "",
        "SketchWalk's actual densities: "
        + ", ".join(f"{d}: {v:.3f}" for d, v in out["densities_sketchwalk_actual"].items())
        + f". Gate threshold {gates.config.threshold:g}.",
    ]
    (out_dir / "gate_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"cross-check (recall from block sums vs attention_recall): {check}")
    print(f"wrote {out_dir / 'gate_quality.md'} and {out_dir / 'gate_quality.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
