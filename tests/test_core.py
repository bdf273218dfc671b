import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sketchwalk import BlockSelection, SketchWalk, SketchWalkConfig
from sketchwalk.selection.select import forced_counts
from sketchwalk.selection.sketch import block_logits, block_pool
from sketchwalk.selection.walk import block_transition
from sketchwalk.testing import make_qkv


def _layers(n, b=1, hq=8, hkv=2, t=700, d=32):
    return [make_qkv(b, hq, hkv, t, d, seed=s)[:2] for s in range(n)]


def test_dense_layers_return_full_causal_selection():
    sw = SketchWalk(SketchWalkConfig(dense_layers=2))
    ((q, k),) = _layers(1)
    for layer in (0, 1):
        sel = sw.select(q, k, layer)
        assert sel.density == 1.0
        assert torch.equal(sel.block_mask, BlockSelection.full(1, 1, 700, 64).block_mask)
    assert sw.select(q, k, 2).density < 1.0


@pytest.mark.parametrize("granularity, groups", [("layer", 1), ("kv_group", 2), ("head", 8)])
def test_granularity_sets_mask_groups(granularity, groups):
    sw = SketchWalk(SketchWalkConfig(granularity=granularity, dense_layers=0, density=0.3))
    ((q, k),) = _layers(1, b=2)
    sel = sw.select(q, k, 0)
    assert sel.block_mask.shape == (2, groups, 11, 11)


def test_walk_links_consecutive_layers_and_restarts_on_gaps():
    cfg = SketchWalkConfig(dense_layers=0, degree=1, damping=0.9, top_k_blocks=2)
    layers = _layers(3)
    sw = SketchWalk(cfg)
    sw.select(*layers[0], 0)
    r0 = sw.walk_state.clone()
    linked = sw.select(*layers[1], 1).scores
    fresh = SketchWalk(cfg)
    fresh.select(*layers[1], 1)
    alone = fresh.walk_state
    assert not torch.allclose(linked, alone), "walk did not carry the previous layer"
    # one step from R0: 0.1 A + 0.9 R0 A, with A this layer's transition matrix
    q1, k1 = layers[1]
    logits = block_logits(block_pool(q1, 64), block_pool(k1, 64), cfg, 1)
    a = block_transition(logits, 2, cfg)
    torch.testing.assert_close(alone, 0.1 * a + 0.9 * a @ a)
    torch.testing.assert_close(linked, 0.1 * a + 0.9 * r0 @ a)
    # a gap restarts the walk
    sw.select(*layers[2], 5)
    fresh2 = SketchWalk(cfg)
    fresh2.select(*layers[2], 5)
    torch.testing.assert_close(sw.walk_state, fresh2.walk_state)


class _StateOnAnotherDevice:
    """The walk state as a layer on another device left it: reports ``meta`` as its device;
    ``to(device)`` hands back the real values (on the CPU) and records the call."""

    def __init__(self, state: torch.Tensor):
        self.state, self.shape, self.device = state, state.shape, torch.device("meta")
        self.moved_to: list[torch.device] = []

    def to(self, device):
        self.moved_to.append(torch.device(device))
        return self.state


def test_walk_state_follows_the_device_of_the_next_layer(monkeypatch):
    """Layers on different devices (a device map): the carried state moves to q's device;
    on the same device it is passed on as it is, without a copy."""
    import sketchwalk.selection.prefill as prefill

    cfg = SketchWalkConfig(dense_layers=0, degree=1, damping=0.9, top_k_blocks=2)
    layers = _layers(3)
    seen = []
    real_walk_step = prefill.walk_step

    def spy(a, previous, degree, damping, **kwargs):
        seen.append(previous)
        return real_walk_step(a, previous, degree, damping, **kwargs)

    monkeypatch.setattr(prefill, "walk_step", spy)
    reference = SketchWalk(cfg)
    reference.select(*layers[0], 0)
    state0 = reference.walk_state
    want = reference.select(*layers[1], 1)
    assert seen[-1] is state0  # same device: the very tensor, no copy

    moved = SketchWalk(cfg)
    moved.select(*layers[0], 0)
    fake = _StateOnAnotherDevice(moved.walk_state)
    moved._walk_state = fake
    got = moved.select(*layers[1], 1)
    print("moved to", fake.moved_to)
    assert fake.moved_to == [layers[1][0].device]  # moved once, to this layer's q device
    assert seen[-1] is fake.state
    assert torch.equal(got.block_mask, want.block_mask)
    torch.testing.assert_close(got.scores, want.scores)


