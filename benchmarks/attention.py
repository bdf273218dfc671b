"""Block-sparse attention benchmark: Triton / FlexAttention kernels and SketchWalk selection
against dense baselines measured in the same process.

Usage (on a CUDA machine, from the repository root):

    PYTHONPATH=src python3 benchmarks/attention.py                 # everything, default sizes
    PYTHONPATH=src python3 benchmarks/attention.py --mode prefill --seq-lens 8192 32768 \\
        --shapes llama --densities 0.2
    PYTHONPATH=src python3 benchmarks/attention.py --mode decode --contexts 131072 --batches 1 8
    PYTHONPATH=src python3 benchmarks/attention.py --sweep         # pick kernel configs first

Prefill: causal attention, batch 1, Llama-3.1-8B (32 query / 8 KV heads, D 128) and SmolLM2
(9 / 3, D 64) shapes, bf16, block 64, selections keeping ``density`` of the causal blocks
(sink block + diagonal + random others, one mask per layer). Baselines: SDPA cuDNN, SDPA flash,
FlexAttention dense (causal block mask, block 128). End to end = ``SketchWalk(config).select``
(timed separately, per layer, averaged over two consecutive layers so the walk's cross-layer term
runs) + attention over the selection it returned.

Peer selectors (``--selectors``; default: all of `sketchwalk.selection.selectors.PEER_SELECTORS`,
XAttention, MInference, FlexPrefill; ``--selectors`` with no name skips them): each one's
``select`` per sparse layer on the same q/k, at the same density and config as SketchWalk (the
``default`` preset), timed in the same process as the SDPA cuDNN baseline, with the realized
density of its selection. ``python3 benchmarks/attention.py --selection-smoke`` runs that path on
the CPU at a tiny size with a wall-clock timer (a check that it runs, not a measurement).

Decode: one query per sequence against a cache of ``context`` tokens, batch 1 and 8, selections
of ``density`` of the blocks (sink + last block + random). Baselines: SDPA (flash, cuDNN,
efficient; GQA through ``enable_gqa`` or repeated K/V), and the Triton decode kernel on the full
selection. Decode timings replay CUDA graphs (launch-bound sizes).

Timing: ``triton.testing.do_bench(..., return_mode="median")`` (``do_bench_cudagraph`` for
decode); ``--warmup`` and ``--rep`` are milliseconds. Results: JSON + markdown in ``--out-dir``
(default benchmarks/results/attention/) with GPU name, driver, torch/triton/CUDA versions,
shapes, dtype, density, warm-up/reps; ratios are against the baseline measured in the same process.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import itertools
import json
import math
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from sketchwalk.blocks import BlockSelection
from sketchwalk.selection.selectors import PEER_SELECTORS

SHAPES = {"llama": (32, 8, 128), "smollm2": (9, 3, 64)}
BLOCK = 64


def environment() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        driver = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    return {
        "gpu": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "driver": driver,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def bench(
    fn: Callable[..., Any],
    fn_args: tuple,
    warmup: int,
    rep: int,
    graph: bool = False,
    **fn_kwargs: Any,
) -> float:
    """Median milliseconds of fn(*fn_args, **fn_kwargs); a failure gives NaN (reason printed)."""

    def call() -> Any:
        return fn(*fn_args, **fn_kwargs)

    return _bench(call, warmup, rep, graph)


def _bench(fn: Callable[[], Any], warmup: int, rep: int, graph: bool) -> float:
    try:
        fn()
        torch.cuda.synchronize()
        if graph:
            return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    except Exception as err:  # a failed baseline must not end the run
        print(f"    failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)
        torch.cuda.empty_cache()
        return float("nan")


def synthetic_selection(
    batch: int, groups: int, seq_len: int, density: float, device: str, seed: int
) -> BlockSelection:
    """Causal selection keeping round(density * (i + 1)) blocks of row i (at least the
    diagonal and block 0), the rest chosen at random; built on the GPU, O(nb^2) memory."""
    nb = triton.cdiv(seq_len, BLOCK)
    gen = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(batch, groups, nb, nb, generator=gen, device=device)
    rows = torch.arange(nb, device=device)
    causal = rows[None, :] <= rows[:, None]
    scores = scores.masked_fill(~causal, -1.0)
    scores[..., 0] = 2.0
    scores[..., rows, rows] = 3.0
    keep = torch.clamp(torch.round(density * (rows + 1)), min=2).long()
    keep = torch.minimum(keep, rows + 1)
    rank = scores.argsort(-1, descending=True).argsort(-1)
    mask = (rank < keep[:, None]) & causal
    return BlockSelection.from_mask(mask, BLOCK, seq_len)


def sparse_flops(selection: BlockSelection, num_q_heads: int, head_dim: int) -> float:
    """4 * D * (visible query-key pairs); the diagonal block counts half."""
    kept = selection.kv_num_blocks.sum().item()
    per_group_heads = num_q_heads / selection.kv_num_blocks.shape[1]
    pairs = (kept - selection.kv_num_blocks[..., :].numel() * 0.5) * BLOCK * BLOCK
    return 4.0 * head_dim * pairs * per_group_heads


def sdpa(q, k, v, backend: SDPBackend, causal: bool):
    """SDPA with one backend forced; GQA through enable_gqa, else pre-repeated K/V."""
    group = q.shape[1] // k.shape[1]
    kr = vr = None

    def run_gqa():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    def run_repeated():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, kr, vr, is_causal=causal)

    try:
        run_gqa()
        torch.cuda.synchronize()
        return run_gqa, "enable_gqa"
    except RuntimeError:
        kr = k.repeat_interleave(group, 1)
        vr = v.repeat_interleave(group, 1)
        return run_repeated, "repeated K/V"


def sweep_prefill(args, env_rows: list) -> dict[int, tuple[int, int, int]]:
    """Try (BLOCK_M, warps, stages) for the prefill kernel at 32K, density 0.2."""
    from sketchwalk.attention.triton_prefill import PrefillTuning, sparse_prefill

    best: dict[int, tuple[int, int, int]] = {}
    for shape in args.shapes:
        hq, hkv, d = SHAPES[shape]
        t = args.sweep_seq
        q = torch.randn(1, hq, t, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        sel = synthetic_selection(1, 1, t, 0.2, "cuda", 0)
        results = []
        for bm in (64, 128, 256):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    if bm == 256 and (warps == 4 or (d == 128 and stages > 2)):
                        continue
                    ms = bench(
                        sparse_prefill,
                        (q, k, v, sel.kv_num_blocks, sel.kv_indices, BLOCK),
                        10,
                        50,
                        tuning=PrefillTuning(configs={d: (bm, warps, stages)}),
                    )
                    results.append((ms, bm, warps, stages))
                    print(
                        f"  sweep {shape} T={t} BLOCK_M={bm} warps={warps} stages={stages}: "
                        f"{ms:.3f} ms",
                        flush=True,
                    )
        ok = [r for r in results if not math.isnan(r[0])]
        ms, bm, warps, stages = min(ok)
        best[d] = (bm, warps, stages)
        env_rows.append(
            {
                "shape": shape,
                "seq_len": t,
                "sweep": [list(r) for r in results],
                "best": [bm, warps, stages],
                "best_ms": ms,
            }
        )
    return best


def record(records: list, base: dict, method: str, ms: float, **extra: Any) -> None:
    """Append one timing; adds TFLOP/s or GB/s when flops/bytes are given."""
    rec = {**base, "method": method, "ms": ms, **extra}
    if "flops" in extra and ms == ms:
        rec["tflops"] = extra["flops"] / ms / 1e9
    if "bytes" in extra and ms == ms:
        rec["GBps"] = extra["bytes"] / ms / 1e6
    records.append(rec)
    shown = {key: val for key, val in extra.items() if key not in ("flops", "bytes")}
    rate = (
        f"{rec['tflops']:.0f} TFLOP/s"
        if "tflops" in rec
        else (f"{rec['GBps']:.0f} GB/s" if "GBps" in rec else "")
    )
    print(f"  {method:<22} {ms:10.4f} ms {rate:>14} {json.dumps(shown)[:110]}", flush=True)


def time_selectors(
    q: torch.Tensor,
    k: torch.Tensor,
    density: float,
    names: list[str],
    timer: Callable[[Callable[[], Any]], float],
) -> list[dict[str, Any]]:
    """Per-layer selection time of each named selector on one layer's q/k.

    Every selector gets the ``default`` preset at ``density`` (block 64), so all keep the same
    number of blocks per row; ``timer(fn)`` returns the milliseconds of one ``fn()`` call.

    Returns:
        One record per selector: ``method`` (``<name>_select``), ``ms``, ``density``,
        ``actual_density`` (of its selection), or ``error`` when it failed.
    """
    from sketchwalk import SketchWalkConfig
    from sketchwalk.selection.selectors import make_selector

    cfg = SketchWalkConfig.preset("default", density=density, block_size=BLOCK)
    out = []
    for name in names:
        rec: dict[str, Any] = {"method": f"{name}_select", "density": density}
        try:
            selector = make_selector(name, cfg)
            layer = cfg.dense_layers
            real = selector.select(q, k, layer)
            rec["ms"] = timer(lambda s=selector, lay=layer: s.select(q, k, lay))
            rec["actual_density"] = real.density
            rec["note"] = "per layer, one sparse layer"
        except Exception as err:  # a failed selector must not end the run
            traceback.print_exc()
            rec["ms"] = float("nan")
            rec["error"] = repr(err)
        out.append(rec)
    return out


def selection_smoke() -> list[dict[str, Any]]:
    """The peer-selector timing path on the CPU at a tiny size (wall clock, one call)."""
    from sketchwalk.selection.selectors import PEER_SELECTORS

    def wall_ms(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 2048, 32, generator=gen)
    k = torch.randn(1, 2, 2048, 32, generator=gen)
    return time_selectors(q, k, 0.3, list(PEER_SELECTORS), wall_ms)


def select_two_layers(sw: Any, q: torch.Tensor, k: torch.Tensor, first: int) -> BlockSelection:
    """A fresh sequence's first two sparse layers (the second one runs the cross-layer walk)."""
    sw.reset()
    sw.select(q, k, first)
    return sw.select(q, k, first + 1)


