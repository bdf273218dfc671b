"""User errors and the one place that turns them into a line on stderr and an exit code.

Every command raises, never prints-and-exits: a bad flag value is a `UsageError` (exit 2), a bad
input file or a request the machine cannot serve is a `DataError` (exit 1). The package's older
error types (`TensorFileError`, `ModelNotFoundError`, `CompareInputError`, `GateCheckpointError`,
`TextSourceError`, `CollectError`) and OS errors on a named file count as data errors. `run_main`
prints ``<prog>: error: <message>`` (one line) and returns the code; ``--debug`` re-raises with
the traceback instead. Anything else is a bug: one line asking for a report, exit 3.

The argparse ``type=`` helpers here check a flag's value where it is parsed, so a bad value is
refused before any model loads or any file is written. Imports nothing from the package at
module level.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "DataError",
    "SketchwalkError",
    "UsageError",
    "UserErrorParser",
    "add_debug_flag",
    "check_output_dir",
    "device_arg",
    "exit_code_of",
    "finite_float",
    "flag_error",
    "float_in",
    "int_at_least",
    "run_main",
    "wants_debug",
]

EXIT_DATA = 1
EXIT_USAGE = 2
EXIT_BUG = 3


class SketchwalkError(Exception):
    """Base of the errors a user can fix; ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_DATA


class UsageError(SketchwalkError, ValueError):
    """A flag value or combination that cannot work (exit 2); the message names the flag."""

    exit_code = EXIT_USAGE


class DataError(SketchwalkError, ValueError):
    """An input file or request that cannot be used (exit 1); the message names the file."""

    exit_code = EXIT_DATA


def _known_data_errors() -> tuple[type[BaseException], ...]:
    """The package's older error types, imported only if their modules already are."""
    found: list[type[BaseException]] = []
    for module, name in (
        ("sketchwalk.pipeline.tensorio", "TensorFileError"),
        ("sketchwalk.hf.models", "ModelNotFoundError"),
        ("sketchwalk.pipeline.seer", "CompareInputError"),
        ("sketchwalk.gate.checkpoint", "GateCheckpointError"),
        ("sketchwalk.hf.text", "TextSourceError"),
        ("sketchwalk.pipeline.collect", "CollectError"),
    ):
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, name):
            found.append(getattr(mod, name))
    return tuple(found)


def exit_code_of(exc: BaseException) -> int | None:
    """The exit code for a user error, or None for a bug."""
    if isinstance(exc, SketchwalkError):
        return exc.exit_code
    if isinstance(exc, _known_data_errors()):
        return EXIT_DATA
    if isinstance(exc, OSError) and (exc.filename is not None or exc.errno is not None):
        return EXIT_DATA  # unreadable / unwritable file, full disk, ...
    if isinstance(exc, MemoryError):
        return EXIT_DATA
    return None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        return f"{where}: {exc.strerror or exc}"
    if isinstance(exc, MemoryError):
        return f"out of memory ({exc or 'MemoryError'}); use shorter inputs"
    return str(exc)


def _close_progress_bars() -> None:
    """End live tqdm bars so the error line starts on its own line."""
    tqdm_std = sys.modules.get("tqdm.std")
    if tqdm_std is None:
        return
    for bar in list(getattr(tqdm_std.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # a bar that cannot close must not hide the error
            pass


def run_main(fn: Callable[[], int | None], prog: str, debug: bool = False) -> int:
    """Run a command body and map what it raises to one stderr line and an exit code.

    Returns 0 on success, 1 for data errors, 2 for usage errors, 130 on Ctrl-C and 3 for a bug
    (with ``debug`` every exception propagates with its traceback).
    """
    try:
        return int(fn() or 0)
    except SystemExit as exc:  # argparse --help / --version, or an explicit exit code
        if debug and not isinstance(exc.code, (int, type(None))):
            raise
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        print(f"{prog}: error: {_one_line(exc.code)}", file=sys.stderr)
        return EXIT_DATA
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:
        if debug or not isinstance(exc, Exception):
            raise
        _close_progress_bars()
        code = exit_code_of(exc)
        if code is None:
            print(
                f"{prog}: internal error: {type(exc).__name__}: {_one_line(str(exc))[:500]} "
                "(a bug: please report it; --debug shows the traceback)",
                file=sys.stderr,
            )
            return EXIT_BUG
        print(f"{prog}: error: {_one_line(_message(exc))}", file=sys.stderr)
        return code


class UserErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise `UsageError` (one line, exit 2, via `run_main`)
    instead of printing the usage block and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def add_debug_flag(parser: argparse.ArgumentParser, suppress_default: bool = False) -> None:
    """``--debug``: show the full traceback of an error instead of one line."""
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS if suppress_default else False,
        help="show the full traceback of an error",
    )


def wants_debug(argv: Sequence[str] | None) -> bool:
    """``--debug`` anywhere on the command line (so that parse errors honour it too)."""
    return "--debug" in (sys.argv[1:] if argv is None else argv)


# ---- argparse type= helpers --------------------------------------------------------------


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
