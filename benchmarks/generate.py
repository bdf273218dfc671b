"""End-to-end generation benchmark: time to first token and decode tokens/s of a transformers
causal LM, dense vs SketchWalk prefill vs SketchWalk prefill + decode, in one process.

Usage (from the repository root):

    # GPU (H200): Qwen2.5-1.5B shape, 32K/64K/128K, batch 1 and 8
    PYTHONPATH=src python3 benchmarks/generate.py --shape qwen2.5-1.5b
    # Llama-3.1-8B shape, time to first token only, batch 1
    PYTHONPATH=src python3 benchmarks/generate.py --shape llama-3.1-8b --batches 1 \\
        --decode_tokens 0 --modes dense prefill
    # CPU smoke test (seconds)
    PYTHONPATH=src python3 benchmarks/generate.py --shape tiny --device cpu --contexts 256 \\
        --batches 1 2 --decode_tokens 4 --repeats 1

Models are built from configs with random weights (no downloads): ``--shape`` picks the
architecture's sizes, ``--num_layers`` truncates it. Every (context, batch) is run in modes

- ``dense``: the stock model (``attn_implementation="sdpa"``);
- ``prefill``: ``enable_sketchwalk(model, config, decode="dense")`` (sparse prefill, dense decode);
- ``decode``: ``enable_sketchwalk(model, config, decode="sketchwalk")`` (both sparse),

with ``config = SketchWalkConfig.preset("default", density=d)`` for each ``--densities`` d.

Method (the same for every mode): the prompt is ``batch`` rows of seeded random token ids. One
repeat = a prefill ``model(ids, use_cache=True, logits_to_keep=1)`` into a fresh
``DynamicCache`` plus the greedy argmax of its last logits (timed: TTFT), then
``--decode_tokens`` N manual greedy steps ``model(token, cache=...)`` on the cache it returned
(timed together: decode). No EOS handling, so every row always decodes exactly N tokens. Times
are wall clock between device synchronisations; one untimed warm-up repeat (prefill + a few
steps: Triton compilation, CUDA-graph capture) comes first, then the median of ``--repeats``.
The manual loop is used instead of differencing two ``generate()`` calls: it times exactly the
prefill and the decode steps, without logits processors or stopping criteria, and without
subtracting two large noisy numbers. Every SketchWalk attention call of the measured repeats is
counted (``sw.calls``: sparse / dense, with the dense reasons), so a mode that silently ran
dense is visible in the JSON, the table and the log.

Results: ``--output`` (default ``benchmarks/results/generate/generate_<gpu>.json``) and the
same stem ``.md``, rewritten atomically after every configuration; ``--resume`` keeps the
configurations already there. Configurations that do not fit are skipped: up front when weights
+ KV cache + the MLP's activations exceed the device memory, otherwise by catching the
out-of-memory error (recorded, the run goes on). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SCHEMA = 1
MODES = ("dense", "prefill", "decode")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
METHOD = (
    "manual greedy loop: prefill model(ids, use_cache=True, logits_to_keep=1) + argmax (TTFT), "
    "then N steps model(token, cache) on the same cache (decode; a DynamicCache or a "
    "StaticCache, --cache)"
)
WARMUP_DECODE_STEPS = 4

# architecture, sizes (head_dim explicit), tied embeddings, rope theta
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(
        model_type="llama",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
    ),
    "llama-3.2-1b": dict(
        model_type="llama",
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        intermediate_size=8192,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2",
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        head_dim=128,
        intermediate_size=8960,
        vocab_size=151936,
        rope_theta=1000000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        use_sliding_window=False,
    ),
    # CPU smoke tests. 4 layers, not 2: the default preset keeps the first 2 layers dense, so a
    # 2-layer model would never run a sparse call.
    "tiny": dict(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=512,
        rope_theta=500000.0,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
}


def log(msg: str) -> None:
    print(f"[generate {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- environment ----------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: the record says so
        return None


def environment(device: torch.device) -> dict[str, Any]:
    import sketchwalk

    env: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "sketchwalk": sketchwalk.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gib=round(props.total_memory / 2**30, 2),
            sm_count=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
            driver=_driver(),
        )
    else:
        env["gpu"] = None
    return env


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _driver() -> str | None:
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        out = subprocess.run(query, capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_tag(device: torch.device) -> str:
    """Short device name for the default output file: "h200", "h100", ..., or "cpu"."""
    if device.type != "cuda":
        return device.type
    words = torch.cuda.get_device_name(device).lower().replace("nvidia", " ").split()
    tag = "".join(ch if ch.isalnum() else "_" for ch in (words[0] if words else "gpu"))
    return tag or "gpu"


# ---- model ----------------------------------------------------------------------------------


def build_model(
    shape: str, num_layers: int | None, max_len: int, dtype: torch.dtype, device: torch.device
) -> torch.nn.Module:
    """A causal LM of ``shape`` with random weights (created directly on ``device``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    model_type = spec.pop("model_type")
    if num_layers is not None:
        spec["num_hidden_layers"] = num_layers
    # default RoPE computes cos/sin from the positions, so a larger limit changes nothing but
    # lets context + decode tokens exceed the shape's nominal maximum
    spec["max_position_embeddings"] = max(spec["max_position_embeddings"], max_len)
    cfg = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(0)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(
                cfg, torch_dtype=dtype, attn_implementation="sdpa"
            )
    model = model.to(device).eval()  # (already there; buffers such as inv_freq keep their dtype)
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"model runs {model.config._attn_implementation!r}, expected 'sdpa'")
    return model