def test_walk_switch_off_makes_layers_independent():
    cfg = SketchWalkConfig(dense_layers=0, walk=False)
    layers = _layers(2)
    sw = SketchWalk(cfg)
    sw.select(*layers[0], 0)
    a = sw.select(*layers[1], 1).block_mask
    b = SketchWalk(cfg).select(*layers[1], 1).block_mask
    assert torch.equal(a, b)


def test_batch_rows_are_independent():
    cfg = SketchWalkConfig(dense_layers=0, density=0.25, granularity="kv_group")
    q, k, _ = make_qkv(3, 4, 2, 500, 16, seed=2)
    both = SketchWalk(cfg).select(q, k, 0).block_mask
    for i in range(3):
        one = SketchWalk(cfg).select(q[i : i + 1], k[i : i + 1], 0).block_mask
        assert torch.equal(both[i : i + 1], one)


def test_reset_starts_a_new_sequence():
    sw = SketchWalk(SketchWalkConfig(dense_layers=0))
    ((q, k),) = _layers(1)
    first = sw.select(q, k, 0).block_mask
    sw.reset()
    assert torch.equal(sw.select(q, k, 0).block_mask, first)


def test_selection_beats_random_on_structured_inputs():
    from sketchwalk import metrics
    from sketchwalk.testing import random_selection

    q, k, _ = make_qkv(1, 8, 2, 2048, 64, seed=0)
    sel = SketchWalk(SketchWalkConfig(dense_layers=0, density=0.3)).select(q, k, 0)
    rnd = random_selection(1, 1, 2048, 64, sel.density, seed=1)
    ours, theirs = metrics.attention_recall(q, k, sel), metrics.attention_recall(q, k, rnd)
    print(f"recall sketchwalk {ours:.4f} random {theirs:.4f} at density {sel.density:.3f}")
    assert ours > theirs + 0.05


# ---- bad input ---------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    sw = SketchWalk(SketchWalkConfig(dense_layers=0))
    q, k, _ = make_qkv(1, 6, 2, 130, 16)
    with pytest.raises(ValueError, match=r"q must be \(batch, num_heads, seq, head_dim\)"):
        sw.select(q[0], k, 0)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        sw.select(q[:, :5], k, 0)
    with pytest.raises(ValueError, match="head_dim"):
        sw.select(q, k[..., :8], 0)
    with pytest.raises(ValueError, match=r"q is torch\.float32 but k is torch\.float64"):
        sw.select(q, k.double(), 0)
    with pytest.raises(ValueError, match="empty sequence"):
        sw.select(q[:, :, :0], k[:, :, :0], 0)
    with pytest.raises(ValueError, match="float tensor"):
        sw.select(q.long(), k.long(), 0)
    with pytest.raises(ValueError, match="as many keys as queries"):
        sw.select(q[:, :, :64], k, 0)
    with pytest.raises(ValueError, match="layer_idx must be an int"):
        sw.select(q, k, -1)
    bad = q.clone()
    bad[0, 1, 7, 3] = float("nan")
    with pytest.raises(ValueError, match="q of layer 0 contains NaN or Inf"):
        sw.select(bad, k, 0)
    sw.reset()
    bad = k.clone()
    bad[0, 0, 3, 3] = float("inf")
    with pytest.raises(ValueError, match="k of layer 0 contains NaN or Inf"):
        sw.select(q, bad, 0)


def test_layer_order_and_shape_changes_are_refused():
    sw = SketchWalk(SketchWalkConfig(dense_layers=0))
    q, k, _ = make_qkv(1, 2, 2, 200, 16)
    sw.select(q, k, 3)
    with pytest.raises(ValueError, match="increasing order; got layer 3 after layer 3"):
        sw.select(q, k, 3)
    with pytest.raises(ValueError, match="increasing order"):
        sw.select(q, k, 1)
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        sw.select(q[:, :, :100], k[:, :, :100], 4)


