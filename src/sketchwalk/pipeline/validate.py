"""Run SketchWalk on collected tensors and measure it against dense attention.

Files are grouped by sequence (seq_len, sample, timestamp) and each sequence's layers are fed in
increasing order, so the cross-layer walk really runs; a missing layer is reported (the walk
restarts after it). For every file: accuracy of the sparse output against exact dense attention
(cosine similarity, MSE, max error, relative L2 error), attention recall (share of the dense
softmax mass inside the kept blocks), sparsity over causal blocks, block counts, and timing of
dense vs sparse attention plus the selection itself.

Timing: on CUDA, CUDA events around each call, median of ``--repeats`` runs after a warm-up; the
dense baseline is the fastest SDPA backend available (cuDNN, flash, memory-efficient), and the
sparse side uses ``--backend`` (``auto`` picks the fastest sparse kernel). On the CPU both sides
are the plain PyTorch references (``reference-vs-reference``): they do the same O(T^2) work, so
CPU speedups are about 1x by construction and say nothing about GPU kernels.

Bounds and restarts: files longer than ``--max_seq_len`` tokens (default 32768) are refused
before any work; a sample that a killed ``collect`` left half-written is skipped with a warning;
``--resume`` continues the latest ``validation_results_*.json`` in ``--output_dir`` (finished
files are kept as they are, their selections rerun only to carry the walk to later layers).

Inputs: every tensor file's SHA-256 is checked against the one ``collect`` recorded in its
summary (a changed file is refused unless ``--no_verify``; files no summary lists are used with
a warning that nothing can verify them). Each record carries ``file_sha256``, ``inputs_sha256``
(its file and the earlier layers of its sequence, which the walk depends on) and
``run_settings``; ``--resume`` reuses a record only when they match this run's, computes one made
from other files again, and refuses other settings.

Under ``torchrun --nproc_per_node N -m sketchwalk validate ...`` whole sequences (never single
layers: the walk runs across them) are dealt out over the N processes; rank 0 alone resumes and
writes, the records in the order one process writes them, each with the ``rank`` that computed
it, and the summary records ``world_size`` (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import sketchwalk.metrics as metrics
from sketchwalk._version import __version__
from sketchwalk.atomic import atomic_write, write_json
from sketchwalk.attention.api import resolve_backend, sparse_attention
from sketchwalk.attention.reference import dense_attention
from sketchwalk.blocks import BlockSelection, UsageError
from sketchwalk.config import SketchWalkConfig, add_config_arguments
from sketchwalk.pipeline import distributed
from sketchwalk.pipeline.flags import device_arg, int_at_least
from sketchwalk.pipeline.runs import (
    SEED_DEFAULTS,
    add_run_arguments,
    budget_target_density,
    check_seq_len,
    compute_dtype,
    dense_cost_text,
    file_record_header,
    incomplete_sample,
    open_run,
    resolve_device,
    run_config,
    tensor_sequences,
)
from sketchwalk.pipeline.tensorio import load_tensor_file
from sketchwalk.selection.prefill import SketchWalk

# ---- timing ------------------------------------------------------------------------------


def _time_fn(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _timed_once(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) * 1e3


def fastest_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeats: int
) -> tuple[str, float]:
    """(name, ms) of the fastest dense causal attention available on q's device."""
    if q.device.type != "cuda":
        return "reference", _time_fn(lambda: dense_attention(q, k, v), q.device, repeats)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    candidates = {
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    best: tuple[str, float] | None = None
    gqa = q.shape[1] != k.shape[1]
    for name, backend in candidates.items():

        def run(backend=backend):
            with sdpa_kernel(backend):
                return sdpa(q, k, v, is_causal=True, enable_gqa=gqa)

        try:
            ms = _time_fn(run, q.device, repeats)
        except RuntimeError:
            continue
        if best is None or ms < best[1]:
            best = (name, ms)
    if best is None:
        return "reference", _time_fn(lambda: dense_attention(q, k, v), q.device, repeats)
    return best


# ---- one file ----------------------------------------------------------------------------


def sparse_backend(backend: str, q: torch.Tensor) -> str:
    """The sparse attention backend ``--backend`` gives for query ``q`` (`resolve_backend`).

    Raises:
        UsageError: an explicit backend that cannot run on q's device, dtype or head_dim (names
            the flag, the reason and the backends that do run).
    """
    try:
        return resolve_backend(backend, q)
    except RuntimeError as exc:
        raise UsageError(
            f"--backend {backend}: {exc}; --backend auto or reference runs on "
            f"{q.device.type} (or give --device cuda)"
        ) from None


def validate_layer(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: BlockSelection,
    config: SketchWalkConfig,
    backend: str,
    repeats: int,
    selection_ms: float,
    time_it: bool = True,
) -> dict[str, Any]:
    """All metrics of one layer's selection. q (B, Hq, T, D), k/v (B, Hkv, T, D).

    On the CPU the two timed numbers are single runs of the computations that produce the
    outputs compared here (reference vs reference); on CUDA they are medians of ``repeats``
    runs after a warm-up, the dense side being the fastest SDPA backend.
    """
    dense, dense_ref_ms = _timed_once(lambda: dense_attention(q, k, v), q.device)
    sparse, sparse_ref_ms = _timed_once(
        lambda: sparse_attention(q, k, v, selection, backend=backend), q.device
    )
    nb = selection.num_blocks
    density = selection.density
    per_row = selection.blocks_per_row()
    kept_all = float(selection.kv_num_blocks.float().sum()) / (
        selection.block_mask.shape[0] * selection.num_groups
    )
    target = budget_target_density(config, nb)
    record: dict[str, Any] = {
        "actual_sparsity": 1.0 - density,
        "target_sparsity": None if target is None else 1.0 - target,
        "block_sparsity": 1.0 - kept_all / (nb * nb),
        "cosine_similarity": metrics.cosine_similarity(sparse, dense),
        "mse": metrics.mse(sparse, dense),
        "max_error": metrics.max_abs_error(sparse, dense),
        "relative_l2_error": metrics.relative_l2_error(sparse, dense),
        "attention_recall": metrics.attention_recall(q, k, selection),
        "density": density,
        "num_blocks_selected": per_row,
        "total_blocks": nb,
        "block_selection_ratio": per_row / nb,
    }
    if time_it:
        if q.device.type == "cuda":
            dense_name, dense_ms = fastest_dense(q, k, v, repeats)
            sparse_ms = _time_fn(
                lambda: sparse_attention(q, k, v, selection, backend=backend), q.device, repeats
            )
        else:
            dense_name, dense_ms, sparse_ms = "reference", dense_ref_ms, sparse_ref_ms
        record.update(
            dense_time_ms=dense_ms,
            sparse_time_ms=sparse_ms,
            selection_time_ms=selection_ms,
            speedup=dense_ms / sparse_ms if sparse_ms > 0 else math.nan,
            end_to_end_speedup=dense_ms / (sparse_ms + selection_ms),
            dense_backend=dense_name,
            timing="cuda-events" if q.device.type == "cuda" else "perf-counter",
        )
    return record


# ---- aggregation -------------------------------------------------------------------------

SUMMARY_FIELDS = (
    "actual_sparsity",
    "target_sparsity",
    "block_sparsity",
    "cosine_similarity",
    "mse",
    "max_error",
    "relative_l2_error",
    "attention_recall",
    "density",
    "num_blocks_selected",
    "block_selection_ratio",
    "dense_time_ms",
    "sparse_time_ms",
    "selection_time_ms",
    "speedup",
    "end_to_end_speedup",
)


def aggregate(records: list[dict[str, Any]], fields=SUMMARY_FIELDS) -> dict[str, Any]:
    """mean / min / max of each numeric field over records (skipping missing values)."""
    out: dict[str, Any] = {"count": len(records)}
    for name in fields:
        vals = [r[name] for r in records if isinstance(r.get(name), (int, float))]
        vals = [float(x) for x in vals if not math.isnan(x)]
        if vals:
            out[name] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)}
    return out


