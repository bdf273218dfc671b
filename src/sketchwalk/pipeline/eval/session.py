"""The model an evaluation runs on and the selectors it switches on.

`_open_session` loads the model (or takes the one passed in) with its tokenizer, device and
SeerAttention gates; `environment` is what every result file records about versions and the
device; `_activate` / `_ActiveRun` switch one run's selector on through
`sketchwalk.hf.integration.enable_selector`; `_layer_densities`, `_decode_density` and
`_density_summary` read the realized densities back from its records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
from collections.abc import Iterator
from typing import Any

import torch

from sketchwalk._version import __version__
from sketchwalk.blocks import UsageError
from sketchwalk.pipeline.eval.runs import SKETCHWALK_KINDS, EvalInputError, RunSpec


@dataclasses.dataclass
class _Session:
    model: Any
    tokenizer: Any
    model_id: str
    device: torch.device
    gate_dir: str | None
    gates: Any = None


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars ("Loading weights") off while ``enabled`` is False
    (``--no_progress``), restored afterwards."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _open_session(
    model_path: str | None,
    model: Any,
    tokenizer: Any,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    gate_path: str | None,
    need_gate: bool,
    device_map: Any = None,
    progress: bool = True,
) -> _Session:
    from sketchwalk.hf.models import load_model

    dev = _resolve_device(device)
    gate_dir = gate_path
    if need_gate and gate_dir is None and (model is not None or _gate_dir_of(model_path) is None):
        raise EvalInputError(
            "selector 'gate' needs --gate_path (a SeerAttention gate checkpoint folder)"
        )  # refused before the model loads
    if model is None:
        placed = {} if device_map is None else {"device_map": device_map}
        with _transformers_progress(progress):
            model, tokenizer, resolved = load_model(model_path, device=dev, dtype=dtype, **placed)
        if device_map is not None:
            from sketchwalk.hf.device_map import input_device

            dev = input_device(model)  # inputs go to the embeddings' device
        model_id = resolved.model_id
        if gate_dir is None and resolved.gate_dir is not None:
            gate_dir = str(resolved.gate_dir)
    else:
        if tokenizer is None:
            raise EvalInputError("evaluate_*: pass tokenizer= together with model=")
        model_id = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        dev = next(model.parameters()).device
    session = _Session(model, tokenizer, model_id, dev, gate_dir)
    if need_gate:
        if gate_dir is None:
            raise EvalInputError(
                "selector 'gate' needs --gate_path (a SeerAttention gate checkpoint folder)"
            )
        from sketchwalk.gate.checkpoint import load_gate_checkpoint

        session.gates = load_gate_checkpoint(gate_dir, device=dev)
    return session


def _gate_dir_of(model_path: str | None) -> Any:
    """The gate folder of a SeerAttention checkpoint given as --model_path (None otherwise)."""
    from sketchwalk.hf.models import resolve_model

    return resolve_model(model_path).gate_dir


def _resolve_device(name: str | torch.device | None) -> torch.device:
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalInputError("--device cuda was asked for but CUDA is not available")
    return dev


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_context(model: Any) -> int | None:
    ctx = getattr(model.config, "max_position_embeddings", None)
    return int(ctx) if isinstance(ctx, int) and ctx > 0 else None


def _check_length(model: Any, length: int, model_id: str, flag: str) -> None:
    ctx = _max_context(model)
    if ctx is not None and length > ctx:
        raise EvalInputError(
            f"{flag} {length} is longer than the model's context of {ctx} tokens ({model_id})"
        )


def environment(model: Any, device: torch.device, device_map: Any = None) -> dict[str, Any]:
    """Versions, device (the inputs' device; ``device_map`` when the model is split) and model
    facts recorded in every result file."""
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        cuda = torch.version.cuda
    else:
        device_name = platform.processor() or platform.machine()
        cuda = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "triton": version("triton"),
        "sketchwalk": __version__,  # also right when run from a source tree
        "cuda": cuda,
        "device": str(device),
        **({} if device_map is None else {"device_map": device_map}),
        "device_name": device_name,
        "cpu_threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attn_implementation": model.config._attn_implementation,
        "num_layers": int(model.config.num_hidden_layers),
        "max_context": _max_context(model),
    }


def _make_selector(run: RunSpec, session: _Session, selection_backend: str) -> Any:
    """The run's selector (`sketchwalk.selection.selectors.make_selector`), with the run's
    config; on CUDA the selectors that score true attention take larger chunks."""
    from sketchwalk.selection.selectors import make_selector

    name = "sketchwalk" if run.kind in SKETCHWALK_KINDS else run.kind
    options: dict[str, Any] = {}
    if name == "sketchwalk":
        options["backend"] = selection_backend
    if name in ("oracle", "xattention") and session.device.type == "cuda":
        options["chunk_elements"] = 1 << 28
    try:
        return make_selector(
            name, run.config, gates=session.gates if name == "gate" else None, **options
        )
    except UsageError as exc:
        raise EvalInputError(str(exc)) from None


@contextlib.contextmanager
def _activate(
    session: _Session, run: RunSpec, backend: str, selection_backend: str
) -> Iterator[Any]:
    """The model with ``run``'s selector switched on (None for the stock dense model)."""
    if run.kind == "dense":
        yield None
        return
    from sketchwalk.hf.capture import attention_modules
    from sketchwalk.hf.integration import enable_selector

    selector = _make_selector(run, session, selection_backend)
    attach = getattr(selector, "attach", None)
    if attach is not None:
        attach(attention_modules(session.model))
    try:
        with enable_selector(session.model, selector, backend=backend, decode=run.decode) as sw:
            yield sw
    finally:
        if attach is not None:
            selector.detach()


class _ActiveRun:
    """Keeps one run's selector switched on across consecutive items of that run."""

    def __init__(self, session: _Session, backend: str, selection_backend: str):
        self.session, self.backend, self.selection_backend = session, backend, selection_backend
        self.run: RunSpec | None = None
        self.stack: contextlib.ExitStack | None = None
        self.sw: Any = None

    def use(self, run: RunSpec) -> Any:
        """The selector state of ``run`` (None for dense), switched on if it is not yet."""
        if self.run is not run:
            self.close()
            self.stack = contextlib.ExitStack()
            self.sw = self.stack.enter_context(
                _activate(self.session, run, self.backend, self.selection_backend)
            )
            self.run = run
        return self.sw

    def close(self) -> None:
        if self.stack is not None:
            self.stack.close()
        self.stack, self.run, self.sw = None, None, None


def _layer_densities(sw: Any, num_layers: int, seq_len: int) -> list[float]:
    """Prefill density of every layer in the last recorded pass of ``seq_len`` tokens."""
    if sw is None:
        return [1.0] * num_layers
    out = [1.0] * num_layers
    for call in sw.calls:
        if call.prefill and call.q_len == seq_len:
            out[call.layer_idx] = float(call.density)
    return out


def _decode_density(sw: Any) -> float | None:
    if sw is None:
        return None
    steps = [c.density for c in sw.calls if not c.prefill and c.mode == "sparse"]
    return sum(steps) / len(steps) if steps else None


def _density_summary(per_layer: list[float], dense_layers: int | None) -> dict[str, Any]:
    sparse = per_layer[dense_layers:] if dense_layers is not None else []
    return {
        "density_all_layers": sum(per_layer) / len(per_layer),
        "density_sparse_layers": (sum(sparse) / len(sparse)) if sparse else None,
    }


def _dense_layers(run: RunSpec) -> int | None:
    return run.config.dense_layers if run.config is not None else None
