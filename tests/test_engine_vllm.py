"""The vLLM attention backend (`sketchwalk.engines.vllm`) against vLLM's stock CPU attention.

Runs only where vLLM is installed (skipped otherwise): ``make test-vllm`` builds a separate
environment with the CPU build of vLLM and runs this file (CI runs it after ``make test``).

A tiny Llama built from a config written here (no download, no tokenizer: prompts are token
ids), random weights (vLLM's dummy loader, with its tensor initialiser replaced here by a seeded
one of useful scale, so that attention matters), float32, eager, greedy decoding; the engine runs
in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the settings and the call records of
the backend are visible here.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os

import pytest

pytest.importorskip("vllm")

import torch

from sketchwalk.config import SketchWalkConfig

swv = pytest.importorskip("sketchwalk.engines.vllm")

BLOCK = 32
MAX_TOKENS = 12
PROMPTS = [
    [(i * 37 + 11) % 500 + 3 for i in range(300)],  # ~10 blocks: chunked at 128 tokens per step
    [(i * 13 + 5) % 480 + 7 for i in range(150)],  # ~5 blocks
    list(range(3, 23)),  # one block: dense everywhere
]
# run after PROMPTS with prefix caching on: 8 full blocks of the first prompt are cached
SHARED = [PROMPTS[0][:256] + [(i * 29 + 3) % 490 + 5 for i in range(70)]]
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_hidden_layers": 4,
    "vocab_size": 512,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


def _config(density: float) -> SketchWalkConfig:
    # dense_layers=1: layers 1-3 of the 4 take the sparse path
    return SketchWalkConfig.preset("default", density=density, block_size=BLOCK, dense_layers=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Greedy tokens (and top-1 logprobs) of every engine and setting, computed once."""
    from vllm import LLM, SamplingParams
    from vllm.model_executor.model_loader import dummy_loader

    model_dir = tmp_path_factory.mktemp("tiny_llama")
    (model_dir / "config.json").write_text(json.dumps(TINY_LLAMA))
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    mp.delenv(swv.ENV_CONFIG, raising=False)
    generator = torch.Generator()

    def init_weight(tensor, *args, **kwargs):
        # matrices ~ N(0, 1 / fan_in), vectors (norm weights) = 1: q.k logits of order 1
        if not tensor.is_floating_point() or tensor.numel() == 0:
            return
        with torch.no_grad():
            if tensor.dim() >= 2:
                values = torch.randn(tensor.shape, generator=generator)
                tensor.copy_(values / math.sqrt(tensor.shape[-1]))
            else:
                tensor.fill_(1.0)

    mp.setattr(dummy_loader, "initialize_single_dummy_weight", init_weight)
    swv.register()  # what the vllm.general_plugins entry point does
    params = SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False, logprobs=1
    )
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    shared = [{"prompt_token_ids": p} for p in SHARED]
    results = {}

    def record(outs, **extra):
        return {
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "logprobs": [
                [
                    lp[t].logprob
                    for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)
                ]
                for o in outs
            ],
            "cached": [o.num_cached_tokens for o in outs],
            **extra,
        }

    try:
        # 128: the 300- and 150-token prompts are prefilled in chunks; "prefix": prefix caching;
        # "prefix_pages": the same with the backend's page_queries
        for chunk in (128, 1024, "prefix", "prefix_pages"):
            for backend in ("stock", "sketchwalk") if chunk != "prefix_pages" else ("sketchwalk",):
                pages = chunk == "prefix_pages"
                prefix = chunk in ("prefix", "prefix_pages")
                generator.manual_seed(0)  # the same weights in every engine
                extra = {} if backend == "stock" else {"attention_backend": "CUSTOM"}
                # the settings when the engine starts size the per-page state in its pages
                swv.configure(_config(1.0), page_queries=pages)
                llm = LLM(
                    model=str(model_dir),
                    load_format="dummy",
                    skip_tokenizer_init=True,
                    enforce_eager=True,
                    dtype="float32",
                    max_model_len=1024,
                    block_size=BLOCK,
                    max_num_batched_tokens=128 if prefix else chunk,
                    max_num_seqs=4,
                    kv_cache_memory_bytes=64 << 20,
                    enable_prefix_caching=prefix,
                    seed=0,
                    **extra,
                )
                layers = _attention_layers(llm)
                impls = {type(layer.impl).__name__ for layer in layers}
                blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
                densities = (1.0,) if backend == "stock" or prefix else (1.0, 0.2)
                for density in densities:
                    swv.configure(_config(density), page_queries=pages)
                    swv.reset_summary()
                    outs = llm.generate(prompts, params, use_tqdm=False)
                    if prefix:  # then a prompt that starts with a cached prefix
                        outs += llm.generate(shared, params, use_tqdm=False)
                    results[(backend, chunk, density)] = record(
                        outs, summary=swv.summary(), impls=impls, blocks=blocks,
                        state=[_state_storage(layer) for layer in layers],
                    )  # fmt: skip
                del llm
                gc.collect()
    finally:
        mp.undo()
        swv._SETTINGS = None
    return results


def _attention_layers(llm):
    from vllm.model_executor.layers.attention import Attention

    layers = []

    def collect(model):
        layers.extend(m for m in model.modules() if isinstance(m, Attention))
        return len(layers)

    llm.apply_model(collect)
    return layers


def _state_storage(layer) -> dict[str, bool] | None:
    """Whether the layer's per-page state lives in its KV-cache tensor's storage."""
    impl = layer.impl
    if not isinstance(impl, swv.SketchWalkImpl):
        return None
    cache = layer.kv_cache[0] if isinstance(layer.kv_cache, list) else layer.kv_cache
    ptr = cache.untyped_storage().data_ptr()

    def inside(t):
        return t is not None and t.untyped_storage().data_ptr() == ptr

    bounds, queries = impl.bounds, impl.queries
    return {
        "bounds": bounds is not None and inside(bounds.key_min) and inside(bounds.key_max),
        "queries": queries is not None and inside(queries.sums) and inside(queries.valid),
    }