def summarize(
    records: list[dict[str, Any]], by_keys=("seq_len", "layer_idx"), fields=SUMMARY_FIELDS
):
    summary: dict[str, Any] = {"overall": aggregate(records, fields)}
    for key in by_keys:
        groups: dict[Any, list[dict[str, Any]]] = {}
        for r in records:
            groups.setdefault(r[key], []).append(r)
        summary[f"by_{key}"] = {str(k): aggregate(v, fields) for k, v in sorted(groups.items())}
    return summary


def print_table(
    title: str,
    summary: dict[str, Any],
    columns: list[tuple[str, str]],
    groups: tuple[str, ...] = ("by_seq_len",),
) -> None:
    """Console table of a summary (overall, then one row per group)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("group")
    for label, _ in columns:
        table.add_column(label, justify="right")

    def row(name: str, agg: dict[str, Any]) -> None:
        cells = []
        for _, field in columns:
            v = agg.get(field)
            cells.append("-" if v is None else f"{v['mean']:.4g}")
        table.add_row(name, *cells)

    row(f"overall ({summary['overall']['count']})", summary["overall"])
    for key in [k for k in summary if k in groups]:
        for group, agg in summary[key].items():
            row(f"{key[3:]}={group}", agg)
    Console().print(table)


# ---- CLI ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tensor_dir", required=True, help="folder of collected tensor files")
    parser.add_argument("--output_dir", default="./validation_results", help="results folder")
    parser.add_argument(
        "--device", type=device_arg, default="auto", help="cuda, cpu or auto (default: auto)"
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "reference", "triton", "flex"],
        help="sparse attention backend (auto: fastest available, reference on CPU)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype (auto: stored dtype on GPU, float32 on CPU)",
    )
    parser.add_argument(
        "--repeats", type=int_at_least(1), default=5, help="timed runs per measurement"
    )
    parser.add_argument("--no_timing", action="store_true", help="skip timing (accuracy only)")
    parser.add_argument(
        "--save_masks", action="store_true", help="write the selected block masks (safetensors)"
    )
    add_run_arguments(parser, "validation_results")
    add_config_arguments(parser, SEED_DEFAULTS)


def run_settings(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The flags besides the SketchWalk config that change a record's numbers."""
    timing = not args.no_timing
    return {
        "device": device.type,
        "dtype": args.dtype,
        "backend": args.backend,
        "timing": timing,
        "repeats": args.repeats if timing else None,
    }


