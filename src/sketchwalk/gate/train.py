"""Train SeerAttention gates by self-distillation with the base model frozen.

Per layer the target is the true causal softmax attention max-pooled over every
(block_size x block_size) tile and row-normalised over key blocks; the loss is
KL(target || softmax(gate logits)) on the last 3/4 of the query-block rows (the first quarter
has too few key blocks to teach anything), summed over key blocks and averaged over rows, heads
and samples. Layers are independent given the captured pre-RoPE q/k and post-RoPE Q/K, so the
model runs forward once per text sample (no backpropagation through it): the gate inputs are
pooled right away (pooling has no parameters) and only pooled blocks and targets are kept.
Every layer's gate then trains on the whole training set at each step (full batch, Adam; the
summed loss gives each layer's weights exactly its own gradient).

Usage:
    sketchwalk train-gate                               # embedded smollm2-135m, real text, CPU
    sketchwalk train-gate --model_path /path/to/llama --output_dir gates/llama --device cuda
    sketchwalk train-gate --output_dir gates/smol --resume   # continue from the last checkpoint
    sketchwalk train-gate --cached   # the cached default gate compare uses (trained if missing)

The output folder is a SeerAttention gate checkpoint (config.json + attn_gate_weights.pth)
plus training_info.json (settings, losses, held-out KL before/after, timings), train_state.pt
(optimizer state for --resume) and features.pt (the captured training set, reused on resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sketchwalk.atomic import atomic_write
from sketchwalk.blocks import UsageError
from sketchwalk.gate.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    GateCheckpointError,
    GateConfig,
    GateSet,
    load_gate_checkpoint,
)
from sketchwalk.gate.model import (
    DEFAULT_GATE_TYPE,
    block_position_ids,
    parse_gate_type,
    pool_blocks,
)

DEFAULT_MODEL = "smollm2-135m"
TRAIN_STATE_NAME = "train_state.pt"
FEATURES_NAME = "features.pt"
INFO_NAME = "training_info.json"


@dataclass
class GateTrainConfig:
    """Every setting of a gate training run; written into training_info.json.

    Args:
        model_path: model alias (e.g. ``smollm2-135m``) or folder, as ``sketchwalk collect`` takes.
        output_dir: where the gate checkpoint and training state go.
        seq_lengths: token lengths of the training samples (each length gets ``num_samples``).
        num_samples: training samples per length.
        heldout_samples: held-out samples per length (disjoint text) for the held-out KL.
        steps: optimizer steps (each one a full pass over the captured training set).
        lr: Adam learning rate.
        weight_decay: AdamW weight decay.
        device: where the model runs and the gates train.
        seed: seeds gate init and text choice; the same seed gives the same gate.
        gate_type, block_size, hidden_size: the gate's architecture.
        threshold, nz_ratio, sparsity_method: selection settings stored in config.json.
        checkpoint_every: save the gate and optimizer state every this many steps.
        init_std: std of the gate weights' normal init.
        dtype: model dtype for the capture forward pass.
        text_source, text_file: real text, as ``sketchwalk collect`` takes them.
    """

    model_path: str = DEFAULT_MODEL
    output_dir: str = "gates/smollm2-135m"
    seq_lengths: tuple[int, ...] = (2048,)
    num_samples: int = 8
    heldout_samples: int = 2
    steps: int = 200
    lr: float = 5e-3
    weight_decay: float = 0.0
    device: str = "cpu"
    seed: int = 0
    gate_type: str = DEFAULT_GATE_TYPE
    block_size: int = 64
    hidden_size: int = 128
    sparsity_method: str = "threshold"
    threshold: float = 2e-3
    nz_ratio: float = 1.0
    checkpoint_every: int = 100
    init_std: float = 0.02
    dtype: str = "float32"
    text_source: str = "auto"
    text_file: str | None = None
    # the frozen model split over devices ("auto" or {module: device}; needs accelerate); the
    # gates still train on ``device``. Placement only: not part of any cache key.
    device_map: Any = None

    def __post_init__(self) -> None:
        self.seq_lengths = tuple(int(t) for t in self.seq_lengths)
        try:
            parse_gate_type(self.gate_type)
        except ValueError as exc:
            raise ValueError(f"gate_type: {exc}") from None
        if not self.seq_lengths or min(self.seq_lengths) < 2 * self.block_size:
            raise ValueError(
                f"seq_lengths must be >= 2 * block_size ({2 * self.block_size}), got "
                f"{self.seq_lengths}"
            )
        for name in ("num_samples", "steps", "checkpoint_every", "block_size", "hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.heldout_samples < 0:
            raise ValueError(f"heldout_samples must be >= 0, got {self.heldout_samples}")
        for name, low, low_open in (("lr", 0.0, True), ("weight_decay", 0.0, False)):
            value = getattr(self, name)
            if not math.isfinite(value) or value < low or (low_open and value == low):
                raise ValueError(f"{name} must be {'>' if low_open else '>='} 0, got {value}")
        if not math.isfinite(self.init_std) or self.init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")
        # gate scores are softmax probabilities: a threshold >= 1 keeps no block at all
        if not (math.isfinite(self.threshold) and 0.0 <= self.threshold < 1.0):
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if not (math.isfinite(self.nz_ratio) and 0.0 < self.nz_ratio <= 1.0):
            raise ValueError(f"nz_ratio must be in (0, 1], got {self.nz_ratio}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, ValueError):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")

    def capture_key(self) -> str:
        """Hash of the settings that decide the captured features (model, text, sizes)."""
        keys = (
            "model_path",
            "seq_lengths",
            "num_samples",
            "heldout_samples",
            "seed",
            "gate_type",
            "block_size",
            "dtype",
            "text_source",
            "text_file",
        )
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class LayerBatch:
    """One layer's training tensors for samples of one length.

    Attributes:
        q_pooled: (N, Hq, nb, len(q_pools) * D) pooled pre-RoPE queries.
        k_pooled: (N, Hkv, nb, len(k_pools) * D) pooled pre-RoPE keys.
        block_pos: (N, nb) block position ids.
        target: (N, Hq, nb, nb) row-normalised max-pooled true attention (zero above diagonal).
    """

    q_pooled: torch.Tensor
    k_pooled: torch.Tensor
    block_pos: torch.Tensor
    target: torch.Tensor


@dataclass
class GateFeatures:
    """Captured training data: ``batches[length][layer]`` plus the model's shape facts."""

    batches: dict[int, list[LayerBatch]] = field(default_factory=dict)

    def num_layers(self) -> int:
        return len(next(iter(self.batches.values())))

    def to(self, device: torch.device | str) -> GateFeatures:
        return GateFeatures(
            {
                t: [LayerBatch(*(x.to(device) for x in dataclasses.astuple(b))) for b in layers]
                for t, layers in self.batches.items()
            }
        )

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for t, layers in self.batches.items():
            for i, b in enumerate(layers):
                for name, x in dataclasses.asdict(b).items():
                    out[f"{t}.{i}.{name}"] = x.cpu().contiguous()
        return out

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> GateFeatures:
        parts: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
        for key, x in state.items():
            t, i, name = key.split(".")
            parts.setdefault(int(t), {}).setdefault(int(i), {})[name] = x
        return cls(
            {
                t: [LayerBatch(**layers[i]) for i in sorted(layers)]
                for t, layers in sorted(parts.items())
            }
        )

    @staticmethod
    def merge(samples: Sequence[list[LayerBatch]]) -> list[LayerBatch]:
        """Concatenate per-sample layer lists (same length) along the sample axis."""
        return [
            LayerBatch(
                *(
                    torch.cat(parts, 0)
                    for parts in zip(*(dataclasses.astuple(s[i]) for s in samples), strict=True)
                )
            )
            for i in range(len(samples[0]))
        ]


