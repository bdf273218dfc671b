"""Seed-compatible entry point for step 1; everything lives in :mod:`sketchwalk.pipeline.collect`.

    python collect_seerattn_tensors.py --model_path /path/to/model --output_dir ./tensor_data \
        --sequence_lengths 4096 8192 16384 --num_samples 5 --device cuda

``from collect_seerattn_tensors import TensorCollector`` keeps working too.
"""

from __future__ import annotations

import sys

from sketchwalk.cli import UserErrorParser, add_debug_flag, run_main, wants_debug
from sketchwalk.pipeline.collect import TensorCollector, add_arguments, run

__all__ = ["TensorCollector", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = UserErrorParser(
        prog="collect_seerattn_tensors.py",
        description="Capture real post-RoPE Q/K/V tensors from a causal LM run "
        "(same as `sketchwalk collect`).",
    )
    add_arguments(parser)
    add_debug_flag(parser)
    # one stderr line and exit code 2 (usage) / 1 (data) on a user error; --debug: traceback
    return run_main(
        lambda: run(parser.parse_args(argv)), "collect_seerattn_tensors.py", debug=wants_debug(argv)
    )


if __name__ == "__main__":
    sys.exit(main())
