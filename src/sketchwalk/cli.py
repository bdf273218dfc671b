"""`sketchwalk` command line: one subcommand per pipeline step.

Each subcommand lives in the module of the concept it serves; that module exposes
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their
subcommand is built, and keep heavy imports (transformers, matplotlib) inside functions.

Commands raise on a user error; `main` is the one place that turns the error into one line on
stderr and exit code 2 (usage) or 1 (data) (`sketchwalk.errors`); ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from sketchwalk.errors import UserErrorParser, add_debug_flag, run_main, wants_debug

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
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (module, help_) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = (module, help_)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = UserErrorParser(
        prog="sketchwalk",
        description="Sketch&Walk block-sparse attention: collect, validate, compare.",
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