def model_info(model: torch.nn.Module) -> dict[str, Any]:
    c = model.config
    return {
        "model_type": c.model_type,
        "num_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "num_q_heads": c.num_attention_heads,
        "num_kv_heads": c.num_key_value_heads,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


def memory_estimate(info: dict[str, Any], batch: int, context: int, steps: int, dtype) -> dict:
    """Lower bound of the peak device memory of one configuration (bytes): the weights, the KV
    cache at its final length and the MLP's gate and up projections of the prefill (they
    coexist). The real peak is higher (hidden states, norms in fp32, attention inputs)."""
    elem = torch.empty((), dtype=dtype).element_size()
    tokens = batch * (context + steps + 1)
    kv = info["num_layers"] * 2 * info["num_kv_heads"] * info["head_dim"] * tokens * elem
    mlp = 2 * batch * context * info["intermediate_size"] * elem
    total = info["weight_bytes"] + kv + mlp
    return {"weights": info["weight_bytes"], "kv_cache": kv, "mlp_activations": mlp, "total": total}


def _cache_kwarg(model: torch.nn.Module) -> str:
    """``cache`` in recent transformers 5.x, ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(model: torch.nn.Module, kind: str = "dynamic", max_len: int = 0) -> Any:
    """A fresh KV cache: ``dynamic`` (grows by concatenation: every step copies the whole
    cache) or ``static`` (preallocated to ``max_len`` tokens, written in place)."""
    from transformers import DynamicCache, StaticCache

    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


# ---- measurement ----------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CallCounter:
    """Counts the SketchWalk attention calls (``sw.calls``) of the measured repeats."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, Any]] = {}

    def take(self, sw: Any, phase: str) -> None:
        """Add the calls recorded since the last ``sw.clear()`` to ``phase``, then clear."""
        if sw is None:
            return
        entry = self.phases.setdefault(
            phase,
            {"sparse": 0, "dense": 0, "dense_reasons": {}, "backends": {}, "_densities": []},
        )
        for call in sw.calls:
            entry[call.mode if call.mode in ("sparse", "dense") else "dense"] += 1
            entry["backends"][call.backend] = entry["backends"].get(call.backend, 0) + 1
            if call.mode == "sparse":
                entry["_densities"].append(float(call.density))
            if call.reason is not None:
                entry["dense_reasons"][call.reason] = entry["dense_reasons"].get(call.reason, 0) + 1
        sw.clear()

    def result(self) -> dict[str, Any]:
        out = {}
        for phase, entry in self.phases.items():
            dens = entry.pop("_densities")
            entry["mean_sparse_density"] = sum(dens) / len(dens) if dens else None
            out[phase] = entry
        return out


def one_repeat(
    model: torch.nn.Module,
    ids: torch.Tensor,
    steps: int,
    device: torch.device,
    sw: Any,
    counter: CallCounter | None,
    cache_kind: str = "dynamic",
) -> tuple[float, float | None, torch.Tensor]:
    """(TTFT seconds, decode seconds of ``steps`` steps or None, tokens (B, 1 + steps))."""
    name = _cache_kwarg(model)
    cache = _new_cache(model, cache_kind, ids.shape[1] + steps + 1)
    if sw is not None:
        sw.clear()
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{name: cache})
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    ttft = time.perf_counter() - t0
    if counter is not None:
        counter.take(sw, "prefill")
    del out  # the DynamicCache is filled in place
    tokens = [token]
    decode_s = None
    if steps > 0:
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, use_cache=True, **{name: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            del out
        _sync(device)
        decode_s = time.perf_counter() - t1
        if counter is not None:
            counter.take(sw, "decode")
    elif sw is not None:
        sw.clear()
    return ttft, decode_s, torch.cat(tokens, dim=1).cpu()


def breakdown(model: torch.nn.Module, ids: torch.Tensor, device: torch.device, sw: Any) -> dict:
    """Time shares of one prefill forward: SketchWalk selection (``selector.select``), decode
    state set-up (``decoder.prefill``, decode mode), the rest of the attention modules
    (projections, RoPE, the attention kernel) and everything else (embedding, MLPs, norms, LM
    head). CUDA events on the GPU (GPU timeline), wall clock on the CPU."""
    from sketchwalk.hf.capture import attention_modules

    cuda = device.type == "cuda"

    def stamp() -> Any:
        if cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def elapsed(a: Any, b: Any) -> float:
        return a.elapsed_time(b) if cuda else (b - a) * 1e3

    spans: dict[str, list] = {"attention_module": [], "selection": [], "decode_state": []}
    open_: dict[int, Any] = {}
    handles = []
    for module in attention_modules(model).values():

        def pre(mod, _args, _kwargs):
            open_[id(mod)] = stamp()

        def post(mod, _args, _kwargs, _out):
            spans["attention_module"].append((open_.pop(id(mod)), stamp()))

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))

    def wrap(obj: Any, attr: str, span: str) -> Callable[[], None]:
        original = getattr(obj, attr)

        def timed(*a: Any, **kw: Any) -> Any:
            start = stamp()
            try:
                return original(*a, **kw)
            finally:
                spans[span].append((start, stamp()))

        setattr(obj, attr, timed)
        return lambda: delattr(obj, attr)

    restore = []
    if sw is not None:
        restore.append(wrap(sw.selector, "select", "selection"))
        if sw.decode == "sketchwalk":
            restore.append(wrap(sw.decoder, "prefill", "decode_state"))
    try:
        cache = _new_cache(model)
        _sync(device)
        start = stamp()
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{_cache_kwarg(model): cache})
        end = stamp()
        _sync(device)
        total = elapsed(start, end)
        sums = {k: sum(elapsed(a, b) for a, b in v) for k, v in spans.items()}
    finally:
        for handle in handles:
            handle.remove()
        for undo in restore:
            undo()
        if sw is not None:
            sw.clear()
    attn_other = sums["attention_module"] - sums["selection"] - sums["decode_state"]
    parts = {
        "selection_ms": sums["selection"],
        "decode_state_ms": sums["decode_state"],
        "attention_other_ms": attn_other,
        "rest_ms": total - sums["attention_module"],
    }
    return {
        "total_ms": total,
        **parts,
        "shares": {k[:-3]: (v / total if total > 0 else None) for k, v in parts.items()},
        "timer": "cuda events" if cuda else "wall clock",
        "note": "attention_other = attention modules (q/k/v/o projections, RoPE, attention "
        "kernel) minus selection and decode state; rest = embedding, MLPs, norms, LM head",
    }


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def measure(
    model: torch.nn.Module,
    args: argparse.Namespace,
    device: torch.device,
    context: int,
    batch: int,
    mode: str,
    density: float | None,
) -> dict[str, Any]:
    """Warm-up + ``args.repeats`` measured repeats of one configuration."""
    from sketchwalk import SketchWalkConfig
    from sketchwalk.hf.integration import enable_sketchwalk

    gen = torch.Generator().manual_seed(args.seed + 7919 * context + batch)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
    steps = args.decode_tokens
    rec: dict[str, Any] = {}
    sw = None
    if mode != "dense":
        config = SketchWalkConfig.preset("default", density=density)
        rec["sketchwalk_config"] = config.to_dict()
        sw = enable_sketchwalk(
            model,
            config,
            backend=args.backend,
            selection_backend=args.selection_backend,
            decode="sketchwalk" if mode == "decode" else "dense",
        )
    try:
        with torch.no_grad():
            t = time.perf_counter()
            one_repeat(model, ids, min(steps, WARMUP_DECODE_STEPS), device, sw, None, args.cache)
            rec["warmup_s"] = time.perf_counter() - t
            counter = CallCounter()
            ttfts, decodes = [], []
            tokens = None
            for r in range(args.repeats):
                ttft, dec, tokens = one_repeat(model, ids, steps, device, sw, counter, args.cache)
                ttfts.append(ttft)
                if dec is not None:
                    decodes.append(dec)
                log(
                    f"    repeat {r + 1}/{args.repeats}: TTFT {ttft * 1e3:.1f} ms"
                    + (f", decode {dec / steps * 1e3:.2f} ms/step" if dec else "")
                )
            if args.breakdown:
                rec["breakdown"] = breakdown(model, ids, device, sw)
    finally:
        if sw is not None:
            sw.disable()
    rec["ttft_ms"] = _median(ttfts) * 1e3
    rec["ttft_ms_all"] = [x * 1e3 for x in ttfts]
    rec["prefill_tokens_per_s"] = batch * context / _median(ttfts)
    if decodes:
        med = _median(decodes)
        rec["decode_ms_per_step"] = med / steps * 1e3
        rec["decode_tokens_per_s"] = batch * steps / med
        rec["decode_s_all"] = decodes
    else:
        rec["decode_ms_per_step"] = rec["decode_tokens_per_s"] = None
    rec["calls"] = counter.result() if sw is not None else None
    rec["tokens"] = tokens.tolist() if tokens is not None else None
    rec["warnings"] = check_calls(mode, rec["calls"], steps, density)
    return rec


