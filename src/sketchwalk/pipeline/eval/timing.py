"""``--timing``: time to first token and decode tokens/s, dense and with every SketchWalk run,
measured in the same process (`measure_timing`)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from sketchwalk.pipeline.eval.runs import SKETCHWALK_KINDS, RunSpec
from sketchwalk.pipeline.eval.session import _activate, _Session, _sync


def _cache_argument(model: Any) -> str:
    """The name under which this transformers version takes the KV cache (``cache`` in recent
    5.x, ``past_key_values`` before)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _time_generation(
    model: Any, ids: torch.Tensor, decode_tokens: int, device: torch.device
) -> tuple[float, float]:
    """(seconds to the first token, decode tokens per second) of one greedy generation."""
    name = _cache_argument(model)
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    ttft = time.perf_counter() - t0
    cache = getattr(out, name)
    t1 = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(input_ids=token, use_cache=True, **{name: cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        cache = getattr(out, name)
    _sync(device)
    seconds = time.perf_counter() - t1
    return ttft, decode_tokens / seconds if seconds > 0 else float("nan")


def measure_timing(
    session: _Session,
    runs: list[RunSpec],
    input_ids: torch.Tensor,
    decode_tokens: int,
    backend: str,
    selection_backend: str,
    repeats: int = 2,
) -> dict[str, Any]:
    """Time to first token and decode tokens/s at ``input_ids``' length, dense and with every
    SketchWalk run, each both prefill-only and with SketchWalk decode, in this process. Each is
    measured once as warm-up (kernel compilation, CUDA graph capture) and then ``repeats`` times
    (median)."""
    ids = input_ids[None].to(session.device)
    chosen = [RunSpec("dense", "dense", "dense", None, None)]
    names = {r.name for r in runs}
    for r in runs:
        if r.kind not in SKETCHWALK_KINDS:
            continue
        chosen.append(r)
        # prefill-only runs (ppl) are also timed with SketchWalk decode
        if r.decode == "dense" and f"{r.name}+decode" not in names:
            chosen.append(
                dataclasses.replace(
                    r, name=f"{r.name}+decode", family=f"{r.family}+decode", decode="sketchwalk"
                )
            )
    out: dict[str, Any] = {"seq_len": int(ids.shape[1]), "decode_tokens": decode_tokens,
                           "repeats": repeats, "runs": {}}  # fmt: skip
    with torch.no_grad():
        for run in chosen:
            with _activate(session, run, backend, selection_backend) as sw:
                samples = []
                for _ in range(1 + repeats):
                    if sw is not None:
                        sw.clear()
                    samples.append(_time_generation(session.model, ids, decode_tokens,
                                                    session.device))  # fmt: skip
                measured = samples[1:]
                ttft = sorted(t for t, _ in measured)[len(measured) // 2]
                tps = sorted(r for _, r in measured)[len(measured) // 2]
                out["runs"][run.name] = {
                    "decode": run.decode,
                    "target_density": run.density,
                    "ttft_s": ttft,
                    "decode_tokens_per_s": tps,
                    "samples": [{"ttft_s": t, "decode_tokens_per_s": r} for t, r in measured],
                }
    dense = out["runs"]["dense"]
    for r in out["runs"].values():
        r["ttft_speedup_vs_dense"] = dense["ttft_s"] / r["ttft_s"]
        r["decode_speedup_vs_dense"] = r["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
    return out
