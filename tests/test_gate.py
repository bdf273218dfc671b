"""SeerAttention gate: references for pooling, per-head maps, block RoPE and the causal mask;
selection rules; the checkpoint format; and a tiny self-distillation run whose held-out KL falls."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sketchwalk.gate.checkpoint import (
    KEY_TEMPLATE,
    GateCheckpointError,
    GateConfig,
    GateSet,
    load_gate_checkpoint,
)
from sketchwalk.gate.model import (
    DEFAULT_GATE_TYPE,
    GATE_TYPES,
    AttnGate,
    HeadLinear,
    apply_block_rope,
    parse_gate_type,
    pool_blocks,
    rope_inv_freq,
    select_blocks_from_scores,
)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _report(name: str, got: torch.Tensor, ref: torch.Tensor) -> float:
    err = (got.detach() - ref.detach()).abs()
    print(f"{name}: max err {err.max().item():.3e}, mean err {err.mean().item():.3e}")
    return float(err.max())


# --- pooling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [1, 50, 64, 150, 256])
@pytest.mark.parametrize("pools", [("avg",), ("max", "min", "avg"), ("min",), ("max", "avg")])
def test_pooling_matches_torch_ceil_mode_pooling(seq_len: int, pools: tuple[str, ...]) -> None:
    x = _randn(2, 3, seq_len, 8, seed=seq_len)
    xt = x.transpose(1, 2)  # (B, T, H, D), the layout SeerAttention pools
    if seq_len >= 64:
        kw = dict(kernel_size=[64, 1, 1], stride=[64, 1, 1], ceil_mode=True)
        ref_by = {
            "max": F.max_pool3d(xt, **kw),
            "min": -F.max_pool3d(-xt, **kw),
            "avg": F.avg_pool3d(xt, **kw),
        }
    else:  # torch's pooling refuses inputs shorter than the kernel: one partial block
        ref_by = {
            "max": xt.amax(1, keepdim=True),
            "min": xt.amin(1, keepdim=True),
            "avg": xt.mean(1, keepdim=True),
        }
    ref = torch.cat([ref_by[p] for p in pools], dim=-1).transpose(1, 2)
    got = pool_blocks(x, 64, pools)
    assert got.shape == (2, 3, math.ceil(seq_len / 64), 8 * len(pools))
    assert _report("pool", got, ref) < 1e-5


def test_partial_tail_block_averages_its_true_token_count() -> None:
    x = torch.ones(1, 1, 70, 4)
    x[..., 64:, :] = 3.0
    pooled = pool_blocks(x, 64, ("avg",))
    assert torch.allclose(pooled[0, 0, 1], torch.full((4,), 3.0))


def test_every_pooling_combination_is_a_gate_type() -> None:
    assert len(GATE_TYPES) == 49 and DEFAULT_GATE_TYPE in GATE_TYPES
    assert parse_gate_type("Qavg_Kmaxminavg") == (("avg",), ("max", "min", "avg"))
    with pytest.raises(ValueError, match="unknown gate type"):
        parse_gate_type("Qavg_Kavgmax")  # wrong order
    with pytest.raises(ValueError):
        parse_gate_type("Qsum_Kmax")


# --- per-head maps, RoPE, mask ---------------------------------------------------------------


@pytest.mark.parametrize("heads,in_heads", [(4, 4), (8, 2), (6, 1)])
def test_head_linear_is_one_matrix_per_head(heads: int, in_heads: int) -> None:
    lin = HeadLinear(heads, 12, 5, init_std=1.0)
    x = _randn(2, in_heads, 7, 12)
    got = lin(x)
    group = heads // in_heads
    ref = torch.stack([x[:, h // group] @ lin.weight[h] for h in range(heads)], dim=1)
    assert got.shape == (2, heads, 7, 5)
    assert _report("head linear", got, ref) < 1e-5


def test_block_rope_rotates_pairs_by_position_times_frequency() -> None:
    dim = 8
    inv_freq = rope_inv_freq(dim, rope_theta=100.0)
    x = _randn(1, 1, 3, dim)
    pos = torch.tensor([[0, 64, 128]])
    got = apply_block_rope(x, pos, inv_freq)
    ref = torch.empty_like(x)
    half = dim // 2
    for n in range(3):
        for i in range(half):
            a = pos[0, n].item() * inv_freq[i].item()
            u, v = x[0, 0, n, i].item(), x[0, 0, n, i + half].item()
            ref[0, 0, n, i] = u * math.cos(a) - v * math.sin(a)
            ref[0, 0, n, i + half] = v * math.cos(a) + u * math.sin(a)
    assert _report("rope", got, ref) < 1e-5
    # scores depend only on relative block positions
    q, k = _randn(1, 1, 1, dim, seed=1), _randn(1, 1, 1, dim, seed=2)
    s1 = apply_block_rope(q, torch.tensor([[192]]), inv_freq) @ apply_block_rope(
        k, torch.tensor([[64]]), inv_freq
    ).transpose(-1, -2)
    s2 = apply_block_rope(q, torch.tensor([[640]]), inv_freq) @ apply_block_rope(
        k, torch.tensor([[512]]), inv_freq
    ).transpose(-1, -2)
    assert torch.allclose(s1, s2, atol=1e-4)


def test_llama3_rope_scaling_matches_transformers() -> None:
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import LlamaConfig

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = LlamaConfig(
        hidden_size=512,
        num_attention_heads=4,
        head_dim=128,
        rope_parameters={"rope_theta": 500000.0, **scaling},
    )
    ref, _ = rope_utils.ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    got = rope_inv_freq(128, 500000.0, scaling)
    assert _report("llama3 inv_freq", got, ref.float()) < 1e-6 * ref.abs().max().item() + 1e-9


def _reference_gate_logits(
    gate: AttnGate, q_pre: torch.Tensor, k_pre: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """SeerAttention's gate written out per head and per block pair, with plain loops."""
    b, hq, t, _ = q_pre.shape
    hkv = k_pre.shape[1]
    bs, hidden = gate.block_size, gate.hidden_size
    nb = math.ceil(t / bs)
    ops = {"avg": lambda z: z.mean(0), "max": lambda z: z.amax(0), "min": lambda z: z.amin(0)}
    out = torch.empty(b, hq, nb, nb)
    inv = gate.inv_freq
    for bi in range(b):
        pos = position_ids[bi, ::bs].float()

        def rope(v: torch.Tensor, p: float) -> torch.Tensor:
            ang = p * inv
            c, s = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
            rot = torch.cat([-v[hidden // 2 :], v[: hidden // 2]])
            return v * c + rot * s

        for h in range(hq):
            kv = h // (hq // hkv)
            for i in range(nb):
                qb = torch.cat([ops[p](q_pre[bi, h, i * bs : (i + 1) * bs]) for p in gate.q_pools])
                qh = qb @ gate.mask_linear_q.weight[h] if gate.mask_linear_q is not None else qb
                qh = rope(qh, pos[i].item())
                for j in range(nb):
                    if j > i:
                        out[bi, h, i, j] = float("-inf")
                        continue
                    kb = torch.cat(
                        [ops[p](k_pre[bi, kv, j * bs : (j + 1) * bs]) for p in gate.k_pools]
                    )
                    w = gate.mask_linear_k.weight
                    kh = kb @ (w[kv] if w.shape[0] == hkv else w[h])
                    kh = rope(kh, pos[j].item())
                    out[bi, h, i, j] = qh @ kh / math.sqrt(hidden)
    return torch.softmax(out, dim=-1)


@pytest.mark.parametrize(
    "gate_type,hq,hkv,d,hidden,t",
    [
        ("Qavg_Kmaxminavg", 4, 2, 8, 16, 150),
        ("Qmaxavg_Kmin", 3, 1, 8, 16, 64),
        ("Qavg_Kavg", 2, 2, 16, 16, 40),  # q map omitted, k map has Hq heads
        ("Qmax_Kmaxmin", 8, 1, 8, 8, 200),  # q map omitted with GQA group 8
    ],
)
def test_gate_matches_loop_reference(gate_type, hq, hkv, d, hidden, t) -> None:
    torch.manual_seed(0)
    gate = AttnGate(
        hq,
        hkv,
        d,
        block_size=32,
        hidden_size=hidden,
        gate_type=gate_type,
        rope_theta=1000.0,
        init_std=0.5,
    )
    q_pre, k_pre = _randn(2, hq, t, d, seed=3), _randn(2, hkv, t, d, seed=4)
    pos = torch.stack([torch.arange(t), torch.arange(t) + 17])  # batch rows at other offsets
    got = gate.block_scores(q_pre, k_pre, pos)
    ref = _reference_gate_logits(gate, q_pre, k_pre, pos)
    assert _report(gate_type, got, ref) < 1e-5
    nb = math.ceil(t / 32)
    future = ~torch.ones(nb, nb, dtype=torch.bool).tril()
    assert (got[..., future] == 0).all()
    assert torch.allclose(got.sum(-1), torch.ones(2, hq, nb), atol=1e-5)


def test_q_map_omission_rules() -> None:
    assert AttnGate(4, 2, 128, hidden_size=128, gate_type="Qavg_Kmaxminavg").mask_linear_q is None
    gate = AttnGate(4, 2, 128, hidden_size=128, gate_type="Qavg_Kmaxminavg")
    assert tuple(gate.mask_linear_k.weight.shape) == (4, 384, 128)  # Hq heads when q map is gone
    forced = AttnGate(4, 2, 128, hidden_size=128, force_double=True)
    assert tuple(forced.mask_linear_q.weight.shape) == (4, 128, 128)
    assert tuple(forced.mask_linear_k.weight.shape) == (2, 384, 128)
    default = AttnGate(9, 3, 64)
    assert tuple(default.mask_linear_q.weight.shape) == (9, 64, 128)
    assert tuple(default.mask_linear_k.weight.shape) == (3, 192, 128)


def test_gate_rejects_bad_shapes() -> None:
    gate = AttnGate(4, 2, 8, hidden_size=16)
    with pytest.raises(ValueError, match="k_pre must be"):
        gate(torch.zeros(1, 4, 64, 8), torch.zeros(1, 4, 64, 8))
    with pytest.raises(ValueError, match="share batch and seq"):
        gate(torch.zeros(1, 4, 64, 8), torch.zeros(1, 2, 32, 8))


# --- selection --------------------------------------------------------------------------------


def test_threshold_selection_keeps_scores_above_t_and_last_rows_dense() -> None:
    scores = torch.softmax(_randn(1, 2, 6, 6) * 3, -1) * torch.ones(6, 6).tril()
    mask = select_blocks_from_scores(scores, threshold=0.2, last_block_dense=True)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert (mask[..., :4, :] == ((scores > 0.2) & causal)[..., :4, :]).all()
    assert (mask[..., 4:, :] == causal[4:]).all()
    assert not (mask & ~causal).any()
    no_dense = select_blocks_from_scores(scores, threshold=0.2, last_block_dense=False)
    assert (no_dense == ((scores > 0.2) & causal)).all()


def test_nz_ratio_selection_keeps_topk_per_row() -> None:
    nb = 16
    scores = torch.rand(1, 1, nb, nb, generator=torch.Generator().manual_seed(0))
    mask = select_blocks_from_scores(scores, nz_ratio=0.5, last_block_dense=False)
    topk = int((1 - math.sqrt(0.5)) * nb)  # SeerAttention's per-row count for nz_ratio 0.5
    for i in range(nb):
        expect = set(scores[0, 0, i].topk(topk).indices.tolist()) & set(range(i + 1))
        assert set(mask[0, 0, i].nonzero().flatten().tolist()) == expect


def test_gateset_select_uses_checkpoint_method() -> None:
    cfg = GateConfig("m", 1, 2, 1, 8, hidden_size=8, sparsity_method="nz_ratio", nz_ratio=0.3)
    gates = GateSet(cfg)
    s = gates.block_scores(0, _randn(1, 2, 256, 8), _randn(1, 1, 256, 8))
    assert (gates.select(s) == select_blocks_from_scores(s, nz_ratio=0.3)).all()
    assert (gates.select(s, threshold=0.1) == select_blocks_from_scores(s, threshold=0.1)).all()
    with pytest.raises(ValueError):
        gates.select(s, threshold=0.1, nz_ratio=0.2)


# --- checkpoint format -------------------------------------------------------------------------


def _small_set(**kw) -> GateSet:
    torch.manual_seed(0)
    cfg = GateConfig(
        base_model="org/base",
        num_layers=3,
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=8,
        hidden_size=16,
        threshold=5e-3,
        rope_theta=5000.0,
        base_config={"model_type": "llama", "hidden_size": 32},
        **kw,
    )
    return GateSet(cfg, init_std=0.3)


def test_checkpoint_round_trip_in_seerattention_format(tmp_path) -> None:
    gates = _small_set()
    gates.save(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["base_model"] == "org/base" and cfg["model_type"] == "llama"
    assert cfg["seerattn_gate_type"] == "Qavg_Kmaxminavg"
    assert cfg["rope_theta"] == 5000.0  # the 4.x field SeerAttention's config class reads
    for key in (
        "seerattn_sparsity_method",
        "seerattn_threshold",
        "seerattn_nz_ratio",
        "seerattn_gate_block_size",
        "seerattn_gate_hidden_size",
        "seerattn_last_block_dense",
        "seerattn_gate_force_double",
    ):
        assert key in cfg, key
    state = torch.load(tmp_path / "ckpt" / "attn_gate_weights.pth", weights_only=True)
    assert sorted(state) == sorted(
        f"model.layers.{i}.self_attn.attn_gate.{n}.weight"
        for i in range(3)
        for n in ("mask_linear_q", "mask_linear_k")
    )
    assert tuple(state["model.layers.1.self_attn.attn_gate.mask_linear_k.weight"].shape) == (
        2,
        24,
        16,
    )
    loaded = load_gate_checkpoint(tmp_path / "ckpt")
    assert loaded.config.threshold == 5e-3 and loaded.config.rope_theta == 5000.0
    q, k = _randn(1, 4, 300, 8, seed=5), _randn(1, 2, 300, 8, seed=6)
    for layer in range(3):
        a = gates.block_scores(layer, q, k)
        b = loaded.block_scores(layer, q, k)
        assert _report(f"round trip layer {layer}", a, b) == 0.0


def test_loads_a_published_style_checkpoint(tmp_path) -> None:
    """A folder as SeerAttention publishes it: bf16 weights, Llama-3.1 config with llama3 RoPE."""
    folder = tmp_path / "pub"
    folder.mkdir()
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "num_hidden_layers": 2,
                "num_attention_heads": 8,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "rope_theta": 500000.0,
                "rope_scaling": scaling,
                "base_model": "meta-llama/x",
                "seerattn_sparsity_method": "threshold",
                "seerattn_threshold": 5e-4,
                "seerattn_gate_type": "Qavg_Kmaxminavg",
                "seerattn_gate_block_size": 64,
                "seerattn_gate_hidden_size": 32,
                "seerattn_last_block_dense": True,
                "seerattn_gate_force_double": False,
                "seerattn_nz_ratio": 1.0,
            }
        )
    )
    state = {}
    for i in range(2):
        state[KEY_TEMPLATE.format(layer=i, name="mask_linear_q")] = _randn(8, 16, 32).bfloat16()
        state[KEY_TEMPLATE.format(layer=i, name="mask_linear_k")] = _randn(2, 48, 32).bfloat16()
    torch.save(state, folder / "attn_gate_weights.pth")
    gates = load_gate_checkpoint(folder)
    assert gates.config.num_q_heads == 8 and gates.config.num_kv_heads == 2
    assert gates.config.rope_scaling["rope_type"] == "llama3"
    assert torch.allclose(gates.gates[0].inv_freq, rope_inv_freq(32, 500000.0, scaling))
    s = gates.block_scores(1, _randn(1, 8, 200, 16), _randn(1, 2, 200, 16))
    assert s.shape == (1, 8, 4, 4) and torch.isfinite(s).all()


@pytest.mark.parametrize(
    "breakage,match",
    [
        ("no_weights", "missing attn_gate_weights.pth"),
        ("bad_json", "not valid JSON"),
        ("bad_key", "unexpected parameter"),
        ("bad_shape", "has shape"),
        ("missing_q", "needs mask_linear_q"),
        ("bad_type", "unknown gate type"),
        ("missing_layer", "no mask_linear_k weight for layers"),
        ("pickle", "weights-only"),
    ],
)
def test_malformed_checkpoints_raise_clear_errors(tmp_path, breakage: str, match: str) -> None:
    folder = tmp_path / "ckpt"
    _small_set().save(folder)
    w = folder / "attn_gate_weights.pth"
    state = torch.load(w, weights_only=True)
    if breakage == "no_weights":
        w.unlink()
    elif breakage == "bad_json":
        (folder / "config.json").write_text("{not json")
    elif breakage == "bad_type":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["seerattn_gate_type"] = "Qfoo_Kbar"
        (folder / "config.json").write_text(json.dumps(cfg))
    else:
        if breakage == "bad_key":
            state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(1)
        elif breakage == "bad_shape":
            state[KEY_TEMPLATE.format(layer=2, name="mask_linear_q")] = torch.zeros(4, 9, 16)
        elif breakage == "missing_q":
            for i in range(3):
                del state[KEY_TEMPLATE.format(layer=i, name="mask_linear_q")]
        elif breakage == "missing_layer":
            del state[KEY_TEMPLATE.format(layer=1, name="mask_linear_k")]
        elif breakage == "pickle":
            state = {"x": object()}
        torch.save(state, w)
    with pytest.raises(GateCheckpointError, match=match):
        load_gate_checkpoint(folder)


# --- training on a tiny config-built model ---------------------------------------------------


def _tiny_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        initializer_range=0.1,
        attention_bias=True,
    )
    cfg._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    # A shared pre-RoPE direction in q and k gives a relative-position (local) attention pattern
    # that a gate can learn and that generalises to unseen tokens, as real models' does.
    with torch.no_grad():
        for layer in model.model.layers:
            v = torch.randn(2, 16)
            layer.self_attn.k_proj.bias.copy_((3.0 * v).flatten())
            layer.self_attn.q_proj.bias.copy_((3.0 * v.repeat_interleave(2, 0)).flatten())
    return model


