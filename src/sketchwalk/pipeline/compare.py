"""Compare SketchWalk's block selection with SeerAttention's on collected tensors (step 3).

Files are grouped by sequence (seq_len, sample, timestamp) and each sequence's layers are fed to
one SketchWalk in increasing order, so the cross-layer walk runs as in ``validate``.

The SeerAttention side is, per file:

- ``seerattention-gate``: the learned gate, when the file carries ``seerattn_scores`` (collected
  with a SeerAttention checkpoint). Its selection is the stored ``seerattn_mask`` (the
  checkpoint's own threshold or nz_ratio), or the gate scores re-selected when
  ``--seerattn_threshold`` or ``--seerattn_nz_ratio`` is given explicitly.
- ``oracle-threshold``: otherwise, the seed's stand-in. It is NOT a learned gate: it thresholds
  the true block attention (per head, mean over the block's queries of the softmax mass on each
  key block; rows sum to 1) at ``--seerattn_threshold`` (default 0.1), or keeps SeerAttention's
  nz_ratio top-k per row; lower-triangular, the last ``--seerattn_dense_last_rows`` rows dense
  (2, as SeerAttention), the diagonal kept.

Per file: both sparsities over causal blocks (per-head masks), block overlap (overlap
coefficient), Jaccard similarity, attention correlation (Pearson, over causal tiles, of the
head-averaged SeerAttention-side score map and SketchWalk's walk matrix), each side's attention
recall at its own density, both at a matched density, and the oracle (true top blocks) recall
at SketchWalk's per-row budget as the ceiling. The true block attention is computed once per
file and every recall is derived from it exactly.

``--selectors NAME ...`` (names of `COMPARE_SELECTORS`: ``oracle``, ``streaming`` and the
peers' ``xattention``, ``minference``, ``flexprefill``) runs other selectors beside SketchWalk,
at its config (the same forced blocks and per-row budget, so the same realized density), each
fed the sequence's layers in order after a ``reset()``. Each record gains per selector
(``selector_{name}_...``): its density, its attention recall (from the same true block
attention) and its overlap and Jaccard with SketchWalk's selection and with the SeerAttention
side's; the summary their means, the console a row each. ``gate``, ``quest``, ``sketchwalk``
and ``forced`` are refused (the flag's help says why).

``--validation_dir``: the latest validation run found there gives the default SketchWalk
config (explicit flags win) and its per-file attention recall is reported alongside.

Outputs in ``--output_dir``: ``comparison_results_{ts}.json`` (one record per file, rewritten
atomically after each), ``comparison_summary_{ts}.json`` (overall, sparse layers only, by
sequence length, by layer), a console table, and with ``--visualize`` PNG heatmaps
``comparison_{sample_id}.png`` for up to ``--max_plots`` files plus
``comparison_summary_{ts}.png`` (recall and overlap by layer).

As in ``validate``: ``--max_seq_len`` refuses longer files up front, half-written samples are
skipped, a tensor file whose SHA-256 differs from the one ``collect`` recorded is refused unless
``--no_verify``, every record carries ``file_sha256``, ``inputs_sha256`` and ``run_settings``,
and ``--resume`` continues the latest ``comparison_results_*.json``, reusing a record only when
it was made from the same inputs, settings and ``--validation_dir`` recall.

Under ``torchrun --nproc_per_node N -m sketchwalk compare ...`` whole sequences are dealt out
over the N processes, as in ``validate``; rank 0 alone resumes and writes (results, summary and
heatmaps, in the order one process writes them), each record carries the ``rank`` that computed
it and the summary ``world_size`` (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from sketchwalk._version import __version__
from sketchwalk.atomic import write_json
from sketchwalk.blocks import BlockSelection, DataError, UsageError, causal_block_mask
from sketchwalk.config import (
    SketchWalkConfig,
    add_config_arguments,
    given_config_flags,
)
from sketchwalk.metrics import block_mask_recall, oracle_selection, true_block_attention
from sketchwalk.pipeline import distributed
from sketchwalk.pipeline.flags import (
    device_arg,
    flag_error,
    float_in,
    int_at_least,
)
from sketchwalk.pipeline.plots import plot_file, plot_summary
from sketchwalk.pipeline.runs import (
    SEED_DEFAULTS,
    add_run_arguments,
    check_seq_len,
    check_work,
    compute_dtype,
    dense_cost_text,
    file_record_header,
    incomplete_sample,
    open_run,
    resolve_device,
    run_config,
    tensor_sequences,
)
from sketchwalk.pipeline.seer import (
    DEFAULT_SEERATTN_THRESHOLD,
    SeerSide,
    gate_side,
    oracle_threshold_side,
)
from sketchwalk.pipeline.tensorio import load_tensor_file
from sketchwalk.pipeline.validate import print_table, summarize
from sketchwalk.selection.prefill import SketchWalk
from sketchwalk.selection.select import select_blocks
from sketchwalk.selection.selectors import PEER_SELECTORS, make_selector

COMPARE_FIELDS = (
    "seerattn_sparsity",
    "sketchwalk_sparsity",
    "seerattn_density",
    "sketchwalk_density",
    "seerattn_blocks_per_row",
    "sketchwalk_blocks_per_row",
    "block_overlap",
    "jaccard_similarity",
    "attention_correlation",
    "attention_rank_correlation",
    "sketchwalk_true_correlation",
    "seerattn_true_correlation",
    "seerattn_recall",
    "sketchwalk_recall",
    "sketchwalk_recall_matched",
    "sketchwalk_density_matched",
    "seerattn_recall_matched",
    "oracle_recall",
    "oracle_recall_seerattn_budget",
    "validation_attention_recall",
    "seconds",
)

# The selectors ``--selectors`` runs beside SketchWalk (`sketchwalk.selection.selectors`), and
# why the other names are refused.
COMPARE_SELECTORS = ("oracle", "streaming", *PEER_SELECTORS)
REFUSED_SELECTORS = {
    "sketchwalk": "it is the W side of every record already",
    "gate": "it needs a gate checkpoint; on files collected through one its stored scores are "
    "the SeerAttention side, and seerattn_recall_matched ranks them at SketchWalk's budget",
    "quest": "it is dense in prefill and selects only at decode steps, which tensor files do "
    "not have",
    "forced": "it keeps only the forced blocks, below SketchWalk's density",
}
# Per-selector record fields: ``selector_{name}_{metric}`` (`selector_fields`).
SELECTOR_METRICS = (
    "density",
    "recall",
    "overlap_sketchwalk",
    "jaccard_sketchwalk",
    "overlap_seerattn",
    "jaccard_seerattn",
)
# Selectors whose constructor takes the softmax ``scale`` (the file's ``attention_scaling``).
_SCALED_SELECTORS = ("oracle", *PEER_SELECTORS)


def selector_fields(names: Any) -> tuple[str, ...]:
    """The record fields of the ``--selectors`` ``names``, in order (`SELECTOR_METRICS` each)."""
    return tuple(f"selector_{name}_{metric}" for name in names for metric in SELECTOR_METRICS)


# ---- metrics ---------------------------------------------------------------------------------


def mask_agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float | None]:
    """Overlap coefficient and Jaccard similarity of two per-head block masks.

    Each mask (B, H, nb, nb) is read as the set of its kept causal tiles (b, h, i, j):
    ``block_overlap = |A & B| / min(|A|, |B|)``, ``jaccard_similarity = |A & B| / |A | B|``
    (None when a denominator is 0).
    """
    if a.shape != b.shape:
        raise ValueError(f"mask_agreement: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    causal = causal_block_mask(a.shape[-1], a.device)
    a, b = a & causal, b & causal
    inter = int((a & b).sum().item())
    size_a, size_b = int(a.sum().item()), int(b.sum().item())
    union = size_a + size_b - inter
    smaller = min(size_a, size_b)
    return {
        "block_overlap": inter / smaller if smaller else None,
        "jaccard_similarity": inter / union if union else None,
        "intersection_blocks": inter,
    }


def causal_tiles(score_map: torch.Tensor) -> torch.Tensor:
    """float64 vector of the causal tiles (i >= j) of a (B, G, nb, nb) map averaged over batch
    and heads/groups."""
    mean = score_map.double().mean(dim=(0, 1))
    return mean[causal_block_mask(mean.shape[-1], mean.device)]


def pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Pearson correlation of two equal-length vectors (float64); None if either is constant."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = x.norm() * y.norm()
    if x.numel() < 2 or den == 0:
        return None
    return float((x @ y / den).item())


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Spearman rank correlation (ties get their average rank); None if either is constant."""
    return pearson(_average_ranks(x), _average_ranks(y))


