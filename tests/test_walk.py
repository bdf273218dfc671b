import pytest
import torch

from sketchwalk import SketchWalkConfig
from sketchwalk.selection.walk import aggregate_heads, block_transition, sharpen, walk_step


def _stochastic(b, g, n, seed):
    a = torch.rand(b, g, n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a / a.sum(-1, keepdim=True)


@pytest.mark.parametrize("degree", [1, 2, 3, 5])
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.9])
@pytest.mark.parametrize("with_previous", [False, True])
def test_walk_equals_closed_form(degree, beta, with_previous):
    a = _stochastic(2, 3, 6, 0)
    s = _stochastic(2, 3, 6, 1) if with_previous else a
    got = walk_step(a, s if with_previous else None, degree, beta)
    want = beta**degree * s @ torch.linalg.matrix_power(a, degree)
    for j in range(degree):
        want = want + (1 - beta) * beta**j * torch.linalg.matrix_power(a, j + 1)
    torch.testing.assert_close(got, want)
    # rows stay stochastic
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 3, 6, dtype=torch.float64))


def test_previous_layer_weight_is_beta_to_the_degree():
    a = _stochastic(1, 1, 5, 2)
    s1, s2 = _stochastic(1, 1, 5, 3), _stochastic(1, 1, 5, 4)
    diff = walk_step(a, s1, 3, 0.25) - walk_step(a, s2, 3, 0.25)
    torch.testing.assert_close(diff, (s1 - s2) @ torch.linalg.matrix_power(a, 3) / 64)


@pytest.mark.parametrize("how", ["sum", "max"])
@pytest.mark.parametrize("granularity, groups", [("layer", 1), ("kv_group", 2), ("head", 6)])
def test_aggregate_heads(granularity, groups, how):
    probs = torch.softmax(torch.randn(2, 6, 4, 4), -1)
    got = aggregate_heads(probs, num_kv_heads=2, granularity=granularity, how=how)
    assert got.shape == (2, groups, 4, 4)
    for g in range(groups):
        heads = {"layer": range(6), "kv_group": range(3 * g, 3 * g + 3), "head": [g]}[granularity]
        if how == "sum":
            s = sum(probs[:, h] for h in heads)
        else:  # elementwise maximum over the group's heads, written out
            s = probs[:, next(iter(heads))].clone()
            for h in heads:
                s = torch.where(probs[:, h] > s, probs[:, h], s)
        torch.testing.assert_close(got[:, g], s / s.sum(-1, keepdim=True))


def test_max_aggregation_keeps_one_heads_block_that_a_sum_dilutes():
    """One head of a group of four puts 0.6 of its mass on block 3; the other three spread
    theirs over blocks 0-2. Summed, block 3 ranks last; by the maximum it ranks first."""
    probs = torch.full((1, 4, 1, 4), 0.0)
    probs[0, 0, 0] = torch.tensor([0.2, 0.1, 0.1, 0.6])
    for h in (1, 2, 3):
        probs[0, h, 0] = torch.tensor([0.45, 0.3, 0.25, 0.0])
    summed = aggregate_heads(probs, 1, "kv_group", "sum")[0, 0, 0]
    maxed = aggregate_heads(probs, 1, "kv_group", "max")[0, 0, 0]
    assert summed.argmin() == 3 and maxed.argmax() == 3
    with pytest.raises(ValueError, match="head aggregation"):
        aggregate_heads(probs, 1, "kv_group", "mean")


@pytest.mark.parametrize("parity", [False, True])
def test_sharpen_is_renormalised_power(parity):
    a = torch.softmax(torch.randn(1, 1, 5, 7), -1)
    got = sharpen(a, 3.0, parity)
    want = a**3 / (a**3).sum(-1, keepdim=True)
    torch.testing.assert_close(got, want)
    assert sharpen(a, 1.0) is a