def run_prefill(args: argparse.Namespace, records: list, tuning: Any = None) -> None:
    """Prefill timings; ``tuning`` (a `PrefillTuning`, None: the defaults) is passed to every
    Triton prefill call."""
    from sketchwalk import SketchWalkConfig
    from sketchwalk.attention.flex import build_block_mask, compiled_flex_attention, kernel_options
    from sketchwalk.attention.triton_prefill import sparse_prefill
    from sketchwalk.selection.prefill import SketchWalk

    flex = compiled_flex_attention()
    w, r = args.warmup, args.rep

    for shape in args.shapes:
        hq, hkv, d = SHAPES[shape]
        for t in args.seq_lens:
            print(f"prefill {shape} T={t}", flush=True)
            q = k = v = None
            torch.cuda.empty_cache()
            q = torch.randn(1, hq, t, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            base = {
                "kind": "prefill",
                "shape": shape,
                "num_q_heads": hq,
                "num_kv_heads": hkv,
                "head_dim": d,
                "seq_len": t,
                "batch": 1,
                "dtype": "bfloat16",
                "block_size": BLOCK,
            }
            dense_flops = 4.0 * d * hq * t * (t + 1) / 2
            for name, backend in (
                ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
            ):
                fn, how = sdpa(q, k, v, backend, causal=True)
                record(records, base, name, bench(fn, (), w, r), gqa=how, flops=dense_flops)
                fn = None
            # Causal BlockMask from block indices (create_block_mask would materialise T x T).
            full = BlockSelection.full(1, 1, t, 128, "cuda")
            dense_mask = build_block_mask(full.kv_num_blocks, full.kv_indices, 128, t, hq, hkv)
            record(
                records,
                base,
                "flex_dense",
                bench(flex, (q, k, v), w, r, block_mask=dense_mask, enable_gqa=True),
                flops=dense_flops,
            )
            dense_mask = None
            full = BlockSelection.full(1, 1, t, BLOCK, "cuda")
            record(
                records,
                base,
                "triton_dense",
                bench(
                    sparse_prefill,
                    (q, k, v, full.kv_num_blocks, full.kv_indices, BLOCK),
                    w,
                    r,
                    tuning=tuning,
                ),
                flops=dense_flops,
            )
            full = None
            for density in args.densities:
                sel = synthetic_selection(1, 1, t, density, "cuda", seed=1)
                flops = sparse_flops(sel, hq, d)
                record(
                    records,
                    base,
                    "triton_sparse",
                    bench(
                        sparse_prefill,
                        (q, k, v, sel.kv_num_blocks, sel.kv_indices, BLOCK),
                        w,
                        r,
                        tuning=tuning,
                    ),
                    density=density,
                    actual_density=sel.density,
                    flops=flops,
                )
                if not args.no_flex_sparse and (density == 0.2 or args.all_flex):
                    mask = build_block_mask(sel.kv_num_blocks, sel.kv_indices, BLOCK, t, hq, hkv)
                    record(
                        records,
                        base,
                        "flex_sparse",
                        bench(
                            flex,
                            (q, k, v),
                            w,
                            r,
                            block_mask=mask,
                            enable_gqa=True,
                            kernel_options=kernel_options(BLOCK),
                        ),
                        density=density,
                        actual_density=sel.density,
                        flops=flops,
                    )
                    mask = None
                sel = None
                if args.no_select:
                    continue
                real = None
                for query_rows, walk_dtype, select_backend in itertools.product(
                    args.query_rows or [None], args.walk_dtypes or [None], args.select_backends
                ):
                    # --query-rows N: exactly N exact rows (the preset's query_tokens off)
                    extra = (
                        {} if query_rows is None else {"query_rows": query_rows, "query_tokens": 0}
                    )
                    if walk_dtype is not None:
                        extra["walk_dtype"] = walk_dtype
                    cfg = SketchWalkConfig.preset(
                        "default", density=density, block_size=BLOCK, **extra
                    )
                    sw = SketchWalk(cfg, backend=select_backend)
                    try:
                        real = select_two_layers(sw, q, k, cfg.dense_layers)
                        sel_ms = bench(select_two_layers, (sw, q, k, cfg.dense_layers), w, r) / 2
                    except Exception as err:
                        traceback.print_exc()
                        record(
                            records,
                            base,
                            "sketchwalk_select",
                            float("nan"),
                            density=density,
                            query_rows=cfg.exact_rows(q.shape[2]),
                            walk_dtype=cfg.walk_dtype,
                            select_backend=select_backend,
                            error=repr(err),
                        )
                        real = None
                        continue
                    record(
                        records,
                        base,
                        "sketchwalk_select",
                        sel_ms,
                        density=density,
                        actual_density=real.density,
                        query_rows=cfg.exact_rows(q.shape[2]),
                        walk_dtype=cfg.walk_dtype,
                        select_backend=select_backend,
                        query_rows_backend=sw.query_rows_backend,
                        note="per layer, mean of two consecutive sparse layers",
                    )
                if real is None:
                    continue
                attn_ms = bench(
                    sparse_prefill,
                    (q, k, v, real.kv_num_blocks, real.kv_indices, BLOCK),
                    w,
                    r,
                    tuning=tuning,
                )
                record(
                    records,
                    base,
                    "triton_on_sketchwalk",
                    attn_ms,
                    density=density,
                    actual_density=real.density,
                    flops=sparse_flops(real, hq, d),
                )
                record(
                    records,
                    base,
                    "end_to_end",
                    sel_ms + attn_ms,
                    density=density,
                    actual_density=real.density,
                    select_ms=sel_ms,
                    attention_ms=attn_ms,
                )
                real = sw = None
                for rec in time_selectors(
                    q, k, density, args.selectors, lambda fn: bench(fn, (), w, r)
                ):
                    method, ms = rec.pop("method"), rec.pop("ms")
                    record(records, base, method, ms, **rec)
                if args.profile_select and density == 0.2 and t >= 65536:
                    profile_select(q, k, cfg, shape, t)
            q = k = v = None
            torch.cuda.empty_cache()


def profile_select(q, k, cfg, shape: str, t: int) -> None:
    """Where the selection's time goes (torch profiler, CUDA time by op)."""
    from torch.profiler import ProfilerActivity, profile

    from sketchwalk.selection.prefill import SketchWalk

    sw = SketchWalk(cfg)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            sw.reset()
            sw.select(q, k, cfg.dense_layers)
            sw.select(q, k, cfg.dense_layers + 1)
        torch.cuda.synchronize()
    print(f"select profile {shape} T={t}")
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    )