def distillation_target(
    q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float | None = None
) -> torch.Tensor:
    """SeerAttention's ground truth: max-pooled true attention per tile, row-normalised.

    Args:
        q: (B, Hq, T, D) post-RoPE queries; k: (B, Hkv, T, D) post-RoPE keys.

    Returns:
        float32 (B, Hq, nb, nb), each row sums to 1 over its causal key blocks.
    """
    from sketchwalk.metrics import true_block_attention

    tiles = true_block_attention(q, k, block_size, reduce="max", scale=scale)
    return tiles / tiles.sum(dim=-1, keepdim=True).clamp_min(1e-30)


def layer_features(
    gate_cfg: GateConfig,
    q: torch.Tensor,
    k: torch.Tensor,
    q_pre: torch.Tensor,
    k_pre: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> LayerBatch:
    """Pool one layer's pre-RoPE q/k (B, H, T, D) and build its target from post-RoPE Q/K."""
    q_pools, k_pools = parse_gate_type(gate_cfg.gate_type)
    t = q_pre.shape[2]
    return LayerBatch(
        q_pooled=pool_blocks(q_pre, gate_cfg.block_size, q_pools).cpu(),
        k_pooled=pool_blocks(k_pre, gate_cfg.block_size, k_pools).cpu(),
        block_pos=block_position_ids(
            position_ids, q_pre.shape[0], t, gate_cfg.block_size, q_pre.device
        ).cpu(),
        target=distillation_target(q, k, gate_cfg.block_size, scale).cpu(),
    )


def distillation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) per row, averaged over the last 3/4 of query-block rows.

    Args:
        logits: (N, Hq, nq, nk) masked gate logits.
        target: (N, Hq, nq, nk) row-normalised ground truth.
    """
    start = logits.shape[2] // 4
    logp = torch.log_softmax(logits[:, :, start:].float(), dim=-1)
    tgt = target[:, :, start:].float()
    kl = torch.xlogy(tgt, tgt) - tgt * logp
    return kl.sum(-1).mean()


def gate_losses(gates: GateSet, features: GateFeatures) -> torch.Tensor:
    """Per-layer distillation loss (L,), each averaged over every sample of every length."""
    losses = []
    for layer, gate in enumerate(gates.gates):
        total, weight = 0.0, 0
        for layers in features.batches.values():
            b = layers[layer]
            logits = gate.logits_from_pooled(b.q_pooled, b.k_pooled, b.block_pos)
            n = b.q_pooled.shape[0]
            total = total + distillation_loss(logits, b.target) * n
            weight += n
        losses.append(total / weight)
    return torch.stack(losses)


# --- capture: run the frozen model and keep only what the gates need ---------------------------


def capture_features(
    model: Any,
    input_ids: torch.Tensor,
    gate_cfg: GateConfig,
) -> list[LayerBatch]:
    """Run the model once on ``input_ids`` (1, T) and return every layer's :class:`LayerBatch`.

    Uses :mod:`sketchwalk.hf.capture` (post-RoPE Q/K where attention runs, pre-RoPE q/k after the
    projection and q/k norm).
    """
    from sketchwalk.hf.capture import capture_attention

    # keep the captured tensors where the model runs (no offload): on a GPU the targets'
    # exact attention is computed there; pooling and the targets are float32 either way
    with capture_attention(model, offload=False, pre_rope=True) as cap:
        try:  # only the last position's logits: the LM head over T tokens is wasted work here
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
        except TypeError:
            model(input_ids=input_ids, use_cache=False)
        layers = cap.layers
    missing = [i for i in range(gate_cfg.num_layers) if "Q_pre" not in layers.get(i, {})]
    if missing:
        raise RuntimeError(f"capture recorded no pre-RoPE q/k for layers {missing}")
    out = []
    for layer in range(gate_cfg.num_layers):
        t = layers[layer]
        out.append(layer_features(gate_cfg, t["Q"], t["K"], t["Q_pre"], t["K_pre"]))
        layers[layer] = {}  # free the raw tensors as soon as they are pooled
    return out


def gate_config_for_model(model: Any, cfg: GateTrainConfig, base_model: str) -> GateConfig:
    """A :class:`GateConfig` for a transformers causal LM and the training settings."""
    mc = model.config
    base = mc.to_dict() if hasattr(mc, "to_dict") else dict(vars(mc))
    hq = int(mc.num_attention_heads)
    head_dim = int(getattr(mc, "head_dim", None) or mc.hidden_size // hq)
    rope_theta, rope_scaling = GateConfig.rope_from_model_config(base)
    base = json.loads(json.dumps(base, default=str))
    return GateConfig(
        base_model=base_model,
        num_layers=int(mc.num_hidden_layers),
        num_q_heads=hq,
        num_kv_heads=int(getattr(mc, "num_key_value_heads", None) or hq),
        head_dim=head_dim,
        gate_type=cfg.gate_type,
        block_size=cfg.block_size,
        hidden_size=cfg.hidden_size,
        sparsity_method=cfg.sparsity_method,
        threshold=cfg.threshold,
        nz_ratio=cfg.nz_ratio,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        base_config=base,
    )


def collect_features(
    model: Any,
    samples: Sequence[torch.Tensor],
    gate_cfg: GateConfig,
    desc: str = "capture",
    capture: Callable[[Any, torch.Tensor, GateConfig], list[LayerBatch]] = capture_features,
    progress: bool = True,
) -> GateFeatures:
    """Capture every sample (1, T) and group them by length."""
    from tqdm.auto import tqdm

    by_len: dict[int, list[list[LayerBatch]]] = {}
    for ids in tqdm(samples, desc=desc, unit="sample", disable=not progress):
        with torch.no_grad():
            by_len.setdefault(int(ids.shape[-1]), []).append(capture(model, ids, gate_cfg))
    return GateFeatures({t: GateFeatures.merge(s) for t, s in sorted(by_len.items())})


# --- training ----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a training run produced."""

    output_dir: Path
    gates: GateSet
    heldout_before: list[float]
    heldout_after: list[float]
    train_loss: list[float]
    seconds: dict[str, float]

    @property
    def heldout_mean(self) -> tuple[float, float]:
        def mean(x: list[float]) -> float:
            return sum(x) / max(1, len(x))

        return mean(self.heldout_before), mean(self.heldout_after)