def test_sharpen_keeps_order_of_small_entries_and_stays_stochastic():
    a = torch.tensor([[[[1e-3, 1e-4, 1.0 - 1.1e-3], [0.0, 0.5, 0.5]]]])
    got = sharpen(a, 8.0)
    assert torch.isfinite(got).all() and got[0, 0, 0, 0] > got[0, 0, 0, 1] > 0
    torch.testing.assert_close(got.sum(-1), torch.ones(1, 1, 2))
    assert got[0, 0, 1, 0] == 0


def test_causal_sketch_puts_no_mass_on_future_blocks():
    logits = torch.randn(1, 4, 6, 6)
    causal = block_transition(logits, 2, SketchWalkConfig(causal_sketch=True))
    assert (causal.triu(1) == 0).all()
    released = block_transition(logits, 2, SketchWalkConfig(causal_sketch=False))
    assert (released.triu(1) > 0).any()
    # parity ignores causal_sketch: the released softmax is not causal
    parity = block_transition(logits, 2, SketchWalkConfig(causal_sketch=True, parity=True))
    torch.testing.assert_close(parity, released)


@pytest.mark.parametrize("granularity", ["layer", "kv_group", "head"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "parity, exact, how", [(False, False, "sum"), (True, False, "sum"), (True, True, "sum"),
                           (False, False, "max")]
)  # fmt: skip
@pytest.mark.parametrize("exponent", [1.0, 4.0])
def test_transition_from_pooled_equals_the_step_by_step_path(
    granularity, causal, parity, exact, how, exponent
):
    from sketchwalk.selection.sketch import block_logits
    from sketchwalk.selection.walk import transition_from_pooled

    gen = torch.Generator().manual_seed(1)
    qb, kb = torch.randn(2, 6, 7, 32, generator=gen), torch.randn(2, 2, 7, 32, generator=gen)
    cfg = SketchWalkConfig(
        granularity=granularity,
        causal_sketch=causal,
        parity=parity,
        exact=exact,
        sparsity_exponent=exponent,
        sketch_dim=16,
        head_aggregation=how,
    )
    want = block_transition(block_logits(qb, kb, cfg, 3), 2, cfg)
    got = transition_from_pooled(qb, kb, cfg, 3)
    torch.testing.assert_close(got, want)


def _lower_stochastic(b, g, n, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(b, g, n, n, generator=gen, dtype=torch.float64).tril()
    return (a / a.sum(-1, keepdim=True)).to(dtype)


@pytest.mark.parametrize("n", [1, 5, 63, 64, 130, 333])
@pytest.mark.parametrize("groups", [1, 4, 8])
@pytest.mark.parametrize("with_previous", [False, True])
def test_causal_walk_equals_the_dense_walk(n, groups, with_previous):
    """The tiled lower-triangular walk against the dense products: equal in float64 up to
    rounding, within float32 rounding in float32, exact zeros above the diagonal."""
    from sketchwalk.selection.walk import causal_walk_product

    for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 2e-6)):
        a = _lower_stochastic(1, groups, n, n, dtype)
        prev = _lower_stochastic(1, groups, n, n + 1, dtype) if with_previous else None
        want = walk_step(a, prev, 3, 0.25)
        got = walk_step(a, prev, 3, 0.25, causal=True)
        err = (got - want).abs()
        print(f"n={n} groups={groups} {dtype}: max {err.max():.3g} mean {err.mean():.3g}")
        assert err.max() <= tol * want.abs().max()
        assert bool((got.triu(1) == 0).all())
        if n > 8:  # several row tiles, one of them partial
            one = causal_walk_product(a, a, 0.25, tile=8)
            torch.testing.assert_close(one, 0.75 * a + 0.25 * a @ a, rtol=0, atol=tol)


def test_causal_walk_is_not_for_matrices_with_future_mass():
    """The causal walk drops the terms right of each row tile: on a matrix with mass above
    the diagonal it differs from the dense walk (so the flag matters; prefill sets it only
    for causal block softmaxes)."""
    a = _stochastic(1, 1, 200, 5).float()
    diff = (walk_step(a, None, 3, 0.25, causal=True) - walk_step(a, None, 3, 0.25)).abs()
    assert diff.max() > 1e-3