def test_tiny_gate_training_lowers_heldout_kl_and_resumes(tmp_path) -> None:
    from sketchwalk.gate.train import (
        GateTrainConfig,
        collect_features,
        gate_config_for_model,
        train_from_features,
    )

    model = _tiny_model()
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 128, (1, 256), generator=gen) for _ in range(16)]
    cfg = GateTrainConfig(
        model_path="tiny",
        output_dir=str(tmp_path / "a"),
        seq_lengths=(256,),
        num_samples=12,
        heldout_samples=4,
        steps=40,
        lr=1e-2,
        block_size=16,
        hidden_size=32,
        checkpoint_every=20,
    )
    gate_cfg = gate_config_for_model(model, cfg, "tiny")
    train = collect_features(model, ids[:12], gate_cfg)
    heldout = collect_features(model, ids[12:], gate_cfg)
    b0 = train.batches[256][0]
    assert torch.allclose(b0.target.sum(-1), torch.ones_like(b0.target.sum(-1)), atol=1e-5)

    result = train_from_features(cfg, gate_cfg, train, heldout, progress=False)
    before, after = result.heldout_mean
    print(f"held-out KL per layer before {result.heldout_before} after {result.heldout_after}")
    assert after < 0.7 * before
    assert all(a < b for a, b in zip(result.heldout_after, result.heldout_before, strict=True))

    # the written folder is a SeerAttention checkpoint that scores exactly like the trained gates
    loaded = load_gate_checkpoint(tmp_path / "a")
    q, k = torch.randn(1, 4, 100, 16), torch.randn(1, 2, 100, 16)
    assert torch.equal(loaded.block_scores(1, q, k), result.gates.block_scores(1, q, k))

    # stopping at step 20 and resuming to 40 gives the same gates as one run of 40 steps
    half = GateTrainConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "b"), "steps": 20})
    train_from_features(half, gate_cfg, train, heldout, progress=False)
    full = GateTrainConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "b")})
    resumed = train_from_features(full, gate_cfg, train, heldout, resume=True, progress=False)
    assert len(resumed.train_loss) == 40
    diff = max(
        (resumed.gates.gates[i].mask_linear_k.weight - result.gates.gates[i].mask_linear_k.weight)
        .abs()
        .max()
        .item()
        for i in range(2)
    )
    print(f"resume vs straight run: max weight difference {diff:.3e}")
    assert diff < 1e-5


