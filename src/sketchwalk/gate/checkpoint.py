"""SeerAttention gate checkpoints: `GateConfig`, the per-layer `GateSet`, load and save.

Checkpoints are folders in SeerAttention's format: ``config.json`` (the base model's config fields,
``base_model`` and the ``seerattn_*`` fields) and ``attn_gate_weights.pth``, a state dict with keys
``model.layers.<i>.self_attn.attn_gate.{mask_linear_q,mask_linear_k}.weight``, read with
``torch.load(weights_only=True)`` (no code in a checkpoint ever runs). Files are written
atomically.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sketchwalk.atomic import atomic_write, write_text
from sketchwalk.gate.model import (
    DEFAULT_GATE_TYPE,
    AttnGate,
    parse_gate_type,
    select_blocks_from_scores,
)

WEIGHTS_NAME = "attn_gate_weights.pth"
CONFIG_NAME = "config.json"
KEY_TEMPLATE = "model.layers.{layer}.self_attn.attn_gate.{name}.weight"
_KEY_RE = re.compile(
    r"^model\.layers\.(\d+)\.self_attn\.attn_gate\.(mask_linear_q|mask_linear_k)\.weight$"
)


class GateCheckpointError(ValueError):
    """A gate checkpoint folder is missing, malformed or inconsistent (the message says which)."""


@dataclass
class GateConfig:
    """SeerAttention gate settings as stored in a checkpoint's config.json (``seerattn_*`` fields).

    ``base_config`` holds the base model's own config fields (model_type, sizes, RoPE), written
    back verbatim so SeerAttention's code can rebuild the model around the gates.
    """

    base_model: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    gate_type: str = DEFAULT_GATE_TYPE
    block_size: int = 64
    hidden_size: int = 128
    sparsity_method: str = "threshold"
    threshold: float = 2e-3
    nz_ratio: float = 1.0
    last_block_dense: bool = True
    force_double: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    base_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parse_gate_type(self.gate_type)
        if self.sparsity_method not in ("threshold", "nz_ratio"):
            raise ValueError(
                f"sparsity_method must be 'threshold' or 'nz_ratio', got {self.sparsity_method!r}"
            )
        for name in (
            "num_layers",
            "num_q_heads",
            "num_kv_heads",
            "head_dim",
            "block_size",
            "hidden_size",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError("num_q_heads must be a multiple of num_kv_heads")
        if not 0.0 <= self.nz_ratio <= 1.0:
            raise ValueError(f"nz_ratio must be in [0, 1], got {self.nz_ratio}")

    def to_json_dict(self) -> dict[str, Any]:
        """config.json content: base model fields, then ``base_model`` and ``seerattn_*``."""
        out = dict(self.base_config)
        out.setdefault("num_hidden_layers", self.num_layers)
        out.setdefault("num_attention_heads", self.num_q_heads)
        out.setdefault("num_key_value_heads", self.num_kv_heads)
        out.setdefault("head_dim", self.head_dim)
        # transformers 5 writes rope_parameters; SeerAttention's config class reads the 4.x
        # rope_theta / rope_scaling fields, so both forms are written
        out.setdefault("rope_theta", self.rope_theta)
        out.setdefault("rope_scaling", self.rope_scaling)
        out.update(
            base_model=self.base_model,
            seerattn_sparsity_method=self.sparsity_method,
            seerattn_threshold=self.threshold,
            seerattn_nz_ratio=self.nz_ratio,
            seerattn_gate_type=self.gate_type,
            seerattn_gate_block_size=self.block_size,
            seerattn_gate_hidden_size=self.hidden_size,
            seerattn_last_block_dense=self.last_block_dense,
            seerattn_gate_force_double=self.force_double,
        )
        return out

    @staticmethod
    def rope_from_model_config(cfg: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
        """(rope_theta, rope_scaling) from a model config dict in transformers 4.x or 5.x form."""
        params = cfg.get("rope_parameters")
        if isinstance(params, Mapping) and params:
            theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
            kind = params.get("rope_type", params.get("type", "default"))
            return theta, (None if kind == "default" else dict(params))
        scaling = cfg.get("rope_scaling")
        return float(cfg.get("rope_theta", 10000.0) or 10000.0), (
            dict(scaling) if scaling else None
        )


class GateSet(nn.Module):
    """Every layer's :class:`AttnGate` plus the checkpoint's settings.

    ``gates[i]`` is layer i's gate. Main entry points: :meth:`block_scores`, :meth:`select`,
    :meth:`save`; :func:`load_gate_checkpoint` reads a folder back.
    """

    def __init__(self, config: GateConfig, init_std: float = 0.02):
        super().__init__()
        self.config = config
        self.gates = nn.ModuleList(
            AttnGate(
                config.num_q_heads,
                config.num_kv_heads,
                config.head_dim,
                block_size=config.block_size,
                hidden_size=config.hidden_size,
                gate_type=config.gate_type,
                force_double=config.force_double,
                rope_theta=config.rope_theta,
                rope_scaling=config.rope_scaling,
                init_std=init_std,
            )
            for _ in range(config.num_layers)
        )

    @property
    def num_layers(self) -> int:
        return len(self.gates)

    def _gate(self, layer_idx: int) -> AttnGate:
        if not 0 <= layer_idx < len(self.gates):
            raise IndexError(
                f"layer {layer_idx} has no gate (the set has {len(self.gates)} layers)"
            )
        return self.gates[layer_idx]

    def block_logits(
        self,
        layer_idx: int,
        q_pre: torch.Tensor,
        k_pre: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Masked logits (B, Hq, nq, nk) of layer ``layer_idx`` (see :meth:`AttnGate.forward`)."""
        return self._gate(layer_idx)(q_pre, k_pre, position_ids)

    @torch.no_grad()
    def block_scores(
        self,
        layer_idx: int,
        q_pre: torch.Tensor,
        k_pre: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Softmax block scores of layer ``layer_idx``.

        Args:
            layer_idx: decoder layer index.
            q_pre: (B, Hq, T, D) pre-RoPE queries (after projection and any q norm).
            k_pre: (B, Hkv, T, D) pre-RoPE keys.
            position_ids: (B, T) or (T,) token positions; default ``arange(T)``.

        Returns:
            float32 (B, Hq, nq, nk) with nq = nk = ceil(T / block_size); rows sum to 1 over causal
            key blocks, future blocks are exactly 0.
        """
        return self._gate(layer_idx).block_scores(q_pre, k_pre, position_ids)

    def select(
        self,
        scores: torch.Tensor,
        threshold: float | None = None,
        nz_ratio: float | None = None,
        last_block_dense: bool | None = None,
    ) -> torch.Tensor:
        """Bool block mask (B, Hq, nq, nk) from :meth:`block_scores`.

        With neither ``threshold`` nor ``nz_ratio`` the checkpoint's ``seerattn_sparsity_method``
        and its value decide; passing both is an error.
        """
        if threshold is not None and nz_ratio is not None:
            raise ValueError("give at most one of threshold or nz_ratio")
        if threshold is None and nz_ratio is None:
            if self.config.sparsity_method == "threshold":
                threshold = self.config.threshold
            else:
                nz_ratio = self.config.nz_ratio
        dense = self.config.last_block_dense if last_block_dense is None else last_block_dense
        return select_blocks_from_scores(scores, threshold, nz_ratio, dense)

    def gate_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under SeerAttention's parameter names (detached, contiguous, CPU)."""
        out = {}
        for i, gate in enumerate(self.gates):
            if gate.mask_linear_q is not None:
                out[KEY_TEMPLATE.format(layer=i, name="mask_linear_q")] = (
                    gate.mask_linear_q.weight.detach().cpu().contiguous()
                )
            out[KEY_TEMPLATE.format(layer=i, name="mask_linear_k")] = (
                gate.mask_linear_k.weight.detach().cpu().contiguous()
            )
        return out

    def save(self, folder: str | os.PathLike, extra_files: Mapping[str, Any] | None = None) -> Path:
        """Write ``config.json`` and ``attn_gate_weights.pth`` (SeerAttention format) atomically.

        ``extra_files`` maps file names to JSON-serialisable objects written beside them
        (e.g. training_info.json). Returns the folder.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / WEIGHTS_NAME, lambda tmp: torch.save(self.gate_state_dict(), tmp))
        files = {CONFIG_NAME: self.config.to_json_dict(), **dict(extra_files or {})}
        for name, obj in files.items():
            text = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
            write_text(folder / name, text)
        return folder


def _field(cfg: Mapping[str, Any], name: str, default: Any, kind: type, folder: Path) -> Any:
    value = cfg.get(name, default)
    if kind is bool and not isinstance(value, bool):
        raise GateCheckpointError(
            f"{folder / CONFIG_NAME}: {name} must be true/false, got {value!r}"
        )
    if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise GateCheckpointError(f"{folder / CONFIG_NAME}: {name} must be a number, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise GateCheckpointError(f"{folder / CONFIG_NAME}: {name} must be a string, got {value!r}")
    return kind(value)


def load_gate_checkpoint(folder: str | os.PathLike, device: torch.device | str = "cpu") -> GateSet:
    """Read a SeerAttention gate checkpoint folder (published or written by :meth:`GateSet.save`).

    Head counts and head_dim are read from the weight shapes and cross-checked with config.json;
    weights are loaded with ``torch.load(weights_only=True)`` and cast to float32.

    Raises:
        GateCheckpointError: missing files, unreadable JSON, unknown gate type, missing or
            unexpected parameter names, inconsistent shapes.
    """
    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not folder.is_dir():
        raise GateCheckpointError(
            f"{folder}: not a directory (expected a SeerAttention gate folder)"
        )
    for path in (cfg_path, w_path):
        if not path.is_file():
            raise GateCheckpointError(
                f"{folder}: missing {path.name} (a SeerAttention gate folder "
                f"holds {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise GateCheckpointError(f"{cfg_path}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise GateCheckpointError(f"{cfg_path}: expected a JSON object")
    gate_type = _field(cfg, "seerattn_gate_type", DEFAULT_GATE_TYPE, str, folder)
    try:
        q_pools, k_pools = parse_gate_type(gate_type)
    except ValueError as exc:
        raise GateCheckpointError(f"{cfg_path}: {exc}") from exc
    block_size = _field(cfg, "seerattn_gate_block_size", 64, int, folder)
    hidden = _field(cfg, "seerattn_gate_hidden_size", 128, int, folder)
    force_double = _field(cfg, "seerattn_gate_force_double", False, bool, folder)

    try:
        state = torch.load(w_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means a bad file
        raise GateCheckpointError(
            f"{w_path}: cannot be read as a weights-only state dict ({exc})"
        ) from exc
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise GateCheckpointError(f"{w_path}: expected a dict of tensors")
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _KEY_RE.match(str(key))
        if match is None:
            raise GateCheckpointError(
                f"{w_path}: unexpected parameter {key!r}; expected names like "
                f"{KEY_TEMPLATE.format(layer=0, name='mask_linear_k')!r}"
            )
        per_layer.setdefault(int(match.group(1)), {})[match.group(2)] = value
    if not per_layer:
        raise GateCheckpointError(f"{w_path}: holds no gate parameters")
    num_layers = max(per_layer) + 1
    missing = [i for i in range(num_layers) if "mask_linear_k" not in per_layer.get(i, {})]
    if missing:
        raise GateCheckpointError(f"{w_path}: no mask_linear_k weight for layers {missing}")
    if "num_hidden_layers" in cfg and cfg["num_hidden_layers"] != num_layers:
        raise GateCheckpointError(
            f"{folder}: config says {cfg['num_hidden_layers']} layers, "
            f"weights hold gates for {num_layers}"
        )

    k0 = per_layer[0]["mask_linear_k"]
    if k0.dim() != 3 or k0.shape[1] % len(k_pools):
        raise GateCheckpointError(
            f"{w_path}: mask_linear_k weight must be (heads, "
            f"{len(k_pools)} * head_dim, hidden), got {tuple(k0.shape)}"
        )
    head_dim = k0.shape[1] // len(k_pools)
    if k0.shape[2] != hidden:
        raise GateCheckpointError(
            f"{w_path}: weight hidden size {k0.shape[2]} != seerattn_gate_hidden_size {hidden}"
        )
    has_q = len(q_pools) > 1 or hidden != head_dim or force_double
    if has_q:
        if "mask_linear_q" not in per_layer[0]:
            raise GateCheckpointError(
                f"{w_path}: gate type {gate_type} with hidden {hidden} and "
                f"head_dim {head_dim} needs mask_linear_q weights"
            )
        num_q = per_layer[0]["mask_linear_q"].shape[0]
        num_kv = k0.shape[0]
    else:
        num_q = k0.shape[0]
        num_kv = int(cfg.get("num_key_value_heads", num_q))
    if "num_attention_heads" in cfg and cfg["num_attention_heads"] != num_q:
        raise GateCheckpointError(
            f"{folder}: config num_attention_heads "
            f"{cfg['num_attention_heads']} != gate heads {num_q}"
        )
    if has_q and cfg.get("num_key_value_heads", num_kv) != num_kv:
        raise GateCheckpointError(
            f"{folder}: config num_key_value_heads "
            f"{cfg['num_key_value_heads']} != gate key heads {num_kv}"
        )

    rope_theta, rope_scaling = GateConfig.rope_from_model_config(cfg)
    seer_keys = {k for k in cfg if k.startswith("seerattn_")} | {"base_model"}
    try:
        config = GateConfig(
            base_model=str(cfg.get("base_model", "")),
            num_layers=num_layers,
            num_q_heads=num_q,
            num_kv_heads=num_kv,
            head_dim=head_dim,
            gate_type=gate_type,
            block_size=block_size,
            hidden_size=hidden,
            sparsity_method=_field(cfg, "seerattn_sparsity_method", "threshold", str, folder),
            threshold=_field(cfg, "seerattn_threshold", 0.0, float, folder),
            nz_ratio=_field(cfg, "seerattn_nz_ratio", 1.0, float, folder),
            last_block_dense=_field(cfg, "seerattn_last_block_dense", True, bool, folder),
            force_double=force_double,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            base_config={k: v for k, v in cfg.items() if k not in seer_keys},
        )
        gates = GateSet(config)
    except ValueError as exc:
        raise GateCheckpointError(f"{folder}: {exc}") from exc

    expected = gates.gate_state_dict()
    absent = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if absent or extra:
        raise GateCheckpointError(
            f"{w_path}: parameter names do not match gate type {gate_type} "
            f"(missing {absent[:4]}, unexpected {extra[:4]})"
        )
    with torch.no_grad():
        for i, gate in enumerate(gates.gates):
            for name in ("mask_linear_q", "mask_linear_k"):
                module = getattr(gate, name)
                if module is None:
                    continue
                weight = state[KEY_TEMPLATE.format(layer=i, name=name)]
                if tuple(weight.shape) != tuple(module.weight.shape):
                    raise GateCheckpointError(
                        f"{w_path}: layer {i} {name} has shape "
                        f"{tuple(weight.shape)}, expected "
                        f"{tuple(module.weight.shape)}"
                    )
                module.weight.copy_(weight.float())
    return gates.to(device)


def gate_config_summary(config: GateConfig) -> dict[str, Any]:
    """JSON-ready summary of a gate config (without the base model's fields)."""
    out = asdict(config)
    out.pop("base_config")
    return out
