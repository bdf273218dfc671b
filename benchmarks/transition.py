"""Transition-matrix benchmark: fused Triton kernel vs the PyTorch path, and where the
SketchWalk selection's time goes.

Usage (on a CUDA machine, from the repository root):

    PYTHONPATH=src python3 benchmarks/transition.py                  # everything
    PYTHONPATH=src python3 benchmarks/transition.py --seq-lens 131072 --no-profile

For each shape (Llama-3.1-8B 32/8 heads D 128, SmolLM2 9/3 D 64), T and granularity (layer,
kv_group), bf16 Q/K of batch 1, block 64, default `SketchWalkConfig`:

- ``torch``: `sketchwalk.selection.walk.transition_from_pooled` (sketch + per-KV-group
  softmax loop);
- ``triton_<precision>``: `sketchwalk.selection.triton_transition.fused_transition` (the same
  inputs and result through `transition_triton`; precisions tf32x3 / ieee / tf32; a few tile
  configs);
- ``select_torch`` / ``select_triton`` / ``select_auto``: one full `SketchWalk.select` of a
  sparse layer (mean of two consecutive layers, as in benchmarks/attention.py) with
  ``SketchWalk(backend="reference")``, ``SketchWalk(backend="triton", cuda_graphs=False)`` (the
  fused kernel at its default tiles, eager) and the default ``SketchWalk`` (fused kernel and CUDA
  graphs);
- the dense baseline, SDPA cuDNN causal attention, measured in the same process.

``--profile`` prints torch-profiler tables (CUDA time by kernel, and host time) of the selection
at the largest T, both paths. Results: JSON + markdown in ``--out-dir`` (default
benchmarks/results/transition/).
Timing: ``triton.testing.do_bench(..., return_mode="median")``; ``--warmup``/``--rep`` in ms.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"llama": (32, 8, 128), "smollm2": (9, 3, 64)}
BLOCK = 64
CONFIGS = [(64, 64, 4), (128, 64, 8), (64, 128, 8), (128, 128, 8), (32, 64, 4)]
# The SketchWalk settings of each selection path (see the module docstring).
SELECT_PATHS = {
    "torch": {"backend": "reference"},
    "triton": {"backend": "triton", "cuda_graphs": False},
    "auto": {},
}


def triton_transition_fn(precision: str, block_m: int, block_n: int, warps: int):
    """`fused_transition` at one kernel setting: a drop-in for `transition_from_pooled`."""
    from sketchwalk.selection.triton_transition import fused_transition

    return partial(
        fused_transition, precision=precision, block_m=block_m, block_n=block_n, num_warps=warps
    )


def select_two(sw, q, k, first: int):
    sw.reset()
    sw.select(q, k, first)
    return sw.select(q, k, first + 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["llama", "smollm2"])
    p.add_argument("--seq-lens", nargs="+", type=int, default=[32768, 65536, 131072])
    p.add_argument("--granularities", nargs="+", default=["layer", "kv_group"])
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--rep", type=int, default=100)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--out-dir", default="benchmarks/results/transition")
    p.add_argument("--tag", default="h100_run3")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/transition.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from sketchwalk import SketchWalkConfig
    from sketchwalk.selection.prefill import SketchWalk
    from sketchwalk.selection.sketch import block_pool
    from sketchwalk.selection.walk import transition_from_pooled

    def bench(fn, *fn_args) -> float:
        def call():
            return fn(*fn_args)

        call()
        torch.cuda.synchronize()
        return float(
            triton.testing.do_bench(call, warmup=args.warmup, rep=args.rep, return_mode="median")
        )

    def dense_attention(q, k):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)

    env = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }
    print(json.dumps(env), flush=True)
    records: list[dict[str, Any]] = []
    for shape in args.shapes:
        hq, hkv, d = SHAPES[shape]
        for t in args.seq_lens:
            torch.cuda.empty_cache()
            gen = torch.Generator(device="cuda").manual_seed(t)
            q = torch.randn(1, hq, t, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            k = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            dense = bench(dense_attention, q, k)
            base = {"shape": shape, "seq_len": t, "dense_cudnn_ms": dense}
            print(f"{shape} T={t}: cuDNN dense {dense:.3f} ms", flush=True)
            for gran in args.granularities:
                cfg = SketchWalkConfig(density=0.2, block_size=BLOCK, granularity=gran)
                qb = block_pool(q, BLOCK)
                kb = block_pool(k, BLOCK)
                ref = transition_from_pooled(qb, kb, cfg, 3)
                row = {**base, "granularity": gran}
                row["torch_ms"] = bench(transition_from_pooled, qb, kb, cfg, 3)
                variants = [("tf32x3", c) for c in CONFIGS]
                variants += [("ieee", CONFIGS[0]), ("tf32", CONFIGS[0])]
                best = None
                for precision, (bm, bn, warps) in variants:
                    fn = triton_transition_fn(precision, bm, bn, warps)
                    try:
                        out = fn(qb, kb, cfg, 3)
                        ms = bench(fn, qb, kb, cfg, 3)
                    except Exception as err:  # a config that does not fit must not end the run
                        print(f"  {precision} {bm}x{bn} w{warps} failed: {err!s:.150}")
                        continue
                    err_max = (out - ref).abs().max().item()
                    name = f"triton_{precision}_{bm}x{bn}w{warps}"
                    row[name + "_ms"] = ms
                    row[name + "_maxerr"] = err_max
                    print(
                        f"  {gran:<8} {name:<28} {ms:8.3f} ms (torch {row['torch_ms']:.3f}) "
                        f"max |A - torch| {err_max:.2e}",
                        flush=True,
                    )
                    if precision == "tf32x3" and (best is None or ms < best[0]):
                        best = (ms, bm, bn, warps)
                row["best_tf32x3"] = list(best) if best else None
                # Whole selection of a sparse layer, each transition path.
                selections = {}
                for path, options in SELECT_PATHS.items():
                    sw = SketchWalk(cfg, **options)
                    selections[path] = select_two(sw, q, k, 2)
                    row[f"select_{path}_ms"] = bench(select_two, sw, q, k, 2) / 2
                reference = selections["torch"]
                row["select_same_blocks"] = all(
                    torch.equal(sel.kv_num_blocks, reference.kv_num_blocks)
                    and torch.equal(sel.kv_indices, reference.kv_indices)
                    for sel in selections.values()
                )
                print(
                    f"  {gran:<8} select "
                    + ", ".join(
                        f"{path} {row[f'select_{path}_ms']:.3f} ms "
                        f"({100 * row[f'select_{path}_ms'] / dense:.1f}% of dense)"
                        for path in SELECT_PATHS
                    )
                    + f", same blocks {row['select_same_blocks']}",
                    flush=True,
                )
                records.append(row)
                if not args.no_profile and t == max(args.seq_lens) and gran == "layer":
                    profile(cfg, q, k, shape, t)
            q = k = None
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"transition_{args.tag}"
    (out_dir / f"{stem}.json").write_text(
        json.dumps({"environment": env, "settings": vars(args), "records": records}, indent=1)
    )
    lines = [
        f"# Transition matrix and selection ({env['gpu']}, torch {env['torch']}, triton "
        f"{env['triton']}, CUDA {env['cuda']}); batch 1, bf16 Q/K, block 64, median "
        f"do_bench (warm-up {args.warmup} ms, rep {args.rep} ms)\n",
        "| shape | T | granularity | cuDNN dense ms | transition torch ms | transition "
        "triton ms (x) | select torch ms (% dense) | select triton ms (% dense) | "
        "same blocks |",
        "|" + "---|" * 9,
    ]
    for r in records:
        tri = min(
            (v for key, v in r.items() if key.startswith("triton_tf32x3") and key.endswith("_ms")),
            default=float("nan"),
        )
        st, sr = r["select_torch_ms"], r.get("select_triton_ms", float("nan"))
        lines.append(
            f"| {r['shape']} | {r['seq_len']} | {r['granularity']} | "
            f"{r['dense_cudnn_ms']:.2f} | {r['torch_ms']:.3f} | {tri:.3f} "
            f"({r['torch_ms'] / tri:.1f}x) | {st:.3f} "
            f"({100 * st / r['dense_cudnn_ms']:.1f}%) | {sr:.3f} "
            f"({100 * sr / r['dense_cudnn_ms']:.1f}%) | "
            f"{r.get('select_same_blocks')} |"
        )
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def profile(cfg, q, k, shape, t) -> None:
    """Torch-profiler tables of two selections (two layers each), per selection path."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from sketchwalk.selection.prefill import SketchWalk

    for name, options in SELECT_PATHS.items():
        sw = SketchWalk(cfg, **options)
        select_two(sw, q, k, 2)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                select_two(sw, q, k, 2)
            torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / 4
        events = prof.key_averages()
        cuda_total = sum(e.self_device_time_total for e in events) / 4e3
        print(
            f"select profile {shape} T={t} transition={name}: per layer wall {wall * 1e3:.2f} "
            f"ms (profiled), CUDA kernel time {cuda_total:.2f} ms"
        )
        print(events.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=55))
        print(events.table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=55))


if __name__ == "__main__":
    raise SystemExit(main())