def _validate_sequence(
    seq: dict[str, Any],
    args: argparse.Namespace,
    config: SketchWalkConfig,
    device: torch.device,
    finished: dict[str, dict[str, Any]],
    rank: int,
    on_record: Callable[[list[dict[str, Any]]], None] | None = None,
    keys: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Every file of one sequence, its layers fed in order through one SketchWalk.

    Args:
        finished: records of files done by an earlier run from the same inputs (kept as they
            are; their selection still runs when a later layer or ``--save_masks`` needs the
            walk state).
        rank: the process that computes it (recorded in every new record).
        keys: `input_keys` of the files (recorded in every new record).
        on_record: called with this sequence's records so far after each new record.

    Returns:
        ``records`` (in layer order), ``masks`` ({file stem: block mask} with
        ``--save_masks``), ``warnings``, ``backend`` (the sparse backend used, or None) and
        ``files`` (how many files the sequence has).
    """
    out: dict[str, Any] = {
        "records": [],
        "masks": {},
        "warnings": [],
        "backend": None,
        "files": len(seq["paths"]),
    }
    records = out["records"]
    if seq["warning"]:
        out["warnings"].append(seq["warning"])
    todo = [p for p in seq["paths"] if p.stem not in finished]
    if not todo and not args.save_masks:  # every file done: no selection needed either
        records.extend(finished[p.stem] for p in seq["paths"])
        return out
    walker = SketchWalk(config)
    for position, path in enumerate(seq["paths"]):
        rec = load_tensor_file(path)
        meta = rec["metadata"]
        if position == 0 and (why := incomplete_sample(seq, meta)) is not None:
            out["warnings"].append(why)
            break
        b, hq, t, d = rec["Q"].shape
        check_seq_len(t, args.max_seq_len, str(path), dense_cost_text(b, hq, t, d))
        dtype = compute_dtype(args.dtype, device, rec["Q"].dtype)
        q, k, v = (rec[n].to(device=device, dtype=dtype) for n in ("Q", "K", "V"))
        layer = int(meta["layer_idx"])
        done = finished.get(path.stem)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        # finished files still run the selection: the walk carries state to later layers
        selection = walker.select(q, k, layer)
        if device.type == "cuda":
            torch.cuda.synchronize()
        selection_ms = (time.perf_counter() - t0) * 1e3
        if args.save_masks:
            out["masks"][path.stem] = selection.block_mask.cpu()
        if done is not None:
            records.append(done)
            continue
        if out["backend"] is None:
            out["backend"] = sparse_backend(args.backend, q)
        result = validate_layer(
            q,
            k,
            v,
            selection,
            config,
            out["backend"],
            args.repeats,
            selection_ms,
            time_it=not args.no_timing,
        )
        records.append(
            {
                **file_record_header(path, meta, seq["sample"]),
                **result,
                "backend": out["backend"],
                "device": str(device),
                "dtype": str(dtype).replace("torch.", ""),
                "model_path": meta.get("model_path"),
                "config": config.to_dict(),
                **(keys or {}).get(path.stem, {}),
                "run_settings": run_settings(args, device),
                "rank": rank,
            }
        )
        if on_record is not None:
            on_record(records)
    return out


def run(args: argparse.Namespace) -> int:
    with distributed.session(args.device) as w:
        return _run(args, w)


def _run(args: argparse.Namespace, w: distributed.World) -> int:
    """The command on one rank of ``w``: sequences are dealt out over the ranks (the walk runs
    across a sequence's layers, so a sequence stays on one rank); rank 0 writes everything."""
    from tqdm import tqdm

    config = run_config(args, default_preset="seed")
    device = resolve_device(distributed.device_for(args.device, w))
    # an explicit backend this device cannot run is refused before any work
    sparse_backend(args.backend, torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16, device=device))
    tensor_dir, sequences = tensor_sequences(args.tensor_dir, args.max_seq_len)

    required = {"seq_len": int, "layer_idx": int}
    opened = open_run(
        args, "validation", tensor_dir, sequences, config, run_settings(args, device), required, w
    )
    out_dir, ts, finished, keys = (opened[k] for k in ("out_dir", "timestamp", "finished", "keys"))
    results_path = out_dir / f"validation_results_{ts}.json"
    summary_path = out_dir / f"validation_summary_{ts}.json"
    masks: dict[str, torch.Tensor] = {}
    records: list[dict[str, Any]] = []
    warnings: list[str] = []
    backend_used: str | None = None
    total = sum(len(s["paths"]) for s in sequences)
    bar = tqdm(total=total, desc="validate", unit="file", disable=not w.is_main)

    def save_partial(seq_records: list[dict[str, Any]]) -> None:
        write_json(results_path, records + seq_records)
        last = seq_records[-1]
        bar.set_postfix(recall=f"{last['attention_recall']:.3f}", density=f"{last['density']:.2f}")

    # one process writes after every file; several after every round of sequences
    on_record = save_partial if not w.distributed else None

    def one(seq: dict[str, Any]) -> dict[str, Any]:
        return _validate_sequence(seq, args, config, device, finished, w.rank, on_record, keys)

    for done in distributed.map_rounds(sequences, one, w):
        for seq_out in done:
            for why in seq_out["warnings"]:
                warnings.append(why)
                if w.is_main:
                    tqdm.write(f"warning: {why}")
            records.extend(seq_out["records"])
            masks.update(seq_out["masks"])
            backend_used = backend_used or seq_out["backend"]
            bar.update(seq_out["files"])
        if w.is_main:
            write_json(results_path, records)
    bar.close()
    if not w.is_main:
        return 0  # rank 0 writes and reports
    if backend_used is None and records:
        backend_used = records[0].get("backend")
    summary = {
        "timestamp": ts,
        "tensor_dir": str(tensor_dir),
        "device": str(device),
        "backend": backend_used,
        "timing": (
            "cuda-events, dense = fastest SDPA backend"
            if device.type == "cuda"
            else "single run, reference-vs-reference (CPU)"
        ),
        "config": config.to_dict(),
        "sketchwalk_version": __version__,
        "torch_version": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "warnings": warnings,
        "input_checks": opened["input_checks"],
        "world_size": w.world_size,
        **summarize(records),
    }
    write_json(summary_path, summary)
    if args.save_masks:
        from safetensors.torch import save_file

        mask_path = out_dir / f"validation_masks_{ts}.safetensors"
        atomic_write(
            mask_path,
            lambda tmp: save_file(
                {k: m.contiguous() for k, m in masks.items()},
                str(tmp),
                metadata={"config": json.dumps(config.to_dict())},
            ),
        )
        print(f"block masks: {mask_path}")
    columns = [
        ("recall", "attention_recall"),
        ("density", "density"),
        ("cos", "cosine_similarity"),
        ("rel L2", "relative_l2_error"),
        ("max err", "max_error"),
        ("blocks/row", "num_blocks_selected"),
        ("speedup", "speedup"),
        ("e2e speedup", "end_to_end_speedup"),
    ]
    print_table("SketchWalk validation by layer", summary, columns[:5], groups=("by_layer_idx",))
    print_table(
        f"SketchWalk validation ({backend_used} on {device}; timing: {summary['timing']})",
        summary,
        columns,
    )
    print(f"results: {results_path}\nsummary: {summary_path}")
    return 0