@pytest.mark.parametrize("seq_len", [333, 1000, 2049])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("preset", ["default", "paper"])
def test_prefill_masks_with_the_causal_walk_equal_the_dense_walk(
    monkeypatch, seq_len, hq, hkv, preset
):
    """SketchWalk with the tiled causal walk against the same SketchWalk with every walk
    dense: the walk matrices agree within float32 rounding and the selected masks are the
    same except at near-ties (entries whose scores differ by less than the walk's error)."""
    import sketchwalk.selection.prefill as prefill
    from sketchwalk.testing import make_qkv

    # float32 products on both sides (the bfloat16 ones are tested against their definition)
    cfg = SketchWalkConfig.preset(
        preset, density=0.3, dense_layers=0, block_size=16, walk_dtype="float32"
    )
    layers = [make_qkv(1, hq, hkv, seq_len, 32, seed=s, structured=s % 2 == 0)[:2] for s in (0, 1)]
    fast = prefill.SketchWalk(cfg)
    got = [fast.select(q, k, i) for i, (q, k) in enumerate(layers)]
    real = prefill.walk_step
    monkeypatch.setattr(
        prefill, "walk_step", lambda a, p, d, b, causal=False, **_: real(a, p, d, b, causal=False)
    )
    slow = prefill.SketchWalk(cfg)
    want = [slow.select(q, k, i) for i, (q, k) in enumerate(layers)]
    for g, w in zip(got, want, strict=True):
        err = (g.scores - w.scores).abs()
        print(f"T={seq_len} {hq}/{hkv} {preset}: walk max err {err.max():.3g}")
        assert err.max() <= 1e-6
        differ = g.block_mask != w.block_mask
        if differ.any():  # only near-ties may flip
            scores = w.scores[differ]
            row_scores = w.scores.masked_fill(~w.block_mask, float("inf")).amin(-1, True)
            threshold = row_scores.expand_as(w.scores)[differ]
            gap = (scores - threshold).abs()
            print(f"  {int(differ.sum())} flipped blocks, max gap {gap.max():.3g}")
            assert gap.max() <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("n", [100, 1024, 2050])