def test_backends_in_use(runs):
    assert runs[("stock", 128, 1.0)]["impls"] == {"CPUAttentionBackendImpl"}
    assert runs[("sketchwalk", 128, 1.0)]["impls"] == {"SketchWalkImpl"}


@pytest.mark.parametrize("chunk", [128, "prefix", "prefix_pages"])
def test_page_state_inside_the_kv_cache_budget(runs, chunk):
    """The per-page state is carved out of vLLM's KV-cache allocation: at the same memory
    (``kv_cache_memory_bytes``) vLLM holds fewer blocks than with its own attention, by the
    state's bytes per page (key min and max per KV head and channel in float32, with
    ``page_queries`` also Hq x D float32 query sums and a float32 flag, 16-byte aligned), and
    every layer's bounds (and sums) are views of its cache tensor."""
    cfg = TINY_LLAMA
    hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    layers, memory = cfg["num_hidden_layers"], 64 << 20
    stock = runs[("stock", "prefix" if chunk == "prefix_pages" else chunk, 1.0)]
    ours = runs[("sketchwalk", chunk, 1.0)]
    page = 2 * BLOCK * hkv * d * 4  # keys and values, float32
    assert stock["blocks"] == memory // (layers * page)
    state = 2 * hkv * d * 4
    if chunk == "prefix_pages":
        state += 4 * (hq * d + 1)
    state = -(-state // 16) * 16
    print(f"blocks: stock {stock['blocks']}, sketchwalk {ours['blocks']}, state {state} B/page")
    assert ours["blocks"] == memory // (layers * (page + state)) < stock["blocks"]
    assert all(s["bounds"] for s in ours["state"])
    assert all(s["queries"] == (chunk == "prefix_pages") for s in ours["state"])


@pytest.mark.parametrize("chunk", [128, 1024, "prefix", "prefix_pages"])
def test_density_one_matches_stock(runs, chunk):
    stock = runs[("stock", "prefix" if chunk == "prefix_pages" else chunk, 1.0)]
    ours = runs[("sketchwalk", chunk, 1.0)]
    assert ours["tokens"] == stock["tokens"]
    for a, b in zip(ours["logprobs"], stock["logprobs"], strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-3
    summary = ours["summary"]
    # the sparse path ran (every block kept), for prefill and decode
    assert summary["sparse_calls"]["prefill"] > 0
    assert summary["sparse_calls"]["decode"] > 0
    assert summary["mean_density"]["prefill"] == pytest.approx(1.0)
    assert summary["mean_density"]["decode"] == pytest.approx(1.0)
    reasons = summary["fallback_reasons"]
    assert reasons.get("dense layer", 0) > 0
    assert reasons.get("short sequence (one block)", 0) > 0
    # later prefill chunks continue their prompt's selection (select_chunk) across steps
    if chunk == "prefix":
        # the shared prompt's cached blocks were not recomputed: its prefill starts at 256, a
        # later chunk without pooled queries (dense), and its decodes read the bounds of pages
        # another request wrote
        assert ours["cached"][-1] == stock["cached"][-1] == 256
        assert reasons[swv.NO_CHUNK_STATE] > 0
        return
    if chunk == "prefix_pages":  # ... sparse, seeded from the pages' query sums
        assert ours["cached"][-1] == 256
        assert swv.NO_CHUNK_STATE not in reasons and swv.NO_PAGE_QUERIES not in reasons
        assert (
            summary["sparse_calls"]["prefill"]
            > runs[("sketchwalk", "prefix", 1.0)]["summary"]["sparse_calls"]["prefill"]
        )
        return
    assert swv.NO_CHUNK_STATE not in reasons
    if chunk == 128:
        assert (
            summary["sparse_calls"]["prefill"]
            > (runs[("sketchwalk", 1024, 1.0)]["summary"]["sparse_calls"]["prefill"])
        )


def test_sparse_density(runs):
    for chunk in (128, 1024):
        run = runs[("sketchwalk", chunk, 0.2)]
        assert [len(t) for t in run["tokens"]] == [MAX_TOKENS] * len(PROMPTS)
        summary = run["summary"]
        assert summary["sparse_calls"]["prefill"] > 0
        assert summary["sparse_calls"]["decode"] > 0
        assert summary["mean_density"]["prefill"] < 1.0
        assert summary["mean_density"]["decode"] < 1.0
    # the one-block prompt runs dense everywhere: same tokens as the stock attention
    assert runs[("sketchwalk", 1024, 0.2)]["tokens"][2] == runs[("stock", 1024, 1.0)]["tokens"][2]


# ---- the impl on a hand-built flattened batch (no engine) ----------------------------------


class _Layer:
    layer_name = "model.layers.1.self_attn.attn"


def _paged_batch(page_size: int, layout: str, seed: int = 0):
    """A step of three sequences in one flattened batch: a decode after 99 cached tokens, the
    first 70-token prefill chunk, a 40-token chunk after 80 cached tokens. Returns the impl's
    inputs (with the cached tokens already in a shuffled page pool) and the full K/V."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv, d = 4, 2, 32
    seqs = [(1, 100), (70, 70), (40, 120)]  # (queries this step, tokens after the step)
    max_pages = -(-max(s for _, s in seqs) // page_size)
    num_pages = len(seqs) * max_pages + 3
    if layout == "LBHNC":  # logical [pages, heads, page_size, K|V], contiguous
        cache = torch.randn(num_pages, hkv, page_size, 2 * d, generator=g) * 50
    else:  # LBNHC: the same logical view over a [pages, page_size, heads, K|V] buffer
        cache = (torch.randn(num_pages, page_size, hkv, 2 * d, generator=g) * 50).transpose(1, 2)
    perm = torch.randperm(num_pages, generator=g)
    table = perm[: len(seqs) * max_pages].view(len(seqs), max_pages).to(torch.int32)
    ks, vs, qs, new_k, new_v, slots = [], [], [], [], [], []
    impl = swv.SketchWalkImpl(hq, d, d**-0.5, hkv, None, None, "auto")
    k_pages, v_pages = impl._pages(cache)
    for b, (t, s) in enumerate(seqs):
        k = torch.randn(s, hkv, d, generator=g)
        v = torch.randn(s, hkv, d, generator=g)
        pos = torch.arange(s)
        slot = table[b].long()[pos // page_size] * page_size + pos % page_size
        impl._write(k_pages, k[: s - t], slot[: s - t])  # what earlier steps cached
        impl._write(v_pages, v[: s - t], slot[: s - t])
        ks.append(k)
        vs.append(v)
        qs.append(torch.randn(t, hq, d, generator=g))
        new_k.append(k[s - t :])
        new_v.append(v[s - t :])
        slots.append(slot[s - t :])
    starts = torch.tensor([0, *torch.cumsum(torch.tensor([t for t, _ in seqs]), 0).tolist()])
    lens = torch.tensor([s for _, s in seqs], dtype=torch.int32)
    n = int(starts[-1])
    meta = swv.SketchWalkMetadata(
        num_actual_tokens=n,
        query_start_loc=starts.to(torch.int32),
        query_start_loc_cpu=starts.to(torch.int32),
        seq_lens=lens,
        seq_lens_cpu=lens,
        block_table=table,
        slot_mapping=torch.cat(slots),
        num_reqs=len(seqs),
    )
    step = (torch.cat(qs), torch.cat(new_k), torch.cat(new_v), cache, meta)
    return step, qs, ks, vs, (hq, d)


def _dense_ref(q, k, v, window=None):
    """(T, Hq, D) queries at the end of (S, Hkv, D) keys -> (T, Hq, D)."""
    from sketchwalk.attention.reference import dense_attention

    qb, kb, vb = (x.transpose(0, 1)[None] for x in (q, k, v))
    if window is None:
        return dense_attention(qb, kb, vb, causal=True)[0].transpose(0, 1)
    out = [
        dense_attention(qb[:, :, i : i + 1], kb[:, :, : p + 1][:, :, -window:],
                        vb[:, :, : p + 1][:, :, -window:], causal=True)
        for i, p in enumerate(range(k.shape[0] - q.shape[0], k.shape[0]))
    ]  # fmt: skip
    return torch.cat(out, dim=2)[0].transpose(0, 1)


@pytest.mark.parametrize(("page_size", "layout"), [(32, "LBHNC"), (32, "LBNHC"), (16, "LBHNC")])
def test_impl_mixed_batch_density_one(page_size, layout):
    (query, key, value, cache, meta), qs, ks, vs, (hq, d) = _paged_batch(page_size, layout)
    swv.configure(_config(1.0).replace(dense_layers=0))
    swv.reset_summary()
    try:
        impl = swv.SketchWalkImpl(hq, d, d**-0.5, 2, None, None, "auto")
        output = torch.full((query.shape[0], hq * d), float("nan"))
        impl.forward(_Layer(), query, key, value, cache, meta, output)
        summary = swv.summary()
    finally:
        swv._SETTINGS = None
    out = output.view(-1, hq, d)
    start = 0
    for q, k, v in zip(qs, ks, vs, strict=True):
        ref = _dense_ref(q, k, v)
        torch.testing.assert_close(out[start : start + q.shape[0]], ref, atol=1e-5, rtol=1e-5)
        start += q.shape[0]
    # the keys and values of the step were written into the pages
    k_pages, _ = impl._pages(cache)
    got = k_pages[meta.slot_mapping.long() // page_size, meta.slot_mapping.long() % page_size]
    torch.testing.assert_close(got, key)
    assert summary["sparse_calls"] == {"prefill": 1, "decode": 1}
    # the later chunk has no earlier chunk here (no ChunkStates in the metadata): dense
    assert summary["fallback_reasons"] == {swv.NO_CHUNK_STATE: 1}


def test_impl_sparse_and_sliding_window():
    (query, key, value, cache, meta), qs, ks, vs, (hq, d) = _paged_batch(32, "LBHNC", seed=1)
    swv.configure(_config(0.3).replace(dense_layers=0, window_blocks=1))
    try:
        impl = swv.SketchWalkImpl(hq, d, d**-0.5, 2, None, None, "auto")
        sparse = torch.zeros(query.shape[0], hq * d)
        swv.reset_summary()
        impl.forward(_Layer(), query, key, value, cache, meta, sparse)
        summary = swv.summary()
        windowed = swv.SketchWalkImpl(hq, d, d**-0.5, 2, None, 24, "auto")
        out_w = torch.zeros(query.shape[0], hq * d)
        swv.reset_summary()
        windowed.forward(_Layer(), query, key, value, cache, meta, out_w)
        summary_w = swv.summary()
    finally:
        swv._SETTINGS = None
    assert torch.isfinite(sparse).all()
    assert summary["mean_density"]["prefill"] < 1.0
    assert summary["mean_density"]["decode"] < 1.0
    dense = torch.cat([_dense_ref(q, k, v) for q, k, v in zip(qs, ks, vs, strict=True)])
    assert not torch.allclose(sparse.view(-1, hq, d), dense, atol=1e-3)
    ref_w = torch.cat([_dense_ref(q, k, v, 24) for q, k, v in zip(qs, ks, vs, strict=True)])
    torch.testing.assert_close(out_w.view(-1, hq, d), ref_w, atol=1e-5, rtol=1e-5)
    assert summary_w["fallback_reasons"] == {"sliding window": 3}


def test_impl_chunks_across_steps():
    """A 150-token prompt prefilled in two steps (90 + 60 tokens), then a decode: the second
    chunk continues the first one's selection (select_chunk), the decode drops the state."""
    g = torch.Generator().manual_seed(3)
    hq, hkv, d, page, s = 4, 2, 32, 32, 151
    cache = torch.randn(8, hkv, page, 2 * d, generator=g) * 50
    table = torch.tensor([[5, 2, 7, 0, 3, 1]], dtype=torch.int32)
    q_all = torch.randn(s, hq, d, generator=g)
    k_all = torch.randn(s, hkv, d, generator=g)
    v_all = torch.randn(s, hkv, d, generator=g)
    pos = torch.arange(s)
    slots = table[0].long()[pos // page] * page + pos % page
    prompts = swv.ChunkStates(4)
    swv.configure(_config(1.0).replace(dense_layers=0))
    swv.reset_summary()
    impls = [swv.SketchWalkImpl(hq, d, d**-0.5, hkv, None, None, "auto") for _ in range(3)]
    layers = []
    for i in range(3):
        layer = _Layer()
        layer.layer_name = f"model.layers.{i}.self_attn.attn"
        layers.append(layer)
    try:
        for start, stop in ((0, 90), (90, 150), (150, 151)):
            t = stop - start
            meta = swv.SketchWalkMetadata(
                num_actual_tokens=t,
                query_start_loc=torch.tensor([0, t], dtype=torch.int32),
                query_start_loc_cpu=torch.tensor([0, t], dtype=torch.int32),
                seq_lens=torch.tensor([stop], dtype=torch.int32),
                seq_lens_cpu=torch.tensor([stop], dtype=torch.int32),
                block_table=table,
                slot_mapping=slots[start:stop],
                num_reqs=1,
                prompts=prompts,
            )
            for impl, layer in zip(impls, layers, strict=True):
                out = torch.empty(t, hq * d)
                impl.forward(layer, q_all[start:stop], k_all[start:stop], v_all[start:stop],
                             cache, meta, out)  # fmt: skip
                ref = _dense_ref(q_all[start:stop], k_all[:stop], v_all[:stop])
                torch.testing.assert_close(out.view(t, hq, d), ref, atol=1e-5, rtol=1e-5)
            assert len(prompts) == (1 if stop < s else 0)
        summary = swv.summary()
    finally:
        swv._SETTINGS = None
    assert summary["sparse_calls"] == {"prefill": 6, "decode": 3}
    assert summary["fallback_reasons"] == {}


def test_impl_decodes_from_page_bounds_in_one_batch():
    """Two prompts prefilled through the impl (so every key passes the page bounds), then
    decode steps of both in one flattened batch, a third prompt prefilled and decoding beside: each
    decode row equals the per-sequence reference (`SketchWalkDecoder` rebuilt from the keys,
    reference path, and `sparse_decode`) and the selection ran once per step for all rows."""
    from sketchwalk.attention.api import sparse_decode
    from sketchwalk.selection.decode import SketchWalkDecoder

    g = torch.Generator().manual_seed(4)
    hq, hkv, d, page = 4, 2, 32, 16
    cfg = _config(0.5).replace(dense_layers=0, sink_blocks=1, window_blocks=1, block_size=page)
    lens0, steps = [170, 130, 64], 4  # the third prompt is prefilled during the decode steps
    total = [s + steps for s in lens0]
    cache = torch.randn(60, hkv, page, 2 * d, generator=g)  # what earlier requests left
    table = torch.randperm(60, generator=g)[:45].view(3, 15).to(torch.int32)
    cache[table[0, 2].long(), :, :, :d] = 500.0  # huge old keys: the bounds must forget them
    qa = [torch.randn(s, hq, d, generator=g) for s in total]
    ka = [torch.randn(s, hkv, d, generator=g) for s in total]
    va = [torch.randn(s, hkv, d, generator=g) for s in total]
    for b in range(2):
        ka[b][b * 40 + 7] *= 8  # a strong key in an early block
    pos = [torch.arange(s) for s in total]
    slots = [table[b].long()[p // page] * page + p % page for b, p in enumerate(pos)]
    swv.configure(cfg)
    swv.reset_summary()
    impl = swv.SketchWalkImpl(hq, d, d**-0.5, hkv, None, None, "auto")
    calls = []
    real_select = swv.paged_quest_select

    def counting_select(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real_select(*args, **kwargs)

    def meta(pieces):  # [(seq, start, stop)]: one flattened step
        qlen = [stop - start for _, start, stop in pieces]
        loc = torch.tensor([0, *torch.cumsum(torch.tensor(qlen), 0).tolist()], dtype=torch.int32)
        lens = torch.tensor([stop for _, _, stop in pieces], dtype=torch.int32)
        rows = [b for b, _, _ in pieces]
        return swv.SketchWalkMetadata(
            num_actual_tokens=int(loc[-1]), query_start_loc=loc, query_start_loc_cpu=loc,
            seq_lens=lens, seq_lens_cpu=lens, block_table=table[rows],
            slot_mapping=torch.cat([slots[b][s:e] for b, s, e in pieces]), num_reqs=len(pieces),
        )  # fmt: skip

    def run(pieces):
        m = meta(pieces)
        cat = [torch.cat([x[b][s:e] for b, s, e in pieces]) for x in (qa, ka, va)]
        out = torch.full((m.num_actual_tokens, hq * d), float("nan"))
        impl.forward(_Layer(), *cat, cache, m, out)
        return out.view(-1, hq, d)

    mp = pytest.MonkeyPatch()
    mp.setattr(swv, "paged_quest_select", counting_select)
    try:
        run([(0, 0, lens0[0]), (1, 0, lens0[1])])
        for i in range(steps):
            a, b = lens0[0] + i, lens0[1] + i
            third = (2, 0, lens0[2]) if i == 1 else (2, lens0[2] + i - 2, lens0[2] + i - 1)
            pieces = [(0, a, a + 1), (1, b, b + 1)] + ([third] if i >= 1 else [])
            out = run(pieces)
            for row, (seq, start, stop) in enumerate(pieces):
                if stop - start != 1:
                    continue  # the third prompt's prefill (row 2, last in the batch)
                k = ka[seq][:stop].transpose(0, 1)[None]
                v = va[seq][:stop].transpose(0, 1)[None]
                q = qa[seq][stop - 1][None, :, None]
                dec = SketchWalkDecoder(cfg, fast=False)
                dec.prefill(torch.zeros(1, hq, stop - 1, d), k[:, :, :-1], 1)
                sel = dec.step(q, k[:, :, -1:], 1)
                ref = sparse_decode(q, k, v, sel.kv_num_blocks, sel.kv_indices, page,
                                    backend="reference", scale=d**-0.5)  # fmt: skip
                if seq < 2:  # blocks ranked beside the forced 2 (the third one is too short)
                    assert int(sel.kv_num_blocks.min()) > 2
                torch.testing.assert_close(out[row], ref[0, :, 0], atol=1e-5, rtol=1e-5)
        summary = swv.summary()
    finally:
        mp.undo()
        swv._SETTINGS = None
    # one selection per step for all its decode rows (the third sequence decodes from step 2)
    assert calls == [2, 2, 3, 3]
    assert summary["sparse_calls"]["decode"] == 10


# ---- tensor parallelism (two CPU workers) ---------------------------------------------------


def _write_checkpoint(path, seed: int = 0) -> None:
    """TINY_LLAMA with real weights in a safetensors file (N(0, 1 / fan_in) matrices, unit
    norms): each tensor-parallel worker loads its shard of the SAME weights (the dummy loader
    would draw each shard on its own)."""
    from safetensors.torch import save_file

    cfg = TINY_LLAMA
    g = torch.Generator().manual_seed(seed)
    h, inter, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    hq, hkv, vocab = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]

    def mat(rows, cols):
        return torch.randn(rows, cols, generator=g) / math.sqrt(cols)

    tensors = {"model.embed_tokens.weight": mat(vocab, h), "lm_head.weight": mat(vocab, h),
               "model.norm.weight": torch.ones(h)}  # fmt: skip
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": mat(hq * d, h),
            p + "self_attn.k_proj.weight": mat(hkv * d, h),
            p + "self_attn.v_proj.weight": mat(hkv * d, h),
            p + "self_attn.o_proj.weight": mat(h, hq * d),
            p + "mlp.gate_proj.weight": mat(inter, h),
            p + "mlp.up_proj.weight": mat(inter, h),
            p + "mlp.down_proj.weight": mat(h, inter),
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
        }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    save_file(tensors, str(path / "model.safetensors"))


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


@pytest.mark.skipif(len(_cores()) < 2, reason="two tensor-parallel CPU workers need two cores")
def test_tensor_parallel_two_gives_the_tokens_of_one(tmp_path):
    """The backend under tensor parallelism 2 (each worker holds one KV head of the two, so one
    mask group of the default per-KV-group selection): the greedy tokens of one worker, dense
    and sparse. The workers are separate processes: they register the backend through the
    plugin entry point and read the settings from SKETCHWALK_VLLM_CONFIG."""
    from vllm import LLM, SamplingParams

    model = tmp_path / "tiny_llama"
    _write_checkpoint(model)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            detokenize=False)  # fmt: skip
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:2]]
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # one core per worker (vLLM binds one NUMA node per worker by default; here is one node)
    mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(c) for c in _cores()[:2]))
    swv.register()
    tokens, summaries = {}, {}
    try:
        for tp in (1, 2):
            llm = LLM(
                model=str(model), skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
                max_model_len=1024, block_size=BLOCK, max_num_batched_tokens=128, max_num_seqs=4,
                kv_cache_memory_bytes=64 << 20, enable_prefix_caching=False, seed=0,
                tensor_parallel_size=tp, attention_backend="CUSTOM",
                distributed_executor_backend="mp" if tp > 1 else None,
            )  # fmt: skip
            for density in (1.0, 0.2):
                swv.configure_engine(llm, _config(density))  # here and in the running workers
                swv.engine_summary(llm, reset=True)
                outs = llm.generate(prompts, params, use_tqdm=False)
                tokens[(tp, density)] = [list(o.outputs[0].token_ids) for o in outs]
                summaries[(tp, density)] = swv.engine_summary(llm)
            del llm
            gc.collect()
    finally:
        mp.undo()
        swv._SETTINGS = None
    print(tokens, summaries)
    # one summary per worker; each ran the sparse path at the density asked
    for (tp, density), per_worker in summaries.items():
        assert len(per_worker) == tp
        for worker in per_worker:
            assert worker["sparse_calls"]["decode"] > 0
            if density == 1.0:
                assert worker["mean_density"]["decode"] == pytest.approx(1.0)
            else:
                assert worker["mean_density"]["decode"] < 0.9
    assert tokens[(2, 1.0)] == tokens[(1, 1.0)]
    assert tokens[(2, 0.2)] == tokens[(1, 0.2)]
    assert tokens[(1, 0.2)] != tokens[(1, 1.0)]  # the sparse runs kept fewer blocks


