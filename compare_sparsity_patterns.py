"""Seed-compatible entry point for step 3; everything lives in :mod:`sketchwalk.pipeline.compare`.

    python compare_sparsity_patterns.py --tensor_dir ./tensor_data \
        --validation_dir ./validation_results --output_dir ./comparison_results \
        --block_size 64 --sketch_dim 64 --top_k_blocks 16 --seerattn_threshold 0.1 --device cuda
"""

from __future__ import annotations

import argparse
import sys

from sketchwalk.cli import UserErrorParser, add_debug_flag, run_main, wants_debug
from sketchwalk.pipeline.compare import __doc__ as _help
from sketchwalk.pipeline.compare import add_arguments, run

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = UserErrorParser(
        prog="compare_sparsity_patterns.py",
        description=(_help or "").strip() + "\n\n(same as `sketchwalk compare`)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    add_debug_flag(parser)
    # one stderr line and exit code 2 (usage) / 1 (data) on a user error; --debug: traceback
    return run_main(
        lambda: run(parser.parse_args(argv)),
        "compare_sparsity_patterns.py",
        debug=wants_debug(argv),
    )


if __name__ == "__main__":
    sys.exit(main())