def compare_layer(
    selection: BlockSelection,
    seer: SeerSide,
    block_attention: torch.Tensor,
    config: SketchWalkConfig,
    num_kv_heads: int,
    others: dict[str, BlockSelection] | None = None,
) -> dict[str, Any]:
    """Every comparison metric of one layer.

    Args:
        selection: SketchWalk's selection (its ``scores`` = the walk matrix, None on dense
            layers).
        seer: the SeerAttention side.
        block_attention: float32 (B, Hq, nb, nb) true block attention (reduce="sum").
        config: SketchWalk's config (the matched-density re-selection uses it with ``density``).
        num_kv_heads: Hkv.
        others: the ``--selectors``' selections of the same layer by name (any mask
            granularity); each adds the `selector_fields` of its name: density, attention
            recall (from ``block_attention``), overlap and Jaccard with SketchWalk's selection
            and with the SeerAttention side's.

    Returns:
        A dict of plain values (see ``docs/compare.md`` for each definition).
    """
    _, hq, nb, _ = block_attention.shape
    t, bs = selection.seq_len, selection.block_size
    sw_mask = selection.head_mask(hq, num_kv_heads)
    sw_heads = BlockSelection.from_mask(sw_mask.contiguous(), bs, t)
    seer_sel = BlockSelection.from_mask(seer.mask, bs, t)

    def recall(mask: torch.Tensor) -> float:
        return block_mask_recall(block_attention, mask, t, bs)

    out: dict[str, Any] = {
        "seerattn_method": seer.method,
        "seerattn_rule": seer.rule,
        "seerattn_sparsity": 1.0 - seer_sel.density,
        "sketchwalk_sparsity": 1.0 - sw_heads.density,
        "seerattn_density": seer_sel.density,
        "sketchwalk_density": sw_heads.density,
        "seerattn_blocks_per_row": seer_sel.blocks_per_row(),
        "sketchwalk_blocks_per_row": sw_heads.blocks_per_row(),
        "total_blocks": nb,
        "causal_blocks_per_head": nb * (nb + 1) // 2,
        "sketchwalk_dense_layer": selection.scores is None,
    }
    out.update(mask_agreement(seer.mask, sw_mask))

    seer_tiles = causal_tiles(seer.scores)
    true_tiles = causal_tiles(block_attention)
    if selection.scores is not None:
        walk_tiles = causal_tiles(selection.scores)
        out["attention_correlation"] = pearson(seer_tiles, walk_tiles)
        out["attention_rank_correlation"] = spearman(seer_tiles, walk_tiles)
        out["sketchwalk_true_correlation"] = pearson(walk_tiles, true_tiles)
    else:
        out["attention_correlation"] = None
        out["attention_rank_correlation"] = None
        out["sketchwalk_true_correlation"] = None
    out["seerattn_true_correlation"] = pearson(seer_tiles, true_tiles)

    out["seerattn_recall"] = recall(seer.mask)
    out["sketchwalk_recall"] = recall(sw_mask)
    # Matched density 1: SketchWalk at the SeerAttention side's density. The walk matrix does not
    # depend on the budget, so re-selecting from it equals re-running SketchWalk with density=.
    out["sketchwalk_recall_matched"] = None
    out["sketchwalk_density_matched"] = None
    if selection.scores is not None and seer_sel.density > 0:
        matched_cfg = config.replace(density=seer_sel.density, top_k_blocks=None)
        matched = select_blocks(selection.scores, t, matched_cfg)
        matched_mask = matched.head_mask(hq, num_kv_heads)
        out["sketchwalk_recall_matched"] = recall(matched_mask)
        out["sketchwalk_density_matched"] = BlockSelection.from_mask(
            matched_mask.contiguous(), bs, t
        ).density
    # Matched density 2: the SeerAttention side's scores, top-k per row with SketchWalk's counts.
    out["seerattn_recall_matched"] = recall(oracle_selection(seer.scores, sw_heads).block_mask)
    out["oracle_recall"] = recall(oracle_selection(block_attention, sw_heads).block_mask)
    out["oracle_recall_seerattn_budget"] = recall(
        oracle_selection(block_attention, seer_sel).block_mask
    )
    for name, other in (others or {}).items():
        mask = other.head_mask(hq, num_kv_heads)
        with_sw, with_seer = mask_agreement(mask, sw_mask), mask_agreement(mask, seer.mask)
        values = (
            BlockSelection.from_mask(mask.contiguous(), bs, t).density,
            recall(mask),
            with_sw["block_overlap"],
            with_sw["jaccard_similarity"],
            with_seer["block_overlap"],
            with_seer["jaccard_similarity"],
        )
        out.update(zip(selector_fields([name]), values, strict=True))
    return out


