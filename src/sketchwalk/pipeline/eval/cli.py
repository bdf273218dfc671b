"""The ``sketchwalk eval`` command: one subcommand per task family (``ppl``, ``niah``,
``ruler``) with the flags they share (`_add_common`), mapped onto `evaluate_ppl` /
`evaluate_niah` / `evaluate_ruler`; under torchrun rank 0 alone prints the tables."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from sketchwalk.blocks import DataError, UsageError
from sketchwalk.config import add_config_arguments, config_from_args
from sketchwalk.pipeline import distributed
from sketchwalk.pipeline.eval.niah import DEFAULT_DEPTHS, TASKS, evaluate_niah
from sketchwalk.pipeline.eval.ppl import evaluate_ppl
from sketchwalk.pipeline.eval.report import niah_markdown, ppl_markdown
from sketchwalk.pipeline.eval.ruler import evaluate_ruler, ruler_markdown
from sketchwalk.pipeline.eval.ruler_tasks import PROMPT_VARIANTS, SPLITS
from sketchwalk.pipeline.eval.ruler_tasks import TASKS as RULER_TASKS
from sketchwalk.pipeline.eval.runs import DECODE_MODES, SELECTORS


def _add_common(p: argparse.ArgumentParser) -> None:
    from sketchwalk.hf.device_map import add_argument as add_device_map_argument
    from sketchwalk.pipeline.flags import int_at_least

    # The config's flags first: this parser resolves conflicts, so the passage --seed below
    # replaces the config's --seed, which moves to --sketch_seed.
    add_config_arguments(p, {"preset": "default"})
    p.add_argument("--sketch_seed", dest="seed", type=int, default=None,
                   help="seed of the sketch's random draws (SketchWalkConfig.seed)")  # fmt: skip
    p.add_argument("--model_path", default=None, help="alias, HF folder, .gguf or gate folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs (torchrun: cuda:LOCAL_RANK)")  # fmt: skip
    add_device_map_argument(p)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32", "float16"],
        help="model dtype (auto: bf16 on CUDA, float32 on CPU)",
    )
    p.add_argument("--selectors", nargs="+", default=["dense", "sketchwalk", "oracle",
                   "streaming"], choices=SELECTORS, metavar="SELECTOR",
                   help=f"selectors to run, from {', '.join(SELECTORS)}")  # fmt: skip
    p.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                   help="extra SketchWalk config, e.g. paper:preset=paper")  # fmt: skip
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--gate_path", default=None, help="SeerAttention gate folder (selector gate)")
    p.add_argument("--text_source", default="auto", choices=["auto", "austen", "stdlib", "file"])
    p.add_argument("--text_file", default=None)
    p.add_argument("--seed", dest="text_seed", type=int, default=0,
                   help="seed of the passages and needles")  # fmt: skip
    p.add_argument("--num_samples", type=int_at_least(1), default=None)
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "flex"],
                   help="sparse attention backend")  # fmt: skip
    p.add_argument("--selection_backend", default="auto", choices=["auto", "reference", "triton"])
    p.add_argument("--output_dir", default="eval_results")
    p.add_argument("--resume", action="store_true", help="skip items already in the JSON")
    p.add_argument("--timing", action="store_true",
                   help="also time TTFT and decode tokens/s, dense vs SketchWalk")  # fmt: skip
    p.add_argument("--timing_decode_tokens", type=int_at_least(1), default=32)
    p.add_argument("--no_plots", action="store_true")
    p.add_argument("--no_progress", action="store_true")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sketchwalk.pipeline.flags import int_at_least

    sub = parser.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    ppl = sub.add_parser("ppl", help="perplexity of the second half of real passages",
                         description=evaluate_ppl.__doc__, conflict_handler="resolve")  # fmt: skip
    _add_common(ppl)
    ppl.add_argument("--seq_len", type=int, default=4096)
    ppl.add_argument(
        "--loss_chunk", type=int_at_least(1), default=1024, help="positions per logits slice"
    )
    niah = sub.add_parser("niah", help="needle-in-a-haystack retrieval (RULER-style)",
                          description=evaluate_niah.__doc__,
                          conflict_handler="resolve")  # fmt: skip
    _add_common(niah)
    niah.add_argument("--seq_lens", type=int, nargs="+", default=[4096])
    niah.add_argument("--depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS))
    niah.add_argument("--task", default="single", choices=TASKS)
    niah.add_argument(
        "--num_needles", type=int_at_least(1), default=4, help="needles for --task multikey"
    )
    niah.add_argument("--max_new_tokens", type=int_at_least(1), default=12)
    niah.add_argument("--decode", nargs="+", default=["dense", "sketchwalk"],
                      choices=DECODE_MODES,
                      help="decode modes of SketchWalk runs: dense = prefill-only")  # fmt: skip
    ruler = sub.add_parser("ruler", help="RULER's synthetic tasks (needles, variable tracking, "
                           "common and frequent words)", description=evaluate_ruler.__doc__,
                           conflict_handler="resolve")  # fmt: skip
    _add_common(ruler)
    ruler.set_defaults(densities=[0.1, 0.2])
    ruler.add_argument("--seq_lens", type=int, nargs="+", default=[4096])
    ruler.add_argument(
        "--tasks",
        nargs="+",
        default=list(RULER_TASKS),
        choices=RULER_TASKS,
        metavar="TASK",
        help=f"from {', '.join(RULER_TASKS)} (default: all)",
    )
    ruler.add_argument(
        "--prompts",
        nargs="+",
        default=["after"],
        choices=PROMPT_VARIANTS,
        help="prompt variants: the question after the context or before and "
        "after it, each with or without the answer prefix (_prefix)",
    )
    ruler.add_argument(
        "--split",
        default="report",
        choices=SPLITS,
        help="tune: the prompts defaults are chosen on; report: the held-out "
        "prompts the tables show (disjoint values, seeds and filler)",
    )
    ruler.add_argument(
        "--max_new_tokens",
        type=int_at_least(1),
        default=None,
        help="tokens to generate (default: enough for each task's answer)",
    )
    ruler.add_argument(
        "--batch_size",
        type=int_at_least(1),
        default=1,
        help="prompts generated together (same run and answer cap; left-padded)",
    )
    ruler.add_argument(
        "--length_jitter",
        type=int_at_least(0),
        default=0,
        help="each prompt is up to this many tokens shorter than its --seq_lens (one draw per "
        "round of four samples), so prompts end anywhere in a block (default 0: exactly the "
        "length)",
    )
    ruler.add_argument(
        "--decode",
        nargs="+",
        default=["sketchwalk"],
        choices=DECODE_MODES,
        help="decode modes of SketchWalk runs: dense = prefill-only",
    )


def run(args: argparse.Namespace) -> int:
    dtype = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32,
             "float16": torch.float16}[args.dtype]  # fmt: skip
    common = dict(
        model_path=args.model_path,
        densities=args.densities,
        selectors=args.selectors,
        variants=args.variant,
        text_source=args.text_source,
        text_file=args.text_file,
        seed=args.text_seed,
        device=args.device,
        dtype=dtype,
        backend=args.backend,
        selection_backend=args.selection_backend,
        gate_path=args.gate_path,
        output_dir=args.output_dir,
        resume=args.resume,
        timing=args.timing,
        timing_decode_tokens=args.timing_decode_tokens,
        progress=not args.no_progress,
        plots=not args.no_plots,
    )
    if args.text_file is not None and not Path(args.text_file).is_file():
        raise UsageError(f"--text_file {args.text_file}: file not found")
    if args.text_source == "file" and args.text_file is None:
        raise UsageError("--text_source file needs --text_file")
    if args.device_map is not None:
        from sketchwalk.hf.device_map import check_world

        check_world(args.device_map, distributed.requested_world_size())
        if args.device != "auto":
            raise UsageError(
                f"--device {args.device} and --device_map: give one (the map places the model)"
            )
        common["device_map"] = args.device_map
    start = time.perf_counter()
    with distributed.session(args.device) as w:
        return _run_task(args, common, start, w)


def _run_task(
    args: argparse.Namespace, common: dict[str, Any], start: float, w: distributed.World
) -> int:
    from sketchwalk.gate.checkpoint import GateCheckpointError
    from sketchwalk.hf.models import ModelNotFoundError
    from sketchwalk.hf.text import TextSourceError

    try:
        common["base_config"] = config_from_args(args, default_preset="default")
        # one branch per task family: its evaluation and its tables
        if args.eval_task == "ppl":
            markdown = ppl_markdown
            data = evaluate_ppl(
                seq_len=args.seq_len,
                num_samples=2 if args.num_samples is None else args.num_samples,
                loss_chunk=args.loss_chunk,
                **common,
            )
        elif args.eval_task == "ruler":
            markdown = ruler_markdown
            if common.pop("timing"):
                raise UsageError("--timing: not measured by eval ruler (use eval niah --timing)")
            common.pop("timing_decode_tokens")
            data = evaluate_ruler(
                seq_lens=args.seq_lens,
                tasks=args.tasks,
                num_samples=4 if args.num_samples is None else args.num_samples,
                prompt_variants=args.prompts,
                split=args.split,
                max_new_tokens=args.max_new_tokens,
                batch_size=args.batch_size,
                length_jitter=args.length_jitter,
                decode=args.decode,
                **common,
            )
        else:
            markdown = niah_markdown
            data = evaluate_niah(
                seq_lens=args.seq_lens,
                depths=args.depths,
                num_samples=1 if args.num_samples is None else args.num_samples,
                task=args.task,
                num_needles=args.num_needles,
                max_new_tokens=args.max_new_tokens,
                decode=args.decode,
                **common,
            )
    except (ModelNotFoundError, TextSourceError, GateCheckpointError, DataError):
        raise  # data errors: one line and exit 1 (sketchwalk.cli.run_main)
    except UsageError:
        raise
    except ValueError as exc:  # config validation (SketchWalkConfig): a bad flag value
        from sketchwalk.pipeline.flags import flag_error

        raise flag_error(exc) from None
    if not w.is_main:
        return 0  # rank 0 reports
    print(markdown(data))
    out = Path(args.output_dir) / f"eval_{args.eval_task}.json"
    print(f"wrote {out} and its .md/.png ({time.perf_counter() - start:.1f} s)")
    return 0