# dense prefill calls that are the method's own choice, not a fallback
BY_DESIGN = ("dense layer (config.dense_layers)", "selection keeps every causal block")


def check_calls(
    mode: str, calls: dict | None, steps: int, density: float | None = None
) -> list[str]:
    """Warnings when a SketchWalk mode ran dense where it should have run sparse (a density-1
    budget keeping every block is the one expected all-dense prefill)."""
    if mode == "dense":
        return []
    calls = calls or {}
    warnings = []
    prefill = calls.get("prefill", {})
    expected_dense = density is not None and density >= 1.0
    reasons = prefill.get("dense_reasons") or {}
    if prefill.get("sparse", 0) == 0 and not (expected_dense and set(reasons) <= set(BY_DESIGN)):
        warnings.append(
            f"{mode}: no sparse prefill call (dense reasons: {prefill.get('dense_reasons')})"
        )
    decode = calls.get("decode", {})
    if mode == "decode" and steps > 0 and decode.get("sparse", 0) == 0:
        warnings.append(
            f"decode: no sparse decode call (dense reasons: {decode.get('dense_reasons')})"
        )
    if mode == "prefill" and decode.get("sparse", 0) > 0:
        warnings.append("prefill: decode steps ran sparse (expected dense decode)")
    return warnings


# ---- results --------------------------------------------------------------------------------


