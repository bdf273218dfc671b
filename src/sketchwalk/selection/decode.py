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
(`sketchwalk.selection.quest`: built from the prefill's keys in one pass, O(D) per new key) and
scores every block by the bound of the CURRENT query's largest logit in it, so a single needed
key is not averaged away; no query window and no transition matrix.

Either way the step ends with `sketchwalk.selection.select.select_last_row`: the sink blocks and
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

import torch

from sketchwalk.blocks import check_qk, compact_mask, num_blocks
from sketchwalk.config import SketchWalkConfig
from sketchwalk.selection.quest import block_key_bounds, quest_block_scores, update_key_bounds
from sketchwalk.selection.select import select_last_row
from sketchwalk.selection.sketch import block_pool, sketched_blocks
from sketchwalk.selection.walk import aggregate_heads, sharpen, transition_from_pooled


@dataclass
class DecodeSelection:
    """Kept key blocks of one decode step.

    Attributes:
        kv_num_blocks: int32 (B, G).
        kv_indices: int32 (B, G, nk), kept blocks ascending, then 0-padding.
        block_mask: bool (B, G, nk).
        scores: float (B, G, nk) the ranked scores: the walk row, or the quest block
            probabilities (None for dense layers).
        seq_len: tokens in the cache after this step.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_mask: torch.Tensor
    scores: torch.Tensor | None
    seq_len: int

    @property
    def density(self) -> float:
        return float(self.kv_num_blocks.float().mean()) / self.block_mask.shape[-1]


@dataclass
class _LayerState:
    key_sums: torch.Tensor  # (B, Hkv, nk, D) float32
    key_counts: torch.Tensor  # (nk,) float32 tokens per block
    row_tokens: int  # tokens of the current (last) block already averaged into its row
    seq_len: int
    # decode_rule "walk" (None otherwise)
    query_window: torch.Tensor | None = None  # (B, Hq, <=W, D)
    transition: torch.Tensor | None = None  # (B, G, nk, nk)
    # decode_rule "quest" (None otherwise)
    key_min: torch.Tensor | None = None  # (B, Hkv, nk, D) float32
    key_max: torch.Tensor | None = None  # (B, Hkv, nk, D) float32


class SketchWalkDecoder:
    """Decode-time SketchWalk for one batch of sequences.

    Example:
        >>> dec = SketchWalkDecoder(SketchWalkConfig(density=0.2))
        >>> for layer, (q, k) in enumerate(prefill_qk):
        ...     dec.prefill(q, k, layer)
        >>> sel = dec.step(q_t, k_t, layer)   # per layer, per generated token
        >>> out = sparse_decode(q_t, k_cache, v_cache, sel.kv_num_blocks, sel.kv_indices, 64)
    """

    def __init__(self, config: SketchWalkConfig | None = None, window_queries: int = 32) -> None:
        if not isinstance(window_queries, int) or window_queries < 1:
            raise ValueError(f"window_queries must be an int >= 1, got {window_queries!r}")
        self.config = config if config is not None else SketchWalkConfig()
        self.window_queries = window_queries
        self._layers: dict[int, _LayerState] = {}

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
        pooled_k = block_pool(k, bs)  # true-count means
        counts = torch.full((nb,), float(bs), device=k.device)
        counts[-1] = t - (nb - 1) * bs
        st = _LayerState(
            key_sums=pooled_k * counts[:, None],
            key_counts=counts,
            row_tokens=t - (nb - 1) * bs,
            seq_len=t,
        )
        if layer_idx < cfg.dense_layers:
            pass  # dense layers keep every block: nothing to rank
        elif cfg.decode_rule == "quest":
            st.key_min, st.key_max = block_key_bounds(k, bs)
        else:
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
        if layer_idx not in self._layers:
            raise ValueError(
                f"SketchWalkDecoder.step: layer {layer_idx} has no prefill state "
                "(call prefill() first)"
            )
        st = self._layers[layer_idx]
        bs = cfg.block_size
        pos = st.seq_len
        new_block = pos % bs == 0
        if new_block:
            b, hkv, _, d = st.key_sums.shape
            st.key_sums = torch.cat([st.key_sums, st.key_sums.new_zeros(b, hkv, 1, d)], dim=2)
            st.key_counts = torch.cat([st.key_counts, st.key_counts.new_zeros(1)])
            st.row_tokens = 0
        st.key_sums[:, :, -1] += k[:, :, 0].float()
        st.key_counts[-1] += 1
        st.seq_len = pos + 1
        nk = st.key_counts.numel()
        b, hq = q.shape[:2]
        hkv = k.shape[1]
        groups = {"layer": 1, "kv_group": hkv, "head": hq}[cfg.granularity]
        if layer_idx < cfg.dense_layers:
            mask = torch.ones(b, groups, nk, dtype=torch.bool, device=q.device)
            return _pack(mask, None, st.seq_len)
        if cfg.decode_rule == "quest":
            st.key_min, st.key_max = update_key_bounds(
                st.key_min, st.key_max, k[:, :, 0], new_block
            )
            scores = quest_block_scores(
                q[:, :, 0], st.key_min, st.key_max, st.key_counts, cfg.granularity
            )
            return _pack(select_last_row(scores, cfg), scores, st.seq_len)

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
        row = aggregate_heads(probs, hkv, cfg.granularity)[:, :, 0]  # (B, G, nk)
        return sharpen(row, cfg.sparsity_exponent, cfg.parity)


def _pack(mask: torch.Tensor, scores: torch.Tensor | None, seq_len: int) -> DecodeSelection:
    kv_num_blocks, kv_indices = compact_mask(mask)
    return DecodeSelection(kv_num_blocks, kv_indices, mask, scores, seq_len)


__all__ = ["DecodeSelection", "SketchWalkDecoder"]
