"""Seed-compatible entry point for step 2; everything lives in :mod:`sketchwalk.pipeline.validate`.

    python validate_sketchwalk_tensors.py --tensor_dir ./tensor_data \
        --output_dir ./validation_results --block_size 64 --sketch_dim 64 \
        --top_k_blocks 16 --device cuda
"""

from __future__ import annotations

import sys

from sketchwalk.cli import UserErrorParser, add_debug_flag, run_main, wants_debug
from sketchwalk.pipeline.validate import add_arguments, run

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = UserErrorParser(
        prog="validate_sketchwalk_tensors.py",
        description="Validate SketchWalk sparse attention against dense attention on collected "
        "tensors (same as `sketchwalk validate`).",
    )
    add_arguments(parser)
    add_debug_flag(parser)
    # one stderr line and exit code 2 (usage) / 1 (data) on a user error; --debug: traceback
    return run_main(
        lambda: run(parser.parse_args(argv)),
        "validate_sketchwalk_tensors.py",
        debug=wants_debug(argv),
    )


if __name__ == "__main__":
    sys.exit(main())
