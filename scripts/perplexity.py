"""Perplexity of a causal LM on real text: dense attention vs SketchWalk sparse prefill.

Every passage (``sketchwalk.hf.text.make_passages``: distinct, non-overlapping real text)
is run once with the model's own dense attention and once per SketchWalk configuration through
``sketchwalk.hf.integration.enable_sketchwalk`` (one full prefill pass; every position's
next-token loss is scored, so the sparse selection affects the result through every layer and
every row).
Perplexity = exp(total negative log-likelihood / scored tokens), pooled over passages.

Configurations: the base config (``SketchWalkConfig.preset(--preset)``) at each of
``--densities``, then each ``--variant`` (comma-separated ``field=value`` overrides of the base,
e.g. ``dense_last_rows=0`` or ``walk=false,causal_sketch=false``) at each of
``--variant_densities`` (default: ``--densities``).

Usage::

    python scripts/perplexity.py --model_path smollm2-135m --seq_len 4096 --num_samples 2 \\
        --densities 0.1 0.2 0.3 --variant dense_last_rows=0 --variant causal_sketch=false \\
        --variant walk=false --variant_densities 0.2 \\
        --output benchmarks/results/perplexity/perplexity_smollm2_4k

Writes ``<output>.json`` (environment, passages, every resolved config, per-sample NLL, mean
density, dense-call reasons, wall times) and ``<output>.md`` (the table), and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sketchwalk.config import SketchWalkConfig
from sketchwalk.hf.integration import enable_sketchwalk
from sketchwalk.hf.models import DEFAULT_MODEL, load_model
from sketchwalk.hf.text import make_passages


def parse_variant(spec: str) -> dict[str, Any]:
    """``"walk=false,dense_last_rows=0"`` -> ``{"walk": False, "dense_last_rows": 0}``.

    Values are converted to the type of the config field; ``none`` gives None.
    """
    fields = {f.name: f for f in dataclasses.fields(SketchWalkConfig)}
    out: dict[str, Any] = {}
    for item in spec.split(","):
        if "=" not in item:
            raise ValueError(f"--variant {spec!r}: expected field=value, got {item!r}")
        name, raw = (s.strip() for s in item.split("=", 1))
        if name not in fields:
            raise ValueError(f"--variant {spec!r}: unknown SketchWalkConfig field {name!r}")
        kind = str(fields[name].type)
        low = raw.lower()
        if low == "none":
            out[name] = None
        elif kind == "bool":
            if low not in ("true", "false", "1", "0"):
                raise ValueError(f"--variant {spec!r}: {name} needs true/false, got {raw!r}")
            out[name] = low in ("true", "1")
        elif kind.startswith("int"):
            out[name] = int(raw)
        elif kind.startswith("float"):
            out[name] = float(raw)
        else:
            out[name] = raw
    return out


def sequence_nll(model: Any, input_ids: torch.Tensor, chunk: int = 1024) -> tuple[float, int]:
    """Summed next-token NLL of one sequence, without materialising all logits at once.

    Args:
        model: a causal LM with ``get_decoder()`` / ``get_output_embeddings()``.
        input_ids: int64 (1, T).

    Returns:
        (sum of -log p(x_{t+1} | x_<=t) over t < T - 1, T - 1).
    """
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    hidden = decoder(input_ids=input_ids).last_hidden_state[0, :-1]  # (T - 1, hidden)
    targets = input_ids[0, 1:]
    total = 0.0
    for start in range(0, hidden.shape[0], chunk):
        logits = head(hidden[start : start + chunk]).float()
        total += float(
            torch.nn.functional.cross_entropy(
                logits, targets[start : start + chunk], reduction="sum"
            )
        )
    return total, int(targets.numel())


def run_dense(model: Any, passages: list[Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    nll = [sequence_nll(model, p.input_ids[None].to(model.device)) for p in passages]
    return _result("dense", None, None, nll, None, time.perf_counter() - t0)


def run_sketchwalk(
    model: Any,
    passages: list[Any],
    name: str,
    config: SketchWalkConfig,
    target: float | None,
    backend: str,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    with enable_sketchwalk(model, config, backend=backend) as sw:
        nll = [sequence_nll(model, p.input_ids[None].to(model.device)) for p in passages]
        summary = sw.summary()
    return _result(name, config, target, nll, summary, time.perf_counter() - t0)


def _result(
    name: str,
    config: SketchWalkConfig | None,
    target: float | None,
    nll: list[tuple[float, int]],
    summary: dict[str, Any] | None,
    seconds: float,
) -> dict[str, Any]:
    total = sum(n for n, _ in nll)
    tokens = sum(c for _, c in nll)
    return {
        "variant": name,
        "target_density": target,
        "config": config.to_dict() if config is not None else None,
        "nll_per_sample": [n / c for n, c in nll],
        "tokens": tokens,
        "mean_nll": total / tokens,
        "perplexity": math.exp(total / tokens),
        "mean_density": summary["mean_density"] if summary else 1.0,
        "mean_sparse_density": summary["mean_sparse_density"] if summary else None,
        "attention_summary": summary,
        "wall_s": seconds,
    }


def markdown_table(results: list[dict[str, Any]]) -> str:
    dense = next(r for r in results if r["variant"] == "dense")
    lines = [
        "| variant | target density | perplexity | delta vs dense | delta % | mean density "
        "(all layers) | mean density (sparse layers) | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        delta = r["perplexity"] - dense["perplexity"]
        target = "-" if r["target_density"] is None else f"{r['target_density']:.2f}"
        sparse = "-" if r["mean_sparse_density"] is None else f"{r['mean_sparse_density']:.3f}"
        lines.append(
            f"| {r['variant']} | {target} | {r['perplexity']:.4f} | {delta:+.4f} | "
            f"{100 * delta / dense['perplexity']:+.2f}% | {r['mean_density']:.3f} | {sparse} | "
            f"{r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def _write(path: Path, payload: dict[str, Any], table: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(payload, indent=2) + "\n"), (".md", table)):
        target = path.with_suffix(suffix)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_path", default=DEFAULT_MODEL)
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--num_samples", type=int, default=2)
    parser.add_argument("--text_source", default="auto")
    parser.add_argument("--text_file", default=None)
    parser.add_argument("--text_seed", type=int, default=1, help="passage order seed (held out)")
    parser.add_argument("--preset", default="default", choices=["default", "paper", "seed"])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--variant", action="append", default=[], metavar="FIELD=VALUE[,...]")
    parser.add_argument("--variant_densities", type=float, nargs="+", default=None)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="perplexity_results")
    args = parser.parse_args(argv)

    variants = [(spec, parse_variant(spec)) for spec in args.variant]
    runs: list[tuple[str, SketchWalkConfig, float]] = []
    for d in args.densities:
        runs.append(("base", SketchWalkConfig.preset(args.preset, density=d), d))
    for spec, overrides in variants:
        for d in args.variant_densities or args.densities:
            cfg = SketchWalkConfig.preset(args.preset, **{"density": d, **overrides})
            runs.append((spec, cfg, d))

    start = time.perf_counter()
    with torch.no_grad():
        model, tokenizer, resolved = load_model(args.model_path, device=args.device)
        passages = make_passages(
            tokenizer,
            args.seq_len,
            args.num_samples,
            args.text_source,
            args.text_file,
            seed=args.text_seed,
        )
        payload: dict[str, Any] = {
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "model": resolved.model_id,
            "model_path": args.model_path,
            "attn_implementation": model.config._attn_implementation,
            "dtype": str(model.dtype),
            "device": str(args.device),
            "device_name": torch.cuda.get_device_name()
            if args.device == "cuda"
            else platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "seq_len": args.seq_len,
            "passages": [p.info() for p in passages],
            "backend": args.backend,
            "results": [],
        }
        out = Path(args.output)
        print(
            f"{resolved.model_id}: {len(passages)} x {args.seq_len} tokens of "
            f"{passages[0].source} text; {len(runs) + 1} runs",
            flush=True,
        )
        results = payload["results"]
        results.append(run_dense(model, passages))
        print(
            f"dense: ppl {results[-1]['perplexity']:.4f} ({results[-1]['wall_s']:.0f} s)",
            flush=True,
        )
        for name, cfg, d in runs:
            results.append(run_sketchwalk(model, passages, name, cfg, d, args.backend))
            r = results[-1]
            print(
                f"{name} @ {d}: ppl {r['perplexity']:.4f}, density {r['mean_density']:.3f} "
                f"({r['wall_s']:.0f} s)",
                flush=True,
            )
            payload["total_wall_s"] = time.perf_counter() - start
            _write(out, payload, markdown_table(results) + "\n")
    payload["total_wall_s"] = time.perf_counter() - start
    table = markdown_table(results)
    _write(out, payload, table + "\n")
    print(table)
    print(f"total wall time {payload['total_wall_s']:.0f} s; wrote {out}.json and {out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
