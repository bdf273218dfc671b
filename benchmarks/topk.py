"""The decode selection's last step: `top_k_compact` (Triton, budget on the device) against the
sorted ``torch.topk`` a static-shape step needs otherwise, and the unsorted one of the eager path.

Rows are what a decode step ranks: batch x mask groups (Llama-3.1-8B per KV group: 8 per
sequence) over the blocks of a 64-token block cache (the capacity of the graph path: twice the
blocks), k the default budget at density 0.2 plus the forced blocks. Each op is timed in a CUDA
graph (as it runs in the graph step) and eagerly, median of ``triton.testing.do_bench``, in one
process; the kernel's result is checked against `top_k_compact_reference` first.

    PYTHONPATH=src python3 benchmarks/topk.py --out benchmarks/results/topk/topk_<gpu>.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import environment


def graphed(fn):
    """``fn`` captured in a CUDA graph: returns the replay."""
    fn()  # compile / warm up outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def main() -> int:
    from sketchwalk import SketchWalkConfig
    from sketchwalk.selection.select import last_row_kept
    from sketchwalk.selection.topk import top_k_compact, top_k_compact_reference

    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", nargs="+", type=int, default=[32768, 131072])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/topk.py needs a CUDA GPU", file=sys.stderr)
        return 2
    env = environment()
    print(json.dumps(env))
    cfg = SketchWalkConfig.preset("default", density=args.density)
    rows = []
    for t in args.contexts:
        nk = -(-t // cfg.block_size)
        cap = 2 * nk
        k = last_row_kept(nk, cfg)
        for b in args.batches:
            scores = torch.randn(b, args.groups, cap, device="cuda")
            scores[..., nk:] = float("-inf")
            k_dev = torch.tensor([k], device="cuda")
            idx, num = top_k_compact(scores, k_dev)
            ref_idx, ref_num = top_k_compact_reference(scores.cpu(), k_dev.cpu())
            same = bool(torch.equal(num.cpu(), ref_num)) and bool(
                torch.equal(idx[..., :k].cpu(), ref_idx[..., :k])
            )
            ops = {
                "top_k_compact": lambda s=scores, kd=k_dev: top_k_compact(s, kd),
                "topk_sorted": lambda s=scores, kk=k: s.topk(kk, dim=-1, sorted=True),
                "topk_unsorted": lambda s=scores, kk=k: s.topk(kk, dim=-1, sorted=False),
            }
            row = {"t": t, "batch": b, "groups": args.groups, "capacity": cap, "k": k,
                   "matches_reference": same}  # fmt: skip
            for name, fn in ops.items():
                row[f"{name}_graph_us"] = 1e3 * triton.testing.do_bench(
                    graphed(fn), warmup=25, rep=200, return_mode="median"
                )
                row[f"{name}_eager_us"] = 1e3 * triton.testing.do_bench(
                    fn, warmup=25, rep=200, return_mode="median"
                )
            print(json.dumps(row))
            rows.append(row)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
