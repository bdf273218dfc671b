"""Flag values checked where they are parsed, shared by the pipeline commands: argparse ``type=``
functions (a bad value is refused before any model loads or file is written, with the flag's
name), the device flag, the output folder, and config errors restated as flag errors.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

from sketchwalk.blocks import UsageError

__all__ = [
    "check_output_dir",
    "config_value",
    "device_arg",
    "finite_float",
    "flag_error",
    "float_in",
    "int_at_least",
]


def int_at_least(low: int) -> Callable[[str], int]:
    """An int flag >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def finite_float(text: str) -> float:
    """A finite float flag (no nan / inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def float_in(
    low: float | None, high: float | None, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """A finite float flag in an interval (``None`` = unbounded on that side)."""
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    if low is not None and high is not None:
        text_range = f"in {left}{low:g}, {high:g}{right}"
    elif low is not None:
        text_range = f"{'>' if low_open else '>='} {low:g}"
    else:
        text_range = f"{'<' if high_open else '<='} {high:g}"

    def parse(text: str) -> float:
        value = finite_float(text)
        bad_low = low is not None and (value <= low if low_open else value < low)
        bad_high = high is not None and (value >= high if high_open else value > high)
        if bad_low or bad_high:
            raise argparse.ArgumentTypeError(f"must be {text_range}, got {text}")
        return value

    parse.__name__ = f"float {text_range}"
    return parse


def device_arg(text: str) -> str:
    """A device flag: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (CUDA must be available)."""
    import torch

    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}; expected auto, cpu, cuda or cuda:N"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(
            f"unsupported device {text!r}; expected auto, cpu, cuda or cuda:N"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r} asked for, but CUDA is not available here; use cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    return text


def config_value(name: str, kind: Callable[[str], object] = float) -> Callable[[str], object]:
    """A flag for `SketchWalkConfig` field ``name``, checked by the config's own validation."""
    from sketchwalk.config import SketchWalkConfig

    def parse(text: str) -> object:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            SketchWalkConfig(**{name: value})
        except ValueError as exc:
            message = str(exc).replace(f"SketchWalkConfig.{name} ", "")
            message = message.replace("must be None or ", "must be ")
            raise argparse.ArgumentTypeError(message) from None
        return value

    parse.__name__ = name
    return parse


def check_output_dir(path: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """Create an output folder (parents too) and make sure files can be written in it.

    Raises:
        UsageError: the path is a file, lies under a file, or is not writable.
    """
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
        if parent.exists():
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot create it ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: not writable")
    return path


def flag_error(exc: BaseException, prefix: str = "SketchWalkConfig.") -> UsageError:
    """A config validation error (``SketchWalkConfig.density must be ...``) restated for the
    command line (``--density must be ...``)."""
    text = str(exc)
    if text.startswith(prefix):
        text = "--" + text[len(prefix) :]
    text = text.replace("must be None or ", "must be ")
    return UsageError(text)
