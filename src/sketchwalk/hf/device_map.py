"""``--device_map``: one model split over several devices (transformers' ``device_map``).

A value is ``auto`` (accelerate fills the GPUs in order, then the CPU) or an explicit map from
module names to devices, written as JSON (``{"model.embed_tokens": 0, "model.layers.0": 0,
...}``) or as ``module=device`` pairs (``model.embed_tokens=cuda:0,model.layers.0=cuda:0,...``).
A device is a GPU index (``0``), ``cuda:N``, ``cpu`` or ``disk``. An explicit map must name
modules of the model and place every weight (checked on an empty ``meta`` copy of the model
before any weight is read): a misspelt name would otherwise be ignored silently.

The model's inputs go to the device of its input embeddings (`input_device`); each decoder
layer's attention (capture, selection, sparse attention) runs where that layer lives, and the
SketchWalk walk state follows the layers from device to device.

Loading through a device map needs the ``accelerate`` package. A map and several processes of
a ``torchrun`` launch do not combine (each rank would load the whole split model onto the same
devices): `check_world` refuses it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from collections.abc import Iterable
from typing import Any

import torch

from sketchwalk.blocks import UsageError

__all__ = [
    "DeviceMap",
    "add_argument",
    "check_modules",
    "check_world",
    "describe",
    "device_map_arg",
    "input_device",
    "parse_device_map",
    "require_accelerate",
]

# "auto" or {module name: device}
DeviceMap = str | dict[str, int | str]


def _device_value(module: str, raw: Any) -> int | str:
    """One device of an explicit map: a GPU index, ``cuda:N``, ``cpu``, ``disk`` (...)."""
    if isinstance(raw, bool):
        raise ValueError(f"{module}: {raw!r} is not a device")
    if isinstance(raw, int) or (isinstance(raw, str) and raw.strip().isdigit()):
        index = int(raw)
        if index < 0:
            raise ValueError(f"{module}: {raw!r} is not a device")
        return index
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"{module}: {raw!r} is not a device (a GPU index, cuda:N, cpu or disk)")
    text = raw.strip()
    if text == "disk":
        return text
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"{module}: unknown device {text!r} (a GPU index, cuda:N, cpu or disk)"
        ) from None
    return text


def parse_device_map(text: str) -> DeviceMap:
    """``auto``, a JSON object or ``module=device,...`` pairs -> ``"auto"`` or a dict.

    Raises:
        ValueError: the text is none of these (the message says what is wrong).
    """
    text = text.strip()
    if text == "auto":
        return "auto"
    if text.startswith(("{", "[")):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
        if not isinstance(raw, dict):
            raise ValueError("the JSON must be an object of module names to devices")
        pairs = list(raw.items())
    else:
        pairs = []
        for part in text.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ValueError(
                    f"{part.strip()!r} is not module=device (expected auto, a JSON object or "
                    "module=device pairs separated by commas)"
                )
            name, _, device = part.partition("=")
            pairs.append((name.strip(), device))
    if not pairs:
        raise ValueError("the map is empty")
    out: dict[str, int | str] = {}
    for name, device in pairs:
        if not isinstance(name, str):
            raise ValueError(f"{name!r} is not a module name")
        if name in out:
            raise ValueError(f"module {name!r} is given twice")
        out[name] = _device_value(name or '""', device)
    return out


def device_map_arg(text: str) -> DeviceMap:
    """argparse ``type=`` of ``--device_map`` (a bad value is refused before the model loads)."""
    try:
        device_map = parse_device_map(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if isinstance(device_map, dict):
        for name, device in device_map.items():
            wanted = torch.device("cuda", device) if isinstance(device, int) else device
            if wanted == "disk" or torch.device(wanted).type != "cuda":
                continue
            index = torch.device(wanted).index or 0
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                raise argparse.ArgumentTypeError(
                    f"{name}: {device!r} asked for, but there are "
                    f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} CUDA "
                    "device(s) here"
                )
    return device_map


def describe(device_map: DeviceMap | None) -> Any:
    """The map as recorded in result files (JSON-safe)."""
    return device_map if device_map is None or isinstance(device_map, str) else dict(device_map)


def require_accelerate() -> None:
    """Raise a `UsageError` when the accelerate package (device maps) is missing."""
    if importlib.util.find_spec("accelerate") is None:
        raise UsageError(
            "--device_map needs the accelerate package, which is not installed "
            "(pip install accelerate)"
        )


def check_world(device_map: DeviceMap | None, world_size: int | None = None) -> None:
    """Refuse ``--device_map`` under a ``torchrun`` launch of several processes
    (``world_size``, default: ``WORLD_SIZE`` of the environment, 1 without torchrun)."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE") or 1)
    if device_map is not None and world_size > 1:
        raise UsageError(
            f"--device_map and torchrun with {world_size} processes do not combine: every "
            "process would load the whole split model onto the same devices; run one process "
            "with --device_map, or several processes (one device each) without it"
        )


def _covered(name: str, keys: Iterable[str]) -> bool:
    return any(key == "" or name == key or name.startswith(key + ".") for key in keys)


def check_modules(model: torch.nn.Module, device_map: DeviceMap) -> None:
    """An explicit map must name modules of ``model`` and place every weight and buffer.

    Args:
        model: the model, or an empty copy of it (on the ``meta`` device).

    Raises:
        UsageError: unknown module names, or modules with weights that no entry places.
    """
    if not isinstance(device_map, dict):
        return
    names = {name for name, _ in model.named_modules()}
    unknown = [key for key in device_map if key not in names]
    if unknown:
        shown = sorted(n for n in names if n and n.count(".") <= 2)[:12]
        raise UsageError(
            f"--device_map: no module named {', '.join(repr(k) for k in unknown)} in this "
            f"model; its modules include {', '.join(shown)}"
        )
    missing = []
    for name, module in model.named_modules():
        own = any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        )
        if own and not _covered(name, device_map):
            missing.append(name)
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise UsageError(
            f"--device_map places no device for {', '.join(missing[:8])}{more}; give every "
            "module with weights a device (or a parent module, e.g. model.layers)"
        )


def input_device(model: Any) -> torch.device:
    """Where the model's inputs go: the device of its input embeddings."""
    embeddings = model.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if weight is not None:
        return weight.device
    return next(model.parameters()).device


def add_argument(parser: argparse.ArgumentParser) -> None:
    """``--device_map`` (collect, eval, train-gate): one model split over several devices."""
    parser.add_argument(
        "--device_map",
        type=device_map_arg,
        default=None,
        metavar="MAP",
        help="split the model over devices (needs accelerate): auto, a JSON object or "
        "module=device pairs, e.g. model.embed_tokens=0,model.layers.0=0,...,lm_head=1; "
        "inputs go to the embeddings' device, each layer's attention runs where the layer "
        "lives; one process only (not with torchrun)",
    )
