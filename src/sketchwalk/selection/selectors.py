"""Every block selector by name, for the commands that compare them (``eval``, ``compare``).

`make_selector(name, config, ...)` builds one: all share the interface ``config``, ``reset()``,
``select(q, k, layer_idx) -> BlockSelection`` and, given one config, the same forced blocks and
budget, so at a ``density`` budget they keep the same number of blocks per row (matched realized
density) and differ only in their ranking. Under the ``mass`` budget (top-p, Twilight's rule on
each selector's own normalised scores) the density follows each selector's scores.

Names (`SELECTOR_NAMES`):

- ``sketchwalk``: `sketchwalk.selection.prefill.SketchWalk` (option ``backend``);
- ``oracle``, ``streaming``, ``forced``, ``gate``, ``quest``: `sketchwalk.selection.baselines`
  (``gate`` needs ``gates``, a loaded gate checkpoint; ``quest`` is dense in prefill and sets
  ``decode_rule="quest"``: it only differs from dense when decode steps are sparse);
- ``xattention``: `sketchwalk.selection.xattention` (options ``stride``, ``chunk_elements``);
- ``minference``: `sketchwalk.selection.minference` (``last_queries``, ``vertical_size``,
  ``slash_size``);
- ``flexprefill``: `sketchwalk.selection.flexprefill` (``tau``, ``gamma``).
"""

from __future__ import annotations

from typing import Any

from sketchwalk.blocks import UsageError
from sketchwalk.config import SketchWalkConfig

__all__ = ["PEER_SELECTORS", "SELECTOR_NAMES", "make_selector"]

# Selectors of other papers, written from their descriptions (docs/algorithm.md §8).
PEER_SELECTORS = ("xattention", "minference", "flexprefill")
SELECTOR_NAMES = (
    "sketchwalk",
    "oracle",
    "streaming",
    "forced",
    "gate",
    "quest",
    *PEER_SELECTORS,
)


def _classes() -> dict[str, Any]:
    from sketchwalk.selection import baselines
    from sketchwalk.selection.flexprefill import FlexPrefillSelector
    from sketchwalk.selection.minference import MInferenceSelector
    from sketchwalk.selection.prefill import SketchWalk
    from sketchwalk.selection.xattention import XAttentionSelector

    return {
        "sketchwalk": SketchWalk,
        "oracle": baselines.OracleSelector,
        "streaming": baselines.StreamingSelector,
        "forced": baselines.ForcedOnlySelector,
        "gate": baselines.GateSelector,
        "quest": baselines.QuestSelector,
        "xattention": XAttentionSelector,
        "minference": MInferenceSelector,
        "flexprefill": FlexPrefillSelector,
    }


def make_selector(
    name: str, config: SketchWalkConfig | None = None, *, gates: Any = None, **options: Any
) -> Any:
    """The selector called ``name`` with ``config`` (the `SketchWalkConfig` every selector of a
    comparison shares, its budget included).

    Args:
        name: one of `SELECTOR_NAMES`.
        config: forced blocks, budget, granularity, dense layers (default: `SketchWalkConfig()`).
        gates: the gate checkpoint (`sketchwalk.gate.checkpoint.GateSet`), for ``gate`` only.
        **options: the selector's own keyword arguments (see the module docstring), e.g.
            ``stride=16`` for ``xattention`` or ``backend="reference"`` for ``sketchwalk``.

    Returns:
        The selector.

    Raises:
        UsageError: an unknown name, a missing gate, or options the selector does not take.
    """
    if name not in SELECTOR_NAMES:
        raise UsageError(f"unknown selector {name!r}; choose from {list(SELECTOR_NAMES)}")
    if name == "gate":
        if gates is None:
            raise UsageError("selector 'gate' needs a gate checkpoint (--gate_path)")
        options = {"gates": gates, **options}
    elif gates is not None:
        raise UsageError(f"selector {name!r} takes no gate checkpoint")
    cls = _classes()[name]
    try:
        return cls(config=config, **options)
    except TypeError as exc:
        raise UsageError(f"selector {name!r}: {exc}") from None
