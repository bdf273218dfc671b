"""The whole pipeline on the embedded model, offline, with a markdown report.

    sketchwalk demo                      # CPU, SmolLM2-135M, one 4096-token passage
    sketchwalk demo --device cuda --sequence_lengths 8192 --num_samples 2

Steps (each is the same code as its own subcommand):

0. gate: a SeerAttention gate for the embedded model, trained by ``train-gate`` on first use
   and cached (``--no_gate`` skips it; compare then uses the honest ``oracle-threshold``);
1. collect: real post-RoPE Q/K/V of every layer on real text (through the gate checkpoint, so
   the learned gate's block scores are stored beside them);
2. validate: SketchWalk (our defaults at ``--density``) against dense attention;
3. compare: SketchWalk's selection against the learned gate's, with heatmaps;
4. report: ``report.md`` with the headline numbers and plots.

Re-running reuses what is already there (collect ``--resume``); results of each run get their
own timestamped files.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from sketchwalk.pipeline.flags import check_output_dir, config_value, device_arg, int_at_least
from sketchwalk.pipeline.plots import plot_validation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default="sketchwalk_demo", help="where everything goes")
    parser.add_argument("--model_path", default="smollm2-135m", help="model (default: embedded)")
    # every value is checked here, before the gate, collect or anything else runs
    parser.add_argument("--sequence_lengths", type=int_at_least(2), nargs="+", default=[4096])
    parser.add_argument("--num_samples", type=int_at_least(1), default=1)
    parser.add_argument(
        "--device", type=device_arg, default="cpu", help="cpu (default), cuda or auto"
    )
    parser.add_argument(
        "--density",
        type=config_value("density"),
        default=0.2,
        help="SketchWalk's share of causal blocks",
    )
    parser.add_argument(
        "--no_gate", action="store_true", help="skip the learned gate (oracle-threshold stand-in)"
    )
    parser.add_argument("--max_plots", type=int_at_least(0), default=4, help="heatmaps to draw")


def _latest(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if not found:
        raise SystemExit(f"demo: expected {pattern} in {folder}, found nothing")
    return found[-1]


def _run_step(argv: list[str]) -> int:
    """Run one pipeline command (``argv[0]`` names it) exactly as ``sketchwalk <argv>`` would."""
    import importlib

    module = importlib.import_module(f"sketchwalk.pipeline.{argv[0]}")
    parser = argparse.ArgumentParser(prog=f"sketchwalk {argv[0]}")
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(argv[1:])) or 0)


def run(args: argparse.Namespace) -> int:
    out = check_output_dir(args.output_dir)
    tensor_dir, val_dir, cmp_dir = (
        out / "tensor_data",
        out / "validation_results",
        out / ("comparison_results"),
    )
    timings: dict[str, float] = {}
    lengths = [str(n) for n in args.sequence_lengths]

    model_path = args.model_path
    t0 = time.time()
    if not args.no_gate:
        from sketchwalk.gate.train import ensure_default_gate

        print("[0/4] gate: SeerAttention gate for the embedded model (trained once, cached)")
        gate_device = "cuda" if args.device.startswith("cuda") else "cpu"
        model_path = str(ensure_default_gate(args.model_path, device=gate_device))
        print(f"      gate checkpoint: {model_path}")
    timings["gate_s"] = time.time() - t0

    steps: list[tuple[str, list[str]]] = [
        (
            "collect",
            [
                "collect",
                "--model_path",
                model_path,
                "--output_dir",
                str(tensor_dir),
                "--sequence_lengths",
                *lengths,
                "--num_samples",
                str(args.num_samples),
                "--device",
                args.device,
                "--resume",
            ],
        ),
        (
            "validate",
            [
                "validate",
                "--tensor_dir",
                str(tensor_dir),
                "--output_dir",
                str(val_dir),
                "--device",
                args.device,
                "--preset",
                "default",
                "--density",
                str(args.density),
            ],
        ),
        (
            "compare",
            [
                "compare",
                "--tensor_dir",
                str(tensor_dir),
                "--validation_dir",
                str(val_dir),
                "--output_dir",
                str(cmp_dir),
                "--device",
                args.device,
                "--visualize",
                "--max_plots",
                str(args.max_plots),
            ],
        ),
    ]
    for i, (name, argv) in enumerate(steps, start=1):
        print(f"[{i}/4] {name}: sketchwalk {' '.join(argv[1:])}")
        t0 = time.time()
        rc = _run_step(argv)
        timings[f"{name}_s"] = time.time() - t0
        if rc != 0:
            print(f"demo: step {name} failed with exit code {rc}")
            return rc

    print("[4/4] report")
    report = write_report(out, val_dir, cmp_dir, tensor_dir, timings)
    print(f"\nDone in {sum(timings.values()):.0f} s. Report: {report}")
    print(f"Tensors: {tensor_dir}\nValidation: {val_dir}\nComparison: {cmp_dir}")
    return 0


def _link(out: Path, folder: Path, png: str) -> str:
    """Link to ``png`` relative to the report's folder ``out``, so that it resolves wherever the
    report is opened. compare records its plots as it was given its output folder (often
    relative to the working directory of that run): the file is looked up in ``folder`` (the
    comparison folder) by name first, then as recorded."""
    path = folder / Path(png).name
    if not path.exists():
        path = Path(png)
    return Path(os.path.relpath(path.resolve(), out.resolve())).as_posix()


def _fmt(agg: dict[str, Any] | None, field: str, spec: str = ".4f") -> str:
    if not agg or field not in agg or agg[field] is None:
        return "-"
    v = agg[field]
    v = v["mean"] if isinstance(v, dict) else v
    return format(v, spec)


def write_report(
    out: Path, val_dir: Path, cmp_dir: Path, tensor_dir: Path, timings: dict[str, float]
) -> Path:
    """Markdown report of the latest validation and comparison runs in ``out``."""
    vsum = json.loads(_latest(val_dir, "validation_summary_*.json").read_text())
    csum_path = _latest(cmp_dir, "comparison_summary_*.json")
    csum = json.loads(csum_path.read_text())
    plot = out / "validation_by_layer.png"
    plot_validation(vsum, plot)
    cfg = vsum["config"]
    overall = vsum["overall"]
    sparse_layers = {k: v for k, v in vsum["by_layer_idx"].items() if int(k) >= cfg["dense_layers"]}
    recalls = [v["attention_recall"]["mean"] for v in sparse_layers.values()]
    method = csum.get("seerattn_method", "?")
    cs = csum.get("sparse_layers", {}).get("overall", {})
    lines = [
        "# sketchwalk demo report",
        "",
        f"Model: `{vsum.get('tensor_dir')}` tensors collected from the embedded model; "
        f"device {vsum['device']}; backend {vsum['backend']}; timing: {vsum['timing']}.",
        "",
        "## SketchWalk vs dense attention (validate)",
        "",
        f"Configuration: density {cfg['density']}, block {cfg['block_size']}, "
        f"sketch {cfg['sketch_dim']}, granularity {cfg['granularity']}, "
        f"causal_sketch {cfg['causal_sketch']}, walk {cfg['walk']} "
        f"(degree {cfg['degree']}, damping {cfg['damping']}), dense layers "
        f"{cfg['dense_layers']}, dense last rows {cfg['dense_last_rows']}.",
        "",
        "| measure (all layers) | mean | min | max |",
        "|---|---:|---:|---:|",
    ]
    for field in (
        "attention_recall",
        "density",
        "cosine_similarity",
        "relative_l2_error",
        "max_error",
        "num_blocks_selected",
        "speedup",
    ):
        agg = overall.get(field)
        if agg:
            lines.append(f"| {field} | {agg['mean']:.4f} | {agg['min']:.4f} | {agg['max']:.4f} |")
    if recalls:
        lines += [
            "",
            f"Sparse layers only ({len(recalls)}): mean attention recall "
            f"{sum(recalls) / len(recalls):.4f}, worst layer {min(recalls):.4f}.",
        ]
    lines += [
        "",
        f"![per-layer validation]({plot.name})",
        "",
        "## SketchWalk vs SeerAttention (compare)",
        "",
        f"SeerAttention side: **{method}**"
        + (
            " (a threshold on the TRUE attention, not a learned gate)"
            if method == "oracle-threshold"
            else " (the learned gate)"
        )
        + ".",
        "",
        "| measure (sparse layers) | value |",
        "|---|---:|",
    ]
    for field in (
        "seerattn_density",
        "sketchwalk_density",
        "block_overlap",
        "jaccard_similarity",
        "attention_correlation",
        "attention_rank_correlation",
        "seerattn_recall",
        "sketchwalk_recall",
        "sketchwalk_recall_matched",
        "seerattn_recall_matched",
        "oracle_recall",
    ):
        if field in cs:
            lines.append(f"| {field} | {_fmt(cs, field)} |")
    for png in csum.get("plots", [])[-1:]:
        lines += ["", f"![comparison summary]({_link(out, cmp_dir, png)})"]
    lines += ["", "## Time", "", "| step | seconds |", "|---|---:|"]
    lines += [f"| {k[:-2]} | {v:.1f} |" for k, v in timings.items()]
    lines += [
        "",
        "Files: tensors in `tensor_data/`, validation in `validation_results/`, "
        "comparison (with heatmaps) in `comparison_results/`.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
