"""SketchWalk as a drop-in transformers attention implementation (sketchwalk.hf.integration)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_models import ARCHS, tiny_config

from sketchwalk.attention.api import sparse_attention
from sketchwalk.attention.reference import dense_attention
from sketchwalk.config import SketchWalkConfig
from sketchwalk.hf.capture import attention_modules, capture_attention
from sketchwalk.hf.integration import (
    SketchWalkAttention,
    disable_sketchwalk,
    enable_sketchwalk,
    sketchwalk_attention,
)
from sketchwalk.selection.prefill import SketchWalk

SEQ = 100  # 7 blocks of 16, the last one partial
SPARSE = SketchWalkConfig(block_size=16, density=0.3, dense_layers=1, dense_last_rows=1)


def _model(arch: str, attn: str = "sdpa", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    if arch == "mistral":
        overrides.setdefault("sliding_window", None)  # a sliding window makes every layer dense
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(arch, **overrides), attn_implementation=attn
    )
    return model.eval()


def _ids(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _calls(sw: SketchWalkAttention) -> list[tuple]:
    """(layer, forward pass, mode, prefill, backend, reason) of every call SketchWalk saw."""
    return [(c.layer_idx, c.forward_pass, c.mode, c.prefill, c.backend, c.reason) for c in sw.calls]


def _report(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    err = (got.float() - want.float()).abs()
    print(f"{name}: max abs err {err.max().item():.3e}, mean {err.mean().item():.3e}")
    return err.max().item()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dense_equivalent_config_gives_identical_logits(arch, attn):
    model = _model(arch, attn)
    ids = _ids()
    with torch.no_grad():
        stock = model(ids).logits
        for cfg, reason in (
            (
                SketchWalkConfig(block_size=16, dense_layers=999),
                "dense layer (config.dense_layers)",
            ),
            (
                SketchWalkConfig(block_size=16, density=1.0, dense_layers=0),
                "selection keeps every causal block",
            ),
        ):
            with enable_sketchwalk(model, cfg, backend="reference") as sw:
                assert model.config._attn_implementation == f"sketchwalk+{attn}"
                got = model(ids).logits
            _report(f"{arch}/{attn} {cfg.dense_layers=} {cfg.density=}", got, stock)
            assert torch.equal(got, stock)
            # SketchWalk saw every layer's prefill once (one forward pass) and chose dense: the
            # equality above is not a model that bypassed it.
            inner = f"inner:{attn}"
            assert _calls(sw) == [(i, 1, "dense", True, inner, reason) for i in range(3)]
            summary = sw.summary()
            assert summary["prefill_calls"] == 3 and summary["mean_density"] == 1.0
            assert summary["forward_passes"] == 1
        # The same full selection through the sparse reference kernel: equal up to rounding.
        cfg = SketchWalkConfig(block_size=16, dense_layers=999)
        with enable_sketchwalk(model, cfg, backend="reference", dense_when_full=False) as sw:
            got = model(ids).logits
        assert _calls(sw) == [(i, 1, "sparse", True, "reference", None) for i in range(3)]
        assert sw.summary()["backends"] == {"reference": 3}
        assert _report(f"{arch}/{attn} full selection, reference", got, stock) < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_logits_equal_manual_recomputation(arch):
    model = _model(arch)
    ids = _ids()
    modules = attention_modules(model)
    outputs: dict[int, torch.Tensor] = {}

    def hook(layer_idx):
        def fn(_module, inputs):
            outputs[layer_idx] = inputs[0].detach().clone()  # (B, S, Hq * D), attention output

        return fn

    handles = [m.o_proj.register_forward_pre_hook(hook(i)) for i, m in modules.items()]
    try:
        with torch.no_grad():
            stock = model(ids).logits
            with (
                enable_sketchwalk(model, SPARSE, backend="reference") as sw,
                capture_attention(model) as cap,
            ):
                logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    assert torch.isfinite(logits).all()
    diff = _report(f"{arch} sparse vs dense logits", logits, stock)
    assert diff > 1e-3, "a 30%-density selection should change the logits"
    modes = {i: sw.layers[i].mode for i in modules}
    assert modes == {0: "dense", 1: "sparse", 2: "sparse"}, modes

    manual = SketchWalk(SPARSE, backend="reference")
    for i, module in modules.items():
        q, k, v = (cap.layers[i][name] for name in ("Q", "K", "V"))
        selection = manual.select(q, k, i)
        if i < SPARSE.dense_layers:
            assert selection.density == 1.0
            want = dense_attention(q, k, v, scale=module.scaling)
        else:
            assert selection.density < 1.0
            assert selection.density == pytest.approx(sw.layers[i].density)
            want = sparse_attention(q, k, v, selection, backend="reference", scale=module.scaling)
        b, hq, t, d = want.shape
        got = outputs[i].view(b, t, hq, d).transpose(1, 2)
        err = _report(f"{arch} layer {i} attention output", got, want)
        assert err < 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_generate_with_kv_cache_decodes_dense(arch):
    model = _model(arch)
    prompt = _ids(batch=1, seq=80)
    new_tokens = 4
    with torch.no_grad():
        sw = enable_sketchwalk(model, SPARSE, backend="reference")
        try:
            sparse_next = model(prompt).logits[0, -1].argmax()
            sw.clear()
            out = model.generate(
                prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens
            )
        finally:
            disable_sketchwalk(model)
    assert out.shape == (1, 80 + new_tokens)
    assert out[0, 80] == sparse_next, "the first token comes from the sparse prefill"
    prefill = [c for c in sw.calls if c.prefill]
    decode = [c for c in sw.calls if not c.prefill]
    assert [c.mode for c in prefill] == ["dense", "sparse", "sparse"]
    assert len(decode) == 3 * (new_tokens - 1)
    assert all(c.mode == "dense" and c.q_len == 1 and "decode" in c.reason for c in decode)
    assert {c.kv_len for c in decode} == {81, 82, 83}


def test_disable_restores_and_reenables():
    model = _model("llama")
    ids = _ids()
    with torch.no_grad():
        stock = model(ids).logits
        sw = enable_sketchwalk(model, SPARSE, backend="reference")
        assert sketchwalk_attention(model) is sw
        sparse = model(ids).logits
        assert disable_sketchwalk(model) is True
        assert disable_sketchwalk(model) is False
        assert model.config._attn_implementation == "sdpa"
        assert sketchwalk_attention(model) is None
        assert torch.equal(model(ids).logits, stock)
        with SketchWalkAttention(model, SPARSE, backend="reference"):
            again_logits = model(ids).logits
        assert model.config._attn_implementation == "sdpa"
    assert torch.equal(again_logits, sparse)


def test_new_forward_pass_resets_the_walk():
    model = _model("qwen2")
    with torch.no_grad(), enable_sketchwalk(model, SPARSE, backend="reference") as sw:
        first = model(_ids()).logits
        other = model(_ids(batch=1, seq=70, seed=5)).logits  # another shape in between
        second = model(_ids()).logits
    assert torch.isfinite(other).all()
    assert sw.forward_passes == 3
    assert torch.equal(first, second)


def test_layers_subset_and_short_sequences_stay_dense():
    model = _model("llama")
    with torch.no_grad(), enable_sketchwalk(model, SPARSE, backend="reference", layers=[2]) as sw:
        model(_ids())
        assert {i: c.mode for i, c in sw.layers.items()} == {0: "dense", 1: "dense", 2: "sparse"}
        assert sw.layers[1].reason == "layer not selected for SketchWalk"
        sw.clear()
        model(_ids(seq=16))  # one block
        assert [c.mode for c in sw.calls] == ["dense"] * 3
        assert "one block" in sw.layers[2].reason


def _left_padded(lengths: list[int], seq: int = SEQ) -> tuple[torch.Tensor, ...]:
    """ids, attention mask and position ids of a left-padded batch with the given lengths (what
    generate() builds for prompts of different lengths)."""
    ids = _ids(len(lengths), seq)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, seq - n :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padded_batch_runs_sparse_like_each_sequence_alone(arch, attn):
    model = _model(arch, attn)
    lengths = [SEQ - 9, SEQ, 40, 12]  # partial last blocks, an unpadded row, a one-block row
    ids, mask, positions = _left_padded(lengths)
    with torch.no_grad():
        with enable_sketchwalk(model, SPARSE, backend="reference") as sw:
            got = model(ids, attention_mask=mask, position_ids=positions).logits
        summary = sw.summary()
        # layer 0 is a dense layer; the others run sparse, with no padding fallback
        assert [c.mode for c in sw.calls] == ["dense", "sparse", "sparse"], _calls(sw)
        assert summary["dense_reasons"] == {"dense layer (config.dense_layers)": 1}
        assert 0.0 < summary["mean_sparse_density"] < 1.0
        stock = model(ids, attention_mask=mask, position_ids=positions).logits
        for row, n in enumerate(lengths):
            with enable_sketchwalk(model, SPARSE, backend="reference") as alone:
                want = model(ids[row : row + 1, SEQ - n :]).logits[0]
            sparse_alone = alone.calls[-1].mode == "sparse"
            assert sparse_alone == (n >= SEQ - 9)  # short rows keep every block (forced ones)
            err = _report(f"{arch}/{attn} row {row} (length {n})", got[row, SEQ - n :], want)
            assert err <= 1e-4
            if sparse_alone:  # the sparse result is not the dense one
                assert _report("vs dense", got[row, SEQ - n :], stock[row, SEQ - n :]) > 1e-3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_other_than_left_runs_dense_or_raises(attn):
    model = _model("llama", attn)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, -9:] = 0  # right padding in the first row: not what generate() builds
    with torch.no_grad():
        stock = model(ids, attention_mask=mask).logits
        with enable_sketchwalk(model, SPARSE, backend="reference") as sw:
            got = model(ids, attention_mask=mask).logits
            unpadded = model(ids, attention_mask=torch.ones_like(ids)).logits
        assert torch.equal(got, stock)
        reasons = [c.reason for c in sw.calls[:3]]
        assert len(reasons) == 3 and all("not plain causal" in r for r in reasons), reasons
        # an all-ones mask is plain causal: it runs sparse, like no mask at all
        assert [c.mode for c in sw.calls[3:]] == ["dense", "sparse", "sparse"]
        assert not torch.equal(unpadded, model(ids).logits)
        with (
            enable_sketchwalk(model, SPARSE, backend="reference", on_padding="raise"),
            pytest.raises(ValueError, match="padded batches"),
        ):
            model(ids, attention_mask=mask)
    assert model.config._attn_implementation == attn


def test_sliding_window_layers_run_dense():
    model = _model("mistral", sliding_window=24)
    ids = _ids()
    with torch.no_grad():
        stock = model(ids).logits
        with enable_sketchwalk(model, SPARSE, backend="reference") as sw:
            got = model(ids).logits
    assert torch.equal(got, stock)
    assert len(sw.calls) == 3, "one call per layer"
    assert all("sliding-window" in c.reason for c in sw.calls)


def test_bad_arguments_raise_clear_errors():
    model = _model("llama")
    with pytest.raises(ValueError, match="backend must be one of"):
        enable_sketchwalk(model, SPARSE, backend="cuda")
    with pytest.raises(TypeError, match="SketchWalkConfig"):
        enable_sketchwalk(model, {"density": 0.2})
    with pytest.raises(ValueError, match=r"layers \[7\] do not exist"):
        enable_sketchwalk(model, SPARSE, layers=[7])
    with pytest.raises(ValueError, match="on_padding"):
        enable_sketchwalk(model, SPARSE, on_padding="ignore")
    with pytest.raises(ValueError, match="selection_backend"):
        enable_sketchwalk(model, SPARSE, selection_backend="cuda")
    with pytest.raises(ValueError, match="density"):
        SketchWalkConfig(density=1.5)
    assert model.config._attn_implementation == "sdpa"
    with enable_sketchwalk(model, SPARSE), pytest.raises(RuntimeError, match="already enabled"):
        enable_sketchwalk(model, SPARSE)
    # An explicit backend that cannot run here raises; it never falls back silently.
    with (
        torch.no_grad(),
        enable_sketchwalk(model, SPARSE, backend="triton"),
        pytest.raises(RuntimeError, match="triton"),
    ):
        model(_ids())
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sketchwalk_decode_runs_sparse_steps_and_keeps_every_block_when_asked(arch):
    """decode="sketchwalk": one-token steps select blocks with SketchWalkDecoder and run
    sparse_decode. With a budget that keeps every block the generated tokens and step logits
    equal plain dense decoding after the same sparse prefill; with a sparse budget the steps keep
    fewer blocks and still generate."""
    model = _model(arch)
    prompt = _ids(batch=2, seq=90)
    steps = 5
    keep_all = SketchWalkConfig(block_size=16, kblocks_frac=1.0, dense_layers=1, dense_last_rows=1)

    def run(decode: str, cfg: SketchWalkConfig):
        with (
            torch.no_grad(),
            enable_sketchwalk(model, cfg, backend="reference", decode=decode) as sw,
        ):
            out = model.generate(
                prompt,
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        return out, sw

    dense_out, _ = run("dense", keep_all)
    full_out, sw_full = run("sketchwalk", keep_all)
    assert torch.equal(dense_out.sequences, full_out.sequences)
    for a, b in zip(dense_out.logits, full_out.logits, strict=True):
        assert _report("decode logits, every block kept", b, a) < 1e-4
    decode_calls = [c for c in sw_full.calls if not c.prefill]
    sparse_steps = [c for c in decode_calls if c.mode == "sparse"]
    assert len(sparse_steps) == 2 * (steps - 1)  # layers 1 and 2, every step after the first
    assert all(c.density == 1.0 for c in sparse_steps)
    layer0 = [c.reason for c in decode_calls if c.layer_idx == 0]
    assert layer0 == ["dense layer (config.dense_layers)"] * (steps - 1)

    sparse_out, sw_sparse = run(
        "sketchwalk",
        SketchWalkConfig(
            block_size=16, top_k_blocks=1, sink=0.0, window=0.0, dense_layers=1, dense_last_rows=1
        ),
    )
    steps_sparse = [c for c in sw_sparse.calls if not c.prefill and c.mode == "sparse"]
    assert len(steps_sparse) == 2 * (steps - 1)
    assert all(c.density < 1.0 for c in steps_sparse)
    assert sparse_out.sequences.shape == (2, 90 + steps)
    assert len(sparse_out.logits) == steps
    assert all(torch.isfinite(x).all() for x in sparse_out.logits)


def test_sketchwalk_decode_without_sparse_prefill_stays_dense():
    model = _model("llama")
    with (
        torch.no_grad(),
        enable_sketchwalk(model, SPARSE, backend="reference", decode="sketchwalk") as sw,
    ):
        model.generate(_ids(batch=1, seq=10), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    decode = [c for c in sw.calls if not c.prefill]
    assert decode and all(c.mode == "dense" for c in decode)
    assert any("no SketchWalk prefill state" in (c.reason or "") for c in decode)
    with pytest.raises(ValueError, match="decode must be one of"):
        enable_sketchwalk(model, SPARSE, decode="always")


def test_flex_backend_with_sparse_decode_is_refused():
    model = _model("llama")
    with pytest.raises(ValueError, match="no decode kernel"):
        enable_sketchwalk(model, SPARSE, backend="flex", decode="sketchwalk")
    sw = enable_sketchwalk(model, SPARSE, selection_backend="torch")  # the earlier name
    assert sw.selection_backend == "reference"
    disable_sketchwalk(model)


def test_left_padding_recognises_only_left_padded_causal_masks():
    from sketchwalk.hf.integration import left_padding

    s = 6
    pos = torch.arange(s)
    causal = pos[None, :] <= pos[:, None]
    pads = torch.tensor([0, 2, 5])
    allowed = causal[None] & (pos[None, None, :] >= pads[:, None, None])
    assert left_padding(allowed[:, None]) == [0, 2, 5]
    # rows of padding queries may hold anything (transformers may unmask them)
    loose = allowed.clone()
    loose[1, :2] = True
    assert left_padding(loose[:, None]) == [0, 2, 5]
    partial = allowed.clone()
    partial[1, 1, 0] = True  # a padding query that sees some keys only: not padding
    assert left_padding(partial[:, None]) is None
    packed = allowed.clone()
    packed[0, 3:, :3] = False  # two documents packed in row 0
    assert left_padding(packed[:, None]) is None
    right = causal[None].clone()
    right[0, :, 4:] = False  # right padding
    assert left_padding(right[:, None]) is None
    empty = allowed.clone()
    empty[2] = False  # a row with no real token
    assert left_padding(empty[:, None]) is None
    assert left_padding(allowed[:, None].expand(3, 2, s, s)) is None  # per-head masks


# Row budgets that do not depend on the sequence length (a fixed number of ranked blocks, sink
# and window in blocks, no dense last rows): a query block's row is the same whether the prompt
# ends there or later, so chunked and one-shot prefill keep the same blocks.
ROWWISE = SketchWalkConfig(
    block_size=16,
    top_k_blocks=1,
    sink_blocks=1,
    window_blocks=1,
    dense_last_rows=0,
    dense_layers=1,
)


def _chunked_logits(model, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    logits, pos = [], 0
    for size in chunks:
        out = model(ids[:, pos : pos + size], past_key_values=cache, use_cache=True)
        logits.append(out.logits)
        pos += size
    assert pos == ids.shape[1]
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("chunks", [[32, 48, 20], [37, 30, 33], [10, 5, 85], [16, 16, 68]])
def test_chunked_prefill_runs_sparse(arch, chunks):
    model = _model(arch)
    ids = _ids(batch=2)
    with torch.no_grad():
        with enable_sketchwalk(model, ROWWISE, backend="auto") as sw:
            one_shot = model(ids).logits
            assert [c.mode for c in sw.calls] == ["dense", "sparse", "sparse"]
            sw.clear()
            got = _chunked_logits(model, ids, chunks)
        dense = model(ids).logits
    summary = sw.summary()
    print(summary)
    # every chunk after the first runs sparse over the whole cache; only layer 0 (a dense layer)
    # runs the inner implementation
    later = [c for c in sw.calls if c.q_len < c.kv_len and c.layer_idx > 0]
    assert len(later) == 2 * (len(chunks) - 1)
    assert all(
        (c.mode, c.backend) == ("sparse", "reference")
        or c.reason == "selection keeps every causal block"
        for c in later
    ), _calls(sw)
    assert [c.mode for c in later[-2:]] == ["sparse", "sparse"]  # the last chunk drops blocks
    # no fallback: the dense calls are the dense layer and a first chunk too short to drop a
    # block, which the one-shot prefill of those tokens would run dense too
    first_short = chunks[0] <= ROWWISE.block_size  # its record says so, every layer
    dense_layer = summary["dense_reasons"]["dense layer (config.dense_layers)"]
    assert dense_layer == len(chunks) - first_short
    assert set(summary["dense_reasons"]) <= {
        "dense layer (config.dense_layers)",
        "selection keeps every causal block",
        "sequence of 10 tokens fits in one block of 16",
        "sequence of 16 tokens fits in one block of 16",
    }
    assert summary["forward_passes"] == 1 + len(chunks)
    err = _report(f"{arch} chunks {chunks} vs one-shot sparse", got, one_shot)
    # Chunk edges on block edges: every block row is the one-shot row. A chunk ending inside a
    # block selects that block's row from its first tokens only; on these inputs the row keeps
    # the one-shot blocks too (test_select_chunk_rows_equal_one_shot_rows covers the rows in
    # general).
    assert err <= 1e-4
    assert _report("dense vs one-shot sparse", dense, one_shot) > 1e-2  # not the dense model


def test_chunked_prefill_dense_when_the_cache_was_not_seen_or_a_kernel_is_named():
    model = _model("llama")
    ids = _ids(batch=1)
    with torch.no_grad():
        # the prefix was cached with SketchWalk off: no pooled queries to continue from
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        model(ids[:, :48], past_key_values=cache, use_cache=True)
        with enable_sketchwalk(model, ROWWISE, backend="reference") as sw:
            model(ids[:, 48:], past_key_values=cache, use_cache=True)
        reasons = [c.reason for c in sw.calls if c.layer_idx > 0]
        assert all("saw 0 of the 48 cached positions" in r for r in reasons), reasons
        with enable_sketchwalk(model, ROWWISE, backend="flex") as sw:
            _chunked_logits(model, ids, [48, 52])
        reasons = [c.reason for c in sw.calls if c.q_len < c.kv_len and c.layer_idx > 0]
        assert reasons == ["chunked prefill: backend 'flex' has no query offset: dense"] * 2


@pytest.mark.parametrize("chunks", [[32, 48, 20], [37, 30, 33], [5, 90, 5], [100]])
@pytest.mark.parametrize("granularity", ["layer", "kv_group", "head"])
def test_select_chunk_rows_equal_one_shot_rows(chunks, granularity):
    """Per layer on fixed q/k: the rows select_chunk returns for the last chunk (whose cache is
    the whole sequence) are the one-shot rows, and so is the sparse attention of the chunk; each
    earlier chunk equals a one-shot prefill of the prefix on its rows."""
    cfg = SketchWalkConfig(
        block_size=16, density=0.3, dense_layers=1, dense_last_rows=1, granularity=granularity
    )
    g = torch.Generator().manual_seed(0)
    layers, t = 3, SEQ
    qs = [torch.randn(2, 4, t, 16, generator=g) for _ in range(layers)]
    ks = [torch.randn(2, 2, t, 16, generator=g) for _ in range(layers)]
    vs = [torch.randn(2, 2, t, 16, generator=g) for _ in range(layers)]
    chunked = SketchWalk(cfg)
    pos = 0
    for size in chunks:
        end = pos + size
        prefix = SketchWalk(cfg)  # one-shot prefill of the tokens so far
        for layer in range(layers):
            q, k, v = qs[layer][:, :, pos:end], ks[layer][:, :, :end], vs[layer][:, :, :end]
            sel = chunked.select_chunk(q, k, layer)
            want = prefix.select(qs[layer][:, :, :end], k, layer)
            nq = sel.block_mask.shape[2]
            assert nq == want.block_mask.shape[2] - pos // cfg.block_size
            assert torch.equal(sel.block_mask, want.block_mask[:, :, -nq:])
            assert torch.equal(sel.kv_indices, want.kv_indices[:, :, -nq:])
            got = sparse_attention(q, k, v, sel)
            full = sparse_attention(qs[layer][:, :, :end], k, v, want)[:, :, pos:]
            assert _report(f"layer {layer} chunk {pos}:{end}", got, full) <= 1e-6
        pos = end


def test_sparse_attention_of_a_query_chunk_names_its_backends():
    cfg = SketchWalkConfig(block_size=16, density=0.3, dense_layers=0)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 30, 16, generator=g)
    k, v = torch.randn(2, 1, 2, 70, 16, generator=g)
    sw = SketchWalk(cfg)
    sw.keep_queries = True
    sw.select(torch.randn(1, 4, 40, 16, generator=g), k[:, :, :40], 0)
    assert sw.kept_length(0) == 40
    sel = sw.select_chunk(q, k, 0)  # 30 queries at the end of 70 keys, from inside block 2
    assert sel.block_mask.shape[2:] == (5 - 2, 5) and sel.seq_len == 70
    out = sparse_attention(q, k, v, sel, backend="auto")
    assert out.shape == q.shape
    with pytest.raises(RuntimeError, match="flex"):  # on CUDA: no query offset; here: no CUDA
        sparse_attention(q, k, v, sel, backend="flex")
    with pytest.raises(RuntimeError, match="bfloat16/float16"):  # float32: not a kernel dtype
        sparse_attention(q, k, v, sel, backend="triton")
    with pytest.raises(ValueError, match="needs the pooled queries of the 40 cached"):
        SketchWalk(cfg).select_chunk(q, k, 0)
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="layer_idx must be an int"):
            SketchWalk(cfg).select_chunk(q, k, bad)
    with pytest.raises(ValueError, match="mask"):  # a selection for other positions
        sparse_attention(q[:, :, :20], k, v, sel)


def test_generate_with_left_padded_prompts_prefills_each_prompt_sparse():
    model = _model("llama")
    lengths = [SEQ - 9, SEQ]
    ids, mask, _ = _left_padded(lengths)
    with torch.no_grad(), enable_sketchwalk(model, SPARSE, backend="reference") as sw:
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=2, min_new_tokens=2, do_sample=False
        )
        prefill = [c for c in sw.calls if c.prefill]
        assert [c.mode for c in prefill] == ["dense", "sparse", "sparse"]
        for row, n in enumerate(lengths):
            alone = model(ids[row : row + 1, SEQ - n :]).logits[0, -1].argmax()
            assert out[row, SEQ] == alone, row


@pytest.mark.parametrize("rule", ["quest", "walk", "quest_pins"])
def test_generate_with_left_padded_prompts_decodes_sparse_like_each_prompt_alone(rule):
    """decode="sketchwalk" on a left-padded batch: every decode step of the sparse layers runs
    sparse (no padding fallback), and each row generates the tokens, with the same step logits,
    that it generates alone, unpadded."""
    model = _model("llama")
    lengths = [SEQ - 9, SEQ, 70]
    ids, mask, _ = _left_padded(lengths)
    cfg = SketchWalkConfig(
        block_size=16, top_k_blocks=2, sink_blocks=1, window_blocks=1, dense_layers=1,
        dense_last_rows=0, decode_rule=rule.removesuffix("_pins"), granularity="kv_group",
        decode_pin_blocks=2 if rule.endswith("_pins") else 0,  # each row's own question pins
    )  # fmt: skip
    steps = 6

    def generate(input_ids, attention_mask=None):
        with enable_sketchwalk(model, cfg, backend="reference", decode="sketchwalk") as sw:
            out = model.generate(
                input_ids,
                attention_mask=attention_mask,
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        return out, sw

    with torch.no_grad():
        batch, sw = generate(ids, mask)
        decode = [c for c in sw.calls if not c.prefill]
        assert sw.summary()["dense_reasons"] == {
            "dense layer (config.dense_layers)": 1 + (steps - 1)
        }, sw.summary()["dense_reasons"]
        sparse_steps = [c for c in decode if c.mode == "sparse"]
        assert len(sparse_steps) == 2 * (steps - 1)
        assert all(0.0 < c.density < 1.0 for c in sparse_steps)
        for row, n in enumerate(lengths):
            alone, _ = generate(ids[row : row + 1, SEQ - n :])
            assert torch.equal(batch.sequences[row, SEQ:], alone.sequences[0, n:]), row
            for a, b in zip(batch.logits, alone.logits, strict=True):
                assert _report(f"row {row} step logits", a[row], b[0]) < 1e-4


def test_decode_left_padding_recognises_only_left_padding():
    from sketchwalk.hf.integration import decode_left_padding

    allowed = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    assert decode_left_padding(allowed) == [0, 2, 1]
    assert decode_left_padding(torch.tensor([[1, 0, 1, 1]], dtype=torch.bool)) is None  # hole
    assert decode_left_padding(torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)) is None  # right
    assert decode_left_padding(torch.zeros(1, 4, dtype=torch.bool)) is None  # empty row


@pytest.mark.gpu
def test_chunked_prefill_runs_the_triton_kernel_on_cuda():
    """On CUDA in bf16 the chunks after the first run the Triton prefill kernel with the query
    offset, and the logits match the one-shot sparse prefill within bf16 noise."""
    model = _model("llama").to("cuda", torch.bfloat16)
    ids = _ids(batch=2).cuda()
    with torch.no_grad(), enable_sketchwalk(model, ROWWISE, backend="auto") as sw:
        one_shot = model(ids).logits.float()
        sw.clear()
        got = _chunked_logits(model, ids, [37, 30, 33]).float()
    later = [c for c in sw.calls if c.q_len < c.kv_len and c.layer_idx > 0]
    assert later and all(c.backend == "triton" for c in later if c.mode == "sparse"), _calls(sw)
    assert any(c.mode == "sparse" for c in later)
    err = _report("chunked (triton) vs one-shot sparse, bf16", got, one_shot)
    assert err <= 5e-2 * one_shot.abs().max().item()


@pytest.mark.parametrize("padded", [False, True])
def test_generate_with_a_static_cache_runs_sparse_like_the_dynamic_cache(padded):
    """cache_implementation="static": every layer gets the whole preallocated buffers with the
    unwritten slots masked. The integration cuts them off, so prefill and decode run sparse
    (no fallback but the dense layer) and generate the dynamic cache's tokens."""
    model = _model("llama")
    cfg = SketchWalkConfig(
        block_size=16, top_k_blocks=2, sink_blocks=1, window_blocks=1, dense_layers=1,
        dense_last_rows=0, decode_rule="quest", granularity="kv_group",
    )  # fmt: skip
    if padded:
        ids, mask, _ = _left_padded([SEQ - 9, SEQ])
    else:
        ids, mask = _ids(batch=2), None
    steps = 5

    def generate(**extra):
        with enable_sketchwalk(model, cfg, backend="reference", decode="sketchwalk") as sw:
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                do_sample=False, output_logits=True, return_dict_in_generate=True, **extra,
            )  # fmt: skip
        return out, sw

    with torch.no_grad():
        dynamic, _ = generate()
        static, sw = generate(cache_implementation="static")
    assert sw.summary()["dense_reasons"] == {"dense layer (config.dense_layers)": steps}, (
        sw.summary()["dense_reasons"]
    )
    assert {c.kv_len for c in sw.calls if not c.prefill} == set(range(SEQ + 1, SEQ + steps))
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.logits, dynamic.logits, strict=True):
        assert _report("static vs dynamic cache step logits", a, b) < 1e-4


