"""Does a 128-key tile beat two 64-key tiles in the D-128 prefill kernel? (run 7)

Pairing two consecutive kept 64-blocks into one 128-key tile can only pay if the kernel runs a
128-key tile faster per key than a 64-key tile. This measures exactly that bound: the same
synthetic 20 % selection at block size 128 (every kept block is a "pair") run with BLOCK_N 64
and BLOCK_N 128 at several warps / stages, plus the 64-block selection with the defaults, and
SDPA cuDNN in the same process. It also reports which share of SketchWalk's kept 64-blocks at
64K (Llama shape, 20 %) have their right neighbour kept too (the blocks a pairing could merge).

    PYTHONPATH=src python3 benchmarks/key_tile.py \\
        --out benchmarks/results/key_tile/key_tile_h100_run7.json
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
import attention as bench_attention
from attention import SHAPES, environment, sdpa, synthetic_selection


def paired_share(q: torch.Tensor, k: torch.Tensor, density: float) -> float:
    """Share of kept non-last blocks whose right neighbour is also kept and not the last."""
    from sketchwalk import SketchWalk, SketchWalkConfig

    cfg = SketchWalkConfig(density=density, block_size=64)
    sw = SketchWalk(cfg)
    sw.select(q, k, cfg.dense_layers)
    sel = sw.select(q, k, cfg.dense_layers + 1)
    num = sel.kv_num_blocks.long()
    idx = sel.kv_indices.long()
    slot = torch.arange(idx.shape[-1], device=idx.device)
    body = slot < (num - 1)[..., None]  # unmasked entries
    nxt = torch.cat([idx[..., 1:], idx[..., :1]], -1)
    body_next = torch.cat([body[..., 1:], torch.zeros_like(body[..., :1])], -1)
    pair = body & body_next & (nxt == idx + 1)
    # Greedy pairing along the row: a block pairs with its right neighbour unless it was taken.
    pairs = 0
    total = int(body.sum())
    p = pair.cpu()
    for row in p.reshape(-1, p.shape[-1]):
        i, n = 0, row.shape[0]
        r = row.tolist()
        while i < n:
            if r[i]:
                pairs += 1
                i += 2
            else:
                i += 1
    return 2 * pairs / max(1, total)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", nargs="+", type=int, default=[65536])
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    from sketchwalk.attention.triton_prefill import PrefillTuning, sparse_prefill

    hq, hkv, d = SHAPES["llama"]
    rows: list[dict] = []
    env = environment()
    print(json.dumps(env))
    for t in args.seq_lens:
        q = torch.randn(1, hq, t, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        fn, _ = sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION, causal=True)
        cudnn = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        print(f"T={t} cudnn {cudnn:.3f} ms", flush=True)
        rows.append({"t": t, "variant": "cudnn", "ms": cudnn})
        bench_attention.BLOCK = 128
        sel128 = synthetic_selection(1, 1, t, args.density, "cuda", seed=1)
        bench_attention.BLOCK = 64
        sel64 = synthetic_selection(1, 1, t, args.density, "cuda", seed=1)
        ref = None
        for name, sel, bs, tile, cfg in [
            ("block64 tile64 4w2s (default)", sel64, 64, 0, None),
            ("block128 tile64 4w2s", sel128, 128, 64, None),
            ("block128 tile128 4w2s", sel128, 128, 128, (128, 4, 2)),
            ("block128 tile128 8w2s", sel128, 128, 128, (128, 8, 2)),
            ("block128 tile128 8w3s", sel128, 128, 128, (128, 8, 3)),
        ]:
            tuning = PrefillTuning(configs={} if cfg is None else {128: cfg}, key_tile=tile)
            try:

                def run(q=q, k=k, v=v, sel=sel, bs=bs, tuning=tuning):
                    return sparse_prefill(
                        q, k, v, sel.kv_num_blocks, sel.kv_indices, bs, tuning=tuning
                    )

                out = run()
                ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
                diff = None
                if bs == 128:
                    if ref is None:
                        ref = out
                    diff = (out.float() - ref.float()).abs().max().item()
                print(f"  {name:32s} {ms:8.3f} ms  {cudnn / ms:5.2f}x  diff {diff}", flush=True)
                rows.append({"t": t, "variant": name, "ms": ms, "max_diff_vs_tile64": diff})
            except Exception as err:  # a variant that does not compile must not end the sweep
                print(f"  {name:32s} failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
                rows.append({"t": t, "variant": name, "ms": float("nan"), "error": repr(err)})
        share = paired_share(q, k, args.density)
        print(f"  SketchWalk 20 % kept unmasked 64-blocks mergeable into pairs: {share:.3f}")
        rows.append({"t": t, "variant": "paired_share", "share": share})
        q = k = v = None
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
