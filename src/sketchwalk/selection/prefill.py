"""`SketchWalk`: block selection for one sequence, layer after layer.

Per sparse layer l (docs/algorithm.md §1):

1. pool Q and K over blocks (true-count tail mean; the released full-block divisor under
   ``parity``);
2. block logits from the randomized Hadamard sketch of the pooled vectors (or the pooled vectors
   themselves when ``exact``), GQA-aware;
3. block softmax (causal if ``causal_sketch``), head aggregation by ``granularity``,
   row-normalisation, sharpening by ``sparsity_exponent`` -> transition matrix A_l;
4. damped walk starting from the previous sparse layer's R_{l-1} (if ``walk`` and layer l-1 was
   the last one fed) or from A_l;
5. ranked selection with forced sink / window / diagonal blocks and dense last rows; the last
   ``query_rows`` rows are ranked by their exact attention (`query_row_scores`) instead of R.

Layers ``< dense_layers`` return the full causal selection. Nothing here is O(T^2) in memory:
the largest tensors are (B, Hq, nb, nb) with nb = T / block_size.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import operator
from collections.abc import Callable

import torch

from sketchwalk.blocks import BlockSelection, check_finite, check_qk, num_blocks
from sketchwalk.config import SketchWalkConfig
from sketchwalk.selection.query_rows import (
    SELECTION_BACKEND,
    query_row_backend,
    query_row_scores,
)
from sketchwalk.selection.select import select_blocks
from sketchwalk.selection.sketch import block_pool, layer_projection
from sketchwalk.selection.walk import transition_from_pooled, walk_step


class SketchWalk:
    """Holds the walk state of one sequence.

    Example:
        >>> sw = SketchWalk(SketchWalkConfig(density=0.2))
        >>> for layer_idx, (q, k) in enumerate(per_layer_qk):
        ...     selection = sw.select(q, k, layer_idx)
        >>> sw.reset()   # next sequence

    The walk state carried from one layer to the next lives on the device of the last layer's
    queries; when the next layer's ``q`` is on another device (a model split over devices by a
    ``device_map``) it is moved there (no copy when the devices match).

    Layers must be fed in increasing order. A gap (layer l fed after layer l - 2, say, as when
    only a subset of layers was collected) restarts the walk at A_l: the cross-layer term only
    links consecutive layers. Feeding a layer at or below the last one raises; call ``reset()``
    to start a new sequence.
    """

    def __init__(
        self,
        config: SketchWalkConfig | None = None,
        backend: str = "auto",
        cuda_graphs: bool = True,
    ) -> None:
        """
        Args:
            config: the selection settings (default ``SketchWalkConfig()``).
            backend: how the block transition matrix is computed: ``"reference"`` (plain PyTorch;
                ``"torch"`` is accepted as its earlier name,
                any device: `sketchwalk.selection.walk.transition_from_pooled`), ``"triton"`` (fused
                kernel, CUDA, granularity ``layer`` or ``kv_group``; raises where it cannot
                run) or ``"auto"`` (Triton where it can run, else PyTorch; the choice of the
                last layer is in ``transition_backend``). The exact scores of the last
                ``query_rows`` rows use the Triton kernel of
                `sketchwalk.selection.triton_query_rows` under ``"triton"`` and the PyTorch
                reference otherwise (the kernel is not yet chosen by ``"auto"``: its GPU tests
                have not run); ``query_rows_backend`` says which ran.
            cuda_graphs: on CUDA with the Triton transition, replay everything after pooling
                (sketch, transition, walk, top-k, index compaction) from a CUDA graph captured
                once per (batch, seq, heads, previous-walk-state present); same results as
                the eager path, ~70 fewer launches per layer. Every budget is graph-safe
                (static shapes, no host sync: ``mass`` is a device sort + cumsum, global
                ``density`` allocation a top-k of a count fixed by (nb, groups, config)) except
                the parity quantile (``kblocks_frac`` with ``parity``), which runs eagerly.
                Ignored on the CPU, with the PyTorch transition, for the parity quantile budget
                and while the current stream is already being captured. ``False`` always runs
                eagerly. At most
                ``MAX_GRAPHS`` graphs are kept (oldest dropped first): each holds its own
                memory pool (~0.1-0.2 GB at 128K tokens).
        """
        backend = TRANSITION_ALIASES.get(backend, backend)
        if backend not in TRANSITION_BACKENDS:
            raise ValueError(
                f"SketchWalk: backend must be one of {TRANSITION_BACKENDS}, got {backend!r}"
            )
        self.config = config if config is not None else SketchWalkConfig()
        self.backend = backend
        self.cuda_graphs = bool(cuda_graphs)
        self.transition_backend: str | None = None
        self.query_rows_backend: str | None = None
        self._graphs: dict[tuple, _SelectGraph] = {}
        # Keep each layer's pooled queries so that a later query chunk can continue the
        # sequence (`select_chunk`); costs B x Hq x nb x D float32 per layer.
        self.keep_queries = False
        self.reset()

    def clear_graphs(self) -> None:
        """Drop the captured selection graphs (and the GPU memory they hold)."""
        self._graphs.clear()

    def reset(self) -> None:
        """Forget the walk state and the pooled queries: the next call starts a new sequence."""
        self._restart_layers()
        # layer -> (pooled queries (B, Hq, nb, D) float32, tokens they cover): what a later
        # query chunk of the same sequence needs (`select_chunk`); kept only if keep_queries.
        self._queries: dict[int, tuple[torch.Tensor, int]] = {}

    def _restart_layers(self) -> None:
        self._last_layer: int | None = None
        self._walk_state: torch.Tensor | None = None
        self._walk_layer: int | None = None
        self._shape: tuple[int, int] | None = None

    @property
    def walk_state(self) -> torch.Tensor | None:
        """R of the last sparse layer fed, (B, G, nb, nb), or None."""
        return self._walk_state

    def select(self, q: torch.Tensor, k: torch.Tensor, layer_idx: int) -> BlockSelection:
        """Select key blocks for layer ``layer_idx``.

        Args:
            q: (B, Hq, T, D) post-RoPE queries.
            k: (B, Hkv, T, D) post-RoPE keys; Hq must be a multiple of Hkv.
            layer_idx: the layer's index in the model (>= 0, increasing between resets).

        Returns:
            `BlockSelection` with G = 1, Hkv or Hq mask groups by ``granularity``.
        """
        cfg = self.config
        check_qk(q, k)
        if q.shape[2] != k.shape[2]:
            raise ValueError(
                f"SketchWalk.select: prefill needs as many keys as queries; q has seq "
                f"{q.shape[2]}, k has seq {k.shape[2]}"
            )
        # any integer type (numpy and 0-d tensor ints too), not bools or floats
        if isinstance(layer_idx, bool) or not hasattr(type(layer_idx), "__index__"):
            raise ValueError(f"SketchWalk.select: layer_idx must be an int >= 0, got {layer_idx!r}")
        layer_idx = operator.index(layer_idx)
        if layer_idx < 0:
            raise ValueError(f"SketchWalk.select: layer_idx must be an int >= 0, got {layer_idx!r}")
        if self._last_layer is not None and layer_idx <= self._last_layer:
            raise ValueError(
                f"SketchWalk.select: layers must be fed in increasing order; got layer "
                f"{layer_idx} after layer {self._last_layer} (call reset() for a new sequence)"
            )
        b, hq, t, _ = q.shape
        hkv = k.shape[1]
        if self._shape is not None and self._shape != (b, t):
            raise ValueError(
                f"SketchWalk.select: layer {layer_idx} has (batch, seq) = {(b, t)} but earlier "
                f"layers of this sequence had {self._shape} (call reset() for a new sequence)"
            )
        self._shape = (b, t)
        groups = {"layer": 1, "kv_group": hkv, "head": hq}[cfg.granularity]
        self._last_layer = layer_idx

        if layer_idx < cfg.dense_layers:
            check_finite(f"SketchWalk.select: layer {layer_idx}", q=q, k=k)  # one sync on CUDA
            if self.keep_queries:
                self._queries[layer_idx] = (block_pool(q, cfg.block_size, cfg.parity), t)
            return BlockSelection.full(b, groups, t, cfg.block_size, q.device)

        qb = block_pool(q, cfg.block_size, cfg.parity)
        kb = block_pool(k, cfg.block_size, cfg.parity)
        return self._select_pooled(qb, kb, t, layer_idx, self._query_rows(q, k, qb.shape[1]))

    def _query_rows(self, q: torch.Tensor, k: torch.Tensor, hq: int) -> torch.Tensor | None:
        """Exact scores of the last ``config.exact_rows(S)`` rows (B, G, R, nb), or None."""
        cfg = self.config
        rows = cfg.exact_rows(k.shape[2])
        if rows == 0:
            return None
        # the query-row kernel when asked for by name, else what selectors run by default
        backend = "triton" if self.backend == "triton" else SELECTION_BACKEND
        self.query_rows_backend = query_row_backend(q, backend)
        groups = self._groups(hq, k.shape[1])
        return query_row_scores(q, k, rows, cfg.block_size, groups, backend=self.query_rows_backend)

    def _select_pooled(
        self,
        qb: torch.Tensor,
        kb: torch.Tensor,
        t: int,
        layer_idx: int,
        tail: torch.Tensor | None = None,
    ) -> BlockSelection:
        """Steps 2-5 on pooled (B, Hq, nb, D) queries and (B, Hkv, nb, D) keys of t tokens.

        ``tail``: exact scores (B, G, R, nb) that rank the last R rows instead of the walk
        (`query_row_scores`); the walk state carried to the next layer stays the walk's."""
        cfg = self.config
        b, groups = qb.shape[0], self._groups(qb.shape[1], kb.shape[1])
        if self.keep_queries:
            self._queries[layer_idx] = (qb, t)
        # A non-finite value anywhere in a block makes its pooled mean non-finite: checking the
        # pooled tensors costs one small reduction and one host sync per layer.
        if not bool(torch.isfinite(qb.sum() + kb.sum())):
            for name, pooled in (("q", qb), ("k", kb)):
                if not bool(torch.isfinite(pooled).all()):
                    raise ValueError(
                        f"SketchWalk.select: {name} of layer {layer_idx} contains NaN or Inf"
                    )
        nb = num_blocks(t, cfg.block_size)
        previous = None
        if (
            cfg.walk
            and self._walk_state is not None
            and self._walk_layer == layer_idx - 1
            and self._walk_state.shape == (b, groups, nb, nb)
        ):
            previous = self._walk_state
            if previous.device != qb.device:
                # layers on different devices (a model split by a device map): the walk state
                # follows this layer's queries; on the same device it is used as it is
                previous = previous.to(qb.device)
        if tail is not None and tail.shape[:2] != (b, groups):
            raise ValueError(f"query-row scores {tuple(tail.shape)} do not match {(b, groups)}")
        if self._graph_eligible(qb):
            r, selection = self._select_graphed(qb, kb, previous, t, layer_idx, tail)
        else:
            a = self._transition(qb, kb, layer_idx)
            r = _walk(a, previous, cfg)
            selection = select_blocks(_rank_scores(r, tail), t, cfg)
        self._walk_state, self._walk_layer = r, layer_idx
        assert r.shape == selection.scores.shape == (b, groups, nb, nb)
        return selection

    def select_chunk(self, q: torch.Tensor, k: torch.Tensor, layer_idx: int) -> BlockSelection:
        """Select key blocks for a query chunk at the end of the keys (chunked prefill).

        The T queries sit at positions S - T .. S - 1 of the S keys; the positions before them
        were fed earlier to this SketchWalk (by `select` or `select_chunk`, with
        ``keep_queries`` set), which kept each layer's pooled queries. That is the state carried
        across the chunks of one sequence: the chunk's queries are pooled into the blocks they
        fall in (a partial first block is merged with the pooled queries already kept for it),
        appended to the kept ones, and steps 2-5 run on all S tokens exactly as a one-shot
        prefill of S tokens would (same transition, walk from the previous layer of this chunk,
        same budgets); the rows of the chunk's query blocks are returned. Cost per layer: that
        of a one-shot selection of S tokens (O((S / block_size)^2)), the pooling only over the
        chunk.

        Layers must be fed in increasing order within a chunk; a layer at or below the last one
        fed starts the next chunk (the walk restarts, the pooled queries are kept).

        Args:
            q: (B, Hq, T, D) post-RoPE queries of the chunk.
            k: (B, Hkv, S, D) post-RoPE keys of the whole sequence so far, S >= T.
            layer_idx: the layer's index in the model.

        Returns:
            `BlockSelection` with ``seq_len`` S and mask (B, G, nq, nk): the last nq of the
            nk = ceil(S / block_size) key blocks, nq = nk - (S - T) // block_size.

        Raises:
            ValueError: the positions before the chunk were not fed for this layer (no kept
                pooled queries covering exactly S - T tokens), or bad inputs.
        """
        cfg = self.config
        bs = cfg.block_size
        check_qk(q, k, "SketchWalk.select_chunk")
        if isinstance(layer_idx, bool) or not hasattr(type(layer_idx), "__index__"):
            raise ValueError(
                f"SketchWalk.select_chunk: layer_idx must be an int >= 0, got {layer_idx!r}"
            )
        layer_idx = operator.index(layer_idx)
        if layer_idx < 0:
            raise ValueError(
                f"SketchWalk.select_chunk: layer_idx must be an int >= 0, got {layer_idx!r}"
            )
        b, hq, t, _ = q.shape
        s = k.shape[2]
        if t > s:
            raise ValueError(f"SketchWalk.select_chunk: more queries ({t}) than keys ({s})")
        offset = s - t
        kept = self._queries.get(layer_idx)
        if offset and (kept is None or kept[1] != offset or kept[0].shape[:2] != (b, hq)):
            have = "nothing" if kept is None else f"{kept[1]} tokens"
            raise ValueError(
                f"SketchWalk.select_chunk: layer {layer_idx} needs the pooled queries of the "
                f"{offset} cached positions before the chunk, but holds {have} (feed the "
                "sequence's earlier chunks with keep_queries = True)"
            )
        if self._last_layer is not None and layer_idx <= self._last_layer:
            self._restart_layers()  # the next chunk: a new pass over the layers
        first = offset // bs
        parts = [kept[0][:, :, :first]] if first else []
        head = min(t, (first + 1) * bs - offset) if offset % bs else 0
        if head:  # the partial first block: merge with its kept pooled queries
            seen = offset - first * bs
            old = kept[0][:, :, first : first + 1]
            new = q[:, :, :head].sum(dim=2, keepdim=True, dtype=torch.float32)
            if cfg.parity:  # the released divisor: block_size, whatever the count
                parts.append(old + new / bs)
            else:
                parts.append((old * seen + new) / (seen + head))
        if head < t:
            parts.append(block_pool(q[:, :, head:], bs, cfg.parity))
        qb = torch.cat(parts, dim=2)
        # a chunk always keeps its layer's pooled queries: the next chunk continues from them
        saved_keep, self.keep_queries = self.keep_queries, True
        saved_shape, self._shape = self._shape, None
        try:
            if layer_idx < cfg.dense_layers:
                check_finite(f"SketchWalk.select_chunk: layer {layer_idx}", q=q, k=k)
                self._queries[layer_idx] = (qb, s)
                self._last_layer = layer_idx
                full = BlockSelection.full(b, self._groups(hq, k.shape[1]), s, bs, q.device)
            else:
                kb = block_pool(k, bs, cfg.parity)
                self._last_layer = layer_idx
                tail = self._query_rows(q, k, hq)
                full = self._select_pooled(qb, kb, s, layer_idx, tail)
        finally:
            self.keep_queries = saved_keep
            self._shape = saved_shape
        return _last_rows(full, num_blocks(s, bs) - first)

    def seed_queries(self, layer_idx: int, pooled: torch.Tensor, length: int) -> None:
        """Give ``layer_idx`` the pooled queries of a sequence's first ``length`` tokens, kept
        elsewhere (a serving engine's per-page store), so that `select_chunk` can continue after
        them as if they had been fed here.

        Args:
            layer_idx: the layer.
            pooled: float32 (B, Hq, ceil(length / block_size), D) block means of the queries
                (a partial last block: the mean of its tokens; with ``parity``, the sum over
                ``block_size``), what `block_pool` gives.
            length: tokens covered, >= 1.
        """
        bs = self.config.block_size
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise ValueError(f"SketchWalk.seed_queries: length must be an int >= 1, got {length!r}")
        if pooled.dim() != 4 or pooled.shape[2] != num_blocks(length, bs):
            raise ValueError(
                f"SketchWalk.seed_queries: pooled must be (B, Hq, {num_blocks(length, bs)}, D) "
                f"for {length} tokens of blocks of {bs}, got {tuple(pooled.shape)}"
            )
        if pooled.dtype != torch.float32:
            raise ValueError(f"SketchWalk.seed_queries: pooled must be float32, got {pooled.dtype}")
        self._queries[operator.index(layer_idx)] = (pooled, length)

    def kept_length(self, layer_idx: int) -> int | None:
        """Tokens covered by the pooled queries kept for ``layer_idx`` (what a query chunk of
        this layer may continue from), or None."""
        kept = self._queries.get(layer_idx)
        return None if kept is None else kept[1]

    def _groups(self, hq: int, hkv: int) -> int:
        return {"layer": 1, "kv_group": hkv, "head": hq}[self.config.granularity]

    def _single_device(self, qb: torch.Tensor) -> bool:
        """False once layers on two devices were seen (a model split by a device map): the
        fused transition and the selection graphs then give way to the reference path, which
        was measured right across two GPUs where they were not."""
        self._devices = getattr(self, "_devices", set())
        self._devices.add(qb.device)
        return len(self._devices) == 1

    def _graph_eligible(self, qb: torch.Tensor) -> bool:
        cfg = self.config
        return (
            self._single_device(qb)
            and self.cuda_graphs
            and self.backend != "reference"
            and _triton_transition_unavailable(qb, cfg) is None
            and not (cfg.budget == "kblocks_frac" and cfg.parity)
            and not torch.cuda.is_current_stream_capturing()
        )

    def _graph_body(
        self, t: int
    ) -> Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
        tuple[torch.Tensor, ...],
    ]:
        """sketch -> fused transition -> walk -> selection, on given tensors (graph-capturable:
        no host syncs, no host-to-device copies once the per-(nb, config) caches are warm)."""
        from sketchwalk.selection.triton_transition import fused_transition

        cfg = self.config

        def body(qb, kb, proj, previous, tail):
            a = fused_transition(qb, kb, cfg, 0, projection=proj)
            r = _walk(a, previous, cfg)
            ranked = _rank_scores(r, tail)
            sel = select_blocks(ranked, t, cfg)
            return r, ranked, sel.block_mask, sel.kv_num_blocks, sel.kv_indices

        return body

    def _select_graphed(
        self,
        qb: torch.Tensor,
        kb: torch.Tensor,
        previous: torch.Tensor | None,
        t: int,
        layer_idx: int,
        tail: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, BlockSelection]:
        """(walk state R, selection) from the captured graph of this shape."""
        cfg = self.config
        self.transition_backend = "triton"
        proj = None
        if not cfg.exact:
            d = qb.shape[-1]
            proj = layer_projection(d, cfg.sketch_dim, cfg.seed, layer_idx, cfg.parity, qb.device)
        key = (
            tuple(qb.shape),
            tuple(kb.shape),
            qb.device,
            previous is not None,
            None if tail is None else tuple(tail.shape),
            t,
            dataclasses.astuple(cfg),
        )
        body = self._graph_body(t)
        graph = self._graphs.get(key)
        if graph is None:
            # First time for this key: run eagerly (compiles the kernels and fills the
            # per-(nb, config) device caches), return that result, then capture.
            r, ranked, mask, num, idx = body(qb, kb, proj, previous, tail)
            while len(self._graphs) >= MAX_GRAPHS:  # oldest first: bounded GPU memory
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = _SelectGraph(body, qb, kb, proj, previous, tail)
        else:
            # The outputs are the graph's static buffers, overwritten by the next replay:
            # return copies (the walk state is carried to the next layer and the selection is
            # kept by the caller).
            out = graph.replay(qb, kb, proj, previous, tail)
            r, mask, num, idx = (x.clone() for x in (out[0], *out[2:]))
            ranked = r if tail is None else out[1].clone()
        return r, BlockSelection(mask, cfg.block_size, t, num, idx, None, scores=ranked)

    def _transition(self, qb: torch.Tensor, kb: torch.Tensor, layer_idx: int) -> torch.Tensor:
        cfg = self.config
        reason = _triton_transition_unavailable(qb, cfg)
        if reason is None and not self._single_device(qb):
            reason = "layers on several devices"
        if self.backend == "triton" and reason is not None:
            raise RuntimeError(f"SketchWalk backend 'triton' cannot run: {reason}")
        if self.backend == "reference" or reason is not None:
            self.transition_backend = "reference"
            return transition_from_pooled(qb, kb, cfg, layer_idx)
        from sketchwalk.selection.triton_transition import fused_transition

        self.transition_backend = "triton"
        return fused_transition(qb, kb, cfg, layer_idx)