def test_causal_walk_on_cuda_matches_dense_and_replays_from_a_graph(n):
    """On CUDA: the tiled causal walk equals the dense one within float32 rounding, eagerly
    and replayed from a captured CUDA graph (static shapes, no host syncs)."""
    a = _lower_stochastic(1, 8, n, 0).cuda()
    prev = _lower_stochastic(1, 8, n, 1).cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    want = walk_step(a, prev, 3, 0.25)
    eager = walk_step(a, prev, 3, 0.25, causal=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        walk_step(a, prev, 3, 0.25, causal=True)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = walk_step(a, prev, 3, 0.25, causal=True)
    graph.replay()
    for name, got in (("eager", eager), ("graph", captured)):
        err = (got - want).abs()
        print(f"n={n} {name}: max {err.max():.3g} mean {err.mean():.3g}")
        assert err.max().item() <= 2e-6
        assert bool((got.triu(1) == 0).all())


def _bf16_walk_reference(a, prev, degree, beta):
    """The bfloat16-operand walk by its definition: each product of operands rounded to
    bfloat16, summed in float64, the state and the damping sum kept in float64."""

    def lo(x):
        return x.to(torch.bfloat16).to(torch.float64)

    a64 = a.to(torch.float64)
    state = a64 if prev is None else prev.to(torch.float64)
    for _ in range(degree):
        state = (1 - beta) * a64 + beta * (lo(state) @ lo(a64))
    return state


@pytest.mark.parametrize("n", [1, 63, 130, 333])
@pytest.mark.parametrize("with_previous", [False, True])
def test_bf16_walk_equals_its_definition_and_stays_near_the_float32_walk(n, with_previous):
    """bf16_products: equal to the bfloat16-operand products summed exactly (float32
    rounding of the sums only), lower-triangular, and within bfloat16's operand rounding of
    the float32 walk; a wrong rounding (none, or of the whole state) is outside that."""
    a = _lower_stochastic(1, 4, n, 2)
    prev = _lower_stochastic(1, 4, n, 3) if with_previous else None
    got = walk_step(a, prev, 3, 0.25, causal=True, bf16_products=True)
    assert got.dtype == torch.float32
    want = _bf16_walk_reference(a, prev, 3, 0.25)
    scale = want.abs().max()
    assert (got - want).abs().max() <= 5e-6 * scale
    assert bool((got.triu(1) == 0).all())
    exact = walk_step(a.double(), None if prev is None else prev.double(), 3, 0.25)
    rel = ((got - exact).abs().max() / scale).item()
    assert rel <= 2**-8  # operand rounding of a few products, float32 sums
    if n > 1:
        assert rel > 1e-7  # it is not the float32 walk


def test_walk_dtype_config():
    assert SketchWalkConfig.preset("default").walk_dtype == "bfloat16"
    assert SketchWalkConfig().walk_dtype == "float32"
    assert SketchWalkConfig.preset("paper").walk_dtype == "float32"
    with pytest.raises(ValueError, match="walk_dtype"):
        SketchWalkConfig(walk_dtype="float16")
    with pytest.raises(ValueError, match="walk_dtype"):
        SketchWalkConfig(walk_dtype="bfloat16", parity=True)
    with pytest.raises(ValueError, match="walk_dtype"):
        SketchWalkConfig.preset("paper", walk_dtype="bfloat16")  # non-causal: dense products
    with pytest.raises(ValueError, match="causal"):
        walk_step(_lower_stochastic(1, 1, 8, 0), None, 3, 0.25, bf16_products=True)


def test_bf16_walk_keeps_the_float32_walks_selection():
    """The default preset's selection with bfloat16 walk products against the same config
    with float32 products, on pooled Q/K drawn like attention with a few strong blocks: the
    kept blocks agree almost everywhere (a changed pick is a near tie)."""
    from sketchwalk.selection.prefill import SketchWalk

    gen = torch.Generator().manual_seed(0)
    t, d = 4096, 64
    q = torch.randn(1, 8, t, d, generator=gen)
    k = torch.randn(1, 2, t, d, generator=gen)
    k[:, :, 1000:1064] += 2.0 * q[:, :2, -64:].mean(2, keepdim=True)  # a block the end needs
    base = SketchWalkConfig.preset("default", density=0.2)
    masks = {}
    for dtype in ("float32", "bfloat16"):
        sw = SketchWalk(SketchWalkConfig(**{**base.to_dict(), "walk_dtype": dtype}))
        masks[dtype] = [sw.select(q, k, layer).block_mask for layer in range(2, 6)]
    for m32, m16 in zip(masks["float32"], masks["bfloat16"], strict=True):
        agree = (m32 == m16).float().mean().item()
        kept = (m32 & m16).sum().item() / m32.sum().item()
        print(f"agreement {agree:.5f}, float32 picks kept {kept:.5f}")
        assert kept >= 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("n", [100, 2050])
def test_bf16_walk_on_cuda_tensor_cores_matches_its_definition_and_graph_replay(n):
    """On CUDA the bfloat16 products run as bmm with a float32 output (tensor cores): equal
    to the definition within float32 summation-order rounding, eagerly and from a graph."""
    a = _lower_stochastic(1, 8, n, 4)
    prev = _lower_stochastic(1, 8, n, 5)
    want = _bf16_walk_reference(a, prev, 3, 0.25)
    ac, pc = a.cuda(), prev.cuda()
    eager = walk_step(ac, pc, 3, 0.25, causal=True, bf16_products=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        walk_step(ac, pc, 3, 0.25, causal=True, bf16_products=True)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = walk_step(ac, pc, 3, 0.25, causal=True, bf16_products=True)
    graph.replay()
    scale = want.abs().max()
    for name, got in (("eager", eager), ("graph", captured)):
        err = (got.cpu().double() - want).abs()
        print(f"n={n} {name}: max {err.max() / scale:.3g} of the largest entry")
        assert err.max() <= 2e-5 * scale
        assert bool((got.triu(1) == 0).all())