def test_train_gate_cli_flags_map_onto_the_config(tmp_path) -> None:
    from sketchwalk.cli import build_parser
    from sketchwalk.gate.train import GateTrainConfig, config_from_args, default_gate_dir

    args = build_parser().parse_args(
        [
            "train-gate",
            "--output_dir",
            str(tmp_path),
            "--seq_lengths",
            "512",
            "1024",
            "--steps",
            "7",
            "--lr",
            "0.01",
            "--seed",
            "3",
            "--gate_type",
            "Qavg_Kmax",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.seq_lengths == (512, 1024) and cfg.steps == 7 and cfg.seed == 3
    assert cfg.gate_type == "Qavg_Kmax" and cfg.output_dir == str(tmp_path)
    assert cfg.model_path == "smollm2-135m"
    with pytest.raises(ValueError, match="seq_lengths"):
        GateTrainConfig(seq_lengths=(64,))
    # the default gate's cache folder depends on the training settings, not on the device
    a = default_gate_dir("smollm2-135m", tmp_path, GateTrainConfig(device="cpu"))
    b = default_gate_dir("smollm2-135m", tmp_path, GateTrainConfig(device="cuda"))
    c = default_gate_dir("smollm2-135m", tmp_path, GateTrainConfig(seed=1))
    assert a == b != c and a.parent == tmp_path / "gates"