def compared_selectors(
    names: Any, config: SketchWalkConfig, device: torch.device, scale: float | None = None
) -> dict[str, Any]:
    """The ``--selectors`` at SketchWalk's config (same forced blocks and per-row budget, so the
    same realized density), reset for a new sequence.

    Args:
        names: names from `COMPARE_SELECTORS`.
        config: SketchWalk's config.
        device: where they run (on CUDA the selectors that score attention take larger chunks).
        scale: the softmax scale of the sequence's files (``attention_scaling``; None: 1 /
            sqrt(head_dim)).

    Returns:
        ``{name: selector}`` in the order of ``names``.

    Raises:
        UsageError: a selector refuses the config (e.g. a block size its stride does not
            divide); the message names ``--selectors``.
    """
    out: dict[str, Any] = {}
    for name in names:
        options: dict[str, Any] = {"scale": scale} if name in _SCALED_SELECTORS else {}
        if name in ("oracle", "xattention") and device.type == "cuda":
            options["chunk_elements"] = 1 << 28
        try:
            selector = make_selector(name, config, **options)
        except UsageError as exc:
            raise UsageError(f"--selectors: {exc}") from None
        selector.reset()
        out[name] = selector
    return out


# ---- validation results ------------------------------------------------------------------------


def load_validation(validation_dir: str | None) -> dict[str, Any]:
    """The latest validation run in ``validation_dir``.

    Returns:
        ``{"config": dict | None, "recall": {sample_id: (recall, config)}, "notes": [str],
        "summary_file": str | None, "results_file": str | None}``. Absent, empty or unreadable
        inputs give notes (the comparison goes on without them).

    Raises:
        DataError: the results file reads as JSON but is not a list of validation records
            (names the file, the entry and the field).
    """
    info: dict[str, Any] = {
        "config": None,
        "recall": {},
        "notes": [],
        "summary_file": None,
        "results_file": None,
    }
    if not validation_dir:
        info["notes"].append("no --validation_dir given: SketchWalk config from flags only")
        return info
    folder = Path(validation_dir)
    if not folder.is_dir():
        info["notes"].append(f"validation folder {folder} not found: config from flags only")
        return info
    summaries = sorted(folder.glob("validation_summary_*.json"))
    results = sorted(folder.glob("validation_results_*.json"))
    if not summaries and not results:
        info["notes"].append(
            f"no validation_summary_*.json or validation_results_*.json in {folder}: "
            "config from flags only"
        )
        return info

    def read(path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            info["notes"].append(f"{path}: unreadable ({exc}); ignored")
            return None

    if summaries:
        summary_path = summaries[-1]
        data = read(summary_path)
        if isinstance(data, dict) and isinstance(data.get("config"), dict):
            info["config"], info["summary_file"] = data["config"], str(summary_path)
        elif data is not None:
            info["notes"].append(f"{summary_path}: no 'config' entry; ignored")
        stamp = summary_path.stem.removeprefix("validation_summary_")
        same = folder / f"validation_results_{stamp}.json"
        results_path = same if same.is_file() else (results[-1] if results else None)
    else:
        results_path = results[-1]
    data = None if results_path is None else read(results_path)
    if data is not None:
        _check_validation_records(results_path, data)
        info["results_file"] = str(results_path)
        for rec in data:
            info["recall"][rec["sample_id"]] = (rec.get("attention_recall"), rec.get("config"))
        if info["config"] is None and data and isinstance(data[0].get("config"), dict):
            info["config"] = data[0]["config"]
    if len(summaries) > 1:
        info["notes"].append(f"{len(summaries)} validation runs in {folder}; using the latest")
    return info


def _check_validation_records(path: Path, data: Any) -> None:
    """Refuse a ``validation_results_*.json`` that is not a list of records with a string
    ``sample_id``, a numeric (or null) ``attention_recall`` and a dict (or null) ``config``."""
    where = f"--validation_dir: {path}"
    if not isinstance(data, list):
        found = type(data).__name__
        raise DataError(f"{where}: expected a list of validation records, found {found}")
    none = type(None)
    fields = {"sample_id": (str,), "attention_recall": (int, float, none), "config": (dict, none)}
    for index, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: entry {index} is {type(rec).__name__}, not a record")
        for field, kinds in fields.items():
            value = rec.get(field)
            if not isinstance(value, kinds) or isinstance(value, bool):
                raise DataError(
                    f"{where}: entry {index} field {field!r} is {value!r:.60} (expected "
                    f"{' or '.join('null' if k is none else k.__name__ for k in kinds)})"
                )


def resolve_config(args: argparse.Namespace, base: dict[str, Any] | None) -> SketchWalkConfig:
    """SketchWalk's config: the validation run's config (when given and no ``--preset``) or the
    seed preset, then every flag given explicitly (`SketchWalkConfig.with_overrides` decides
    which budget wins)."""
    if base is None or getattr(args, "preset", None):
        return run_config(args, default_preset="seed")
    config = SketchWalkConfig.from_dict(base).with_overrides(**given_config_flags(args))
    check_work(config)
    return config


# ---- CLI ---------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tensor_dir", required=True, help="folder of collected tensor files")
    parser.add_argument(
        "--validation_dir",
        default=None,
        help="folder of validation results: its latest config becomes the default SketchWalk "
        "config and its per-file recall is reported alongside (optional)",
    )
    parser.add_argument("--output_dir", default="./comparison_results", help="results folder")
    parser.add_argument(
        "--seerattn_threshold",
        type=float_in(0.0, 1.0),
        default=None,
        help="SeerAttention threshold (default: 0.1). oracle-threshold: on the true block "
        "attention; gate files: given explicitly, re-selects the gate scores instead of using "
        "the stored seerattn_mask",
    )
    parser.add_argument(
        "--seerattn_nz_ratio",
        type=float_in(0.0, 1.0, low_open=True),
        default=None,
        help="SeerAttention nz_ratio (top-k per row) instead of a threshold",
    )
    parser.add_argument(
        "--seerattn_dense_last_rows",
        type=int_at_least(0),
        default=2,
        help="last query-block rows the SeerAttention side keeps dense (default: 2)",
    )
    parser.add_argument(
        "--device", type=device_arg, default="auto", help="cuda, cpu or auto (default: auto)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="SketchWalk's compute dtype (auto: stored dtype on GPU, float32 on CPU)",
    )
    parser.add_argument("--visualize", action="store_true", help="write PNG heatmaps")
    parser.add_argument(
        "--max_plots",
        type=int_at_least(0),
        default=6,
        help="files to draw with --visualize (default: 6)",
    )
    refused = "; ".join(f"{name}: {why}" for name, why in REFUSED_SELECTORS.items())
    parser.add_argument(
        "--selectors",
        nargs="+",
        type=_selector_name,
        default=None,
        metavar="NAME",
        help="other selectors to compare at SketchWalk's config (same forced blocks and per-row "
        f"budget), from {', '.join(COMPARE_SELECTORS)}; each record gains their density, recall "
        f"and agreement with both sides (default: none). Not here: {refused}",
    )
    add_run_arguments(parser, "comparison_results")
    add_config_arguments(parser, SEED_DEFAULTS)


def _selector_name(text: str) -> str:
    """A ``--selectors`` name (argparse ``type=``)."""
    if text in COMPARE_SELECTORS:
        return text
    if text in REFUSED_SELECTORS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not compared here: {REFUSED_SELECTORS[text]}"
        )
    raise argparse.ArgumentTypeError(
        f"unknown selector {text!r}; choose from {', '.join(COMPARE_SELECTORS)}"
    )


