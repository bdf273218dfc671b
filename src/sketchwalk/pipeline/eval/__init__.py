"""Evaluate block selectors end to end on a real model, at matched attention density.

Three task families (``sketchwalk eval ppl``, ``eval niah`` and ``eval ruler``; Python API
:func:`evaluate_ppl`, :func:`evaluate_niah` and :func:`evaluate_ruler`):

- ``ppl``: perplexity of the SECOND HALF of ``--num_samples`` real passages of ``--seq_len``
  tokens (``sketchwalk.hf.text.make_passages``: fixed by ``--seed``, recorded by the SHA-256
  of their token ids). One forward pass per passage and selector; the loss is computed from the
  final hidden states in slices of ``--loss_chunk`` positions, so no (T, vocab) float32 tensor
  is ever built.
- ``niah``: RULER-style needle retrieval through ``model.generate()`` (greedy) with the model's
  chat template (a plain prompt when it has none): "The special magic number for <key> is
  <value>." hidden at ``--depths`` (% of the filler) in real text, for each of ``--seq_lens``;
  ``--task multikey`` hides ``--num_needles`` needles with different keys and asks for one.
  Correct = the value appears in the answer. Every answer is saved.
- ``ruler``: RULER's synthetic tasks (`ruler_tasks`: needles in noise, real text or other
  needles; several keys, values or queries; variable tracking; common and frequent words), with
  prompt variants (question after or before and after the context, with or without the answer
  prefix) and two disjoint splits (``tune`` for choosing defaults, ``report`` for the tables);
  scored as RULER scores, with 95% Wilson intervals and a check that each task separates
  streaming from dense.

Selectors (``--selectors``; each at every density of ``--densities``): ``dense`` (the stock
model), ``sketchwalk`` (the base config: ``--preset`` plus config flags), every ``--variant
NAME:key=value,...`` (more SketchWalk configs, e.g. ``paper:preset=paper``), ``oracle`` (true
attention mass per block), ``streaming`` (sink + most recent blocks), ``forced`` (only the
forced blocks: the floor) and ``gate`` (a SeerAttention gate checkpoint, ``--gate_path``). All
run through the same sparse attention path (`sketchwalk.hf.integration.enable_selector`) with
the same forced blocks and the same per-row budget (`sketchwalk.selection.baselines`), so only
the ranking differs and the realized densities match. The first ``dense_layers`` layers stay
dense for all. For niah, SketchWalk configs run with each ``--decode`` mode: ``dense``
(prefill-only) and ``sketchwalk`` (prefill + SketchWalk decode).

Outputs in ``--output_dir``: ``eval_<task>.json`` (every selector's config, realized density per
layer and overall, the passages' token hashes, per-item results and answers, the environment),
written atomically after every item; ``--resume`` skips the (selector, sample, length[, depth])
items already there. Also ``eval_<task>.md`` (tables) and plots (``eval_<task>.png``: metric
against realized density, one line per selector; ``eval_niah_heatmap.png``: accuracy by depth
and length). ``--timing`` adds time to first token and decode tokens/s, dense and with each
SketchWalk config, measured in the same process.

Under ``torchrun --nproc_per_node N -m sketchwalk eval ...`` the items are dealt out over the N
processes (`sketchwalk.pipeline.distributed`, docs/distributed.md); rank 0 alone reads, resumes
and writes, and the files are those of one process plus each item's ``rank`` and the settings'
``world_size``.

The package, one module per concept: `runs` (selectors, variants and densities as `RunSpec`s;
input checks), `session` (the model, its selectors switched on, the environment), `results`
(the runner: result files, ``--resume`` and the item loop over ranks), one module per task
family (`ppl`, `niah`, `ruler` with its prompts in `ruler_tasks`), `timing` (``--timing``),
`report` (markdown tables and plots) and `cli` (the flags). A new task family is a module
beside `ppl` and `niah` plus its subcommand in `cli`.
"""

from sketchwalk.pipeline.eval.cli import add_arguments, run
from sketchwalk.pipeline.eval.niah import (
    DEFAULT_DEPTHS,
    TASKS,
    build_niah_prompt,
    evaluate_niah,
    niah_prompts,
)
from sketchwalk.pipeline.eval.ppl import evaluate_ppl, second_half_nll
from sketchwalk.pipeline.eval.report import niah_markdown, ppl_markdown
from sketchwalk.pipeline.eval.results import RESULT_VERSION
from sketchwalk.pipeline.eval.ruler import evaluate_ruler, ruler_markdown, ruler_prompts
from sketchwalk.pipeline.eval.runs import (
    DECODE_MODES,
    SELECTORS,
    EvalInputError,
    RunSpec,
    build_runs,
    forced_density,
    forced_warnings,
    parse_variant,
)
from sketchwalk.pipeline.eval.session import _transformers_progress  # noqa: F401 (tests use it)
from sketchwalk.pipeline.eval.timing import measure_timing

__all__ = [
    "DECODE_MODES",
    "DEFAULT_DEPTHS",
    "RESULT_VERSION",
    "SELECTORS",
    "TASKS",
    "EvalInputError",
    "RunSpec",
    "add_arguments",
    "build_niah_prompt",
    "build_runs",
    "evaluate_niah",
    "evaluate_ppl",
    "evaluate_ruler",
    "forced_density",
    "forced_warnings",
    "measure_timing",
    "niah_markdown",
    "niah_prompts",
    "parse_variant",
    "ppl_markdown",
    "ruler_markdown",
    "ruler_prompts",
    "run",
    "second_half_nll",
]
