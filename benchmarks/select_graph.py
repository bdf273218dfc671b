"""SketchWalk.select with and without CUDA-graph replay (run 7).

Per shape and T: the first two sparse layers of a fresh sequence (`select_two_layers`, as in
benchmarks/attention.py), median per layer, eager (``cuda_graphs=False``) and graphed, both
against SDPA cuDNN dense causal in the same process; and whether both paths return identical
selections and walk states.

    PYTHONPATH=src python3 benchmarks/select_graph.py --out benchmarks/results/select_graph/x.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import SHAPES, environment, sdpa, select_two_layers


def main() -> int:
    from sketchwalk import SketchWalk, SketchWalkConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["llama", "smollm2"])
    ap.add_argument("--seq-lens", nargs="+", type=int, default=[16384, 32768, 65536, 131072])
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    env = environment()
    print(json.dumps(env))
    rows = []
    for shape in args.shapes:
        hq, hkv, d = SHAPES[shape]
        for t in args.seq_lens:
            q = torch.randn(1, hq, t, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            fn, _ = sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION, causal=True)
            cudnn = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            cfg = SketchWalkConfig(density=args.density, block_size=64)
            row = {"shape": shape, "t": t, "cudnn_ms": cudnn}
            sels = {}
            for name, graphs in (("eager", False), ("graph", True)):
                sw = SketchWalk(cfg, cuda_graphs=graphs)
                sel = select_two_layers(sw, q, k, cfg.dense_layers)
                ms = triton.testing.do_bench(
                    lambda sw=sw, q=q, k=k, f=cfg.dense_layers: select_two_layers(sw, q, k, f),
                    warmup=25,
                    rep=100,
                    return_mode="median",
                )
                sels[name] = select_two_layers(sw, q, k, cfg.dense_layers)
                row[f"{name}_ms"] = ms / 2
                row[f"{name}_pct"] = 100 * ms / 2 / cudnn
                del sel
            a, b = sels["eager"], sels["graph"]
            row["identical"] = bool(
                torch.equal(a.block_mask, b.block_mask)
                and torch.equal(a.kv_indices, b.kv_indices)
                and torch.equal(a.kv_num_blocks, b.kv_num_blocks)
                and torch.equal(a.scores, b.scores)
            )
            print(
                f"{shape} T={t}: cudnn {cudnn:.2f} ms; select eager {row['eager_ms']:.3f} ms "
                f"({row['eager_pct']:.1f} %), graph {row['graph_ms']:.3f} ms "
                f"({row['graph_pct']:.1f} %); identical {row['identical']}",
                flush=True,
            )
            rows.append(row)
            q = k = v = sels = a = b = None
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