def _check_args(args: argparse.Namespace) -> None:
    if args.seerattn_threshold is not None and args.seerattn_nz_ratio is not None:
        raise UsageError("give at most one of --seerattn_threshold and --seerattn_nz_ratio")
    names = args.selectors or []
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UsageError(f"--selectors: {', '.join(twice)} given more than once")


def run_settings(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The flags besides the SketchWalk config that change a record's numbers (``selectors``
    only when ``--selectors`` is given, so records without them keep their settings)."""
    settings: dict[str, Any] = {
        "device": device.type,
        "dtype": args.dtype,
        "seerattn_threshold": args.seerattn_threshold,
        "seerattn_nz_ratio": args.seerattn_nz_ratio,
        "seerattn_dense_last_rows": args.seerattn_dense_last_rows,
    }
    if args.selectors:
        settings["selectors"] = list(args.selectors)
    return settings


def _validation_fields(
    validation: dict[str, Any], sample_id: str, config: SketchWalkConfig
) -> dict[str, Any]:
    """A file's recall in the ``--validation_dir`` run, and whether that run's config matches."""
    recall, val_config = validation["recall"].get(sample_id, (None, None))
    return {
        "validation_attention_recall": recall,
        "validation_config_matches": None if val_config is None else val_config == config.to_dict(),
    }


def _plot_indices(total: int, max_plots: int) -> set[int]:
    """Up to ``max_plots`` file positions spread evenly over the run."""
    if max_plots <= 0 or total == 0:
        return set()
    if max_plots >= total:
        return set(range(total))
    step = (total - 1) / max(1, max_plots - 1)
    return {round(i * step) for i in range(max_plots)}


def _compare_sequence(
    seq: dict[str, Any],
    first: int,
    args: argparse.Namespace,
    config: SketchWalkConfig,
    device: torch.device,
    finished: dict[str, dict[str, Any]],
    validation: dict[str, Any],
    to_plot: set[int],
    out_dir: Path,
    rank: int,
    on_record: Any = None,
    keys: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Every file of one sequence, its layers fed in order through one SketchWalk and through
    each ``--selectors`` selector (made and reset for the sequence at its first file read).

    Args:
        first: position of the sequence's first file in the run (plots are chosen by position).
        finished: records of files done by an earlier run from the same inputs (kept as they
            are).
        rank: the process that computes it (recorded in every new record).
        on_record: called with this sequence's records so far after each new record.
        keys: `input_keys` of the files (recorded in every new record).

    Returns:
        ``records`` (layer order), ``warnings``, ``methods`` (SeerAttention sides seen),
        ``plots`` (``(png path, tensors to draw or None when the heatmap exists)`` per file to
        plot, in order; rank 0 draws them) and ``files`` (how many files the sequence has).
    """
    out: dict[str, Any] = {
        "records": [],
        "warnings": [],
        "methods": set(),
        "plots": [],
        "files": len(seq["paths"]),
    }
    records = out["records"]
    if seq["warning"]:
        out["warnings"].append(seq["warning"])
    walker = SketchWalk(config)
    others: dict[str, Any] | None = None
    for index, path in enumerate(seq["paths"]):
        position = first + index
        png = out_dir / f"comparison_{path.stem}.png"
        done = finished.get(path.stem)
        if done is not None and all(p.stem in finished for p in seq["paths"][index:]):
            records.append(done)  # the rest of this sequence is done: no selection needed
            out["methods"].add(done["seerattn_method"])
            if position in to_plot:
                out["plots"].append((png, None))
            continue
        t0 = time.perf_counter()
        rec = load_tensor_file(path)
        meta = rec["metadata"]
        if index == 0 and (why := incomplete_sample(seq, meta)) is not None:
            out["warnings"].append(why)
            break
        b, hq, t, d = rec["Q"].shape
        check_seq_len(t, args.max_seq_len, str(path), dense_cost_text(b, hq, t, d))
        dtype = compute_dtype(args.dtype, device, rec["Q"].dtype)
        q = rec["Q"].to(device=device, dtype=dtype)
        k = rec["K"].to(device=device, dtype=dtype)
        layer = int(meta["layer_idx"])
        scale = meta.get("attention_scaling")
        if others is None:
            others = compared_selectors(args.selectors or (), config, device, scale)
        # finished files still run the selection: the walk carries state to later layers (and
        # any other selector may carry state too)
        selection = walker.select(q, k, layer)
        other_selections = {name: other.select(q, k, layer) for name, other in others.items()}
        if done is not None:
            records.append(done)
            out["methods"].add(done["seerattn_method"])
            if position in to_plot:
                out["plots"].append((png, None))
            continue
        block_attention = true_block_attention(q, k, config.block_size, reduce="sum", scale=scale)
        threshold = args.seerattn_threshold
        if "seerattn_scores" in rec:
            seer = gate_side(
                rec,
                path,
                config.block_size,
                threshold,
                args.seerattn_nz_ratio,
                args.seerattn_dense_last_rows,
                device=device,
            )
        else:
            seer = oracle_threshold_side(
                block_attention,
                DEFAULT_SEERATTN_THRESHOLD if threshold is None else threshold,
                args.seerattn_nz_ratio,
                args.seerattn_dense_last_rows,
            )
        out["methods"].add(seer.method)
        result = compare_layer(
            selection, seer, block_attention, config, k.shape[1], other_selections
        )
        record = {
            **file_record_header(path, meta, seq["sample"]),
            **result,
            **_validation_fields(validation, path.stem, config),
            "seconds": time.perf_counter() - t0,
            "device": str(device),
            "model_path": meta.get("model_path"),
            "config": config.to_dict(),
            **(keys or {}).get(path.stem, {}),
            "run_settings": run_settings(args, device),
            "rank": rank,
        }
        records.append(record)
        if position in to_plot:
            drawn = (
                block_attention.cpu(),
                seer.mask.cpu(),
                selection.head_mask(q.shape[1], k.shape[1]).cpu(),
                record,
                {
                    name: sel.head_mask(q.shape[1], k.shape[1]).cpu()
                    for name, sel in other_selections.items()
                },
            )
            out["plots"].append((png, drawn))
        if on_record is not None:
            on_record(records)
    return out