def config_key(a: dict[str, Any]) -> str:
    dens = "-" if a["density"] is None else f"{a['density']:g}"
    return (
        f"{a['shape']}|L{a['num_layers']}|T{a['context']}|B{a['batch']}|{a['mode']}|d{dens}|"
        f"N{a['decode_tokens']}|{a['dtype']}|{a['device_type']}|{a['backend']}|"
        f"{a['selection_backend']}|{a.get('cache', 'dynamic')}"
    )


def _dense_key(rec: dict[str, Any]) -> str:
    return config_key({**rec, "mode": "dense", "density": None})


def add_ratios(records: list[dict[str, Any]]) -> None:
    """``vs_dense`` of every SketchWalk record: TTFT speedup (dense TTFT / ours) and decode
    tokens/s ratio (ours / dense), against the dense record of the same configuration."""
    dense = {r["key"]: r for r in records if r["mode"] == "dense" and r["status"] == "ok"}
    for rec in records:
        if rec["mode"] == "dense" or rec["status"] != "ok":
            continue
        ref = dense.get(_dense_key(rec))
        if ref is None:
            rec["vs_dense"] = None
            continue
        tps, ref_tps = rec.get("decode_tokens_per_s"), ref.get("decode_tokens_per_s")
        same = ref.get("tokens") is not None and ref.get("tokens") == rec.get("tokens")
        rec["vs_dense"] = {
            "ttft_speedup": ref["ttft_ms"] / rec["ttft_ms"],
            "decode_tokens_per_s_ratio": (tps / ref_tps) if tps and ref_tps else None,
            "same_session": ref.get("session") == rec.get("session"),
            "tokens_equal_dense": same,
        }