def decode_selection(
    batch: int, groups: int, context: int, density: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    nk = triton.cdiv(context, BLOCK)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand(batch, groups, nk, generator=gen, device="cuda")
    scores[..., 0] = 2.0
    scores[..., -1] = 2.0
    keep = max(2, round(density * nk))
    top = scores.topk(keep, -1).indices.sort(-1).values.to(torch.int32)
    num = torch.full((batch, groups), keep, dtype=torch.int32, device="cuda")
    idx = torch.zeros(batch, groups, nk, dtype=torch.int32, device="cuda")
    idx[..., :keep] = top
    return num, idx


# decode-time selection steps timed: SketchWalkConfig.decode_rule, and the quest step captured
# in a CUDA graph (SketchWalkDecoder(cuda_graphs=True), what the transformers integration runs)
RULES = ("walk", "quest", "quest_graph")


def time_decode_selection(
    args: argparse.Namespace,
    records: list,
    base: dict,
    q: torch.Tensor,
    k: torch.Tensor,
    density: float,
) -> None:
    """One decode step of `SketchWalkDecoder` per rule (eager: what generation runs), after a
    prefill of the whole cache: the step adds the new key and selects the blocks."""
    from sketchwalk.config import SketchWalkConfig
    from sketchwalk.selection.decode import SketchWalkDecoder

    batch, hq, ctx, d = q.shape[0], q.shape[1], k.shape[2], q.shape[3]
    for rule in RULES:
        cfg = SketchWalkConfig(
            density=density, block_size=BLOCK, dense_layers=0,
            decode_rule=rule.removesuffix("_graph"),
            granularity="kv_group", sink_blocks=1, window_blocks=2, dense_last_rows=0,
        )  # fmt: skip
        decoder = SketchWalkDecoder(cfg, cuda_graphs=rule.endswith("_graph"))
        # The prefill query only feeds the walk rule's transition matrix: pooled random queries
        # of the cache's length are as costly as real ones.
        decoder.prefill(torch.randn(batch, hq, ctx, d, device="cuda", dtype=q.dtype), k, 0)
        k_new = torch.randn(batch, k.shape[1], 1, d, device="cuda", dtype=k.dtype)
        ms = bench(decoder.step, (q, k_new, 0), args.warmup, args.rep, graph=False)
        record(records, base, f"select_decode_{rule}", ms, density=density)
        decoder = None


def run_decode(args: argparse.Namespace, records: list) -> None:
    from sketchwalk.attention.triton_decode import sparse_decode_triton

    w, r = args.warmup, args.rep
    for shape in args.decode_shapes:
        hq, hkv, d = SHAPES[shape]
        for batch in args.batches:
            for ctx in args.contexts:
                print(f"decode {shape} B={batch} S={ctx}", flush=True)
                q = k = v = None
                torch.cuda.empty_cache()
                q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(batch, hkv, ctx, d, device="cuda", dtype=torch.bfloat16)
                v = torch.randn_like(k)
                base = {
                    "kind": "decode",
                    "shape": shape,
                    "num_q_heads": hq,
                    "num_kv_heads": hkv,
                    "head_dim": d,
                    "context": ctx,
                    "batch": batch,
                    "dtype": "bfloat16",
                    "block_size": BLOCK,
                    "queries": 1,
                }
                dense_bytes = 2 * k.numel() * k.element_size()
                for name, backend in (
                    ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                    ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                    ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
                ):
                    try:
                        fn, how = sdpa(q, k, v, backend, causal=False)
                    except RuntimeError as err:
                        print(f"    {name} unavailable: {str(err)[:120]}")
                        continue
                    record(
                        records,
                        base,
                        name,
                        bench(fn, (), w, r, graph=True),
                        gqa=how,
                        bytes=dense_bytes,
                    )
                    fn = None
                nk = triton.cdiv(ctx, BLOCK)
                full_num = torch.full((batch, 1), nk, dtype=torch.int32, device="cuda")
                full_idx = (
                    torch.arange(nk, dtype=torch.int32, device="cuda")
                    .expand(batch, 1, nk)
                    .contiguous()
                )
                record(
                    records,
                    base,
                    "triton_dense",
                    bench(
                        sparse_decode_triton, (q, k, v, full_num, full_idx, BLOCK), w, r, graph=True
                    ),
                    bytes=dense_bytes,
                )
                for density in args.densities:
                    num, idx = decode_selection(batch, 1, ctx, density, seed=2)
                    kept = num[0, 0].item() / nk
                    record(
                        records,
                        base,
                        "triton_sparse",
                        bench(sparse_decode_triton, (q, k, v, num, idx, BLOCK), w, r, graph=True),
                        density=density,
                        actual_density=kept,
                        bytes=dense_bytes * kept,
                    )
                    if not args.no_select:
                        time_decode_selection(args, records, base, q, k, density)
                q = k = v = None
                torch.cuda.empty_cache()


def ratio_tables(records: list) -> str:
    """Markdown tables: speedups against the baselines run in the same process."""
    out = []

    def ms_of(rows, method, **match):
        for r in rows:
            if r["method"] == method and all(r.get(key) == val for key, val in match.items()):
                return r["ms"]
        return float("nan")

    pre = [r for r in records if r["kind"] == "prefill"]
    if pre:
        out.append("### Prefill (batch 1, bf16, block 64): time and speedup vs SDPA cuDNN dense\n")
        out.append(
            "| shape | T | cuDNN ms | flash ms | flex dense ms | triton dense ms | density "
            "| triton sparse ms (x) | flex sparse ms (x) | select ms (% of cuDNN) "
            "| end to end ms (x) |"
        )
        out.append("|" + "---|" * 11)
        keys = sorted({(r["shape"], r["seq_len"]) for r in pre}, key=lambda x: (x[0], x[1]))
        for shape, t in keys:
            rows = [r for r in pre if r["shape"] == shape and r["seq_len"] == t]
            cud = ms_of(rows, "sdpa_cudnn")
            for dens in sorted({r["density"] for r in rows if "density" in r}):
                ts = ms_of(rows, "triton_sparse", density=dens)
                fs = ms_of(rows, "flex_sparse", density=dens)
                sel = ms_of(rows, "sketchwalk_select", density=dens)
                e2e = ms_of(rows, "end_to_end", density=dens)
                out.append(
                    f"| {shape} | {t} | {cud:.2f} | {ms_of(rows, 'sdpa_flash'):.2f} | "
                    f"{ms_of(rows, 'flex_dense'):.2f} | {ms_of(rows, 'triton_dense'):.2f} | "
                    f"{dens:.0%} | {ts:.2f} ({cud / ts:.2f}x) | {fs:.2f} ({cud / fs:.2f}x) | "
                    f"{sel:.2f} ({100 * sel / cud:.1f}%) | {e2e:.2f} ({cud / e2e:.2f}x) |"
                )
        out.append("")
        peers = sorted({r["method"] for r in pre if r["method"].endswith("_select")})
        if len(peers) > 1:
            out.append(
                "### Prefill selection per layer: ms (% of SDPA cuDNN dense) and realized density\n"
            )
            out.append("| shape | T | density | " + " | ".join(peers) + " |")
            out.append("|" + "---|" * (3 + len(peers)))
            for shape, t in keys:
                rows = [r for r in pre if r["shape"] == shape and r["seq_len"] == t]
                cud = ms_of(rows, "sdpa_cudnn")
                for dens in sorted({r["density"] for r in rows if "density" in r}):
                    cells = []
                    for method in peers:
                        hit = [r for r in rows if r["method"] == method and r["density"] == dens]
                        ms = hit[0]["ms"] if hit else float("nan")
                        real = hit[0].get("actual_density", float("nan")) if hit else float("nan")
                        cells.append(f"{ms:.2f} ({100 * ms / cud:.1f}%), {real:.3f}")
                    out.append(f"| {shape} | {t} | {dens:.0%} | " + " | ".join(cells) + " |")
            out.append("")
    dec = [r for r in records if r["kind"] == "decode"]
    if dec:
        out.append("### Decode (1 query, bf16, block 64): speedup vs the fastest SDPA dense\n")
        out.append(
            "| shape | batch | context | best SDPA | SDPA us | triton dense us | density "
            "| triton sparse us | speedup vs SDPA | vs triton dense "
            "| select walk us (% of sparse) | select quest us (% of sparse) | "
            "select quest, CUDA graph us (% of sparse) |"
        )
        out.append("|" + "---|" * 13)
        keys = sorted({(r["shape"], r["batch"], r["context"]) for r in dec})
        for shape, b, ctx in keys:
            rows = [r for r in dec if (r["shape"], r["batch"], r["context"]) == (shape, b, ctx)]
            sdpas = [
                (r["ms"], r["method"])
                for r in rows
                if r["method"].startswith("sdpa") and r["ms"] == r["ms"]
            ]
            best_ms, best = min(sdpas) if sdpas else (float("nan"), "-")
            td = ms_of(rows, "triton_dense")
            for dens in sorted({r["density"] for r in rows if "density" in r}):
                ts = ms_of(rows, "triton_sparse", density=dens)
                sel = [ms_of(rows, f"select_decode_{rule}", density=dens) for rule in RULES]
                sel_text = " | ".join(
                    "-" if m != m else f"{m * 1e3:.1f} ({100 * m / ts:.0f}%)" for m in sel
                )
                out.append(
                    f"| {shape} | {b} | {ctx} | {best} | {best_ms * 1e3:.1f} | "
                    f"{td * 1e3:.1f} | {dens:.0%} | {ts * 1e3:.1f} | "
                    f"{best_ms / ts:.2f}x | {td / ts:.2f}x | {sel_text} |"
                )
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["prefill", "decode", "all"], default="all")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["llama", "smollm2"])
    p.add_argument("--decode-shapes", nargs="+", choices=list(SHAPES), default=["llama"])
    p.add_argument("--seq-lens", nargs="+", type=int, default=[8192, 16384, 32768, 65536, 131072])
    p.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    p.add_argument("--contexts", nargs="+", type=int, default=[8192, 16384, 32768, 65536, 131072])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--warmup", type=int, default=25, help="warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="measurement time, ms")
    p.add_argument("--sweep", action="store_true", help="sweep prefill kernel configs first")
    p.add_argument("--sweep-seq", type=int, default=32768)
    p.add_argument("--no-select", action="store_true", help="skip every selection timing")
    p.add_argument(
        "--selectors",
        nargs="*",
        choices=list(PEER_SELECTORS),
        default=list(PEER_SELECTORS),
        metavar="NAME",
        help=f"peer selectors to time beside SketchWalk, from {', '.join(PEER_SELECTORS)}",
    )
    p.add_argument(
        "--selection-smoke",
        action="store_true",
        help="run the peer-selector timing path on the CPU at a tiny size and exit",
    )
    p.add_argument(
        "--query-rows",
        nargs="+",
        type=int,
        default=None,
        help="time the default preset's selection with exactly this many exact query rows "
        "(query_rows=N, query_tokens=0; default: the preset's own); attention runs on the last "
        "one's selection",
    )
    p.add_argument(
        "--walk-dtypes",
        nargs="+",
        choices=["float32", "bfloat16"],
        default=None,
        help="time the default preset's selection with each walk_dtype (default: the "
        "preset's own); attention runs on the last one's selection",
    )
    p.add_argument(
        "--select-backends",
        nargs="+",
        choices=["auto", "triton"],
        default=["auto"],
        help="SketchWalk(backend=...) for the selection timings: triton also runs the "
        "query-row kernel (auto keeps its PyTorch reference for now)",
    )
    p.add_argument("--profile-select", action="store_true")
    p.add_argument("--no-flex-sparse", action="store_true")
    p.add_argument("--all-flex", action="store_true", help="flex sparse at every density")
    p.add_argument("--out-dir", default="benchmarks/results/attention")
    p.add_argument("--tag", default="h100")
    args = p.parse_args(argv)
    if args.selection_smoke:
        for rec in selection_smoke():
            print(json.dumps(rec), flush=True)
        return 0
    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dynamo_config = importlib.import_module("torch._dynamo").config
    # One compiled flex kernel per shape; the default limit would fall back to eager flex.
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, 256)
    env = environment()
    print(json.dumps(env), flush=True)
    records: list[dict[str, Any]] = []
    sweeps: list[dict[str, Any]] = []
    start = time.time()
    picked: dict[int, tuple[int, int, int]] = {}
    if args.sweep and args.mode in ("prefill", "all"):
        picked = sweep_prefill(args, sweeps)
        print(f"sweep picked {picked}", flush=True)
    if args.mode in ("prefill", "all"):
        from sketchwalk.attention.triton_prefill import PrefillTuning

        run_prefill(args, records, PrefillTuning(configs=picked) if picked else None)
    if args.mode in ("decode", "all"):
        run_decode(args, records)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items()}
    result = {
        "environment": env,
        "settings": settings,
        "timing": {
            "warmup_ms": args.warmup,
            "rep_ms": args.rep,
            "statistic": "median",
            "prefill": "triton.testing.do_bench",
            "decode": "triton.testing.do_bench_cudagraph",
        },
        "prefill_config": {str(k): v for k, v in picked.items()} or "defaults",
        "sweep": sweeps,
        "records": records,
        "wall_s": time.time() - start,
    }
    stem = f"attention_{args.tag}_{args.mode}"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    header = (
        f"# Attention benchmark ({args.mode})\n\n{env['gpu']}, driver {env['driver']}, "
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, cuDNN "
        f"{env['cudnn']}; {env['date']}. Median of do_bench (warm-up {args.warmup} ms, "
        f"rep {args.rep} ms).\n\n"
    )
    tables = ratio_tables(records)
    (out_dir / f"{stem}.md").write_text(header + tables)
    print(tables)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
