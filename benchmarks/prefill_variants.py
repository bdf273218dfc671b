"""Kernel-variant sweep for the Triton prefill and decode kernels, plus a profile of the selection.

Usage (CUDA machine, repository root):

    PYTHONPATH=src python3 benchmarks/prefill_variants.py \\
        --out benchmarks/results/prefill_variants/x.json

Prefill: Llama-3.1-8B shape (32 / 8 heads, D 128) and SmolLM2 (9 / 3, D 64), bf16, block 64,
synthetic causal selections at ``--density`` (same generator as benchmarks/attention.py), one
variant at a time: (BLOCK_M, warps, stages) x {pointer loads, TMA descriptor loads for the
unmasked K/V blocks} x {warp specialisation} (``--full-grid``; else the run-4 and run-5
defaults). Every variant's output is compared with the first one's (max |diff|; the math is the
same, so it should be 0).
SDPA cuDNN dense runs in the same process as the baseline.

Decode: Llama shape, one query, ``--decode-contexts``, batch 1 and 8, split count / tile / warps /
stages, timed by CUDA-graph replay.

Selection: ``SketchWalk(config).select`` under the torch profiler at ``--select-seq``: CUDA and
host time, kernel launches and host syncs per layer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch
import triton
from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import SHAPES, environment, sdpa, synthetic_selection


def run_prefill(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    from sketchwalk.attention.triton_prefill import PrefillTuning, sparse_prefill

    # (BLOCK_M, warps, stages, tma, warp_spec); run 5's sweep also tried an index prefetch one
    # iteration ahead (slower everywhere: 0.75-0.84x), since removed from the kernel.
    grid = [
        (128, 4, 3, False, False),  # the run-4 default
        (128, 4, 2, True, True),  # the run-5 default
    ]
    if args.full_grid:
        grid += [
            (128, 4, 2, True, False),
            (128, 4, 3, True, False),
            (128, 4, 4, True, False),
            (128, 8, 2, True, False),
            (128, 8, 3, True, False),
            (128, 4, 3, True, True),
            (128, 8, 2, True, True),
            (128, 8, 3, True, True),
            (64, 4, 3, True, False),
        ]
    for shape in args.shapes:
        hq, hkv, d = SHAPES[shape]
        for t in args.seq_lens:
            q = torch.randn(1, hq, t, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            fn, _ = sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION, causal=True)
            cudnn = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            print(f"{shape} T={t} cudnn {cudnn:.3f} ms", flush=True)
            sel = synthetic_selection(1, 1, t, args.density, "cuda", seed=1)
            kept = sel.kv_num_blocks.sum().item() - sel.kv_num_blocks.numel() * 0.5
            flops = 4.0 * d * hq * kept * 64 * 64
            ref = None
            variants = (
                grid
                if d == 128
                else [
                    (64, 4, 3, False, False),
                    (64, 4, 3, True, False),
                    (64, 4, 2, True, False),
                    (64, 4, 3, True, True),
                ]
            )
            for bm, warps, stages, tma, ws in variants:
                tuning = PrefillTuning(configs={d: (bm, warps, stages)}, tma=tma, warp_spec=ws)
                label = f"BM{bm} w{warps} s{stages} tma={tma} ws={ws}"
                try:
                    run = partial(
                        sparse_prefill,
                        q,
                        k,
                        v,
                        sel.kv_num_blocks,
                        sel.kv_indices,
                        64,
                        tuning=tuning,
                    )
                    out = run()
                    torch.cuda.synchronize()
                    if ref is None:
                        ref = out
                    diff = (out.float() - ref.float()).abs().max().item()
                    ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
                except Exception as err:  # a variant that does not compile is reported, not fatal
                    print(f"  {label}: failed {type(err).__name__}: {str(err)[:300]}", flush=True)
                    continue
                row = {
                    "kind": "prefill",
                    "shape": shape,
                    "seq_len": t,
                    "density": args.density,
                    "block_m": bm,
                    "warps": warps,
                    "stages": stages,
                    "tma": tma,
                    "warp_spec": ws,
                    "ms": ms,
                    "cudnn_ms": cudnn,
                    "speedup": cudnn / ms,
                    "tflops": flops / ms / 1e9,
                    "max_diff": diff,
                }
                results.append(row)
                print(
                    f"  {label}: {ms:.3f} ms {row['tflops']:.0f} TFLOP/s "
                    f"{row['speedup']:.2f}x diff {diff:.1e}",
                    flush=True,
                )
            q = k = v = ref = out = fn = None
            torch.cuda.empty_cache()


def run_decode(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    from attention import decode_selection

    from sketchwalk.attention.triton_decode import DecodeTuning, sparse_decode_triton

    hq, hkv, d = SHAPES["llama"]
    for batch, ctx in itertools.product(args.batches, args.decode_contexts):
        q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, hkv, ctx, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        fn, _ = sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION, causal=False)
        cudnn = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        num, idx = decode_selection(batch, 1, ctx, 0.2, seed=2)
        print(f"decode B={batch} S={ctx} cudnn {cudnn * 1e3:.1f} us", flush=True)
        ref = None
        for splits, warps, stages in itertools.product(args.splits, (4, 8), (2, 3)):
            tuning = DecodeTuning(splits=splits, num_warps=warps, num_stages=stages)
            run = partial(sparse_decode_triton, q, k, v, num, idx, 64, tuning=tuning)
            try:
                out = run()
                if ref is None:
                    ref = out
                diff = (out.float() - ref.float()).abs().max().item()
                ms = triton.testing.do_bench_cudagraph(run, rep=100, return_mode="median")
            except Exception as err:
                print(f"  splits {splits} w{warps} s{stages}: failed {err!r:.200}", flush=True)
                continue
            results.append(
                {
                    "kind": "decode",
                    "batch": batch,
                    "context": ctx,
                    "splits": splits,
                    "warps": warps,
                    "stages": stages,
                    "us": ms * 1e3,
                    "cudnn_us": cudnn * 1e3,
                    "speedup": cudnn / ms,
                    "max_diff": diff,
                }
            )
            print(
                f"  splits {splits or 'auto'} w{warps} s{stages}: {ms * 1e3:.1f} us "
                f"{cudnn / ms:.2f}x diff {diff:.1e}",
                flush=True,
            )
        q = k = v = None
        torch.cuda.empty_cache()


def profile_select(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    from torch.profiler import ProfilerActivity, profile

    from sketchwalk import SketchWalkConfig
    from sketchwalk.selection.prefill import SketchWalk

    hq, hkv, d = SHAPES["llama"]
    t = args.select_seq
    q = torch.randn(1, hq, t, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16)
    cfg = SketchWalkConfig(density=0.2, block_size=64)
    sw = SketchWalk(cfg)

    def two_layers() -> None:
        sw.reset()
        sw.select(q, k, cfg.dense_layers)
        sw.select(q, k, cfg.dense_layers + 1)

    two_layers()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(two_layers, warmup=25, rep=200, return_mode="median") / 2
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            two_layers()
        torch.cuda.synchronize()
    events = prof.key_averages()
    cuda_us = sum(e.self_device_time_total for e in events) / 10
    launches = sum(e.count for e in events if e.device_type.name == "CUDA") / 10
    syncs = (
        sum(
            e.count
            for e in events
            if e.key
            in (
                "aten::item",
                "aten::_local_scalar_dense",
                "cudaStreamSynchronize",
                "cudaDeviceSynchronize",
            )
        )
        / 10
    )
    print(
        f"select T={t}: {ms:.3f} ms per layer, CUDA {cuda_us / 1e3:.3f} ms, "
        f"{launches:.0f} kernels, {syncs:.0f} sync-like ops per layer",
        flush=True,
    )
    print(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=50))
    print(events.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=50))
    # Where the host waits for the GPU (what blocks CUDA-graph capture): torch's sync debug
    # mode warns at every synchronising call; print the first non-torch frame of each.
    import traceback
    import warnings

    sites: dict[str, int] = {}

    def note(message, category, filename, lineno, file=None, line=None):
        frames = [
            f
            for f in traceback.extract_stack()
            if "sketchwalk" in f.filename and "prefill_variants" not in f.filename
        ]
        key = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[::-1][:3])
        sites[key] = sites.get(key, 0) + 1

    old = warnings.showwarning
    warnings.showwarning = note
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        two_layers()
        torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = old
    print("synchronising calls in two layers (file:line <- callers):")
    for key, count in sites.items():
        print(f"  {count} x {key}")
    results.append(
        {
            "kind": "select",
            "seq_len": t,
            "ms_per_layer": ms,
            "sync_sites": sites,
            "cuda_ms_per_layer": cuda_us / 1e3,
            "kernels_per_layer": launches,
            "syncs_per_layer": syncs,
        }
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["prefill", "decode", "select"])
    p.add_argument("--shapes", nargs="+", default=["llama", "smollm2"])
    p.add_argument("--seq-lens", nargs="+", type=int, default=[32768, 65536, 131072])
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--decode-contexts", nargs="+", type=int, default=[131072])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--select-seq", type=int, default=32768)
    p.add_argument(
        "--splits",
        nargs="+",
        type=int,
        default=[0, 16, 64, 128, 256],
        help="decode split counts (0: the kernel's default)",
    )
    p.add_argument("--full-grid", action="store_true", help="every prefill variant")
    p.add_argument("--out", default="benchmarks/results/prefill_variants/variants.json")
    args = p.parse_args()
    env = environment()
    print(json.dumps(env), flush=True)
    results: list[dict[str, Any]] = []
    for part, fn in (("prefill", run_prefill), ("decode", run_decode), ("select", profile_select)):
        if part in args.parts:
            fn(args, results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"environment": env, "settings": vars(args), "results": results}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