# ---- properties over random shapes -------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3),
    hkv=st.integers(1, 3),
    group=st.sampled_from([1, 3, 4, 8]),
    t=st.integers(1, 600),
    block=st.sampled_from([16, 32, 64]),
    granularity=st.sampled_from(["layer", "kv_group", "head"]),
    budget=st.sampled_from(["frac", "topk", "density", "mass", "global", "blocks"]),
    exact=st.booleans(),
    parity=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_selection_properties(
    batch, hkv, group, t, block, granularity, budget, exact, parity, seed
):
    kwargs = {
        "frac": {},
        "topk": {"top_k_blocks": 2},
        "density": {"density": 0.3},
        "mass": {"mass": 0.8},
        "global": {"density": 0.3, "allocation": "global"},
        "blocks": {"top_k_blocks": 1, "sink_blocks": 0, "window_blocks": 2},
    }[budget]
    cfg = SketchWalkConfig(
        block_size=block,
        granularity=granularity,
        dense_layers=1,
        exact=exact,
        parity=parity,
        sketch_dim=16,
        **kwargs,
    )
    sw = SketchWalk(cfg)
    nb = -(-t // block)
    groups = {"layer": 1, "kv_group": hkv, "head": hkv * group}[granularity]
    for layer in range(3):
        q, k, _ = make_qkv(batch, hkv * group, hkv, t, 16, seed=seed + layer)
        with warnings.catch_warnings():  # density below the forced floor warns (test_selection)
            warnings.simplefilter("ignore")
            sel = sw.select(q, k, layer)
        m = sel.block_mask
        assert m.shape == (batch, groups, nb, nb) and m.dtype == torch.bool
        assert not m.triu(1).any()
        assert m.diagonal(dim1=-2, dim2=-1).all()
        sink, _ = forced_counts(nb, cfg)
        for i in range(nb):
            assert m[..., i, : min(sink, i + 1)].all()
        assert torch.equal(sel.kv_num_blocks, m.sum(-1, dtype=torch.int32))
        assert 0 < sel.density <= 1
        if layer == 0:
            assert sel.density == 1.0


def test_transition_backend_choice_on_cpu():
    q, k, _ = make_qkv(1, 4, 2, 300, 16)
    sw = SketchWalk(SketchWalkConfig(dense_layers=0), backend="auto")
    sw.select(q, k, 0)
    assert sw.transition_backend == "reference"
    with pytest.raises(RuntimeError, match="needs CUDA"):
        SketchWalk(SketchWalkConfig(dense_layers=0), backend="triton").select(q, k, 0)
    with pytest.raises(ValueError, match="backend must be one of"):
        SketchWalk(backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["layer", "kv_group"])
@pytest.mark.parametrize("parity, exact", [(False, False), (True, True)])
def test_triton_transition_selects_the_same_blocks_as_torch(granularity, parity, exact):
    cfg = SketchWalkConfig(
        dense_layers=0, density=0.2, granularity=granularity, parity=parity, exact=exact
    )
    layers = [make_qkv(2, 8, 2, 4000, 64, seed=s, device="cuda") for s in range(3)]
    fast, slow = SketchWalk(cfg, backend="triton"), SketchWalk(cfg, backend="reference")
    for i, (q, k, _) in enumerate(layers):
        a, b = fast.select(q, k, i), slow.select(q, k, i)
        assert fast.transition_backend == "triton"
        err = (a.scores - b.scores).abs().max().item()
        differ = (a.block_mask != b.block_mask).float().mean().item()
        print(f"layer {i}: walk max abs diff {err:.2e}, blocks differing {differ:.2e}")
        assert err < 1e-5
        assert differ < 1e-3


def test_cuda_graphs_flag_leaves_the_cpu_path_unchanged():
    cfg = SketchWalkConfig(dense_layers=0, density=0.3)
    on, off = SketchWalk(cfg, cuda_graphs=True), SketchWalk(cfg, cuda_graphs=False)
    for i, (q, k) in enumerate(_layers(3)):
        a, b = on.select(q, k, i), off.select(q, k, i)
        assert torch.equal(a.block_mask, b.block_mask)
        assert torch.equal(a.kv_indices, b.kv_indices)
        assert torch.equal(on.walk_state, off.walk_state)
    assert not on._graphs


def _assert_same_selection(a, b):
    assert torch.equal(a.block_mask, b.block_mask)
    assert torch.equal(a.kv_num_blocks, b.kv_num_blocks)
    assert torch.equal(a.kv_indices, b.kv_indices)
    if a.scores is None or b.scores is None:  # dense layers carry no walk matrix
        assert a.scores is None and b.scores is None
    else:
        assert torch.equal(a.scores, b.scores)


GRAPH_BUDGETS = [
    {"density": 0.2},
    {"mass": 0.9},
    {"density": 0.2, "allocation": "global"},
    {"top_k_blocks": 8, "sink_blocks": 1, "window_blocks": 2, "dense_last_rows": 0},
]


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["layer", "kv_group"])
@pytest.mark.parametrize("parity, exact", [(False, False), (True, True)])
@pytest.mark.parametrize("budget", GRAPH_BUDGETS)
def test_cuda_graph_selection_equals_eager(granularity, parity, exact, budget):
    cfg = SketchWalkConfig(
        dense_layers=1, granularity=granularity, parity=parity, exact=exact, **budget
    )
    for t in (3000, 4100):
        layers = [make_qkv(1, 8, 2, t, 64, seed=10 * t + s, device="cuda")[:2] for s in range(5)]
        graphed, eager = SketchWalk(cfg), SketchWalk(cfg, cuda_graphs=False)
        # Layer 3 is skipped: layer 4 restarts the walk (the no-previous-state graph again).
        feed = [0, 1, 2, 4]
        for _ in range(2):  # second round: every selection replays a captured graph
            graphed.reset()
            eager.reset()
            kept = []
            for i in feed:
                q, k = layers[i]
                a, b = graphed.select(q, k, i), eager.select(q, k, i)
                _assert_same_selection(a, b)
                if i < cfg.dense_layers:  # dense layers leave the walk state alone
                    assert graphed.walk_state is None and eager.walk_state is None
                else:
                    assert torch.equal(graphed.walk_state, eager.walk_state)
                kept.append((a, b))
            # Earlier layers' results are copies, not graph buffers later replays overwrote.
            for a, b in kept:
                _assert_same_selection(a, b)
            assert graphed.transition_backend == "triton"
        assert len(graphed._graphs) == 2  # (no previous state, previous state)
        graphed.clear_graphs()
    # Bad input still raises on the graphed path (the check runs before the replay).
    q, k = layers[1]
    graphed.reset()
    graphed.select(q, k, 1)
    graphed.select(q, k, 2)
    bad = q.clone()
    bad[0, 3, 100, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        graphed.select(bad, k, 3)


@pytest.mark.gpu
def test_cuda_graph_cache_is_bounded(monkeypatch):
    import sketchwalk.selection.prefill as core

    monkeypatch.setattr(core, "MAX_GRAPHS", 1)
    cfg = SketchWalkConfig(dense_layers=0, density=0.2)
    graphed, eager = SketchWalk(cfg), SketchWalk(cfg, cuda_graphs=False)
    for t in (2000, 2600, 2000):
        layers = [make_qkv(1, 8, 2, t, 64, seed=t + s, device="cuda")[:2] for s in range(3)]
        for _ in range(2):
            graphed.reset()
            eager.reset()
            for i, (q, k) in enumerate(layers):
                _assert_same_selection(graphed.select(q, k, i), eager.select(q, k, i))
            assert len(graphed._graphs) == 1


@pytest.mark.gpu
@pytest.mark.parametrize(
    "budget",
    [
        {},
        {"top_k_blocks": 5},
        {"density": 0.25},
        {"density": 0.25, "allocation": "global"},
        {"mass": 0.85},
        {"mass": 1.0},
    ],
)
def test_budgets_on_cuda_match_cpu_without_host_sync(budget):
    """select_blocks on CUDA: the same blocks as on the CPU, and (once the per-(nb, config)
    caches are warm) no synchronising call, which a CUDA-graph capture could not hold."""
    from sketchwalk.selection.select import select_blocks

    cfg = SketchWalkConfig(granularity="kv_group", **budget)
    nb = 150
    scores = torch.rand(2, 4, nb, nb, generator=torch.Generator().manual_seed(0)) ** 4
    cpu = select_blocks(scores, nb * 64, cfg)
    gpu_scores = scores.cuda()
    select_blocks(gpu_scores, nb * 64, cfg)  # warm the caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = select_blocks(gpu_scores, nb * 64, cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    differ = int((gpu.block_mask.cpu() != cpu.block_mask).sum())
    print(f"{budget}: {differ} of {cpu.block_mask.numel()} blocks differ CPU vs CUDA")
    assert differ <= cpu.block_mask.numel() * 1e-4
    if budget.get("allocation") == "global":
        assert gpu.kv_num_blocks.sum().item() == cpu.kv_num_blocks.sum().item()


def test_layers_on_two_devices_turn_off_the_fused_transition_and_graphs():
    """Once SketchWalk has seen layers on two devices (a model split by a device map) the fused
    transition and the selection graphs give way to the reference path (measured right across
    two GPUs, where the fused path was not)."""
    from sketchwalk.selection.prefill import SketchWalk

    sw = SketchWalk(SketchWalkConfig(density=0.3))
    assert sw._single_device(torch.zeros(1))
    assert sw._single_device(torch.zeros(1))
    assert not sw._single_device(torch.zeros(1, device="meta"))
    assert not sw._single_device(torch.zeros(1))  # stays off
    assert not sw._graph_eligible(torch.zeros(1))
