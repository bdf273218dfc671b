"""How often bfloat16 walk products change the default preset's selection, on real tensors.

Runs a causal LM once over a real-text passage, captures every layer's post-RoPE Q/K, and
selects blocks for every sparse layer twice, the walk carried across layers: with float32 and
with bfloat16 walk products (`SketchWalkConfig.walk_dtype`), everything else the `default`
preset. Prints, per density, the share of the float32 walk's kept blocks that the bfloat16
walk keeps too (mean and worst layer) and the share of all mask entries that agree.

    PYTHONPATH=src python3 benchmarks/walk_dtype_agreement.py --model_path qwen2.5-coder-1.5b \
        --seq_len 8192 --text_source austen --out benchmarks/results/walk_dtype/qwen_8k.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", default="smollm2-135m")
    p.add_argument("--seq_len", type=int, default=8192)
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2])
    p.add_argument("--text_source", default="auto")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)

    from sketchwalk import SketchWalkConfig
    from sketchwalk.atomic import write_text
    from sketchwalk.hf.capture import capture_attention
    from sketchwalk.hf.models import load_model
    from sketchwalk.hf.text import make_passages
    from sketchwalk.selection.prefill import SketchWalk

    model, tok, resolved = load_model(args.model_path, device=args.device, dtype=torch.float32)
    ids = make_passages(tok, args.seq_len, 1, args.text_source, seed=args.seed)[0].input_ids
    start = time.perf_counter()
    with torch.no_grad(), capture_attention(model, dtype=torch.bfloat16) as cap:
        model(ids[None].to(args.device))
    forward_s = time.perf_counter() - start
    results = {}
    for density in args.densities:
        base = SketchWalkConfig.preset("default", density=density).to_dict()
        masks = {}
        for dtype in ("float32", "bfloat16"):
            sw = SketchWalk(SketchWalkConfig(**{**base, "walk_dtype": dtype}))
            masks[dtype] = [
                sw.select(cap.layers[i]["Q"].float(), cap.layers[i]["K"].float(), i).block_mask
                for i in sorted(cap.layers)
                if i >= base["dense_layers"]
            ]
        kept, agree = [], []
        for m32, m16 in zip(masks["float32"], masks["bfloat16"], strict=True):
            kept.append(((m32 & m16).sum() / m32.sum()).item())
            agree.append((m32 == m16).float().mean().item())
        results[str(density)] = {
            "kept_mean": sum(kept) / len(kept),
            "kept_worst_layer": min(kept),
            "entries_agree_worst_layer": min(agree),
            "kept_per_layer": kept,
        }
        mean = 100 * results[str(density)]["kept_mean"]
        print(f"density {density}: float32 picks kept by bfloat16 {mean:.3f}% "
              f"(worst layer {100 * min(kept):.3f}%)", flush=True)  # fmt: skip
    record = {
        "model": resolved.model_id,
        "seq_len": args.seq_len,
        "text_source": args.text_source,
        "seed": args.seed,
        "device": args.device,
        "torch": torch.__version__,
        "forward_s": forward_s,
        "results": results,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_text(Path(args.out), json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