def train_gates(
    gates: GateSet,
    train: GateFeatures,
    heldout: GateFeatures | None,
    cfg: GateTrainConfig,
    output_dir: Path,
    start_step: int = 0,
    optimizer_state: dict | None = None,
    history: list[float] | None = None,
    extra_info: dict[str, Any] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train every layer's gate on ``train`` for ``cfg.steps`` steps (from ``start_step``).

    Saves the checkpoint folder every ``cfg.checkpoint_every`` steps and at the end.
    """
    from tqdm.auto import tqdm

    device = torch.device(cfg.device)
    gates.to(device)
    train = train.to(device)
    heldout = heldout.to(device) if heldout is not None else None
    opt = torch.optim.AdamW(gates.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    history = list(history or [])
    seconds: dict[str, float] = dict((extra_info or {}).get("seconds", {}))
    info_base = dict(extra_info or {})

    def heldout_losses() -> list[float]:
        if heldout is None:
            return []
        with torch.no_grad():
            return [float(x) for x in gate_losses(gates, heldout)]

    before = info_base.get("heldout_kl_before") or heldout_losses()
    t0 = time.perf_counter()
    bar = tqdm(
        range(start_step, cfg.steps),
        desc="train gates",
        unit="step",
        disable=not progress,
        initial=start_step,
        total=cfg.steps,
    )
    for step in bar:
        opt.zero_grad(set_to_none=True)
        per_layer = gate_losses(gates, train)
        per_layer.sum().backward()
        opt.step()
        history.append(float(per_layer.detach().mean()))
        bar.set_postfix(kl=f"{history[-1]:.4f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            _save_run(
                gates,
                opt,
                done,
                history,
                cfg,
                output_dir,
                {**info_base, "heldout_kl_before": before},
            )
    seconds["train"] = seconds.get("train", 0.0) + time.perf_counter() - t0
    after = heldout_losses()
    info = {**info_base, "heldout_kl_before": before, "heldout_kl_after": after, "seconds": seconds}
    _save_run(gates, opt, max(cfg.steps, start_step), history, cfg, output_dir, info)
    return TrainResult(output_dir, gates, before, after, history, seconds)


def _save_run(
    gates: GateSet,
    opt: torch.optim.Optimizer,
    step: int,
    history: list[float],
    cfg: GateTrainConfig,
    output_dir: Path,
    info: dict[str, Any],
) -> None:
    def mean(x: Sequence[float]) -> float | None:
        return sum(x) / len(x) if x else None

    info = {
        **info,
        "step": step,
        "train_config": dataclasses.asdict(cfg),
        "train_kl_last": history[-1] if history else None,
        "heldout_kl_mean_before": mean(info.get("heldout_kl_before") or []),
        "heldout_kl_mean_after": mean(info.get("heldout_kl_after") or []),
    }
    gates.to("cpu")
    gates.save(output_dir, extra_files={INFO_NAME: info})
    state = {
        "step": step,
        "optimizer": opt.state_dict(),
        "history": torch.tensor(history, dtype=torch.float64),
        "gates": {k: v.detach().cpu().clone() for k, v in gates.state_dict().items()},
    }
    atomic_write(output_dir / TRAIN_STATE_NAME, lambda tmp: torch.save(state, tmp))
    gates.to(cfg.device)


# --- text and model glue -----------------------------------------------------------------------


def load_model_and_samples(
    cfg: GateTrainConfig,
) -> tuple[Any, list[torch.Tensor], list[torch.Tensor], str]:
    """Load the frozen model and cut disjoint real-text samples.

    All passages come from one stream of non-overlapping passages of the longest length (each
    cropped to its own length), so no held-out token is ever seen in training.

    Returns:
        (model, train ids, held-out ids, base_model), ids of shape (1, T) on ``cfg.device``;
        ``base_model`` is what config.json records (the alias, or the model folder's path).
    """
    from sketchwalk.hf.models import ALIASES, ModelNotFoundError, load_model
    from sketchwalk.hf.text import make_passages

    try:
        placed = {} if cfg.device_map is None else {"device_map": cfg.device_map}
        model, tokenizer, _resolved = load_model(
            cfg.model_path, device=cfg.device, dtype=getattr(torch, cfg.dtype), **placed
        )
    except (ModelNotFoundError, MemoryError, UsageError):
        raise
    except Exception as exc:  # transformers raises many types for a broken model folder
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        why = next((x for x in lines if "GLOBAL" in x), lines[0] if lines else "")
        raise GateCheckpointError(
            f"--model_path {cfg.model_path}: cannot load the model ({type(exc).__name__}: "
            f"{why[:300]})"
        ) from None
    check_context(cfg, getattr(model.config, "max_position_embeddings", None))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    from sketchwalk.hf.device_map import input_device

    to = input_device(model) if cfg.device_map is not None else cfg.device
    per_len = cfg.num_samples + cfg.heldout_samples
    passages = make_passages(
        tokenizer,
        seq_len=max(cfg.seq_lengths),
        num_samples=per_len * len(cfg.seq_lengths),
        source=cfg.text_source,
        text_file=cfg.text_file,
        seed=cfg.seed,
    )
    train, heldout = [], []
    for i, t in enumerate(cfg.seq_lengths):
        chunk = passages[i * per_len : (i + 1) * per_len]
        ids = [p.input_ids[:t].reshape(1, t).to(to) for p in chunk]
        train += ids[: cfg.num_samples]
        heldout += ids[cfg.num_samples :]
    spec = str(cfg.model_path)
    base = spec.lower() if spec.lower() in ALIASES else str(Path(spec).expanduser().resolve())
    return model, train, heldout, base


def check_context(cfg: GateTrainConfig, max_positions: int | None) -> None:
    """Refuse training lengths beyond the model's positions before any capture, with the cost.

    Raises:
        UsageError: a ``--seq_lengths`` value exceeds ``max_positions``.
    """
    if max_positions is None:
        return
    too_long = [t for t in cfg.seq_lengths if t > max_positions]
    if too_long:
        worst = max(too_long)
        raise UsageError(
            f"--seq_lengths {too_long} exceed the model's {max_positions} positions "
            f"(max_position_embeddings): its attention there is out of distribution, and the "
            f"targets' exact attention would cost {(worst / max_positions) ** 2:.3g}x that of "
            f"{max_positions} tokens per sample; use lengths <= {max_positions}"
        )


def _load_untrusted(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of a file this package wrote; a corrupt, truncated or
    code-carrying file is one GateCheckpointError (nothing in it ever runs)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling, zip and EOF errors
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        why = next((x for x in lines if "GLOBAL" in x), lines[-1] if lines else "")
        raise GateCheckpointError(
            f"{path}: cannot be read as plain tensors ({type(exc).__name__}: {why[:200]}); "
            "delete it to start over"
        ) from None


def run_training(cfg: GateTrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Capture (or reuse the cached capture), then train and save the gates in cfg.output_dir."""
    from sketchwalk.atomic import remove_stale_tmp

    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(output_dir)  # what a killed earlier run was writing
    torch.manual_seed(cfg.seed)
    seconds: dict[str, float] = {}
    feats_path = output_dir / FEATURES_NAME
    cached = _load_features(feats_path, cfg.capture_key()) if resume else None
    if cached is not None:
        train, heldout, gate_cfg = cached
    else:
        t0 = time.perf_counter()
        model, train_ids, heldout_ids, name = load_model_and_samples(cfg)
        gate_cfg = gate_config_for_model(model, cfg, name)
        seconds["load"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        train = collect_features(model, train_ids, gate_cfg, "capture train", progress=progress)
        heldout = (
            collect_features(model, heldout_ids, gate_cfg, "capture held-out", progress=progress)
            if heldout_ids
            else None
        )
        seconds["capture"] = time.perf_counter() - t0
        del model
        _save_features(feats_path, cfg.capture_key(), train, heldout, gate_cfg)
    return train_from_features(
        cfg, gate_cfg, train, heldout, resume=resume, progress=progress, seconds=seconds
    )


def train_from_features(
    cfg: GateTrainConfig,
    gate_cfg: GateConfig,
    train: GateFeatures,
    heldout: GateFeatures | None,
    resume: bool = False,
    progress: bool = True,
    seconds: dict[str, float] | None = None,
) -> TrainResult:
    """Build (or reload, with ``resume``) the gates and train them on captured features."""
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state_path = output_dir / TRAIN_STATE_NAME
    start, opt_state, history, info = 0, None, None, {"seconds": dict(seconds or {})}
    if resume and state_path.is_file():
        gates, start, opt_state, history, info = _resume_state(
            state_path, output_dir, gate_cfg, seconds
        )
    else:
        torch.manual_seed(cfg.seed)
        gates = GateSet(gate_cfg, init_std=cfg.init_std)
    return train_gates(
        gates, train, heldout, cfg, output_dir, start, opt_state, history, info, progress
    )


def _resume_state(
    state_path: Path, output_dir: Path, gate_cfg: GateConfig, seconds: dict[str, float] | None
) -> tuple[GateSet, int, dict, list[float], dict[str, Any]]:
    """The gates, step, optimizer state, loss history and info of a checkpointed run.

    The gate weights come from train_state.pt itself (saved with the optimizer state it belongs
    to), so a run killed between writing the weights file and the state resumes consistently.
    """
    state = _load_untrusted(state_path)
    try:
        start = int(state["step"])
        opt_state = state["optimizer"]
        history = [float(x) for x in state["history"]]
        if "gates" in state:
            gates = GateSet(gate_cfg)
            gates.load_state_dict(state["gates"])
        else:  # written by an earlier version: the weights file beside it
            gates = load_gate_checkpoint(output_dir)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise GateCheckpointError(
            f"{state_path}: not a training state of these gates ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); delete it to start over"
        ) from None
    try:
        old = json.loads((output_dir / INFO_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        old = {}
    old = old if isinstance(old, dict) else {}
    old_seconds = old.get("seconds") if isinstance(old.get("seconds"), dict) else {}
    info = {
        "heldout_kl_before": old.get("heldout_kl_before"),
        "seconds": {**old_seconds, **(seconds or {})},
    }
    return gates, start, opt_state, history, info


def _save_features(
    path: Path, key: str, train: GateFeatures, heldout: GateFeatures | None, gate_cfg: GateConfig
) -> None:
    state = {"train." + k: v for k, v in train.state().items()}
    if heldout is not None:
        state.update({"heldout." + k: v for k, v in heldout.state().items()})
    blob = json.dumps({"key": key, "gate_config": dataclasses.asdict(gate_cfg)}, default=str)
    state["meta"] = torch.frombuffer(bytearray(blob.encode()), dtype=torch.uint8)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _load_features(
    path: Path, key: str
) -> tuple[GateFeatures, GateFeatures | None, GateConfig] | None:
    if not path.is_file():
        return None
    state = _load_untrusted(path)
    try:
        meta = json.loads(bytes(state.pop("meta").tolist()).decode())
        if meta.get("key") != key:
            return None
        train = {k[6:]: v for k, v in state.items() if k.startswith("train.")}
        held = {k[8:]: v for k, v in state.items() if k.startswith("heldout.")}
        return (
            GateFeatures.from_state(train),
            GateFeatures.from_state(held) if held else None,
            GateConfig(**meta["gate_config"]),
        )
    except (AttributeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise GateCheckpointError(
            f"{path}: not a feature cache of train-gate ({type(exc).__name__}); delete it to "
            "capture again"
        ) from None


# --- default gate for the embedded model -------------------------------------------------------


def default_gate_dir(
    model_path: str = DEFAULT_MODEL,
    cache_dir: str | os.PathLike | None = None,
    cfg: GateTrainConfig | None = None,
) -> Path:
    """Cache folder of the default gate: ``<sketchwalk cache>/gates/<model>-<settings hash>``.

    The cache root is :func:`sketchwalk.hf.models.cache_dir` (``$SKETCHWALK_CACHE_DIR``, ...).
    """
    from sketchwalk.hf.models import cache_dir as models_cache_dir

    cfg = cfg or GateTrainConfig(model_path=model_path)
    root = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_path)
    settings = {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in ("output_dir", "device", "device_map")
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return root / "gates" / f"{safe}-{digest}"


def ensure_default_gate(
    model_path: str = DEFAULT_MODEL,
    cache_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    progress: bool = True,
    cfg: GateTrainConfig | None = None,
) -> Path:
    """Folder of a trained gate for ``model_path``; trains it on first use and caches it.

    With ``cfg`` None the default training settings are used (what ``compare`` relies on);
    otherwise ``cfg`` (its output_dir ignored) decides, and the cache key covers every setting.
    The folder is a SeerAttention checkpoint, so ``load_gate_checkpoint`` (and ``collect
    --model_path``) read it. Training goes to a ``.partial`` folder renamed into place at the
    end, so an interrupted first run never leaves a half-trained gate behind (the next call
    resumes it).
    """
    if cfg is None:
        cfg = GateTrainConfig(model_path=model_path, device=device)
    final = default_gate_dir(cfg.model_path, cache_dir, cfg)
    if (final / WEIGHTS_NAME).is_file() and (final / CONFIG_NAME).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = final.with_name(final.name + ".partial")
    run_training(dataclasses.replace(cfg, output_dir=str(work)), resume=True, progress=progress)
    (work / FEATURES_NAME).unlink(missing_ok=True)
    if final.exists():  # another process finished first
        shutil.rmtree(work, ignore_errors=True)
    else:
        os.replace(work, final)
    return final


# --- CLI ---------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``sketchwalk train-gate``; they map one-to-one onto :class:`GateTrainConfig`."""
    from sketchwalk.hf.device_map import add_argument as add_device_map_argument

    d = GateTrainConfig()
    parser.add_argument(
        "--model_path",
        default=d.model_path,
        help="model alias or folder (default: the embedded %(default)s)",
    )
    parser.add_argument(
        "--output_dir", default=None, help="gate checkpoint folder (default: gates/<model name>)"
    )
    parser.add_argument("--seq_lengths", type=int, nargs="+", default=list(d.seq_lengths))
    parser.add_argument(
        "--num_samples", type=int, default=d.num_samples, help="training samples per length"
    )
    parser.add_argument(
        "--heldout_samples", type=int, default=d.heldout_samples, help="held-out samples per length"
    )
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight_decay", type=float, default=d.weight_decay)
    parser.add_argument(
        "--device",
        default=d.device,
        help="where the model runs and the gates train (with --device_map: the gates only)",
    )
    add_device_map_argument(parser)
    parser.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--gate_type", default=d.gate_type)
    parser.add_argument("--block_size", type=int, default=d.block_size)
    parser.add_argument("--hidden_size", type=int, default=d.hidden_size)
    parser.add_argument(
        "--sparsity_method", default=d.sparsity_method, choices=["threshold", "nz_ratio"]
    )
    parser.add_argument("--threshold", type=float, default=d.threshold)
    parser.add_argument("--nz_ratio", type=float, default=d.nz_ratio)
    parser.add_argument("--checkpoint_every", type=int, default=d.checkpoint_every)
    parser.add_argument(
        "--text_source",
        default=d.text_source,
        choices=["auto", "austen", "stdlib", "file"],
        help="real text, as collect takes it (default: %(default)s)",
    )
    parser.add_argument("--text_file", default=None, help="plain text or .jsonl file of text")
    parser.add_argument("--init_std", type=float, default=d.init_std)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from output_dir's train_state.pt and features.pt",
    )
    parser.add_argument(
        "--cached",
        action="store_true",
        help="train into (or reuse) the gate cache that compare reads, keyed by every setting; "
        "--output_dir is ignored",
    )
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")


def config_from_args(args: argparse.Namespace) -> GateTrainConfig:
    """The training settings of parsed flags; a bad value is a `UsageError` naming the flag."""
    names = {f.name for f in dataclasses.fields(GateTrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.output_dir is None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(args.model_path).name)
        values["output_dir"] = str(Path("gates") / safe)
    try:
        return GateTrainConfig(**values)
    except ValueError as exc:  # messages start with the field name, which is the flag's
        raise UsageError(f"--{exc}") from None


def _check_output_dir(path: str) -> None:
    folder = Path(path)
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--output_dir {folder}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UsageError(f"--output_dir {folder}: {parent} is not writable")
            return


def run(args: argparse.Namespace) -> int:
    from sketchwalk.hf.device_map import check_world

    check_world(args.device_map)
    world_size = int(os.environ.get("WORLD_SIZE") or 1)
    if world_size > 1:
        raise UsageError(
            f"train-gate runs in one process; under torchrun with {world_size} processes every "
            "process would train the same gates into the same folder. Run it without torchrun "
            "(a model too big for one GPU: --device_map auto)"
        )
    cfg = config_from_args(args)
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {cfg.device}: CUDA is not available here; use cpu")
    if cfg.text_file is not None and not Path(cfg.text_file).is_file():
        raise UsageError(f"--text_file {cfg.text_file}: file not found")
    if cfg.text_source == "file" and cfg.text_file is None:
        raise UsageError("--text_source file needs --text_file")
    if not args.cached:
        _check_output_dir(cfg.output_dir)
    if args.cached:
        folder = ensure_default_gate(cfg=cfg, progress=not args.no_progress)
        info = json.loads((folder / INFO_NAME).read_text())
        before, after = info["heldout_kl_mean_before"], info["heldout_kl_mean_after"]
        print(f"gate checkpoint (cached): {folder}")
        print(f"held-out KL (mean over layers): {before:.4f} -> {after:.4f}")
        return 0
    result = run_training(cfg, resume=args.resume, progress=not args.no_progress)
    before, after = result.heldout_mean
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    print(f"gate checkpoint: {result.output_dir}")
    print(f"held-out KL (mean over layers): {before:.4f} -> {after:.4f}")
    print(f"time: {secs}")
    return 0