def test_generate_under_torch_compile_runs_the_attention_as_it_is(monkeypatch):
    """transformers compiles the decode step of generate() with a static cache (on GPUs; here
    forced on the CPU): the SketchWalk attention runs outside the compiled graph, so the tokens,
    logits and call records equal the uncompiled run's and nothing recompiles per step."""
    from transformers.generation.configuration_utils import CompileConfig

    torch._dynamo.reset()
    model = _model("llama")
    cfg = SketchWalkConfig(
        block_size=16, top_k_blocks=2, sink_blocks=1, window_blocks=1, dense_layers=1,
        dense_last_rows=0, decode_rule="quest", granularity="kv_group",
    )  # fmt: skip
    ids = _ids(batch=2)

    def generate(compiled: bool):
        extra = {}
        if compiled:
            compile_config = CompileConfig(mode="default")
            compile_config._compile_all_devices = True  # transformers compiles on GPUs only
            extra["compile_config"] = compile_config
        with enable_sketchwalk(model, cfg, backend="reference", decode="sketchwalk") as sw:
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                do_sample=False, cache_implementation="static", output_logits=True,
                return_dict_in_generate=True, **extra,
            )  # fmt: skip
        return out, _calls(sw)

    traced = []
    call = SketchWalkAttention.__call__

    def watched(self, *args, **kwargs):
        traced.append(torch.compiler.is_compiling())  # True while dynamo traces this call
        return call(self, *args, **kwargs)

    monkeypatch.setattr(SketchWalkAttention, "__call__", watched)
    counters = torch._dynamo.utils.counters
    counters.clear()
    with torch.no_grad():
        eager, eager_calls = generate(False)
        compiled, compiled_calls = generate(True)
    assert counters["stats"]["unique_graphs"] > 0  # it did compile
    assert torch.equal(compiled.sequences, eager.sequences)
    for a, b in zip(compiled.logits, eager.logits, strict=True):
        assert _report("compiled vs eager step logits", a, b) < 1e-4
    assert compiled_calls == eager_calls  # every step's calls recorded, in order
    assert any(c[2] == "sparse" and not c[3] for c in compiled_calls)  # sparse decode steps
    assert traced and not any(traced)  # never traced: run as Python each time
    limits = [k for k in counters["unimplemented"] if "recompile" in k.lower()]
    assert not limits, limits