@pytest.mark.parametrize("stale_entry", [False, True])
def test_impl_prefix_hit_runs_sparse_from_page_queries(stale_entry):
    """With page_queries, a request whose first 96 tokens are cached pages of another request
    prefills the rest sparse: each layer's selector is seeded from the pages' query sums, and
    the output equals the rows of a one-shot SketchWalk prefill of the whole prompt. A chunk
    state left on the shared first page by the other request (``stale_entry``: it ends at 128,
    not 96) gives way to the pages."""
    from sketchwalk import SketchWalk
    from sketchwalk.attention.api import sparse_attention

    g = torch.Generator().manual_seed(6)
    hq, hkv, d, page, layers = 4, 2, 32, 32, 2
    cfg = _config(0.4).replace(dense_layers=0, sink_blocks=1, window_blocks=1)
    shared, total_a, total_b = 96, 128, 170
    q_b = [torch.randn(total_b, hq, d, generator=g) for _ in range(layers)]
    k_b = [torch.randn(total_b, hkv, d, generator=g) for _ in range(layers)]
    v_b = [torch.randn(total_b, hkv, d, generator=g) for _ in range(layers)]
    # request A: the same first 96 tokens (same queries, keys, values), then its own
    q_a = [torch.cat([q[:shared], torch.randn(total_a - shared, hq, d, generator=g)]) for q in q_b]
    k_a = [torch.cat([k[:shared], torch.randn(total_a - shared, hkv, d, generator=g)]) for k in k_b]
    v_a = [torch.cat([v[:shared], torch.randn(total_a - shared, hkv, d, generator=g)]) for v in v_b]
    caches = [torch.randn(16, hkv, page, 2 * d, generator=g) for _ in range(layers)]
    table_a = torch.tensor([[3, 9, 12, 5, 0, 0]], dtype=torch.int32)
    table_b = torch.tensor([[3, 9, 12, 7, 1, 14]], dtype=torch.int32)  # 3 pages shared
    prompts = swv.ChunkStates(4)
    swv.configure(cfg, page_queries=True)
    swv.reset_summary()
    impls = [swv.SketchWalkImpl(hq, d, d**-0.5, hkv, None, None, "auto") for _ in range(layers)]
    names = [_Layer() for _ in range(layers)]
    for i, layer in enumerate(names):
        layer.layer_name = f"model.layers.{i}.self_attn.attn"

    def step(table, start, stop, qs, ks, vs):
        pos = torch.arange(start, stop)
        slots = table[0].long()[pos // page] * page + pos % page
        t = stop - start
        m = swv.SketchWalkMetadata(
            num_actual_tokens=t, query_start_loc=torch.tensor([0, t], dtype=torch.int32),
            query_start_loc_cpu=torch.tensor([0, t], dtype=torch.int32),
            seq_lens=torch.tensor([stop], dtype=torch.int32),
            seq_lens_cpu=torch.tensor([stop], dtype=torch.int32), block_table=table,
            slot_mapping=slots, num_reqs=1, prompts=prompts,
        )  # fmt: skip
        outs = []
        for i in range(layers):
            out = torch.empty(t, hq * d)
            impls[i].forward(names[i], qs[i][start:stop], ks[i][start:stop], vs[i][start:stop],
                             caches[i], m, out)  # fmt: skip
            outs.append(out.view(t, hq, d))
        return outs

    try:
        step(table_a, 0, total_a, q_a, k_a, v_a)  # A's prompt, one chunk
        if not stale_entry:
            prompts.finish(int(table_a[0, 0]))  # what A's first decode does
        swv.reset_summary()
        outs = step(table_b, shared, total_b, q_b, k_b, v_b)  # B: the rest of its prompt
        summary = swv.summary()
    finally:
        swv._SETTINGS = None
    assert summary["fallback_reasons"] == {}
    assert summary["sparse_calls"]["prefill"] == layers
    assert summary["mean_density"]["prefill"] < 1.0
    one_shot = SketchWalk(cfg)
    for i in range(layers):
        q, k, v = (x[i].transpose(0, 1)[None] for x in (q_b, k_b, v_b))
        sel = one_shot.select(q, k, i)
        want = sparse_attention(q, k, v, sel, scale=d**-0.5)[0, :, shared:].transpose(0, 1)
        torch.testing.assert_close(outs[i], want, atol=1e-5, rtol=1e-5)


def test_impl_prefix_hit_without_page_queries_runs_dense():
    g = torch.Generator().manual_seed(8)
    hq, hkv, d, page = 4, 2, 32, 32
    swv.configure(_config(0.4).replace(dense_layers=0))  # page_queries off
    swv.reset_summary()
    try:
        impl = swv.SketchWalkImpl(hq, d, d**-0.5, hkv, None, None, "auto")
        cache = torch.randn(8, hkv, page, 2 * d, generator=g)
        t, s = 40, 130
        table = torch.tensor([[0, 1, 2, 3, 4]], dtype=torch.int32)
        pos = torch.arange(s - t, s)
        m = swv.SketchWalkMetadata(
            num_actual_tokens=t, query_start_loc=torch.tensor([0, t], dtype=torch.int32),
            query_start_loc_cpu=torch.tensor([0, t], dtype=torch.int32),
            seq_lens=torch.tensor([s], dtype=torch.int32),
            seq_lens_cpu=torch.tensor([s], dtype=torch.int32), block_table=table,
            slot_mapping=table[0].long()[pos // page] * page + pos % page, num_reqs=1,
            prompts=swv.ChunkStates(4),
        )  # fmt: skip
        out = torch.empty(t, hq * d)
        impl.forward(_Layer(), torch.randn(t, hq, d, generator=g),
                     torch.randn(t, hkv, d, generator=g), torch.randn(t, hkv, d, generator=g),
                     cache, m, out)  # fmt: skip
        assert impl.queries is None
        assert swv.summary()["fallback_reasons"] == {swv.NO_CHUNK_STATE: 1}
    finally:
        swv._SETTINGS = None


def _benchmark(script: str, *args: str):
    """``benchmarks/<script> args`` in a subprocess with vLLM's own engine processes (the
    settings pushed to and the records read from its workers by method name)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    cmd = [sys.executable, str(root / "benchmarks" / script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_engine_benchmark_runs_on_the_cpu(tmp_path):
    """benchmarks/vllm_engine.py end to end on the tiny shape (vLLM's own engine processes, the
    settings pushed to and the records read from its worker by method name): one dense and one
    SketchWalk row with the sparse path recorded."""
    proc = _benchmark("vllm_engine.py", "--shape", "tiny", "--contexts", "256", "--batches", "2",
                      "--decode-tokens", "4", "--repeats", "1", "--out-dir", str(tmp_path),
                      "--tag", "smoke")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "vllm_engine_smoke.json").read_text())
    rows = {r["engine"]: r for r in doc["rows"]}
    assert set(rows) == {"dense", "sketchwalk"}
    summary = rows["sketchwalk"]["backend_summary"]
    assert summary["sparse_calls"]["prefill"] > 0 and summary["sparse_calls"]["decode"] > 0
    assert summary["mean_density"]["decode"] < 1.0
    assert rows["dense"]["ttft_x"] == 1.0 and rows["sketchwalk"]["b2_decode_tok_s"] > 0
    assert (tmp_path / "vllm_engine_smoke.md").read_text().count("\n| ") >= 3


def test_ruler_benchmark_matches_the_transformers_eval(tmp_path):
    """benchmarks/vllm_ruler.py on SmolLM2-135M (2 tasks at 512 tokens, 2 samples, answers cut
    at 8 tokens): the SketchWalk backend at density 1.0 answers what vLLM's attention answers,
    density 0.5 runs sparse, every (engine, task, length) cell holds its samples' scores, and
    ``--compare`` with `evaluate_ruler` on the same settings (dense, float32, the transformers
    model) matches every prompt by its hash and finds the same answers."""
    from sketchwalk.hf.models import ModelNotFoundError, model_folder
    from sketchwalk.pipeline.eval import evaluate_ruler

    try:
        model_folder("smollm2-135m")
    except ModelNotFoundError as exc:
        pytest.skip(f"smollm2-135m is not available here: {exc}")
    tasks, settings = ["niah_single_1", "vt"], dict(seq_lens=[512], num_samples=2, seed=0)
    evaluate_ruler("smollm2-135m", tasks=tasks, selectors=("dense",), densities=(0.5,),
                   max_new_tokens=8, text_source="stdlib", device="cpu", dtype=torch.float32,
                   output_dir=tmp_path / "hf", progress=False, plots=False, **settings)  # fmt: skip
    proc = _benchmark("vllm_ruler.py", "--model", "smollm2-135m", "--seq-lens", "512",
                      "--tasks", *tasks, "--num-samples", "2", "--densities", "1.0", "0.5",
                      "--max-new-tokens", "8", "--text-source", "stdlib",
                      "--compare", str(tmp_path / "hf" / "eval_ruler.json"),
                      "--out-dir", str(tmp_path), "--tag", "cpu")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "vllm_ruler_cpu.json").read_text())
    runs = {r["name"]: r for r in doc["runs"]}
    assert list(runs) == ["dense", "sketchwalk@1", "sketchwalk@0.5"]
    answers = {n: [i["answer"] for i in r["items"]] for n, r in runs.items()}
    print(answers)
    assert answers["sketchwalk@1"] == answers["dense"]
    assert all(len(a) == 4 and all(a) for a in answers.values())
    for r in runs.values():
        assert set(r["scores"]) == set(tasks)
        for task in tasks:
            cell = r["scores"][task]["512"]
            assert cell["n"] == 2 and cell["lo"] <= cell["mean"] <= cell["hi"]
    assert runs["sketchwalk@0.5"]["backend_summary"]["mean_density"]["prefill"] < 1.0
    assert runs["sketchwalk@1"]["backend_summary"]["mean_density"]["prefill"] == 1.0
    dense = runs["dense"]["compare"]
    print(dense)
    assert dense["transformers_run"] == "dense"
    assert dense["matched"] == dense["items"] == 4
    assert dense["identical_answers"] == 1.0 and dense["score_difference"] == 0.0
    # no transformers run at a sparse density in the file: nothing to compare with
    assert runs["sketchwalk@0.5"]["compare"]["transformers_run"] is None
    md = (tmp_path / "vllm_ruler_cpu.md").read_text()
    assert "| dense | - | dense | 4/4 | 100% | +0.000 |" in md


def test_ruler_benchmark_refuses_a_file_that_is_no_eval_result(tmp_path):
    bad = tmp_path / "eval_ruler.json"
    bad.write_text(json.dumps({"runs": {}}))
    proc = _benchmark("vllm_ruler.py", "--compare", str(bad), "--out-dir", str(tmp_path))
    assert proc.returncode == 1
    assert f"--compare {bad}: not a `sketchwalk eval ruler` result" in proc.stderr
    proc = _benchmark("vllm_ruler.py", "--tasks", "niah_single_9", "--out-dir", str(tmp_path))
    assert proc.returncode == 2 and "--tasks: invalid choice: 'niah_single_9'" in proc.stderr


def test_impl_without_room_for_page_state_decodes_per_sequence(monkeypatch):
    """When the per-page key bounds cannot be allocated (a cache whose pages hold no room for
    them, so they are allocated beside it), the layer gives them up for good and its decodes
    rebuild the bounds per sequence: the same output as the per-sequence reference, no error."""
    from sketchwalk.attention.api import sparse_decode
    from sketchwalk.selection.decode import SketchWalkDecoder

    (query, key, value, cache, meta), qs, ks, vs, (hq, d) = _paged_batch(32, "LBHNC", seed=2)
    cfg = _config(0.3).replace(dense_layers=0, window_blocks=1)
    calls = []

    def no_room(*args, **kwargs):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(swv, "PageKeyBounds", no_room)
    swv.configure(cfg, page_queries=True)
    try:
        impl = swv.SketchWalkImpl(hq, d, d**-0.5, 2, None, None, "auto")
        out = torch.zeros(query.shape[0], hq * d)
        impl.forward(_Layer(), query, key, value, cache, meta, out)
        again = dataclasses.replace(meta, selectors={}, decode_plans={}, seeded=set())
        impl.forward(_Layer(), query, key, value, cache, again, out)  # no second attempt
    finally:
        swv._SETTINGS = None
    assert calls == [1] and impl.bounds is None and impl.queries is None
    k = ks[0].transpose(0, 1)[None]
    v = vs[0].transpose(0, 1)[None]
    q = qs[0].transpose(0, 1)[None]  # the decode row: 1 query after 99 cached tokens
    dec = SketchWalkDecoder(cfg.replace(decode_rule="quest"))
    dec.prefill(torch.zeros(1, hq, 99, d), k[:, :, :-1], 1)
    sel = dec.step(q, k[:, :, -1:], 1)
    want = sparse_decode(q, k, v, sel.kv_num_blocks, sel.kv_indices, 32, backend="reference",
                         scale=d**-0.5)  # fmt: skip
    torch.testing.assert_close(out.view(-1, hq, d)[0], want[0, :, 0], atol=1e-5, rtol=1e-5)


def _padded(cache: torch.Tensor, tail_bytes: int) -> torch.Tensor:
    """``cache`` (pages, H, N, C) copied into a buffer whose pages are ``tail_bytes`` longer, as
    vLLM views a layer's cache when its spec has ``page_size_padded``."""
    n = cache.shape[0]
    page = cache[0].numel()
    extra = tail_bytes // cache.element_size()
    raw = torch.zeros(n * (page + extra), dtype=cache.dtype)
    inner = torch.empty(cache.shape[1:]).stride()
    out = torch.as_strided(raw, cache.shape, (page + extra, *inner))
    out.copy_(cache)
    return out


def test_impl_keeps_page_state_in_the_page_padding():
    """On a cache whose pages carry the room `reserve_page_state` asks vLLM for, the bounds
    and query sums are views of that room (no allocation of their own: `_allocate` is not
    called), the keys and values are untouched by them, and the outputs equal those of the
    same steps with the state allocated beside an unpadded cache."""
    (query, key, value, cache, meta), _, _, _, (hq, d) = _paged_batch(32, "LBHNC", seed=5)
    cfg = _config(0.3).replace(dense_layers=0, window_blocks=1)
    layout = swv.PageTailLayout(2, d, cache.dtype, hq)
    padded = _padded(cache, layout.nbytes)
    swv.configure(cfg, page_queries=True)
    outs, impls = [], []
    try:
        for c in (cache, padded):
            impl = swv.SketchWalkImpl(hq, d, d**-0.5, 2, None, None, "auto")
            allocations = []
            impl._allocate = lambda what, make, calls=allocations: calls.append(what) or make()
            out = torch.zeros(query.shape[0], hq * d)
            for _ in range(2):  # the second step reads the state the first one left
                m = dataclasses.replace(meta, selectors={}, decode_plans={}, seeded=set())
                impl.forward(_Layer(), query, key, value, c, m, out)
            outs.append(out)
            impls.append((impl, allocations))
    finally:
        swv._SETTINGS = None
    (outside, outside_calls), (inside, inside_calls) = impls
    assert outside_calls == ["key bounds", "query sums"] and inside_calls == []
    ptr = padded.untyped_storage().data_ptr()
    for t in (inside.bounds.key_min, inside.bounds.key_max, inside.queries.sums):
        assert t.untyped_storage().data_ptr() == ptr
    assert outside.bounds.key_min.untyped_storage().data_ptr() != cache.untyped_storage().data_ptr()
    torch.testing.assert_close(padded, cache, atol=0, rtol=0)  # K/V untouched by the state
    torch.testing.assert_close(inside.bounds.key_min, outside.bounds.key_min[:-1])
    torch.testing.assert_close(inside.bounds.key_max, outside.bounds.key_max[:-1])
    torch.testing.assert_close(inside.queries.sums, outside.queries.sums[:-1])
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)


def test_reserve_page_state_grows_the_page_of_plain_specs_only():
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    spec = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)
    swv.configure(_config(1.0))
    try:
        grown = swv.SketchWalkBackend.customize_spec(spec)
        swv.configure(_config(1.0), page_queries=True)
        swv.SketchWalkImpl(8, 32, 32**-0.5, 2, None, None, "auto")  # 8 query heads per 2
        with_sums = swv.reserve_page_state(spec)
    finally:
        swv._SETTINGS = None
    page = 2 * 32 * 2 * 32 * 2
    assert spec.page_size_bytes == page
    assert grown.page_size_bytes == page + 2 * 2 * 32 * 2  # bf16 min and max
    assert with_sums.page_size_bytes == page + 2 * 2 * 32 * 2 + 4 * (8 * 32 + 1) + 12
    window = SlidingWindowSpec(
        block_size=32, num_kv_heads=2, head_size=32, dtype=torch.bfloat16, sliding_window=64
    )
    assert swv.reserve_page_state(window) is window
    assert swv.reserve_page_state(grown) is grown  # padded already: left alone


