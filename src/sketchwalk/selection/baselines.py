"""Baseline block selectors, at SketchWalk's budget, for comparisons at matched density.

Every selector here has SketchWalk's shape (``config``, ``reset()``, ``select(q, k, layer_idx)
-> BlockSelection``), so :func:`sketchwalk.hf.integration.enable_selector` runs them through the
same sparse attention path. They share SketchWalk's budget exactly:

- the forced blocks of :func:`~sketchwalk.selection.select.forced_block_mask` (sink, local window
  with the diagonal, dense last rows);
- in every query-block row, the same number of ranked blocks,
  :func:`~sketchwalk.selection.select.ranked_per_row`, taken among the same candidates (the
  causal, non-forced blocks); only the ranking score differs;
- the same mask granularity (one mask per layer, per KV group or per head) and the same dense
  layers (``layer_idx < dense_layers`` keeps every causal block).

So each row keeps exactly as many blocks as SketchWalk keeps there (except under the ``parity``
quantile budget, whose per-row count depends on ties of the walk scores) and the realized
densities match. Every budget form of `SketchWalkConfig` applies, because the ranking is
SketchWalk's own `~sketchwalk.selection.select.select_blocks`: ``density`` per row or allocated
globally, ``top_k_blocks``, ``kblocks_frac`` and ``mass``, the top-p rule (per row, the best
blocks until their share of the row's normalised scores reaches ``mass``; its density follows the
scores and is what `BlockSelection.density` reports).

Selectors:

- :class:`OracleSelector`: ranks by the TRUE attention mass of each (query block, key block)
  tile, computed from q and k in chunks of query rows (memory O(chunk x T), never O(T^2)). At a
  given per-row budget it maximises the attention recall: the upper bound for any selector;
- :class:`StreamingSelector`: ranks by recency: the sink plus the most recent blocks
  (StreamingLLM's pattern at SketchWalk's budget);
- :class:`ForcedOnlySelector`: only the forced blocks (the floor every selector starts from;
  its density is below the others');
- :class:`GateSelector`: ranks by a SeerAttention gate's block scores, computed from the PRE-RoPE
  q/k that the gate was trained on, captured with forward hooks on the attention modules'
  ``q_proj``/``k_proj`` (``q_norm``/``k_norm`` where the architecture has them) while attached;
- :class:`QuestSelector`: dense prefill, and the query-aware key-bound rule of
  `sketchwalk.selection.quest` for the decode steps (Quest is a decode-time method).

The selectors of other papers (XAttention, MInference, FlexPrefill) have the same shape, one file
each in this package; `sketchwalk.selection.selectors.make_selector` builds any of them by name.
A selector whose method has its own budget rule sets ``native`` and returns its own mask from
``_native_mask``; the forced blocks are added to it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from sketchwalk.blocks import BlockSelection, check_finite, check_qk, num_blocks
from sketchwalk.config import SketchWalkConfig
from sketchwalk.selection.select import forced_block_mask, select_blocks

__all__ = [
    "ForcedOnlySelector",
    "GateSelector",
    "OracleSelector",
    "QuestSelector",
    "StreamingSelector",
    "aggregate_groups",
    "select_ranked",
    "union_groups",
]

# Elements of one query chunk's (B, Hq, rows, T) float32 probabilities in the oracle.
DEFAULT_ORACLE_CHUNK_ELEMENTS = 1 << 24


def _groups(config: SketchWalkConfig, num_q_heads: int, num_kv_heads: int) -> int:
    return {"layer": 1, "kv_group": num_kv_heads, "head": num_q_heads}[config.granularity]


def aggregate_groups(per_head: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean of per-head scores (B, Hq, nq, nk) within ``groups`` consecutive head groups:
    (B, groups, nq, nk) (GQA order: query head h belongs to group h // (Hq / groups))."""
    b, hq, nq, nk = per_head.shape
    if hq % groups:
        raise ValueError(f"cannot split {hq} heads into {groups} mask groups")
    return per_head.view(b, groups, hq // groups, nq, nk).mean(dim=2)


def union_groups(per_head: torch.Tensor, groups: int) -> torch.Tensor:
    """bool (B, Hq, nq, nk) per-head masks -> (B, groups, nq, nk): a group keeps a block when
    any of its heads keeps it (GQA order as in `aggregate_groups`)."""
    b, hq, nq, nk = per_head.shape
    if hq % groups:
        raise ValueError(f"cannot split {hq} heads into {groups} mask groups")
    return per_head.view(b, groups, hq // groups, nq, nk).any(dim=2)


def select_ranked(scores: torch.Tensor, seq_len: int, config: SketchWalkConfig) -> BlockSelection:
    """Forced blocks plus the candidates SketchWalk's budget keeps when ranked by ``scores``.

    Args:
        scores: float (B, G, nb, nb), higher = keep first; only candidate entries (causal and
            not forced) are ranked. Under the ``mass`` budget (top-p) and the global density
            allocation the scores are also normalised per row, so they should be non-negative
            masses (attention estimates) for those budgets to mean what they say.
        seq_len: T.
        config: forced blocks and budget (SketchWalk's), any budget form.

    Returns:
        The selection (`select_blocks`; no scores attached).
    """
    selection = select_blocks(scores, seq_len, config)
    selection.scores = None
    return selection


class _BudgetSelector:
    """Shared shape: input checks, dense layers, ranking by ``_scores`` at the budget."""

    name = "baseline"
    # True where the method's own budget rule replaces the config's (`_native_mask`).
    native = False

    def __init__(self, config: SketchWalkConfig | None = None) -> None:
        self.config = config if config is not None else SketchWalkConfig()
        if not isinstance(self.config, SketchWalkConfig):
            raise TypeError(f"{type(self).__name__}: config must be a SketchWalkConfig")

    def reset(self) -> None:
        """Nothing is carried between layers."""

    def select(self, q: torch.Tensor, k: torch.Tensor, layer_idx: int) -> BlockSelection:
        """Select key blocks for one layer.

        Args:
            q: (B, Hq, T, D) post-RoPE queries; k: (B, Hkv, T, D) post-RoPE keys.
            layer_idx: the layer index (layers below ``dense_layers`` keep every block).

        Returns:
            `BlockSelection` with 1, Hkv or Hq mask groups by ``config.granularity``.
        """
        where = f"{type(self).__name__}.select"
        check_qk(q, k, where)
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"{where}: prefill needs as many keys as queries")
        b, hq, t, _ = q.shape
        groups = _groups(self.config, hq, k.shape[1])
        if layer_idx < self.config.dense_layers:
            return BlockSelection.full(b, groups, t, self.config.block_size, q.device)
        check_finite(f"{where}: layer {layer_idx}", q=q, k=k)
        if self.native:
            mask = self._native_mask(q, k, layer_idx, groups)
            forced = forced_block_mask(mask.shape[-1], self.config, mask.device)
            return BlockSelection.from_mask(mask | forced, self.config.block_size, t)
        scores = self._scores(q, k, layer_idx, groups)
        return select_ranked(scores, t, self.config)

    def _scores(self, q: torch.Tensor, k: torch.Tensor, layer_idx: int, groups: int):
        """float (B, groups, nb, nb) ranking scores, higher = keep first."""
        raise NotImplementedError

    def _native_mask(self, q: torch.Tensor, k: torch.Tensor, layer_idx: int, groups: int):
        """bool (B, groups, nb, nb): the blocks the method's own budget keeps."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What this selector is, for result files."""
        return {"selector": self.name, "config": self.config.to_dict()}


class OracleSelector(_BudgetSelector):
    """Ranks candidates by the true attention mass per tile (the recall-optimal selection).

    Args:
        config: SketchWalk's config (forced blocks, budget, granularity, dense layers).
        scale: softmax scale (default 1 / sqrt(head_dim)).
        chunk_elements: elements of one chunk of (B, Hq, rows, T) float32 probabilities; larger
            chunks mean fewer kernel launches (use ~2**28 on a large GPU).
    """

    name = "oracle"

    def __init__(
        self,
        config: SketchWalkConfig | None = None,
        scale: float | None = None,
        chunk_elements: int = DEFAULT_ORACLE_CHUNK_ELEMENTS,
    ) -> None:
        super().__init__(config)
        self.scale = scale
        self.chunk_elements = int(chunk_elements)

    def _scores(self, q, k, layer_idx, groups):
        from sketchwalk.metrics import true_block_attention

        b, hq, t, _ = q.shape
        rows = max(1, self.chunk_elements // max(1, b * hq * t))
        mass = true_block_attention(
            q, k, self.config.block_size, "sum", self.scale, chunk_size=rows
        )  # (B, Hq, nb, nb): mean over each tile's query rows of the mass on the key block
        return aggregate_groups(mass, groups)


class StreamingSelector(_BudgetSelector):
    """Sink plus the most recent blocks: candidates ranked by recency (StreamingLLM pattern),
    in prefill and, with sparse decode steps, in decode too (``decode_rule="recent"``)."""

    name = "streaming"

    def __init__(self, config: SketchWalkConfig | None = None) -> None:
        super().__init__(config)
        self.config = self.config.replace(decode_rule="recent")

    def _scores(self, q, k, layer_idx, groups):
        nb = num_blocks(q.shape[2], self.config.block_size)
        recency = torch.arange(nb, device=q.device, dtype=torch.float32)
        return recency.expand(q.shape[0], groups, nb, nb)


class ForcedOnlySelector(_BudgetSelector):
    """Only the forced blocks (sink, window, diagonal, dense last rows): the floor."""

    name = "forced"

    def select(self, q: torch.Tensor, k: torch.Tensor, layer_idx: int) -> BlockSelection:
        check_qk(q, k, "ForcedOnlySelector.select")
        b, hq, t, _ = q.shape
        groups = _groups(self.config, hq, k.shape[1])
        if layer_idx < self.config.dense_layers:
            return BlockSelection.full(b, groups, t, self.config.block_size, q.device)
        nb = num_blocks(t, self.config.block_size)
        forced = forced_block_mask(nb, self.config, q.device)
        return BlockSelection.from_mask(
            forced.expand(b, groups, nb, nb).contiguous(), self.config.block_size, t
        )


class QuestSelector(_BudgetSelector):
    """Quest (Tang et al. 2024): dense prefill, query-aware decode.

    Quest selects only at decode time: per key block the channel-wise key minimum and maximum
    bound the logit of the current query (`sketchwalk.selection.quest`, docs/algorithm.md
    §2.3). This selector keeps every causal block in prefill and carries ``decode_rule="quest"``
    in its config, so decode steps run through that rule under the config's budget when the
    model is switched on with sparse decoding
    (``enable_selector(model, selector, decode="sketchwalk")``).
    """

    name = "quest"

    def __init__(self, config: SketchWalkConfig | None = None) -> None:
        super().__init__(config)
        self.config = self.config.replace(decode_rule="quest")

    def select(self, q: torch.Tensor, k: torch.Tensor, layer_idx: int) -> BlockSelection:
        check_qk(q, k, "QuestSelector.select")
        b, hq, t, _ = q.shape
        groups = _groups(self.config, hq, k.shape[1])
        return BlockSelection.full(b, groups, t, self.config.block_size, q.device)


class GateSelector(_BudgetSelector):
    """A SeerAttention gate's block scores, ranked at SketchWalk's budget.

    The gate reads PRE-RoPE q/k (what SeerAttention trains it on). :meth:`attach` hooks the
    model's attention modules so that each layer's pre-RoPE q/k are kept until that layer's
    attention call asks for a selection; only the most recent layer's are held.

    Args:
        gates: a ``sketchwalk.gate.checkpoint.GateSet`` (one gate per model layer).
        config: SketchWalk's config; its ``block_size`` must be the gate's.
    """

    name = "gate"

    def __init__(self, gates: Any, config: SketchWalkConfig | None = None) -> None:
        super().__init__(config)
        gate_block = int(gates.config.block_size)
        if gate_block != self.config.block_size:
            raise ValueError(
                f"GateSelector: the gate pools blocks of {gate_block} tokens but the config's "
                f"block_size is {self.config.block_size}; use --block_size {gate_block}"
            )
        self.gates = gates
        self._pre: dict[int, dict[str, torch.Tensor]] = {}
        self._hooks: list[Any] = []

    def attach(self, modules: dict[int, nn.Module]) -> GateSelector:
        """Hook the attention modules (``{layer_idx: module}``, e.g.
        ``sketchwalk.hf.capture.attention_modules(model)``) to keep pre-RoPE q/k."""
        self.detach()
        if len(modules) != self.gates.num_layers:
            raise ValueError(
                f"GateSelector: the gate has {self.gates.num_layers} layers, the model "
                f"{len(modules)}"
            )
        for i, module in modules.items():
            head_dim = int(module.head_dim)
            for side in ("q", "k"):
                norm = getattr(module, f"{side}_norm", None)
                per_head = isinstance(norm, nn.Module)
                target = norm if per_head else getattr(module, f"{side}_proj")
                self._hooks.append(
                    target.register_forward_hook(self._hook(i, side, head_dim, per_head))
                )
        return self

    def detach(self) -> None:
        """Remove the hooks and drop held tensors."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._pre = {}

    def feed(
        self, layer_idx: int, q_pre: torch.Tensor | None = None, k_pre: torch.Tensor | None = None
    ) -> None:
        """Hand over layer ``layer_idx``'s pre-RoPE q (B, Hq, T, D) and/or k (B, Hkv, T, D) for
        its next :meth:`select` (the hooks of :meth:`attach` call this). Tensors of other layers
        are dropped: one layer is held at a time."""
        if layer_idx not in self._pre:
            self._pre.clear()
        entry = self._pre.setdefault(layer_idx, {})
        if q_pre is not None:
            entry["q"] = q_pre.detach()
        if k_pre is not None:
            entry["k"] = k_pre.detach()

    def _hook(self, layer_idx: int, side: str, head_dim: int, per_head: bool):
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            x = output if per_head else output.view(*output.shape[:-1], -1, head_dim)
            self.feed(layer_idx, **{f"{side}_pre": x.transpose(1, 2)})

        return hook

    def row_selector(self) -> GateSelector:
        """A selector for one row of a left-padded batch: the same gates and config, no hooks
        (its pre-RoPE inputs come from this selector through `share_row_inputs`)."""
        return GateSelector(self.gates, self.config)

    def share_row_inputs(self, other: GateSelector, layer_idx: int, row: int, pad: int) -> None:
        """Hand ``other`` (a `row_selector`) the pre-RoPE q/k of batch row ``row``'s real tokens
        (positions ``pad:``) of layer ``layer_idx``, as the hooks hold them for the batch."""
        pre = self._pre.get(layer_idx, {})
        other.feed(
            layer_idx,
            **{
                f"{side}_pre": pre[side][row : row + 1, :, pad:]
                for side in ("q", "k")
                if side in pre
            },
        )

    def reset(self) -> None:
        """Nothing is carried between layers (held pre-RoPE tensors are per call)."""

    def select(self, q: torch.Tensor, k: torch.Tensor, layer_idx: int) -> BlockSelection:
        try:
            return super().select(q, k, layer_idx)
        finally:
            self._pre.pop(layer_idx, None)

    def _scores(self, q, k, layer_idx, groups):
        pre = self._pre.get(layer_idx, {})
        if "q" not in pre or "k" not in pre:
            raise RuntimeError(
                f"GateSelector: no pre-RoPE q/k for layer {layer_idx}; call attach(modules) or "
                "feed() first"
            )
        q_pre, k_pre = pre["q"], pre["k"]
        if q_pre.shape[2] != q.shape[2]:
            raise RuntimeError(
                f"GateSelector: pre-RoPE q of layer {layer_idx} has {q_pre.shape[2]} tokens, "
                f"attention has {q.shape[2]}"
            )
        scores = self.gates.block_scores(layer_idx, q_pre, k_pre)  # (B, Hq, nb, nb)
        return aggregate_groups(scores, groups)

    def describe(self) -> dict[str, Any]:
        gate = dataclasses.asdict(self.gates.config)
        gate.pop("base_config", None)
        return {**super().describe(), "gate": gate}
