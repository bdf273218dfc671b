"""``sketchwalk eval ppl``: perplexity of the second half of real passages, per selector.

One forward pass per passage and run; `second_half_nll` computes the loss from the final hidden
states in slices, so no (T, vocab) float32 tensor is built. `_aggregate_ppl` gives each run's
perplexity over all its tokens and its delta against dense.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sketchwalk.atomic import write_text
from sketchwalk.config import SketchWalkConfig
from sketchwalk.pipeline import distributed
from sketchwalk.pipeline.eval.report import _plot_metric, ppl_markdown
from sketchwalk.pipeline.eval.results import (
    _open_results,
    _progress,
    _run_densities,
    _run_items,
    _start_results,
)
from sketchwalk.pipeline.eval.runs import (
    EvalInputError,
    RunSpec,
    _check_block_lengths,
    _check_positive,
    build_runs,
    forced_warnings,
)
from sketchwalk.pipeline.eval.session import (
    _ActiveRun,
    _check_length,
    _dense_layers,
    _density_summary,
    _layer_densities,
    _open_session,
    _sync,
    environment,
)
from sketchwalk.pipeline.eval.timing import measure_timing


def second_half_nll(
    model: Any, input_ids: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over the second half of one sequence, without a (T, vocab) tensor.

    Args:
        model: a causal LM with ``get_decoder()`` and ``get_output_embeddings()``.
        input_ids: int64 (1, T).
        chunk: positions per slice of logits (each slice is (chunk, vocab) float32).

    Returns:
        (float64 scalar tensor on the model's device: sum of -log p(x_t | x_<t) for
        t = T // 2 .. T - 1, number of scored tokens T - T // 2). No host sync inside.
    """
    t = input_ids.shape[1]
    start = t // 2
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state[0]
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    states = hidden[start - 1 : t - 1]
    targets = input_ids[0, start:]
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for s in range(0, states.shape[0], chunk):
        logits = head(states[s : s + chunk]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        # with a device map the head may live on another device than the inputs
        target = targets[s : s + chunk].to(logits.device)
        loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        total = total + loss.double().to(total.device)
    return total, int(targets.numel())


def evaluate_ppl(
    model_path: str | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    seq_len: int = 4096,
    num_samples: int = 2,
    densities: Sequence[float] = (0.1, 0.2, 0.3),
    selectors: Sequence[str] = ("dense", "sketchwalk", "oracle", "streaming"),
    variants: Sequence[str] = (),
    base_config: SketchWalkConfig | None = None,
    text_source: str = "auto",
    text_file: str | None = None,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    selection_backend: str = "auto",
    gate_path: str | None = None,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    timing: bool = False,
    timing_decode_tokens: int = 32,
    loss_chunk: int = 1024,
    progress: bool = True,
    plots: bool = True,
    device_map: Any = None,
) -> dict[str, Any]:
    """Perplexity of the second half of real passages, per selector, at matched densities.

    Returns:
        The result dict (also written to ``output_dir/eval_ppl.json`` when given): ``settings``,
        ``environment``, ``passages`` (token hashes), ``runs`` (configs), ``items`` (per run and
        sample: NLL, tokens, per-layer density, seconds), ``results`` (per run: perplexity,
        delta vs dense, realized density overall / sparse layers / per layer, wall time) and
        ``timing`` when asked.
    """
    from sketchwalk.hf.text import make_passages

    if not isinstance(seq_len, int) or seq_len < 4:
        raise EvalInputError(f"--seq_len must be an int >= 4, got {seq_len!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise EvalInputError(f"--num_samples must be an int >= 1, got {num_samples!r}")
    _check_positive(loss_chunk=loss_chunk, timing_decode_tokens=timing_decode_tokens)
    runs = build_runs(selectors, densities, base_config, variants)
    _check_block_lengths(runs, [seq_len], "--seq_len")
    w = distributed.world()
    results = _open_results(output_dir, "ppl", resume, w)
    session = _open_session(
        model_path, model, tokenizer, distributed.device_for(device, w), dtype, gate_path,
        any(r.kind == "gate" for r in runs), device_map, progress,
    )  # fmt: skip
    _check_length(session.model, seq_len, session.model_id, "--seq_len")
    passages = make_passages(
        session.tokenizer, seq_len, num_samples, text_source, text_file, seed=seed
    )
    settings = {
        "model": session.model_id,
        "seq_len": seq_len,
        "num_samples": num_samples,
        "seed": seed,
        "text_source": passages[0].source,
        "passages_sha256": [p.sha256 for p in passages],
        "backend": backend,
        "world_size": w.world_size,
    }
    num_layers = int(session.model.config.num_hidden_layers)
    data = results.data
    data["environment"] = environment(session.model, session.device, device_map)
    data["passages"] = [p.info() for p in passages]
    all_runs, done = _start_results(results, settings, runs, w)
    if w.is_main:
        data["warnings"] = forced_warnings(runs, [seq_len])
    todo = [(run, key, i) for run in runs for i in range(num_samples)
            if (key := f"{run.name}|T{seq_len}|s{i}") not in done]  # fmt: skip

    def compute(run: RunSpec, sw: Any, i: int) -> dict[str, Any]:
        ids = passages[i].input_ids[None].to(session.device)
        _sync(session.device)
        t0 = time.perf_counter()
        nll, count = second_half_nll(session.model, ids, loss_chunk)
        nll_value = float(nll)
        _sync(session.device)
        seconds = time.perf_counter() - t0
        per_layer = _layer_densities(sw, num_layers, seq_len)
        return {
            "run": run.name,
            "sample": i,
            "seq_len": seq_len,
            "input_ids_sha256": passages[i].sha256,
            "nll_sum": nll_value,
            "tokens": count,
            "perplexity": math.exp(nll_value / count),
            "layer_density": per_layer,
            **_density_summary(per_layer, _dense_layers(run)),
            "wall_s": seconds,
        }

    active = _ActiveRun(session, backend, selection_backend)
    bar_on = progress and w.is_main
    with _progress(len(todo), f"ppl T={seq_len}", bar_on) as bar, torch.no_grad():
        _run_items(todo, compute, results, active, w, bar,
                   lambda it: f"{it['run']} ppl {it['perplexity']:.3f}")  # fmt: skip
    if not w.is_main:
        return data  # rank 0 aggregates and writes
    data["results"] = _aggregate_ppl(all_runs, data["items"])
    if timing:
        data["timing"] = measure_timing(
            session, runs, passages[0].input_ids, timing_decode_tokens, backend, selection_backend
        )
    results.save()
    if output_dir is not None:
        write_text(Path(output_dir) / "eval_ppl.md", ppl_markdown(data))
        if plots:
            _plot_metric(data, Path(output_dir) / "eval_ppl.png", "perplexity", "perplexity")
    return data


def _aggregate_ppl(runs: list[RunSpec], items: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for run in runs:
        mine = [it for it in items.values() if it["run"] == run.name]
        if not mine:
            continue
        nll = sum(it["nll_sum"] for it in mine)
        tokens = sum(it["tokens"] for it in mine)
        out[run.name] = {
            **run.to_dict(),
            "samples": len(mine),
            "tokens": tokens,
            "perplexity": math.exp(nll / tokens),
            "perplexity_per_sample": [it["perplexity"] for it in mine],
            **_run_densities(run, mine),
            "wall_s": sum(it["wall_s"] for it in mine),
        }
    dense = out.get("dense")
    for res in out.values():
        if dense is not None:
            delta = res["perplexity"] - dense["perplexity"]
            res["delta_vs_dense"] = delta
            res["delta_vs_dense_pct"] = 100.0 * delta / dense["perplexity"]
        else:
            res["delta_vs_dense"] = res["delta_vs_dense_pct"] = None
    return out
