"""SketchWalk during decoding: one new query per step, block selection over a growing KV cache.

Per layer, the decoder keeps the running block SUMS and token counts of the key cache (a new token
updates one pooled key in O(D); the released code re-pools the whole cache every step, O(T)) and
what its ``decode_rule`` needs.

``decode_rule="walk"`` (docs/algorithm.md §2, the released-style rule) also keeps the last
``window_queries`` (W = 32) queries and the layer's block transition matrix A from the prefill,
grown by one row and column whenever the cache opens a new block. Each step, for a new query q_t
and key k_t:

1. add k_t to its block's sum (opening a block if needed) and q_t to the query window;
2. score the window's queries against the pooled keys with the layer's sketch (the same draws,
   temperature and GQA mapping as the prefill), softmax over key blocks per head and query,
   sum over the window and over the heads of a mask group, row-normalise: one row a_t (B, G, nk);
3. update A's row of the current block with a running average, alpha = 1 / (tokens of that block
   seen so far), so the row is the mean of the rows of its tokens;
4. walk within the layer: ``state = a_t``, then ``degree`` times
   ``state = (1 - beta) * a_t + beta * state @ A`` (the released decode has no cross-layer term).

``decode_rule="quest"`` keeps per-block, per-channel key minima and maxima instead
(`sketchwalk.selection.quest`: built from the prefill's keys in one pass, folded in place in O(D)
per new key, in buffers with room for as many blocks again, grown by doubling) and scores every
block by the bound of the CURRENT query's largest logit in it, so a single needed key is not
averaged away; no query window and no transition matrix. With a row budget the step takes the
fast path (`SketchWalkDecoder` ``fast``): log-space scores (`quest_log_scores`), the forced
blocks raised to +inf by a cached bias, one ``topk`` whose indices are the kept-block list, and
a kept count known on the host, so neither a mask nor a sync is made; the reference path
(`quest_block_scores`, `select_last_row`, index compaction) serves the ``mass`` budget and the
global allocation, and the tests.

``decode_rule="recent"`` ranks the blocks by recency alone (StreamingLLM's pattern: sink and the
latest blocks), what the streaming baseline decodes with; it keeps no state.

Every rule's step ends with `sketchwalk.selection.select.select_last_row`: the sink blocks and
the local window (both counted on the current context) are kept, plus the best ranked other blocks
under the config's budget, computed as for the last row of a prefill of nk blocks without dense
last rows (``kblocks_frac``, ``top_k_blocks``, ``density`` per row or allocated globally over the
mask groups, ``mass`` on the row's normalised scores).

The result is the (kv_num_blocks (B, G), kv_indices (B, G, nk)) pair that
`sketchwalk.attention.sparse_decode` consumes. Layers below ``dense_layers`` keep every block.
A step makes no host sync: budgets come from CPU-side cached tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sketchwalk.blocks import check_qk, compact_mask, num_blocks
from sketchwalk.config import SketchWalkConfig
from sketchwalk.selection.query_rows import SELECTION_BACKEND, query_row_scores
from sketchwalk.selection.quest import (
    block_key_bounds,
    bound_logits,
    group_log_probs,
    quest_block_scores,
    quest_log_scores,
)
from sketchwalk.selection.select import forced_counts, last_row_kept, select_last_row
from sketchwalk.selection.sketch import block_pool, sketched_blocks
from sketchwalk.selection.topk import top_k_compact
from sketchwalk.selection.walk import aggregate_heads, sharpen, transition_from_pooled


class DecodeSelection:
    """Kept key blocks of one decode step.

    Attributes:
        kv_num_blocks: int32 (B, G) kept blocks per mask group.
        kv_indices: int32 (B, G, n), n >= every kv_num_blocks: the first kv_num_blocks[b, g]
            entries of each row are its kept blocks (ascending after the reference selection,
            in score order after the fast one; `sketchwalk.attention.sparse_decode` takes any
            order), the rest padding.
        seq_len: tokens in the cache after this step.
        num_key_blocks: nk, the cache's blocks after this step.
        block_mask: bool (B, G, nk), built on first use from the indices.
        scores: float (B, G, nk) the ranked scores: the walk row, or the quest block
            probabilities (None for dense layers); built on first use when the step ranked
            log-probabilities.
        density: kept / nk, mean over batch and groups: from host-side counts when the budget
            fixes them (no device sync), else read from ``kv_num_blocks``.
    """

    def __init__(
        self,
        kv_num_blocks: torch.Tensor,
        kv_indices: torch.Tensor,
        seq_len: int,
        num_key_blocks: int,
        *,
        block_mask: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
        log_scores: torch.Tensor | None = None,
        kept: int | None = None,
    ) -> None:
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.seq_len = seq_len
        self.num_key_blocks = num_key_blocks
        self._block_mask = block_mask
        self._scores = scores
        self._log_scores = log_scores
        self._kept = kept

    @property
    def block_mask(self) -> torch.Tensor:
        if self._block_mask is None:
            b, g, n = self.kv_indices.shape
            valid = torch.arange(n, device=self.kv_indices.device) < self.kv_num_blocks[..., None]
            mask = torch.zeros(
                b, g, self.num_key_blocks + 1, dtype=torch.bool, device=self.kv_indices.device
            )
            # padding entries go to the scratch column nk, which is dropped
            slot = torch.where(valid, self.kv_indices.long(), self.num_key_blocks)
            self._block_mask = mask.scatter_(-1, slot, True)[..., : self.num_key_blocks]
        return self._block_mask

    @property
    def scores(self) -> torch.Tensor | None:
        if self._scores is None and self._log_scores is not None:
            self._scores = self._log_scores.exp()
        return self._scores

    @property
    def density(self) -> float:
        if self._kept is not None:
            return self._kept / self.num_key_blocks
        return float(self.kv_num_blocks.float().mean()) / self.num_key_blocks


@dataclass
class _LayerState:
    row_tokens: int  # tokens of the current (last) block already averaged into its row
    seq_len: int
    # decode_rule "walk" (None otherwise)
    key_sums: torch.Tensor | None = None  # (B, Hkv, nk, D) float32
    key_counts: torch.Tensor | None = None  # (nk,) float32 tokens per block
    query_window: torch.Tensor | None = None  # (B, Hq, <=W, D)
    transition: torch.Tensor | None = None  # (B, G, nk, nk)
    # decode_rule "quest" (None otherwise): (B, Hkv, capacity, D) float32 buffers, blocks
    # [0, nk) valid; grown by doubling, so a step never reallocates within a block
    min_buffer: torch.Tensor | None = None
    max_buffer: torch.Tensor | None = None
    static: Any = None  # _StaticQuestStep for the current capacity (cuda_graphs)
    # decode_pin_blocks: (B, G, capacity) float32, PIN_BIAS on the pinned blocks, 0 elsewhere
    pin_bias: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return -(-self.seq_len // self._block_size)

    _block_size: int = 64

    @property
    def key_min(self) -> torch.Tensor | None:
        """(B, Hkv, nk, D) per-block key minima (a view of the buffer)."""
        return None if self.min_buffer is None else self.min_buffer[:, :, : self.num_blocks]

    @property
    def key_max(self) -> torch.Tensor | None:
        return None if self.max_buffer is None else self.max_buffer[:, :, : self.num_blocks]


class SketchWalkDecoder:
    """Decode-time SketchWalk for one batch of sequences.

    Example:
        >>> dec = SketchWalkDecoder(SketchWalkConfig(density=0.2))
        >>> for layer, (q, k) in enumerate(prefill_qk):
        ...     dec.prefill(q, k, layer)
        >>> sel = dec.step(q_t, k_t, layer)   # per layer, per generated token
        >>> out = sparse_decode(q_t, k_cache, v_cache, sel.kv_num_blocks, sel.kv_indices, 64)

    ``fast`` (default True): with ``decode_rule="quest"`` and a row budget (``kblocks_frac``,
    ``top_k_blocks``, ``density`` with ``allocation="row"``) a step ranks log-probabilities
    with one ``topk`` over scores whose forced blocks are raised to +inf, and counts its kept
    blocks on the host: about fifteen device operations, no mask, no host sync. ``fast=False``
    runs the reference (`quest_block_scores` and `select_last_row`); both keep the same blocks
    up to ties (tests).

    ``cuda_graphs`` (default False; the transformers integration turns it on): the fast quest
    step runs as a static-shape body over the bound buffers' whole capacity (blocks past the
    cache masked, the position kept in a device counter, budgets looked up in device tables),
    captured once per layer and capacity in a CUDA graph: a step is two input copies and one
    replay instead of about fifteen launches; the budget, which grows with the cache, is read
    on the device by `top_k_compact` (no sorted top-k over the capacity). Same blocks as the
    fast path (tests; eagerly on the CPU). The returned tensors are the graph's buffers: valid
    until the layer's next step.
    """

    def __init__(
        self,
        config: SketchWalkConfig | None = None,
        window_queries: int = 32,
        fast: bool = True,
        cuda_graphs: bool = False,
    ) -> None:
        if not isinstance(window_queries, int) or window_queries < 1:
            raise ValueError(f"window_queries must be an int >= 1, got {window_queries!r}")
        self.config = config if config is not None else SketchWalkConfig()
        self.window_queries = window_queries
        self.fast = bool(fast)
        self.cuda_graphs = bool(cuda_graphs)
        self._static_tables: dict[tuple, tuple] = {}
        self._layers: dict[int, _LayerState] = {}
        # host/device tables shared by the layers, rebuilt when the cache opens a block
        self._budget_nk = -1
        self._budget = 0
        self._tables: dict[tuple, torch.Tensor] = {}

    def reset(self) -> None:
        self._layers.clear()

    def cache_length(self, layer_idx: int) -> int | None:
        """Tokens the decoder has seen for ``layer_idx`` (None before its prefill)."""
        state = self._layers.get(layer_idx)
        return None if state is None else state.seq_len

    def prefill(self, q: torch.Tensor, k: torch.Tensor, layer_idx: int) -> None:
        """Initialise a layer's state from its prefill q (B, Hq, T, D) and k (B, Hkv, T, D)."""
        cfg = self.config
        check_qk(q, k, "SketchWalkDecoder.prefill")
        if q.shape[2] != k.shape[2]:
            raise ValueError("SketchWalkDecoder.prefill: q and k must have the same length")
        t, bs = k.shape[2], cfg.block_size
        nb = num_blocks(t, bs)
        st = _LayerState(row_tokens=t - (nb - 1) * bs, seq_len=t, _block_size=bs)
        if layer_idx < cfg.dense_layers or cfg.decode_rule == "recent":
            pass  # dense layers keep every block, recency needs no state: nothing to keep
        elif cfg.decode_rule == "quest":
            key_min, key_max = block_key_bounds(k, bs)
            capacity = max(2 * nb, nb + 64)
            b, hkv, _, d = key_min.shape
            st.min_buffer = key_min.new_zeros(b, hkv, capacity, d)
            st.max_buffer = key_max.new_zeros(b, hkv, capacity, d)
            st.min_buffer[:, :, :nb] = key_min
            st.max_buffer[:, :, :nb] = key_max
            if cfg.decode_pin_blocks:
                st.pin_bias = _pin_bias(q, k, cfg, capacity)
        else:
            pooled_k = block_pool(k, bs)  # true-count means
            counts = torch.full((nb,), float(bs), device=k.device)
            counts[-1] = t - (nb - 1) * bs
            st.key_sums = pooled_k * counts[:, None]
            st.key_counts = counts
            st.transition = transition_from_pooled(block_pool(q, bs), pooled_k, cfg, layer_idx)
            st.query_window = q[:, :, -self.window_queries :].float()
        self._layers[layer_idx] = st

    def step(self, q: torch.Tensor, k: torch.Tensor, layer_idx: int) -> DecodeSelection:
        """One new token: q (B, Hq, 1, D), k (B, Hkv, 1, D). Returns the kept blocks of the cache
        including this token."""
        cfg = self.config
        check_qk(q, k, "SketchWalkDecoder.step")
        if q.shape[2] != 1 or k.shape[2] != 1:
            raise ValueError(
                f"SketchWalkDecoder.step: one new token per call; got q seq {q.shape[2]}, "
                f"k seq {k.shape[2]}"
            )
        st = self._layers.get(layer_idx)
        if st is None:
            raise ValueError(
                f"SketchWalkDecoder.step: layer {layer_idx} has no prefill state "
                "(call prefill() first)"
            )
        bs = cfg.block_size
        pos = st.seq_len
        new_block = pos % bs == 0
        st.seq_len = pos + 1
        nk = -(-st.seq_len // bs)
        b, hq = q.shape[:2]
        hkv = k.shape[1]
        groups = {"layer": 1, "kv_group": hkv, "head": hq}[cfg.granularity]
        if layer_idx < cfg.dense_layers:
            return self._dense(b, groups, nk, st.seq_len, q.device)
        if cfg.decode_rule == "quest":
            return self._quest_step(st, q[:, :, 0], k[:, :, 0], new_block, nk, groups)
        if cfg.decode_rule == "recent":  # the streaming baseline: sink + the latest blocks
            recency = torch.arange(nk, device=q.device, dtype=torch.float32)
            scores = recency.expand(b, groups, nk)
            return _pack(select_last_row(scores, cfg), scores, st.seq_len)
        return self._walk_step(st, q, k, layer_idx, hkv, new_block)

    # ---- decode_rule "quest" -------------------------------------------------------------

    def _quest_step(
        self,
        st: _LayerState,
        q: torch.Tensor,
        k_new: torch.Tensor,
        new_block: bool,
        nk: int,
        groups: int,
    ) -> DecodeSelection:
        cfg = self.config
        j = nk - 1
        fast = self.fast and cfg.budget != "mass" and cfg.allocation == "row"
        if fast and self.cuda_graphs:
            if nk > st.min_buffer.shape[2]:
                self._grow(st)
            return self._static_step(st, q, k_new, nk, groups)
        if new_block:
            if nk > st.min_buffer.shape[2]:
                self._grow(st)
            st.min_buffer[:, :, j] = k_new
            st.max_buffer[:, :, j] = k_new
        else:  # fold the key into the last block's bounds, in place: O(D) per head
            st.min_buffer[:, :, j].clamp_(max=k_new.float())
            st.max_buffer[:, :, j].clamp_(min=k_new.float())
        last_count = st.seq_len - j * cfg.block_size
        if not fast:
            counts = torch.full((nk,), float(cfg.block_size), device=q.device)
            counts[-1:].fill_(float(last_count))  # a fill kernel: no host-to-device copy
            scores = quest_block_scores(q, st.key_min, st.key_max, counts, cfg.granularity)
            if st.pin_bias is None:
                return _pack(select_last_row(scores, cfg), scores, st.seq_len)
            pin = st.pin_bias[..., :nk]
            pinned = pin > 0
            if cfg.budget != "mass" and cfg.allocation == "row":
                # ranked first after the forced blocks (above every probability), in the
                # question's order
                mask = select_last_row(torch.where(pinned, 1.0 + pin / PIN_BIAS, scores), cfg)
            else:  # data-dependent counts: the pins are added to what the budget keeps
                mask = select_last_row(scores, cfg) | pinned
            return _pack(mask, scores, st.seq_len)
        log_scores = quest_log_scores(
            q, st.key_min, st.key_max, last_count, cfg.block_size, cfg.granularity
        )
        n_keep = self._row_budget(nk)
        bias = self._table("bias", nk, q.device)
        if st.pin_bias is not None:
            bias = bias + st.pin_bias[..., :nk]
        top = (log_scores + bias).topk(n_keep, dim=-1, sorted=False).indices
        kv_num_blocks = self._table("count", (q.shape[0], groups, n_keep), q.device)
        return DecodeSelection(
            kv_num_blocks,
            top.to(torch.int32),
            st.seq_len,
            nk,
            log_scores=log_scores,
            kept=n_keep,
        )

    @staticmethod
    def _grow(st: _LayerState) -> None:
        """Double the bound buffers' capacity (the blocks kept, the rest zeros: finite, so the
        static step's masked scores of blocks past the cache stay -inf, not NaN)."""
        for name in ("min_buffer", "max_buffer", "pin_bias"):
            buf = getattr(st, name)
            if buf is not None:
                setattr(st, name, torch.cat([buf, torch.zeros_like(buf)], dim=2))
        st.static = None

    def _static_step(
        self, st: _LayerState, q: torch.Tensor, k_new: torch.Tensor, nk: int, groups: int
    ) -> DecodeSelection:
        cap = st.min_buffer.shape[2]
        tables = self._static_tables_for(cap, q.device)
        if st.static is None or st.static.cap != cap:
            st.static = _StaticQuestStep(self.config, st, q, k_new, groups, tables)
        num, idx, scores = st.static.run(st, q, k_new)
        kept = tables[3][nk]
        return DecodeSelection(
            num, idx[..., :kept], st.seq_len, nk, log_scores=scores[..., :nk], kept=kept
        )

    def _static_tables_for(self, cap: int, device: torch.device) -> tuple:
        """Per capacity: kept blocks, sink and window sizes for every block count 0..cap (device
        int64 tables), the kept counts on the host, and their maximum."""
        entry = self._static_tables.get((cap, device))
        if entry is None:
            kept, sink, window = [0], [0], [0]
            for n in range(1, cap + 1):
                s_n, w_n = forced_counts(n, self.config)
                kept.append(self._kept_blocks(n))
                sink.append(s_n)
                window.append(w_n)
            host = torch.tensor([kept, sink, window], dtype=torch.int64)
            dev = host.to(device)
            entry = (dev[0], dev[1], dev[2], kept, max(kept))
            self._static_tables[(cap, device)] = entry
        return entry

    def _kept_blocks(self, nk: int) -> int:
        """Blocks a row keeps over nk blocks: forced (sink, window) plus the ranked budget."""
        return last_row_kept(nk, self.config)

    def _row_budget(self, nk: int) -> int:
        """`_kept_blocks`, cached for the current nk (the layers of a step share it)."""
        if nk != self._budget_nk:
            self._budget = self._kept_blocks(nk)
            self._budget_nk = nk
        return self._budget

    def _table(self, kind: str, key: Any, device: torch.device) -> torch.Tensor:
        """Small device tensors the steps reuse: the forced-block bias of an nk-block row
        (+inf on the sink and window, 0 elsewhere) and constant kept counts."""
        entry = (kind, key, device)
        table = self._tables.get(entry)
        if table is None:
            # built on the device (fill kernels): a host-to-device copy would wait for the
            # work queued before it
            if kind == "bias":
                nk = key
                sink, window = forced_counts(nk, self.config)
                table = torch.zeros(nk, device=device)
                table[:sink] = float("inf")
                table[nk - window :] = float("inf")
            else:
                b, g, n = key
                table = torch.full((b, g), n, dtype=torch.int32, device=device)
            if len(self._tables) > 64:
                self._tables.clear()
            self._tables[entry] = table
        return table

    def _dense(
        self, b: int, groups: int, nk: int, seq_len: int, device: torch.device
    ) -> DecodeSelection:
        mask = torch.ones(b, groups, nk, dtype=torch.bool, device=device)
        return _pack(mask, None, seq_len, kept=nk)

    # ---- decode_rule "walk" --------------------------------------------------------------

    def _walk_step(
        self,
        st: _LayerState,
        q: torch.Tensor,
        k: torch.Tensor,
        layer_idx: int,
        hkv: int,
        new_block: bool,
    ) -> DecodeSelection:
        cfg = self.config
        if new_block:
            b, _, _, d = st.key_sums.shape
            st.key_sums = torch.cat([st.key_sums, st.key_sums.new_zeros(b, hkv, 1, d)], dim=2)
            st.key_counts = torch.cat([st.key_counts, st.key_counts.new_zeros(1)])
            st.row_tokens = 0
        st.key_sums[:, :, -1] += k[:, :, 0].float()
        st.key_counts[-1] += 1
        st.query_window = torch.cat([st.query_window, q.float()], dim=2)[
            :, :, -self.window_queries :
        ]
        a_t = self._window_row(st, layer_idx, hkv)  # (B, G, nk)
        if new_block:
            st.transition = torch.nn.functional.pad(st.transition, (0, 1, 0, 1))
        st.row_tokens += 1
        alpha = 1.0 / st.row_tokens
        st.transition[:, :, -1] = (1 - alpha) * st.transition[:, :, -1] + alpha * a_t
        state = a_t
        for _ in range(cfg.degree):
            state = (1 - cfg.damping) * a_t + cfg.damping * (
                state[:, :, None, :] @ st.transition
            ).squeeze(2)
        return _pack(select_last_row(state, cfg), state, st.seq_len)

    def _window_row(self, st: _LayerState, layer_idx: int, hkv: int) -> torch.Tensor:
        cfg = self.config
        kb = st.key_sums / (st.key_counts[:, None] if not cfg.parity else float(cfg.block_size))
        qs, ks, scale = sketched_blocks(st.query_window, kb, cfg, layer_idx)
        b, hq, w, _ = qs.shape
        g = hq // hkv
        logits = qs.view(b, hkv, g, w, -1) @ ks[:, :, None].transpose(-1, -2)
        logits = logits.view(b, hq, w, -1) * scale
        if cfg.parity and cfg.exact:
            logits = logits.clamp(-10.0, 10.0)
        probs = torch.softmax(logits, dim=-1).sum(dim=2, keepdim=True)  # over the window
        row = aggregate_heads(probs, hkv, cfg.granularity, cfg.head_aggregation)[
            :, :, 0
        ]  # (B, G, nk)
        return sharpen(row, cfg.sparsity_exponent, cfg.parity)


class _StaticQuestStep:
    """The fast quest step of one layer as a static-shape body over the bound buffers' capacity
    (see `SketchWalkDecoder` ``cuda_graphs``); captured in a CUDA graph on CUDA, run eagerly
    elsewhere."""

    def __init__(
        self,
        config: SketchWalkConfig,
        st: _LayerState,
        q: torch.Tensor,
        k_new: torch.Tensor,
        groups: int,
        tables: tuple,
    ) -> None:
        self.config = config
        self.cap = st.min_buffer.shape[2]
        self.groups = groups
        self.kept_table, self.sink_table, self.window_table, _, self.kmax = tables
        self.q_in, self.k_in = q.clone(), k_new.clone()
        # tokens in the cache before the token this step adds (advanced by the body)
        self.pos = torch.full((1,), st.seq_len - 1, dtype=torch.int64, device=q.device)
        self.blocks = torch.arange(self.cap, device=q.device)
        self.graph = None
        if q.is_cuda:
            # compile and load the top-k kernel for this shape before the capture
            rows = q.shape[0] * groups
            top_k_compact(torch.zeros(rows, self.cap, device=q.device), self.kept_table[:1])
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self._body(st)

    def run(
        self, st: _LayerState, q: torch.Tensor, k_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.q_in.copy_(q)
        self.k_in.copy_(k_new)
        if self.graph is None:
            return self._body(st)
        self.graph.replay()
        return self.outputs

    def _body(self, st: _LayerState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = self.config
        bs = cfg.block_size
        pos = self.pos
        j = torch.div(pos, bs, rounding_mode="floor")  # the block of the new token, (1,)
        opens = pos - j * bs == 0
        k_new = self.k_in.float()
        for buf, fold in ((st.min_buffer, torch.minimum), (st.max_buffer, torch.maximum)):
            current = buf.index_select(2, j)[:, :, 0]
            buf.index_copy_(2, j, torch.where(opens, k_new, fold(current, k_new))[:, :, None])
        nk = j + 1
        b = st.min_buffer.shape[0]
        logits = bound_logits(self.q_in, st.min_buffer, st.max_buffer)
        col = self.blocks
        last_count = (pos + 1 - j * bs).to(torch.float32)
        logits = logits + (
            torch.where(col < nk, 0.0, float("-inf"))
            + torch.where(col == j, torch.log(last_count / bs), 0.0)
        )
        scores = group_log_probs(logits, b, cfg.granularity)
        sink, window = self.sink_table[nk], self.window_table[nk]
        forced = (col < sink) | ((col >= nk - window) & (col < nk))
        ranked = scores + torch.where(forced, float("inf"), 0.0)
        if st.pin_bias is not None:
            ranked = ranked + st.pin_bias
        # the budget of this nk is on the device: the kept blocks, compacted, without a sort
        top, num = top_k_compact(ranked, self.kept_table[nk])
        self.pos.add_(1)
        return num, top, scores


# Added to a pinned block's log score, scaled by (m - rank) / m for the block the question
# ranks rank-th of m: above every log-probability (<= 0), below the forced blocks' +inf, so a
# row budget keeps the forced blocks, then the pins in the question's order, then the others.
PIN_BIAS = 1e30


def _pin_bias(
    q: torch.Tensor, k: torch.Tensor, config: SketchWalkConfig, capacity: int
) -> torch.Tensor:
    """(B, G, capacity) float32: PIN_BIAS on the ``decode_pin_blocks`` key blocks per mask
    group that the prompt's last ``max(1, exact_rows(T))`` rows attend to most (their exact
    attention, `query_row_scores`, summed over the rows), scaled down by rank (the question's
    best block highest), 0 elsewhere."""
    b, hq, t = q.shape[:3]
    bs = config.block_size
    nb = num_blocks(t, bs)
    groups = {"layer": 1, "kv_group": k.shape[1], "head": hq}[config.granularity]
    rows = max(1, config.exact_rows(t))
    scores = query_row_scores(q, k, rows, bs, groups, backend=SELECTION_BACKEND).sum(dim=2)
    m = min(config.decode_pin_blocks, nb)
    top = scores.topk(m, dim=-1).indices  # best first
    order = torch.arange(m, 0, -1, dtype=torch.float32, device=q.device) * (PIN_BIAS / m)
    bias = torch.zeros(b, groups, capacity, dtype=torch.float32, device=q.device)
    return bias.scatter_(-1, top, order.expand(b, groups, m).contiguous())


def _pack(
    mask: torch.Tensor, scores: torch.Tensor | None, seq_len: int, kept: int | None = None
) -> DecodeSelection:
    kv_num_blocks, kv_indices = compact_mask(mask)
    return DecodeSelection(
        kv_num_blocks,
        kv_indices,
        seq_len,
        mask.shape[-1],
        block_mask=mask,
        scores=scores,
        kept=kept,
    )


__all__ = ["DecodeSelection", "SketchWalkDecoder"]