def test_layer_spec_patch_for_vllm_without_the_backend_hook():
    """vLLM 0.26 has no ``AttentionBackend.customize_spec``: `register` then wraps the layer's
    ``get_kv_cache_spec``; layers of other backends keep vLLM's spec."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = FullAttentionSpec(block_size=16, num_kv_heads=4, head_size=64, dtype=torch.float16)

    class FakeAttention:
        def __init__(self, backend):
            self.backend = backend

        def get_attn_backend(self):
            return self.backend

        def get_kv_cache_spec(self, vllm_config):
            return spec

    swv._patch_layer_spec(FakeAttention)
    swv._patch_layer_spec(FakeAttention)  # once only
    swv.configure(_config(1.0))
    try:
        ours = FakeAttention(swv.SketchWalkBackend).get_kv_cache_spec(None)
        other = FakeAttention(object).get_kv_cache_spec(None)
    finally:
        swv._SETTINGS = None
    assert other is spec
    assert ours.page_size_bytes == spec.page_size_bytes + 2 * 4 * 64 * 2


def test_settings_refuse_decode_pins():
    """decode_pin_blocks needs the prompt's queries at decode time, which the backend's decodes
    do not keep: configure() and the environment's settings refuse it with the reason."""
    from sketchwalk.engines.vllm import BackendSettings, configure

    pinned = SketchWalkConfig.preset("default", decode_pin_blocks=4)
    with pytest.raises(ValueError, match="decode_pin_blocks"):
        configure(pinned)
    with pytest.raises(ValueError, match="decode_pin_blocks"):
        BackendSettings.from_env('{"decode_pin_blocks": 4}')
    assert BackendSettings.from_env('{"decode_pin_blocks": 0}').config.decode_pin_blocks == 0