def _print_selectors(title: str, summary: dict[str, Any], names: list[str]) -> None:
    """Console table of the ``--selectors``: one row each (means over the summary's
    ``overall``), under SketchWalk's own row."""
    from rich.console import Console
    from rich.table import Table

    overall = summary["overall"]
    table = Table(title=title)
    table.add_column("selector", no_wrap=True, min_width=max(map(len, ["sketchwalk", *names])))
    for label in ("dens", "rec", "overlap W", "Jaccard W", "overlap S", "Jaccard S"):
        table.add_column(label, justify="right")

    def row(label: str, fields: tuple[str | None, ...]) -> None:
        cells = []
        for field in fields:
            value = overall.get(field) if field is not None else None
            cells.append("-" if value is None else f"{value['mean']:.4g}")
        table.add_row(label, *cells)

    row("sketchwalk", ("sketchwalk_density", "sketchwalk_recall", None, None,
                           "block_overlap", "jaccard_similarity"))  # fmt: skip
    for name in names:
        row(name, selector_fields([name]))
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    with distributed.session(args.device) as w:
        return _run(args, w)


def _run(args: argparse.Namespace, w: distributed.World) -> int:
    """The command on one rank of ``w``: sequences are dealt out over the ranks (the walk runs
    across a sequence's layers, so a sequence stays on one rank); rank 0 writes everything."""
    from tqdm import tqdm

    device = resolve_device(distributed.device_for(args.device, w))
    tensor_dir, sequences = tensor_sequences(args.tensor_dir, args.max_seq_len)
    validation = load_validation(args.validation_dir)
    if w.is_main:
        for note in validation["notes"]:
            print(f"note: {note}")
    try:
        config = resolve_config(args, validation["config"])
    except (ValueError, TypeError) as exc:
        if validation["config"] is None:
            raise flag_error(exc) from None
        if w.is_main:
            print(f"note: validation config unusable ({exc}); using the flags and the seed preset")
        config = run_config(args, default_preset="seed")
    config_source = (
        f"validation run {validation['summary_file'] or validation['results_file']} + flags"
        if validation["config"] is not None and not args.preset
        else f"preset {args.preset or 'seed'} + flags"
    )
    names = args.selectors or []
    compared_selectors(names, config, device)  # a config a selector refuses stops here
    total = sum(len(s["paths"]) for s in sequences)
    to_plot = _plot_indices(total, args.max_plots) if args.visualize else set()
    firsts = [0]
    for seq in sequences:
        firsts.append(firsts[-1] + len(seq["paths"]))

    def prune(out_dir: Path, finished: dict[str, dict[str, Any]], notes: list[str]) -> None:
        """A finished file whose heatmap is missing, or whose --validation_dir recall is not
        this run's, is computed again."""
        stale = 0
        for seq, first in zip(sequences, firsts[:-1], strict=True):
            for index, path in enumerate(seq["paths"]):
                done = finished.get(path.stem)
                if done is None:
                    continue
                png = out_dir / f"comparison_{path.stem}.png"
                fields = _validation_fields(validation, path.stem, config)
                if any(done.get(k) != v for k, v in fields.items()):
                    stale += 1
                    del finished[path.stem]
                elif first + index in to_plot and not png.is_file():
                    del finished[path.stem]
        if stale:
            notes.append(
                f"{stale} earlier records hold another --validation_dir recall than this run's; "
                "computed again"
            )

    required = {"seq_len": int, "layer_idx": int, "seerattn_method": str, "seerattn_rule": str,
                "sketchwalk_dense_layer": bool}  # fmt: skip
    settings = run_settings(args, device)
    opened = open_run(
        args, "comparison", tensor_dir, sequences, config, settings, required, w, prune
    )
    out_dir, ts, finished, keys = (opened[k] for k in ("out_dir", "timestamp", "finished", "keys"))
    results_path = out_dir / f"comparison_results_{ts}.json"
    summary_path = out_dir / f"comparison_summary_{ts}.json"
    plots: list[str] = []
    records: list[dict[str, Any]] = []
    warnings: list[str] = []
    methods: set[str] = set()
    t_start = time.perf_counter()
    bar = tqdm(total=total, desc="compare", unit="file", disable=not w.is_main)

    def save_partial(seq_records: list[dict[str, Any]]) -> None:
        write_json(results_path, records + seq_records)
        last = seq_records[-1]
        bar.set_postfix(
            overlap=f"{last['block_overlap'] or 0:.2f}",
            sw_recall=f"{last['sketchwalk_recall']:.3f}",
        )

    # one process writes after every file; several after every round of sequences
    on_record = save_partial if not w.distributed else None

    def one(item: tuple[dict[str, Any], int]) -> dict[str, Any]:
        seq, first = item
        return _compare_sequence(
            seq, first, args, config, device, finished, validation, to_plot, out_dir, w.rank,
            on_record, keys,
        )  # fmt: skip

    for done in distributed.map_rounds(list(zip(sequences, firsts[:-1], strict=True)), one, w):
        for seq_out in done:
            for why in seq_out["warnings"]:
                warnings.append(why)
                if w.is_main:
                    tqdm.write(f"warning: {why}")
            records.extend(seq_out["records"])
            methods |= seq_out["methods"]
            for png, drawn in seq_out["plots"]:
                if w.is_main and drawn is not None:
                    plot_file(png, *drawn)
                plots.append(str(png))
            bar.update(seq_out["files"])
        if w.is_main:
            write_json(results_path, records)
    bar.close()
    if not w.is_main:
        return 0  # rank 0 writes and reports
    method = "/".join(sorted(methods))
    sparse = [r for r in records if not r["sketchwalk_dense_layer"]]
    fields = COMPARE_FIELDS + selector_fields(names)
    grouped = summarize(records, fields=fields)
    summary: dict[str, Any] = {
        "timestamp": ts,
        "tensor_dir": str(tensor_dir),
        "validation_dir": args.validation_dir,
        "validation_summary_file": validation["summary_file"],
        "validation_results_file": validation["results_file"],
        "seerattn_method": method,
        "seerattn_rules": sorted({r["seerattn_rule"] for r in records}),
        "config": config.to_dict(),
        "config_source": config_source,
        "device": str(device),
        "seconds": time.perf_counter() - t_start,
        "world_size": w.world_size,
        "sketchwalk_version": __version__,
        "torch_version": torch.__version__,
        "notes": validation["notes"],
        "warnings": warnings,
        "input_checks": opened["input_checks"],
        "overall": grouped["overall"],
        "sparse_layers": summarize(sparse, by_keys=("seq_len",), fields=fields),
        "by_seq_len": grouped["by_seq_len"],
        "by_layer_idx": grouped["by_layer_idx"],
    }
    if names:
        summary["selectors"] = list(names)
    if args.visualize:
        png = out_dir / f"comparison_summary_{ts}.png"
        plot_summary(png, summary, method)
        plots.append(str(png))
        summary["plots"] = plots
    write_json(summary_path, summary)

    print(
        f"S = SeerAttention side ({method}), W = SketchWalk; dens = density over causal blocks; "
        "rec = attention recall; @S dens = at S's density; @W k = with W's blocks per row"
    )
    by_layer = [
        ("overlap", "block_overlap"),
        ("Jaccard", "jaccard_similarity"),
        ("rank corr", "attention_rank_correlation"),
        ("S rec", "seerattn_recall"),
        ("W rec", "sketchwalk_recall"),
        ("oracle", "oracle_recall"),
    ]
    print_table("S vs W by layer", summary, by_layer, groups=("by_layer_idx",))
    agreement = [
        ("S dens", "seerattn_density"),
        ("W dens", "sketchwalk_density"),
        ("overlap", "block_overlap"),
        ("Jaccard", "jaccard_similarity"),
        ("corr", "attention_correlation"),
        ("rank corr", "attention_rank_correlation"),
    ]
    recall = [
        ("S rec", "seerattn_recall"),
        ("W rec", "sketchwalk_recall"),
        ("W rec @S dens", "sketchwalk_recall_matched"),
        ("S rec @W k", "seerattn_recall_matched"),
        ("oracle @W k", "oracle_recall"),
    ]
    where = f"W's sparse layers (>= {config.dense_layers}), {device}"
    print_table(f"Selections: S vs W, {where}", summary["sparse_layers"], agreement)
    print_table(f"Attention recall, {where}", summary["sparse_layers"], recall)
    if names:
        _print_selectors(f"Selectors at W's budget, {where}", summary["sparse_layers"], names)
    print(f"config: {config_source}")
    if plots:
        print(f"plots: {len(plots)} PNG files in {out_dir}")
    print(f"results: {results_path}\nsummary: {summary_path}")
    return 0
