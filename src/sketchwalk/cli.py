"""`sketchwalk` command line: one subcommand per pipeline step.

Each subcommand lives in the module of the concept it serves; that module exposes
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their
subcommand is built, and keep heavy imports (transformers, matplotlib) inside functions.

Commands raise on a user error; `main` is the one place that turns the error into one line on
stderr and exit code 2 (usage) or 1 (data) (`run_main`); ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence

from sketchwalk.blocks import EXIT_DATA, SketchwalkError, UsageError

EXIT_BUG = 3

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "collect": ("sketchwalk.pipeline.collect", "capture real Q/K/V tensors from a causal LM run"),
    "validate": (
        "sketchwalk.pipeline.validate",
        "run SketchWalk on collected tensors against dense attention",
    ),
    "compare": (
        "sketchwalk.pipeline.compare",
        "compare SketchWalk's block selection with SeerAttention's",
    ),
    "demo": (
        "sketchwalk.pipeline.demo",
        "collect -> validate -> compare -> report on the embedded model",
    ),
    "train-gate": ("sketchwalk.gate.train", "train SeerAttention gates by self-distillation"),
    "eval": (
        "sketchwalk.pipeline.eval",
        "perplexity and needle retrieval of selectors at matched density",
    ),
    "models": ("sketchwalk.hf.models", "list the model aliases; fetch and verify a model"),
}


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
    if isinstance(exc, OSError):
        return EXIT_DATA  # unreadable / unwritable / existing file, full disk, ...
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
        with contextlib.suppress(Exception):  # a bar that cannot close must not hide the error
            bar.close()


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


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (module, help_) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = (module, help_)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = UserErrorParser(
        prog="sketchwalk",
        description="Sketch&Walk block-sparse attention: collect, validate, compare, evaluate.",
    )
    from sketchwalk._version import __version__

    parser.add_argument("--version", action="version", version=f"sketchwalk {__version__}")
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in _available().items():
        mod = importlib.import_module(module)
        p = sub.add_parser(
            name,
            help=help_,
            description=(mod.__doc__ or help_).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        add_debug_flag(p, suppress_default=True)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit code (never raises on a user
    error unless ``--debug`` is given)."""

    def body() -> int:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "_run", None) is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args._run(args) or 0)

    prog = "sketchwalk"
    if argv is None:
        argv_list = sys.argv[1:]
    else:
        argv_list = list(argv)
    command = next((a for a in argv_list if not a.startswith("-")), None)
    if command in COMMANDS:
        prog = f"sketchwalk {command}"
    return run_main(body, prog, debug=wants_debug(argv_list))


if __name__ == "__main__":
    sys.exit(main())
