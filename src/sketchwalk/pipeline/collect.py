"""Step 1: capture real post-RoPE Q/K/V tensors from a causal LM run on real text.

Usage (the defaults collect from the embedded SmolLM2-135M model, offline)::

    sketchwalk collect --sequence_lengths 4096 --num_samples 1 --device cpu
    python collect_seerattn_tensors.py --model_path /path/to/model --output_dir ./tensor_data \\
        --sequence_lengths 4096 8192 16384 --num_samples 5 --device cuda

Writes ``tensors_seq{L}_layer{i}_sample{j}_{timestamp}.pt`` (or ``.safetensors``) per layer and
sample, and ``summary_seq{L}_{timestamp}.json`` with per-layer statistics of the true attention
(mass on the sink block, key blocks needed for 90% / 95% of each query block's mass, entropy),
computed exactly in chunks of query rows, and the SHA-256 of every tensor file (per sample,
``file_sha256``: validate and compare refuse a file changed since).

Under ``torchrun --nproc_per_node N -m sketchwalk collect ...`` the samples (one passage: all
its layer files) are dealt out over the N processes, one GPU each. Each rank writes the tensor
files of its own samples (disjoint names, atomic writes, one timestamp for the run); rank 0
alone prepares the folder, decides what ``--resume`` skips and writes the summaries, in the
order one process writes them, each sample record with the ``rank`` that computed it and the
summary with ``world_size`` (docs/distributed.md). ``--device_map`` splits one model over
several devices instead (one process; docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from sketchwalk.atomic import file_sha256, write_json
from sketchwalk.blocks import UsageError
from sketchwalk.pipeline import distributed
from sketchwalk.pipeline.flags import (
    check_output_dir,
    device_arg,
    int_at_least,
)

__all__ = [
    "CollectError",
    "TensorCollector",
    "add_arguments",
    "attention_statistics",
    "load_seerattn_gate",
    "run",
    "seerattn_gate_tensors",
]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STAT_KEYS = (
    "sink_mass",
    "blocks_for_90",
    "blocks_for_95",
    "density_for_90",
    "density_for_95",
    "entropy",
    "normalized_entropy",
)


class CollectError(RuntimeError):
    """Collection cannot go on; the message says why and what to change."""


# --------------------------------------------------------------------------- true attention stats


def _stat_chunk_rows(batch: int, heads: int, seq_len: int, block_size: int, budget: int) -> int:
    rows = budget // max(1, batch * heads * seq_len)
    return max(block_size, rows // block_size * block_size)


@torch.no_grad()
def attention_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int = 64,
    scale: float | None = None,
    device: str | torch.device | None = None,
    max_elements: int = 1 << 24,
) -> dict[str, float]:
    """Exact statistics of the causal softmax attention ``softmax(q k^T * scale)``.

    Algorithm: for chunks of query rows (a multiple of ``block_size`` rows, so that at most
    ``max_elements`` probabilities exist at once), compute the exact fp32 probabilities of each row
    over its causal keys; accumulate each row's entropy and, per (query block, key block) tile, the
    mean over the block's rows of the probability mass on the key block (rows sum to 1). Then:

    - ``sink_mass``: mean mass on key block 0, over heads and query blocks 1.. (block 0 is its own
      only key block);
    - ``blocks_for_90`` / ``blocks_for_95``: mean over heads and query blocks of the smallest number
      of key blocks holding 90% / 95% of the block row's mass; ``density_for_90`` /
      ``density_for_95``: the same counts divided by the causal blocks (kept / causal, summed);
    - ``entropy``: mean over heads and query rows of the row entropy (nats);
      ``normalized_entropy``: entropy / log(number of keys), over rows with at least 2 keys.

    Args:
        q: (B, Hq, T, D) post-RoPE queries; k: (B, Hkv, T, D) keys; ``Hq % Hkv == 0``.
        block_size: block size of the tiles.
        scale: logit scale; default ``1 / sqrt(D)``.
        device: where to compute (default: q's device).
        max_elements: probabilities held at once (memory bound: 4 bytes each, a few copies).

    Returns:
        dict of floats with the keys of :data:`STAT_KEYS` plus ``num_blocks``.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (B, H, T, D), got {tuple(q.shape)}, {tuple(k.shape)}")
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not match")
    dev = torch.device(device) if device is not None else q.device
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    nb = -(-t // block_size)
    kf = k.to(dev, torch.float32)
    block_mass = torch.zeros(b, hkv, g, nb, nb, dtype=torch.float32, device=dev)
    entropy_sum = 0.0
    norm_entropy_sum = 0.0
    chunk = _stat_chunk_rows(b, hq, t, block_size, max_elements)
    for start in range(0, t, chunk):
        stop = min(t, start + chunk)
        c = stop - start
        qc = q[:, :, start:stop].to(dev, torch.float32).view(b, hkv, g, c, d)
        logits = torch.einsum("bhgcd,bhtd->bhgct", qc, kf[:, :, :stop]) * scale
        rows = torch.arange(start, stop, device=dev)
        cols = torch.arange(stop, device=dev)
        logits.masked_fill_(cols[None, :] > rows[:, None], float("-inf"))
        p = torch.softmax(logits, dim=-1)
        del logits
        ent = -torch.xlogy(p, p).sum(-1)  # (B, Hkv, g, c)
        entropy_sum += ent.sum().item()
        n_keys = (rows + 1).to(torch.float32)
        valid = n_keys > 1
        if valid.any():
            norm_entropy_sum += (ent[..., valid] / n_keys[valid].log()).sum().item()
        nbk = -(-stop // block_size)
        p = torch.nn.functional.pad(p, (0, nbk * block_size - stop))
        per_row = p.view(b, hkv, g, c, nbk, block_size).sum(-1)  # (B, Hkv, g, c, nbk)
        del p
        qb0 = start // block_size
        cb = -(-c // block_size)
        per_row = torch.nn.functional.pad(per_row, (0, 0, 0, cb * block_size - c))
        tile = per_row.view(b, hkv, g, cb, block_size, nbk).sum(-2)
        counts = torch.full((cb,), float(block_size), device=dev)
        counts[-1] = c - (cb - 1) * block_size
        block_mass[:, :, :, qb0 : qb0 + cb, :nbk] = tile / counts[:, None]
    block_mass = block_mass.view(b, hq, nb, nb)
    causal_counts = torch.arange(1, nb + 1, device=dev, dtype=torch.float32)
    out: dict[str, float] = {"num_blocks": float(nb)}
    out["sink_mass"] = block_mass[:, :, 1:, 0].mean().item() if nb > 1 else 1.0
    sorted_mass = block_mass.sort(dim=-1, descending=True).values.cumsum(-1)
    for pct, name in ((0.90, "90"), (0.95, "95")):
        needed = (sorted_mass < pct - 1e-6).sum(-1).to(torch.float32) + 1.0
        needed = torch.minimum(needed, causal_counts)
        out[f"blocks_for_{name}"] = needed.mean().item()
        out[f"density_for_{name}"] = (needed.sum() / (causal_counts.sum() * b * hq)).item()
    out["entropy"] = entropy_sum / (b * hq * t)
    out["normalized_entropy"] = norm_entropy_sum / (b * hq * max(1, t - 1))
    return out


# --------------------------------------------------------------------------- SeerAttention hook


def load_seerattn_gate(gate_dir: str | os.PathLike | None, device: str | torch.device) -> Any:
    """Load a SeerAttention gate folder with :mod:`sketchwalk.gate` when that module exists.

    Returns:
        A ``GateSet`` on ``device``, or None when there is no gate folder, no gate weights file,
        or ``sketchwalk.gate`` cannot be imported (collection then goes on without gate scores).
    """
    if gate_dir is None or not (Path(gate_dir) / "attn_gate_weights.pth").is_file():
        return None
    try:
        from sketchwalk.gate.checkpoint import load_gate_checkpoint
    except ImportError:
        return None
    return load_gate_checkpoint(gate_dir, device=device)


@torch.no_grad()
def seerattn_gate_tensors(
    gate: Any,
    layer_idx: int,
    q_pre: torch.Tensor,
    k_pre: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """The hook point where collection asks SeerAttention's gate for its block selection.

    Args:
        gate: a ``sketchwalk.gate.checkpoint.GateSet``.
        layer_idx: decoder layer.
        q_pre: (B, Hq, T, D) pre-RoPE queries; k_pre: (B, Hkv, T, D) pre-RoPE keys.
        position_ids: (B, T) token positions (default ``arange(T)``).
        device: where the gate runs (default: q_pre's device).

    Returns:
        ``{'seerattn_scores': float32 (B, Hq, nq, nk), 'seerattn_mask': bool (B, Hq, nq, nk)}``
        on the CPU; the mask is ``gate.select(scores)`` with the checkpoint's own threshold or
        nz_ratio.
    """
    dev = torch.device(device) if device is not None else q_pre.device
    q = q_pre.to(dev, torch.float32)
    k = k_pre.to(dev, torch.float32)
    pos = position_ids.to(dev) if position_ids is not None else None
    scores = gate.block_scores(layer_idx, q, k, pos)
    mask = gate.select(scores)
    return {"seerattn_scores": scores.float().cpu(), "seerattn_mask": mask.bool().cpu()}


# --------------------------------------------------------------------------- collector


def load_model_checked(load: Any, model_path: Any, **kwargs: Any) -> Any:
    """``load(model_path, **kwargs)`` (`sketchwalk.hf.models.load_model`) with any failure of
    transformers on a broken model folder (bad config, truncated or refused weights, missing
    tokenizer) reported as one `CollectError` naming the folder. Remote code never runs:
    ``trust_remote_code`` is never passed."""
    from sketchwalk.hf.models import ModelNotFoundError

    try:
        return load(model_path, **kwargs)
    except (ModelNotFoundError, MemoryError, UsageError):
        raise
    except Exception as exc:  # transformers raises many types for a broken folder
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        blocked = next((line for line in lines if "GLOBAL" in line), None)
        why = blocked or (lines[0] if lines else type(exc).__name__)
        raise CollectError(
            f"--model_path {model_path}: cannot load the model ({type(exc).__name__}: {why[:300]})"
        ) from None


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _plain_json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _rope_parameters(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = {"rope_theta": getattr(config, "rope_theta", None)}
        if getattr(config, "rope_scaling", None):
            params["rope_scaling"] = config.rope_scaling
    return _plain_json(dict(params))


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class TensorCollector:
    """Runs a causal LM on real text and writes the attention tensors of every sample.

    Args:
        model_path: alias (default ``smollm2-135m``), HF folder, ``.gguf`` or SeerAttention folder.
        output_dir: where the files go (created if needed).
        device: ``"cuda"``, ``"cpu"``, ... (default: CUDA when available).
        layers: layer indices to capture (default: all).
        dtype: storage dtype name of the tensors (``bfloat16``, ``float16``, ``float32``, ``auto``
            = the model's compute dtype).
        model_dtype: compute dtype name, ``auto`` = bf16 on CUDA, float32 on CPU.
        text_source: ``auto``, ``austen``, ``stdlib`` or ``file`` (with ``text_file``).
        file_format: ``pt`` or ``safetensors``.
        save_pre_rope: also store pre-RoPE ``Q_pre``/``K_pre`` (always when a gate is present).
        block_size: block size of the summary statistics.
        allow_long: allow lengths beyond the model's ``max_position_embeddings``.
        resume: skip samples whose files are already complete in ``output_dir``.
        seed: order of the text documents.
        progress: show tqdm progress bars.
        device_map: ``"auto"`` or ``{module: device}``: the model split over devices
            (`sketchwalk.hf.device_map`); inputs go to the input embeddings' device, which is
            also where the statistics and a gate run unless ``device`` is given.

    After :meth:`load_model`, ``collector.model`` runs under the collector's capture: every forward
    pass records the tensors, and :meth:`save_captured` writes the last one.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        output_dir: str | os.PathLike = "./tensor_data",
        device: str | None = None,
        layers: Iterable[int] | None = None,
        dtype: str = "bfloat16",
        model_dtype: str = "auto",
        text_source: str = "auto",
        text_file: str | os.PathLike | None = None,
        file_format: str = "pt",
        save_pre_rope: bool = False,
        block_size: int = 64,
        allow_long: bool = False,
        resume: bool = False,
        seed: int = 0,
        progress: bool = True,
        device_map: str | dict[str, int | str] | None = None,
    ):
        from sketchwalk.hf.models import DEFAULT_MODEL

        if file_format not in ("pt", "safetensors"):
            raise ValueError(f"file_format must be 'pt' or 'safetensors', got {file_format!r}")
        for name, value in (("dtype", dtype), ("model_dtype", model_dtype)):
            if value != "auto" and value not in DTYPES:
                raise ValueError(f"{name} must be auto or one of {sorted(DTYPES)}, got {value!r}")
        self.model_path = str(model_path) if model_path is not None else DEFAULT_MODEL
        self.output_dir = Path(output_dir)
        self.device_map = device_map
        self._device_given = device
        self.device = device or ("cpu" if device_map is not None else _default_device())
        self.input_device: torch.device | None = None
        self.layers = None if layers is None else sorted({int(i) for i in layers})
        self.dtype_name = dtype
        self.model_dtype_name = model_dtype
        self.text_source = text_source
        self.text_file = text_file
        self.file_format = file_format
        self.save_pre_rope = save_pre_rope
        self.block_size = block_size
        self.allow_long = allow_long
        self.resume = resume
        self.seed = seed
        self.progress = progress
        self.model: Any = None
        self.tokenizer: Any = None
        self.resolved: Any = None
        self.gate: Any = None
        self.capture: Any = None
        self.timings: dict[str, float] = {}

    # -- model -------------------------------------------------------------------------------

    def load_model(self) -> tuple[Any, Any]:
        """Load model and tokenizer, load a SeerAttention gate if present, start the capture."""
        from sketchwalk.hf.capture import AttentionCapture
        from sketchwalk.hf.models import load_model

        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise CollectError(
                "--device cuda requested but CUDA is not available; use --device cpu"
            )
        t0 = time.perf_counter()
        model_dtype = None if self.model_dtype_name == "auto" else DTYPES[self.model_dtype_name]
        placed = {} if self.device_map is None else {"device_map": self.device_map}
        self.model, self.tokenizer, self.resolved = load_model_checked(
            load_model, self.model_path, device=self.device, dtype=model_dtype, **placed
        )
        self.timings["load_model_s"] = time.perf_counter() - t0
        if self.device_map is not None:
            from sketchwalk.hf.device_map import input_device

            self.input_device = input_device(self.model)
            if self._device_given is None:
                self.device = str(self.input_device)
        else:
            self.input_device = torch.device(self.device)
        self.gate = load_seerattn_gate(self.resolved.gate_dir, self.device)
        store = None if self.dtype_name == "auto" else DTYPES[self.dtype_name]
        n_layers = int(getattr(self.model.config, "num_hidden_layers", 0) or 0)
        bad = [i for i in self.layers or () if n_layers and i >= n_layers]
        if bad:
            raise UsageError(f"--layers {bad}: the model has {n_layers} layers (0..{n_layers - 1})")
        try:
            self.capture = AttentionCapture(
                self.model,
                layers=self.layers,
                dtype=store,
                offload=True,
                pre_rope=self.save_pre_rope or self.gate is not None,
            )
        except ValueError as exc:
            raise CollectError(f"--model_path {self.model_path}: {exc}") from None
        self.capture.__enter__()
        return self.model, self.tokenizer

    def close(self) -> None:
        """Stop capturing (restores the model's attention implementation)."""
        if self.capture is not None and self.capture.active:
            self.capture.__exit__(None, None, None)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def check_lengths(self, sequence_lengths: Sequence[int]) -> None:
        """Refuse lengths beyond the model's positions unless ``allow_long``."""
        limit = self.max_positions
        for length in sequence_lengths:
            if length < 2:
                raise CollectError(f"sequence length {length} is too short (need >= 2)")
            if limit is not None and length > limit and not self.allow_long:
                raise CollectError(
                    f"sequence length {length} exceeds the model's {limit} positions "
                    f"(max_position_embeddings); its attention would be out of distribution. "
                    f"Use lengths <= {limit}, or pass --allow_long to collect anyway."
                )

    # -- forward + files ---------------------------------------------------------------------

    def _base_metadata(self) -> dict[str, Any]:
        from sketchwalk._version import __version__

        cfg = self.model.config
        first = next(iter(self.capture.modules.values()))
        return {
            "hidden_size": int(cfg.hidden_size),
            "model_path": self.model_path,
            "model_id": self.resolved.model_id,
            "model_kind": self.resolved.kind,
            "model_type": getattr(cfg, "model_type", ""),
            "num_hidden_layers": int(cfg.num_hidden_layers),
            "max_position_embeddings": self.max_positions,
            "sliding_window": getattr(cfg, "sliding_window", None),
            "rope_parameters": _rope_parameters(cfg),
            "attention_scaling": float(getattr(first, "scaling", 1.0 / math.sqrt(first.head_dim))),
            "model_dtype": str(self.model.dtype).replace("torch.", ""),
            "device": str(self.device),
            **({} if self.device_map is None else {"device_map": self._device_map_text()}),
            "capture": "post-RoPE Q/K/V at transformers' attention interface",
            "sketchwalk_version": __version__,
            "gate_dir": str(self.resolved.gate_dir) if self.resolved.gate_dir else None,
        }

    def _device_map_text(self) -> Any:
        from sketchwalk.hf.device_map import describe

        return describe(self.device_map)

    def forward(self, input_ids: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
        """Run the decoder (no LM head, no cache) on ``input_ids`` (B, T); return the capture.

        Raises:
            CollectError: the sequence does not fit in memory (says what to lower).
        """
        if self.model is None:
            self.load_model()
        self.capture.clear()
        ids = input_ids.to(self.input_device if self.input_device is not None else self.device)
        base = getattr(self.model, self.model.base_model_prefix, self.model)
        try:
            with torch.no_grad():
                base(input_ids=ids, use_cache=False)
        except Exception as exc:
            if _is_oom(exc):
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise CollectError(
                    f"a sequence of {ids.shape[-1]} tokens does not fit in memory on "
                    f"{self.device} ({type(exc).__name__}). Lower --sequence_lengths, capture "
                    "fewer --layers, store --dtype bfloat16, or use a device with more memory."
                ) from exc
            raise
        return self.capture.layers

    def save_captured(
        self,
        input_ids: torch.Tensor,
        sample_idx: int,
        timestamp: str,
        passage_info: dict[str, Any] | None = None,
    ) -> list[Path]:
        """Write the last forward pass's captured layers, one file per layer.

        Args:
            input_ids: (B, T) or (T,) the ids that were run.
            sample_idx: sample number in the file name.
            timestamp: ``YYYYmmdd_HHMMSS`` of the run.
            passage_info: text source description
                (see :meth:`sketchwalk.hf.text.Passage.info`).

        Returns:
            The paths written, in layer order.
        """
        from sketchwalk.hf.text import token_sha256
        from sketchwalk.pipeline.tensorio import save_tensor_file, tensor_filename

        ids = input_ids.detach().to("cpu", torch.int64)
        if ids.dim() == 1:
            ids = ids[None]
        b, t = ids.shape
        base = self._base_metadata()
        info = dict(passage_info or {})
        info.setdefault("input_ids_sha256", token_sha256(ids))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for layer_idx, rec in sorted(self.capture.layers.items()):
            q, k = rec["Q"], rec["K"]
            tensors = {"Q": q, "K": k, "V": rec["V"], "input_ids": ids}
            if "Q_pre" in rec and "K_pre" in rec:
                tensors["Q_pre"], tensors["K_pre"] = rec["Q_pre"], rec["K_pre"]
                if self.gate is not None:
                    tensors.update(
                        seerattn_gate_tensors(
                            self.gate, layer_idx, rec["Q_pre"], rec["K_pre"], device=self.device
                        )
                    )
            meta = {
                "layer_idx": layer_idx,
                "seq_len": t,
                "num_heads": int(q.shape[1]),
                "num_kv_heads": int(k.shape[1]),
                "head_dim": int(q.shape[-1]),
                "batch_size": b,
                "timestamp": timestamp,
                "sample": sample_idx,
                # every layer of this sample: a reader can tell a sample that a killed run left
                # half-written from a complete one
                "sample_layers": sorted(self.capture.layers),
                "dtype": str(q.dtype).replace("torch.", ""),
                **base,
                **info,
            }
            name = tensor_filename(t, layer_idx, sample_idx, timestamp, self.file_format)
            written.append(save_tensor_file(self.output_dir / name, tensors, meta))
        return written

    def layer_statistics(self) -> dict[int, dict[str, float]]:
        """:func:`attention_statistics` of every captured layer of the last forward pass."""
        out = {}
        for layer_idx, rec in sorted(self.capture.layers.items()):
            out[layer_idx] = self._stats(rec["Q"], rec["K"])
        return out

    def _stats(self, q: torch.Tensor, k: torch.Tensor) -> dict[str, float]:
        module = self.capture.modules.get(next(iter(self.capture.modules)))
        scale = float(getattr(module, "scaling", 1.0 / math.sqrt(q.shape[-1])))
        try:
            return attention_statistics(q, k, self.block_size, scale=scale, device=self.device)
        except Exception as exc:
            if _is_oom(exc):
                raise CollectError(
                    f"attention statistics for {q.shape[2]} tokens do not fit in memory on "
                    f"{self.device}; lower --sequence_lengths"
                ) from exc
            raise

    # -- whole runs --------------------------------------------------------------------------

    def _finished(self, seq_len: int, sample: int) -> list[Path] | None:
        """Files of a complete earlier (seq_len, sample) in the chosen format, or None."""
        from sketchwalk.pipeline.tensorio import group_tensor_files, parse_tensor_filename

        if not self.output_dir.is_dir():
            return None
        wanted = set(self.capture.layer_ids)
        for (length, idx, _ts), files in group_tensor_files(self.output_dir).items():
            if length != seq_len or idx != sample:
                continue
            files = [f for f in files if f.suffix == f".{self.file_format}"]
            if {parse_tensor_filename(f)["layer_idx"] for f in files} >= wanted:
                return [f for f in files if parse_tensor_filename(f)["layer_idx"] in wanted]
        return None

    def _resumed_stats(self, files: list[Path], passage_sha: str) -> dict[int, dict[str, float]]:
        from sketchwalk.pipeline.tensorio import load_tensor_file

        out = {}
        for path in files:
            rec = load_tensor_file(path)
            meta = rec["metadata"]
            if meta.get("input_ids_sha256") != passage_sha or meta.get("model_path") != str(
                self.model_path
            ):
                raise CollectError(
                    f"--resume: {path} holds a different passage or model than this run would "
                    "collect (text source, tokenizer or --model_path changed); use a new "
                    "--output_dir"
                )
            out[int(meta["layer_idx"])] = self._stats(rec["Q"], rec["K"])
        return out

    def collect(
        self,
        sequence_lengths: Sequence[int] = (4096, 8192, 16384),
        num_samples: int = 5,
        w: distributed.World | None = None,
    ) -> list[Path]:
        """Collect ``num_samples`` passages per length; write tensor files and one summary per
        length.

        Args:
            w: the processes of a torchrun launch (default: this process's `distributed.world`):
                the samples are dealt out round-robin over them; each writes its samples' tensor
                files, rank 0 the summaries.

        Returns:
            The summary JSON paths, one per sequence length (on rank 0; empty elsewhere).
        """
        from tqdm.auto import tqdm

        from sketchwalk._version import __version__
        from sketchwalk.hf.text import make_passages, resolve_source

        w = w if w is not None else distributed.world()
        if self.model is None:
            self.load_model()
        self.check_lengths(sequence_lengths)
        if num_samples < 1:
            raise CollectError(f"--num_samples must be >= 1, got {num_samples}")
        lengths = list(sequence_lengths)
        items = [(seq_len, j) for seq_len in lengths for j in range(num_samples)]
        # rank 0 prepares the folder and decides what --resume skips, before anyone writes
        prepared = distributed.on_main(lambda: self._prepare(items), w)
        timestamp, finished = distributed.broadcast(prepared, w)
        source = resolve_source(self.text_source, self.text_file)
        passages: dict[int, list[Any]] = {}

        def one(item: tuple[int, int]) -> tuple[int, dict[int, dict[str, float]], dict[str, Any]]:
            seq_len, j = item
            if seq_len not in passages:
                passages[seq_len] = make_passages(
                    self.tokenizer, seq_len, num_samples, self.text_source, self.text_file,
                    self.seed,
                )  # fmt: skip
            passage = passages[seq_len][j]
            bar.set_description(f"collect seq{seq_len} sample{j}")
            t0 = time.perf_counter()
            done = finished.get(item)
            if done is not None:
                stats = self._resumed_stats(done, passage.sha256)
                files, forward_s = done, 0.0
            else:
                self.forward(passage.input_ids[None])
                forward_s = time.perf_counter() - t0
                files = self.save_captured(passage.input_ids, j, timestamp, passage.info())
                stats = self.layer_statistics()
            self.capture.clear()
            sample = {
                "sample": j,
                **passage.info(),
                "resumed": done is not None,
                "files": [p.name for p in files],
                "file_sha256": {p.name: file_sha256(p) for p in files},
                "forward_seconds": round(forward_s, 3),
                "sample_seconds": round(time.perf_counter() - t0, 3),
                "rank": w.rank,
            }
            return seq_len, stats, sample

        summaries: list[Path] = []
        per_layer: dict[int, dict[int, list[dict[str, float]]]] = {n: {} for n in lengths}
        samples: dict[int, list[dict[str, Any]]] = {n: [] for n in lengths}
        t_len0 = time.perf_counter()
        bar = tqdm(total=len(items), desc="collect", disable=not (self.progress and w.is_main))
        for done_round in distributed.map_rounds(items, one, w):
            for seq_len, stats, sample in done_round:
                for layer_idx, st in stats.items():
                    per_layer[seq_len].setdefault(layer_idx, []).append(st)
                samples[seq_len].append(sample)
                bar.update(1)
                if len(samples[seq_len]) < num_samples or not w.is_main:
                    continue
                summary = self._summary(
                    seq_len, timestamp, num_samples, source, per_layer[seq_len],
                    samples[seq_len], time.perf_counter() - t_len0, w.world_size, __version__,
                )  # fmt: skip
                path = self.output_dir / f"summary_seq{seq_len}_{timestamp}.json"
                write_json(path, summary, overwrite=False)
                summaries.append(path)
                t_len0 = time.perf_counter()
        bar.close()
        return summaries

    def _prepare(self, items: list[tuple[int, int]]) -> tuple[str, dict[tuple[int, int], Any]]:
        """Rank 0, before any file is written: the run's timestamp, the folder made and cleaned
        of a killed run's temporary files, and (``resume``) the files of finished samples."""
        from sketchwalk.atomic import remove_stale_tmp
        from sketchwalk.pipeline.tensorio import group_tensor_files

        timestamp = datetime.now().strftime("%Y%m%d_%H%M%S")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(self.output_dir)  # what a killed earlier run was writing
        earlier = sum(len(v) for v in group_tensor_files(self.output_dir).values())
        if earlier and not self.resume:
            print(
                f"note: {self.output_dir} already holds {earlier} tensor files; they are kept "
                "(new files get timestamp " + timestamp + "; --resume skips finished samples)",
                file=sys.stderr,
            )
        finished = {}
        if self.resume:
            for seq_len, j in items:
                files = self._finished(seq_len, j)
                if files is not None:
                    finished[(seq_len, j)] = files
        return timestamp, finished

    def _summary(
        self,
        seq_len: int,
        timestamp: str,
        num_samples: int,
        source: str,
        per_layer: dict[int, list[dict[str, float]]],
        samples: list[dict[str, Any]],
        seconds: float,
        world_size: int,
        version: str,
    ) -> dict[str, Any]:
        layers_out = []
        for layer_idx in sorted(per_layer):
            runs = per_layer[layer_idx]
            entry: dict[str, Any] = {"layer_idx": layer_idx}
            for key in STAT_KEYS:
                entry[key] = sum(r[key] for r in runs) / len(runs)
            entry["num_blocks"] = int(runs[0]["num_blocks"])
            entry["per_sample"] = [{k: r[k] for k in STAT_KEYS} for r in runs]
            layers_out.append(entry)
        return {
            "seq_len": seq_len,
            "timestamp": timestamp,
            "model_path": self.model_path,
            "model_id": self.resolved.model_id,
            "num_samples": num_samples,
            "block_size": self.block_size,
            "statistics": (
                "exact causal softmax attention; per (query block, key block) tile the mean "
                "over the block's queries of the mass on the key block; sink = key block 0"
            ),
            "device": str(self.device),
            **({} if self.device_map is None else {"device_map": self._device_map_text()}),
            "dtype": self.dtype_name,
            "model_dtype": str(self.model.dtype).replace("torch.", ""),
            "text_source": source,
            "format": self.file_format,
            "sketchwalk_version": version,
            "seerattn_gate": self.gate is not None,
            "load_model_seconds": round(self.timings.get("load_model_s", 0.0), 3),
            "seconds": round(seconds, 3),
            "world_size": world_size,
            "samples": samples,
            "layers": layers_out,
        }


# --------------------------------------------------------------------------- CLI


def _layer_spec(text: str) -> list[int]:
    """One ``--layers`` value: ``all``, ``5``, ``0-3`` or ``0-3,8`` (indices >= 0, ranges low-high
    with low <= high); argparse ``type=`` so a bad value is refused before the model loads."""
    if text == "all":
        return []
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo_text, hi_text = part.split("-", 1)
                lo, hi = int(lo_text), int(hi_text)
                if lo > hi:
                    raise argparse.ArgumentTypeError(
                        f"range {part!r} is empty (low > high); write {hi}-{lo}"
                    )
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part!r} is not a layer index or range (e.g. 0 5 10, 0-3,8 or all)"
            ) from None
    if any(i < 0 for i in out):
        raise argparse.ArgumentTypeError(f"layer indices must be >= 0, got {text!r}")
    return out


def _parse_layers(values: Sequence[str | list[int]] | None) -> list[int] | None:
    if not values or values == ["all"]:
        return None
    out: list[int] = []
    for value in values:
        out.extend(value if isinstance(value, list) else _layer_spec(str(value)))
    return out or None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The seed's flags (same names and defaults) plus sketchwalk's additions."""
    from sketchwalk.hf.device_map import add_argument as add_device_map_argument

    parser.add_argument(
        "--model_path",
        default="smollm2-135m",
        help="model alias (default smollm2-135m, embedded, offline), HF model folder, .gguf file "
        "or SeerAttention checkpoint folder (config.json with base_model)",
    )
    parser.add_argument("--output_dir", default="./tensor_data", help="where files are written")
    parser.add_argument(
        "--sequence_lengths",
        type=int_at_least(2),
        nargs="+",
        default=[4096, 8192, 16384],
        help="sequence lengths in tokens (default: 4096 8192 16384)",
    )
    parser.add_argument("--num_samples", type=int_at_least(1), default=5, help="samples per length")
    parser.add_argument(
        "--device",
        type=device_arg,
        default=None,
        help="cuda / cpu / cuda:1 (default: cuda when available; under torchrun each process "
        "uses cuda:LOCAL_RANK). With --device_map: where the statistics and a gate run "
        "(default: the device of the input embeddings)",
    )
    add_device_map_argument(parser)
    parser.add_argument(
        "--layers",
        type=_layer_spec,
        nargs="+",
        default=None,
        help="layers to capture, e.g. '0 5 10' or '0-3,8' (default: all)",
    )
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["auto", *DTYPES],
        help="storage dtype of Q/K/V (default bfloat16; auto = the model's compute dtype)",
    )
    parser.add_argument(
        "--model_dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="compute dtype (default auto: bfloat16 on CUDA, float32 on CPU)",
    )
    parser.add_argument(
        "--text_source",
        default="auto",
        choices=["auto", "austen", "stdlib", "file"],
        help="real text: austen (r-cran-janeaustenr), stdlib (Python sources), file "
        "(--text_file); auto = austen where installed, else stdlib",
    )
    parser.add_argument("--text_file", default=None, help="plain text or .jsonl file of text")
    parser.add_argument(
        "--format", default="pt", choices=["pt", "safetensors"], help="tensor file format"
    )
    parser.add_argument(
        "--resume", action="store_true", help="skip samples whose files are already complete"
    )
    parser.add_argument(
        "--allow_long",
        action="store_true",
        help="allow lengths beyond the model's max_position_embeddings",
    )
    parser.add_argument(
        "--save_pre_rope",
        action="store_true",
        help="also store pre-RoPE Q_pre/K_pre (always stored for a SeerAttention checkpoint)",
    )
    parser.add_argument(
        "--block_size", type=int_at_least(1), default=64, help="block size of the statistics"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the text document order")
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    """``sketchwalk collect``: returns 0 on success; raises a user error (`sketchwalk.cli.main`
    turns it into one stderr line and exit code 1 or 2)."""
    from sketchwalk.hf.device_map import check_world

    check_world(args.device_map, distributed.requested_world_size())
    with distributed.session(args.device or "auto") as w:
        return _run(args, w)


def _run(args: argparse.Namespace, w: distributed.World) -> int:
    t0 = time.perf_counter()
    if args.text_file is not None and not Path(args.text_file).is_file():
        raise UsageError(f"--text_file {args.text_file}: file not found")
    if args.text_source == "file" and args.text_file is None:
        raise UsageError("--text_source file needs --text_file")
    device = distributed.device_for(args.device or "auto", w)
    device = None if device in (None, "auto") else str(device)
    collector = TensorCollector(
        model_path=args.model_path,
        output_dir=args.output_dir,
        device=device,
        layers=_parse_layers(args.layers),
        dtype=args.dtype,
        model_dtype=args.model_dtype,
        text_source=args.text_source,
        text_file=args.text_file,
        file_format=args.format,
        save_pre_rope=args.save_pre_rope,
        block_size=args.block_size,
        allow_long=args.allow_long,
        resume=args.resume,
        seed=args.seed,
        progress=not args.no_progress,
        device_map=args.device_map,
    )
    check_output_dir(args.output_dir)
    collector.load_model()
    collector.check_lengths(args.sequence_lengths)
    summaries = collector.collect(args.sequence_lengths, args.num_samples, w)
    if not w.is_main:
        return 0  # rank 0 reports
    for path in summaries:
        summary = json.loads(path.read_text())
        print(f"wrote {path} ({len(summary['samples'])} samples x {len(summary['layers'])} layers)")
        for layer in summary["layers"]:
            print(
                f"  layer {layer['layer_idx']:3d}: sink {layer['sink_mass']:.3f}  "
                f"blocks for 90% {layer['blocks_for_90']:.1f} ({layer['density_for_90']:.1%})  "
                f"95% {layer['blocks_for_95']:.1f}  entropy {layer['entropy']:.2f}"
            )
    print(f"done in {time.perf_counter() - t0:.1f} s; files in {collector.output_dir}")
    return 0
