"""`sketchwalk` command line: one subcommand per pipeline step.

Each subcommand lives in the module of the concept it serves; that module exposes
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their
subcommand is built, and keep heavy imports (transformers, matplotlib) inside functions.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

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


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (module, help_) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = (module, help_)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sketchwalk",
        description="Sketch&Walk block-sparse attention: collect, validate, compare.",
    )
    from sketchwalk._version import __version__

    parser.add_argument("--version", action="version", version=f"sketchwalk {__version__}")
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
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