# The attention backends' names (sketchwalk.attention.api): "reference" is the plain PyTorch
# transition; "torch", its earlier name, is still accepted.
TRANSITION_BACKENDS = ("reference", "triton", "auto")
TRANSITION_ALIASES = {"torch": "reference"}
# Captured selection graphs kept per SketchWalk (two per sequence length: with and without the
# previous layer's walk state).
MAX_GRAPHS = 8


class _SelectGraph:
    """One captured selection: static input buffers, the CUDA graph, its output buffers."""

    def __init__(
        self,
        body: Callable[..., tuple[torch.Tensor, ...]],
        qb: torch.Tensor,
        kb: torch.Tensor,
        proj: torch.Tensor | None,
        previous: torch.Tensor | None,
        tail: torch.Tensor | None = None,
    ) -> None:
        self.qb, self.kb = qb.clone(), kb.clone()
        self.proj = None if proj is None else proj.clone()
        self.previous = None if previous is None else previous.clone()
        self.tail = None if tail is None else tail.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = body(self.qb, self.kb, self.proj, self.previous, self.tail)

    def replay(
        self,
        qb: torch.Tensor,
        kb: torch.Tensor,
        proj: torch.Tensor | None,
        previous: torch.Tensor | None,
        tail: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        self.qb.copy_(qb)
        self.kb.copy_(kb)
        if self.proj is not None:
            self.proj.copy_(proj)
        if self.previous is not None:
            self.previous.copy_(previous)
        if self.tail is not None:
            self.tail.copy_(tail)
        self.graph.replay()
        return self.outputs


def _walk(a: torch.Tensor, previous: torch.Tensor | None, cfg: SketchWalkConfig) -> torch.Tensor:
    """This layer's walk state from its transition ``a`` and the previous layer's state."""
    return walk_step(
        a, previous, cfg.degree, cfg.damping, causal=_causal_walk(cfg),
        bf16_products=cfg.walk_dtype == "bfloat16",
    )  # fmt: skip


def _causal_walk(cfg: SketchWalkConfig) -> bool:
    """Whether every transition matrix (and so every walk state) of this config is
    lower-triangular: a causal block softmax, which parity does not apply."""
    return cfg.causal_sketch and not cfg.parity


def _rank_scores(r: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor:
    """The walk matrix R (B, G, nb, nb) with its last rows replaced by ``tail`` (B, G, R, nb),
    the exact query-row scores (R itself when there are none)."""
    if tail is None:
        return r
    return torch.cat([r[:, :, : r.shape[2] - tail.shape[2]], tail.to(r.dtype)], dim=2)


def _last_rows(selection: BlockSelection, rows: int) -> BlockSelection:
    """The last ``rows`` query-block rows of a square selection (a query chunk's rows)."""
    if rows == selection.block_mask.shape[2]:
        return selection
    scores = None if selection.scores is None else selection.scores[:, :, -rows:]
    return BlockSelection(
        selection.block_mask[:, :, -rows:],
        selection.block_size,
        selection.seq_len,
        selection.kv_num_blocks[:, :, -rows:],
        selection.kv_indices[:, :, -rows:],
        None,
        scores=scores,
    )


def _triton_transition_unavailable(qb: torch.Tensor, cfg: SketchWalkConfig) -> str | None:
    """Why the fused transition kernel cannot run here, or None if it can."""
    if not qb.is_cuda:
        return f"tensors are on {qb.device}, the kernel needs CUDA"
    if cfg.granularity == "head":
        return "granularity 'head' has nothing to fuse (one softmax per mask)"
    if cfg.head_aggregation != "sum":
        return f"the kernel sums the heads of a group (head_aggregation {cfg.head_aggregation!r})"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


__all__ = ["MAX_GRAPHS", "TRANSITION_BACKENDS", "SketchWalk"]