def _fmt(x: Any, spec: str = ".1f", suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:{spec}}{suffix}"


def _ctx(t: int) -> str:
    return f"{t // 1024}K" if t % 1024 == 0 and t >= 1024 else str(t)


def _setting(r: dict[str, Any]) -> str:
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    return (
        f"{short.get(r['dtype'], r['dtype'])} N{r['decode_tokens']} "
        f"{r['backend']}/{r['selection_backend']} {r.get('cache', 'dynamic')}"
    )


def markdown(data: dict[str, Any]) -> str:
    env = data["environment"]
    lines = [
        "# Generation benchmark (benchmarks/generate.py)",
        "",
        f"Device: {env.get('gpu') or env.get('device')}; torch {env.get('torch')}, triton "
        f"{env.get('triton')}, transformers {env.get('transformers')}, sketchwalk "
        f"{env.get('sketchwalk')}, CUDA {env.get('cuda')}, commit {env.get('git_commit')}; "
        f"{env.get('date')}.",
        "",
        f"Method: {METHOD}; random weights; median of the repeats after one warm-up. "
        "TTFT x = dense TTFT / this TTFT; tok/s x = this decode tokens/s / dense's; "
        "calls = sparse/dense SketchWalk attention calls of the measured repeats (prefill; "
        "decode); dens = mean density of the sparse calls (prefill; decode); setting = dtype, "
        "decode tokens N, sparse backend / selection backend, KV cache.",
        "",
        "| shape | layers | T | B | setting | mode | density | status | TTFT ms | TTFT x | "
        "ms/step | tok/s | tok/s x | calls prefill | calls decode | dens | peak GiB | notes |",
        "|---|---:|---:|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    order = {m: i for i, m in enumerate(MODES)}
    recs = sorted(
        data["records"],
        key=lambda r: (
            r["shape"],
            r["num_layers"],
            r["context"],
            r["batch"],
            _setting(r),
            r["density"] or 0.0,
            order.get(r["mode"], 9),
        ),
    )
    for r in recs:
        vs = r.get("vs_dense") or {}
        calls = r.get("calls") or {}
        pre, dec = calls.get("prefill", {}), calls.get("decode", {})

        def cnt(c: dict) -> str:
            return f"{c['sparse']}/{c['dense']}" if c else "-"

        dens = (
            f"{_fmt(pre.get('mean_sparse_density'), '.3f')}; "
            f"{_fmt(dec.get('mean_sparse_density'), '.3f')}"
            if calls
            else "-"
        )
        notes = "; ".join([*(r.get("warnings") or []), *([r["reason"]] if r.get("reason") else [])])
        notes = notes.replace("|", "/").replace("\n", " ")[:160]
        lines.append(
            f"| {r['shape']} | {r['num_layers']} | {_ctx(r['context'])} | {r['batch']} | "
            f"{_setting(r)} | {r['mode']} | {_fmt(r['density'], 'g')} | {r['status']} | "
            f"{_fmt(r.get('ttft_ms'))} | {_fmt(vs.get('ttft_speedup'), '.2f', 'x')} | "
            f"{_fmt(r.get('decode_ms_per_step'), '.2f')} | "
            f"{_fmt(r.get('decode_tokens_per_s'), '.1f')} | "
            f"{_fmt(vs.get('decode_tokens_per_s_ratio'), '.2f', 'x')} | {cnt(pre)} | "
            f"{cnt(dec)} | {dens} | {_fmt(r.get('peak_memory_gib'), '.1f')} | {notes} |"
        )
    if any(r.get("breakdown") for r in recs):
        lines += [
            "",
            "Prefill breakdown (one extra forward; shares of its time): selection = "
            "selector.select, decode state = decoder.prefill, attention other = the attention "
            "modules' projections, RoPE and kernel, rest = embedding, MLPs, norms, LM head.",
            "",
            "| shape | T | B | mode | density | total ms | selection | decode state | "
            "attention other | rest |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in recs:
            b = r.get("breakdown")
            if not b:
                continue
            s = b["shares"]
            lines.append(
                f"| {r['shape']} | {_ctx(r['context'])} | {r['batch']} | {r['mode']} | "
                f"{_fmt(r['density'], 'g')} | {b['total_ms']:.1f} | "
                + " | ".join(
                    _fmt(s[k] * 100 if s[k] is not None else None, ".1f", "%")
                    for k in ("selection", "decode_state", "attention_other", "rest")
                )
                + " |"
            )
    return "\n".join(lines) + "\n"


def save(data: dict[str, Any], path: Path) -> None:
    from sketchwalk.atomic import write_json, write_text

    add_ratios(data["records"])
    write_json(path, data)
    write_text(path.with_suffix(".md"), markdown(data))


def load(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if data.get("benchmark") != "generate" or not isinstance(data.get("records"), list):
        raise SystemExit(f"{path}: not a generate.py result file; refusing to resume into it")
    return data


# ---- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), default="qwen2.5-1.5b")
    p.add_argument("--num_layers", type=int, default=None, help="truncate the model")
    p.add_argument("--contexts", nargs="+", type=int, default=[32768, 65536, 131072])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--densities", nargs="+", type=float, default=[0.2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode_tokens", type=int, default=64, help="0: TTFT only")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--backend", default="auto", help="enable_sketchwalk backend")
    p.add_argument("--selection_backend", default="auto")
    p.add_argument("--breakdown", action="store_true", help="prefill time shares (extra pass)")
    p.add_argument(
        "--cache",
        choices=["dynamic", "static"],
        default="dynamic",
        help="KV cache: transformers' DynamicCache (each step concatenates, i.e. copies the "
        "whole cache) or StaticCache (preallocated, written in place)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--output", default=None, help="default benchmarks/results/generate/generate_<gpu>.json"
    )
    p.add_argument("--resume", action="store_true", help="skip configurations already saved")
    p.add_argument(
        "--memory_fraction",
        type=float,
        default=1.0,
        help="skip up front when the lower-bound estimate exceeds this share of device memory",
    )
    args = p.parse_args(argv)
    for name in ("contexts", "batches"):
        if any(x < 1 for x in getattr(args, name)):
            p.error(f"--{name} must be positive")
    if any(not 0.0 < d <= 1.0 for d in args.densities):
        p.error("--densities must be in (0, 1]")
    if args.repeats < 1 or args.decode_tokens < 0:
        p.error("--repeats must be >= 1 and --decode_tokens >= 0")
    if args.num_layers is not None and args.num_layers < 1:
        p.error("--num_layers must be >= 1")
    return args


def _plan(args: argparse.Namespace) -> list[tuple[int, int, str, float | None]]:
    """(context, batch, mode, density) in run order: small contexts first; per (T, B) dense
    first, then each density's modes."""
    plan = []
    for t in sorted(set(args.contexts)):
        for b in sorted(set(args.batches)):
            if "dense" in args.modes:
                plan.append((t, b, "dense", None))
            for d in args.densities:
                for m in ("prefill", "decode"):
                    if m in args.modes:
                        plan.append((t, b, m, d))
    return plan


def classify_error(err: BaseException) -> str:
    """``"oom"`` (out of device memory: skip, go on), ``"fatal"`` (a CUDA error that leaves the
    context unusable: later configurations would all fail, so the run stops) or ``"error"``."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "oom"
    text = str(err).lower()
    if any(
        s in text for s in ("illegal memory access", "device-side assert", "unspecified launch")
    ):
        return "fatal"
    if "out of memory" in text:  # allocations outside the caching allocator (cuBLAS, ...)
        return "oom"
    if "cuda error" in text:
        return "fatal"
    return "error"


def device_memory(device: torch.device) -> int | None:
    """Total memory of a CUDA device in bytes (None elsewhere: no up-front skipping)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    dtype = DTYPES[args.dtype]
    results = Path(__file__).resolve().parent / "results" / "generate"
    output = Path(args.output) if args.output else results / f"generate_{gpu_tag(device)}.json"
    from sketchwalk.atomic import remove_stale_tmp

    remove_stale_tmp(output.parent)
    env = environment(device)
    data = load(output) if args.resume else None
    if data is None:
        if output.exists() and not args.resume:
            log(f"{output} exists: overwriting it (use --resume to keep its configurations)")
        data = {
            "benchmark": "generate",
            "schema": SCHEMA,
            "method": METHOD,
            "sessions": [],
            "records": [],
        }
    session = len(data["sessions"])
    data["sessions"].append(
        {"environment": env, "argv": sys.argv[1:] if argv is None else argv, "settings": vars(args)}
    )
    data["environment"] = env
    # measured and out-of-memory configurations are kept; errors are retried and up-front
    # skips re-evaluated (cheap)
    data["records"] = [r for r in data["records"] if r["status"] in ("ok", "oom")]
    done = {r["key"]: r for r in data["records"]}

    max_len = max(args.contexts) + args.decode_tokens + 1
    log(f"building {args.shape} (layers {args.num_layers or 'all'}) on {device}, {args.dtype}")
    t0 = time.perf_counter()
    model = build_model(args.shape, args.num_layers, max_len, dtype, device)
    info = model_info(model)
    data.setdefault("models", {})[f"{args.shape}|L{info['num_layers']}"] = info
    data["sessions"][-1]["model"] = {"shape": args.shape, **info}
    log(f"built in {time.perf_counter() - t0:.1f} s: {info['parameters'] / 1e6:.1f} M parameters")
    total_mem = device_memory(device)

    plan = _plan(args)
    started = time.perf_counter()
    exit_code = 0
    for i, (context, batch, mode, density) in enumerate(plan):
        base = {
            "shape": args.shape,
            "num_layers": info["num_layers"],
            "context": context,
            "batch": batch,
            "mode": mode,
            "density": density,
            "decode_tokens": args.decode_tokens,
            "dtype": args.dtype,
            "device_type": device.type,
            "backend": args.backend,
            "selection_backend": args.selection_backend,
            "cache": args.cache,
        }
        key = config_key(base)
        label = f"[{i + 1}/{len(plan)}] T={context} B={batch} {mode}" + (
            f" density={density:g}" if density is not None else ""
        )
        if key in done:
            log(f"{label}: already in {output} ({done[key]['status']}), skipped (--resume)")
            continue
        rec: dict[str, Any] = {"key": key, **base, "repeats": args.repeats, "session": session}
        est = memory_estimate(info, batch, context, args.decode_tokens, dtype)
        rec["memory_estimate_gib"] = {k: v / 2**30 for k, v in est.items()}
        oom_smaller = [
            r["context"]
            for r in data["records"]
            if r["status"] == "oom" and r["context"] < context and _same_but_context(r, base)
        ]
        if total_mem is not None and est["total"] > args.memory_fraction * total_mem:
            rec["status"] = "skipped"
            rec["reason"] = (
                f"memory estimate {est['total'] / 2**30:.1f} GiB (weights "
                f"{est['weights'] / 2**30:.1f} + KV cache {est['kv_cache'] / 2**30:.1f} + MLP "
                f"{est['mlp_activations'] / 2**30:.1f}) > device {total_mem / 2**30:.1f} GiB"
            )
        elif oom_smaller:
            rec["status"] = "skipped"
            rec["reason"] = f"out of memory at the smaller context {min(oom_smaller)}"
        if rec.get("status") == "skipped":
            log(f"{label}: skipped: {rec['reason']}")
        else:
            log(f"{label}: running (estimate >= {est['total'] / 2**30:.1f} GiB)")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            error = None
            try:
                rec.update(measure(model, args, device, context, batch, mode, density))
                rec["status"] = "ok"
            except Exception as err:  # one failed configuration must not end the run
                kind = classify_error(err)
                first = (str(err).splitlines() or [""])[0]
                if kind == "oom":
                    error = ("oom", f"out of memory: {first[:300]}")
                else:
                    error = ("error", f"{type(err).__name__}: {str(err)[:500]}")
                    rec["traceback"] = traceback.format_exc().strip().splitlines()[-8:]
                    if kind == "fatal":
                        exit_code = 2
            if error is not None:
                rec["status"], rec["reason"] = error
            gc.collect()
            if device.type == "cuda":
                rec["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                torch.cuda.empty_cache()
            rec["elapsed_s"] = time.perf_counter() - t
            if rec["status"] == "ok":
                dec = rec.get("decode_ms_per_step")
                log(
                    f"{label}: TTFT {rec['ttft_ms']:.1f} ms"
                    + (
                        f", decode {dec:.2f} ms/step, {rec['decode_tokens_per_s']:.1f} tok/s"
                        if dec
                        else ""
                    )
                    + f" ({rec['elapsed_s']:.1f} s)"
                )
                for w in rec["warnings"]:
                    log(f"{label}: WARNING {w}")
            else:
                log(f"{label}: {rec['status']}: {rec['reason']}")
        data["records"] = [r for r in data["records"] if r["key"] != key] + [rec]
        save(data, output)
        if exit_code:
            log("CUDA error: the device context is unusable; stopping (rerun with --resume)")
            break
    save(data, output)
    log(f"done in {time.perf_counter() - started:.1f} s: {output} and {output.with_suffix('.md')}")
    sys.stdout.write(markdown(data))
    sys.stdout.flush()
    return exit_code


def _same_but_context(rec: dict[str, Any], base: dict[str, Any]) -> bool:
    return all(rec.get(k) == v for k, v in base.items() if k != "context")


if __name__ == "__main__":
    sys.exit(main())
