"""Drop-in SketchWalk attention for transformers causal LMs (no forked modeling files).

:func:`enable_sketchwalk` switches a model to a registered attention function named
``sketchwalk+<inner>`` (``<inner>`` is the implementation the model used before, e.g. ``sdpa`` or
``eager``); its paired mask function is the inner implementation's own, so masks are built exactly
as before. For every attention call the function receives post-RoPE ``query`` (B, Hq, S, D),
un-repeated ``key``/``value`` (B, Hkv, S_kv, D) and ``module.layer_idx``, and decides:

- **Sparse prefill**: ``S == S_kv > block_size``, a causal module, no padding (the mask is None or
  equals the plain causal mask), ``dropout == 0`` and no score modifiers (``softcap``, sinks,
  position bias). The layer's q/k go to one :class:`~sketchwalk.selection.prefill.SketchWalk`
  per forward pass (fed in layer order, so the cross-layer walk runs; it is reset when a layer at
  or below the last one seen arrives, i.e. when a new forward pass starts), and the output is
  :func:`~sketchwalk.attention.sparse_attention` over the selected blocks with the configured
  backend and the module's ``scaling``. When the selection keeps every causal block (the first
  ``dense_layers`` layers, a density-1 budget, a sequence of one block) the inner implementation
  runs instead: the result is the same attention, computed by the stock kernel, so a dense
  configuration reproduces the stock model's logits exactly.
- **Sparse decode** (``decode="sketchwalk"``): a step with one new token (``S == 1``) on a layer
  whose prefill ran through SketchWalk goes to a :class:`~sketchwalk.selection.decode.
  SketchWalkDecoder` (incremental pooled keys, a window of recent queries, the prefill's
  transition matrix) and :func:`~sketchwalk.attention.sparse_decode` over the kept blocks of the
  cache. With the default ``decode="dense"`` decode steps run the inner implementation.
- **Left-padded prefill** (what ``generate()`` builds for prompts of different lengths: a causal
  mask whose row b hides its first ``pads[b]`` keys, :func:`left_padding`): each sequence runs
  sparse on its own tokens, with its own selector and walk state (one per batch row and forward
  pass), so no padding token is selected or attended and every real token's output equals the
  sequence run alone. Cost: B selector calls and B attention calls per layer, in a Python loop;
  padding outputs are zeros.
- **Chunked prefill** (``1 < S < S_kv``: a prompt fed in chunks, or new tokens after a prefix
  cached through SketchWalk): :meth:`~sketchwalk.selection.prefill.SketchWalk.select_chunk`
  continues the sequence from each layer's pooled queries (kept by the selector) and selects
  the chunk's rows of a one-shot prefill of the whole cache; the attention runs on the resolved
  backend (Triton on CUDA, with the chunk's query offset). Dense, with the reason recorded, when
  the cache was not filled through SketchWalk or ``backend`` is ``flex`` (no query offset).
- **Everything else runs the inner (dense) implementation unchanged**, with the reason recorded:
  packed or right-padded batches and sliding-window masks (the mask is neither plain causal nor
  left padding; ``on_padding="raise"`` raises instead), short sequences, dropout, non-causal
  modules, layers outside ``layers``.

Any other block selector can take SketchWalk's place (:func:`enable_selector`): an object with
a ``config`` (:class:`~sketchwalk.config.SketchWalkConfig`: block size, dense layers, budget),
``reset()`` (called when a new forward pass starts) and ``select(q, k, layer_idx) ->
BlockSelection``, e.g. the baselines of :mod:`sketchwalk.selection.baselines`. Everything else
(which calls run sparse, the sparse kernel, the records) is the same, so comparing selectors
through this path compares only their selections.

Every call is recorded in :attr:`SketchWalkAttention.calls` (layer, pass, mode, density, backend,
reason); :attr:`SketchWalkAttention.layers` holds each layer's latest call and
:meth:`SketchWalkAttention.summary` the mean density over prefill calls.

Example::

    from sketchwalk import SketchWalkConfig
    from sketchwalk.hf.integration import enable_sketchwalk, disable_sketchwalk

    sw = enable_sketchwalk(model, SketchWalkConfig(density=0.2))
    logits = model(input_ids).logits          # sparse prefill
    print(sw.summary()["mean_density"])
    disable_sketchwalk(model)                 # or: with enable_sketchwalk(model, cfg) as sw: ...
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from sketchwalk.attention.api import (
    BACKENDS,
    on_device,
    resolve_backend,
    sparse_attention,
    sparse_decode,
)
from sketchwalk.config import SketchWalkConfig
from sketchwalk.hf.capture import (
    CAPTURE_PREFIX,
    attention_modules,
    choose_layers,
    inner_attention_function,
    register_wrapper,
    set_attention_implementation,
)
from sketchwalk.selection.decode import SketchWalkDecoder
from sketchwalk.selection.prefill import TRANSITION_ALIASES, TRANSITION_BACKENDS, SketchWalk

__all__ = [
    "SKETCHWALK_PREFIX",
    "LayerCall",
    "SketchWalkAttention",
    "disable_sketchwalk",
    "enable_selector",
    "enable_sketchwalk",
    "left_padding",
    "sketchwalk_attention",
]

SKETCHWALK_PREFIX = "sketchwalk+"
PADDING_POLICIES = ("fallback", "raise")
DECODE_MODES = ("dense", "sketchwalk")
# Score modifiers SketchWalk's kernels do not implement: a call carrying one runs dense.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")

# id(attention module) -> the SketchWalkAttention driving it; id(model) -> the same.
_ACTIVE_MODULES: dict[int, SketchWalkAttention] = {}
_ACTIVE_MODELS: dict[int, SketchWalkAttention] = {}


@dataclass
class LayerCall:
    """One attention call seen by the integration.

    Attributes:
        layer_idx: the module's ``layer_idx``.
        forward_pass: index of the forward pass (increments when a new prefill pass starts).
        mode: ``"sparse"`` (SketchWalk + block-sparse attention) or ``"dense"`` (inner).
        q_len, kv_len: query and key lengths of the call.
        density: kept causal blocks / causal blocks (1.0 for every dense call).
        backend: the resolved sparse backend (``"reference"``, ``"triton"``, ``"flex"``) or
            ``"inner:<name>"`` for the inner implementation.
        reason: why the call ran dense (None for sparse calls).
        prefill: True when ``q_len == kv_len`` (a prefill call, sparse or not).
    """

    layer_idx: int
    forward_pass: int
    mode: str
    q_len: int
    kv_len: int
    density: float
    backend: str
    reason: str | None
    prefill: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SketchWalkAttention:
    """SketchWalk sparse prefill attention on a transformers model (context manager).

    Args:
        model: a transformers causal LM whose attention modules have ``layer_idx`` and dispatch
            through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2, Qwen3, Mistral, ...).
        config: the selection settings (default ``SketchWalkConfig.preset("default")``).
        backend: sparse attention backend for :func:`sparse_attention` (``"auto"``,
            ``"reference"``, ``"triton"``, ``"flex"``). An explicit backend that cannot run on the
            layer's tensors raises during the forward pass; ``"auto"`` resolves per call.
        layers: layer indices allowed to run sparse; None means every layer (the first
            ``config.dense_layers`` layers stay dense anyway).
        selection_backend: ``SketchWalk(backend=)`` for the transition matrix (``"auto"``,
            ``"reference"``, ``"triton"``).
        on_padding: ``"fallback"`` (masks other than plain causal or left padding: packed,
            right-padded, sliding-window, run the inner dense attention, recorded) or
            ``"raise"`` (ValueError). Left-padded batches run sparse either way.
        dense_when_full: run the inner implementation when the selection keeps every causal
            block (exactly the same attention); False sends such calls through
            ``sparse_attention`` too (useful to test the sparse path).
        decode: ``"dense"`` (decode steps run the inner implementation) or ``"sketchwalk"``
            (one-token steps select blocks with a ``SketchWalkDecoder`` and run
            ``sparse_decode``; Triton on CUDA when the sparse backend resolves to Triton).
        selector: the prefill block selector (default ``SketchWalk(config)``): any object with
            ``reset()`` and ``select(q, k, layer_idx) -> BlockSelection``; ``config`` defaults
            to its ``config`` attribute.

    The model is switched on :meth:`enable` (or ``__enter__``) and restored on :meth:`disable`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: SketchWalkConfig | None = None,
        backend: str = "auto",
        layers: Iterable[int] | None = None,
        selection_backend: str = "auto",
        on_padding: str = "fallback",
        dense_when_full: bool = True,
        decode: str = "dense",
        selector: Any = None,
    ) -> None:
        if selector is not None:
            for attr in ("reset", "select"):
                if not callable(getattr(selector, attr, None)):
                    raise TypeError(
                        f"enable_selector: selector {type(selector).__name__} has no {attr}() "
                        "(a selector needs reset() and select(q, k, layer_idx))"
                    )
            if config is None:
                config = getattr(selector, "config", None)
        if config is None:
            config = SketchWalkConfig.preset("default")
        if not isinstance(config, SketchWalkConfig):
            raise TypeError(
                f"enable_sketchwalk: config must be a SketchWalkConfig, got {type(config).__name__}"
            )
        if backend not in BACKENDS:
            raise ValueError(
                f"enable_sketchwalk: backend must be one of {BACKENDS}, got {backend!r}"
            )
        selection_backend = TRANSITION_ALIASES.get(selection_backend, selection_backend)
        if selection_backend not in TRANSITION_BACKENDS:
            raise ValueError(
                f"enable_sketchwalk: selection_backend must be one of {TRANSITION_BACKENDS}, got "
                f"{selection_backend!r}"
            )
        if decode not in DECODE_MODES:
            raise ValueError(
                f"enable_sketchwalk: decode must be one of {DECODE_MODES}, got {decode!r}"
            )
        if decode == "sketchwalk" and backend == "flex":
            raise ValueError(
                "enable_sketchwalk: backend 'flex' has no decode kernel; with "
                "decode='sketchwalk' use backend 'triton', 'reference' or 'auto'"
            )
        if on_padding not in PADDING_POLICIES:
            raise ValueError(
                f"enable_sketchwalk: on_padding must be one of {PADDING_POLICIES}, got "
                f"{on_padding!r}"
            )
        modules = attention_modules(model)
        chosen = choose_layers(modules, layers, "enable_sketchwalk")
        self.model = model
        self.config = config
        self.backend = backend
        self.selection_backend = selection_backend
        self.on_padding = on_padding
        self.dense_when_full = dense_when_full
        self.modules = modules
        self.sparse_layers: set[int] = set(chosen)
        self.inner: str | None = None
        self.name: str | None = None
        self.active = False
        self.selector = (
            selector if selector is not None else SketchWalk(config, backend=selection_backend)
        )
        if isinstance(self.selector, SketchWalk):
            # chunked prefill continues from each layer's pooled queries (B x Hq x nb x D
            # float32 per layer, 1 / block_size of one layer's queries)
            self.selector.keep_queries = True
        self.decode = decode
        # decode steps are consumed at once: the quest step may run as a CUDA graph
        self.decoder = SketchWalkDecoder(config, cuda_graphs=True)
        self.calls: list[LayerCall] = []
        self.layers: dict[int, LayerCall] = {}
        self.forward_passes = 0
        self._last_layer: int | None = None
        self._row_selectors: dict[int, Any] = {}
        # a left-padded batch decodes one row at a time, each row with its own decoder
        self._row_decoders: dict[int, SketchWalkDecoder] = {}
        self._decode_pads: list[int] | None = None
        self._mask_cache: dict[tuple[str, int], tuple[weakref.ref, Any]] = {}

    @property
    def sketchwalk(self) -> Any:
        """The prefill selector (kept under its old name)."""
        return self.selector

    # ---- switching ------------------------------------------------------------------------

    def enable(self) -> SketchWalkAttention:
        """Register ``sketchwalk+<inner>`` and switch the model to it."""
        if self.active:
            raise RuntimeError("enable_sketchwalk: this SketchWalkAttention is already enabled")
        if id(self.model) in _ACTIVE_MODELS:
            raise RuntimeError(
                "enable_sketchwalk: SketchWalk is already enabled on this model; call "
                "disable_sketchwalk(model) first"
            )
        current = self.model.config._attn_implementation or "sdpa"
        if current.startswith(CAPTURE_PREFIX) or current.startswith(SKETCHWALK_PREFIX):
            raise RuntimeError(
                f"enable_sketchwalk: the model runs {current!r}; enable SketchWalk before "
                "capturing (capture_attention wraps whatever implementation is active)"
            )
        self.inner = current
        self.name = register_wrapper(
            SKETCHWALK_PREFIX, current, _make_attention_fn, "enable_sketchwalk"
        )
        set_attention_implementation(self.model, self.name)
        for module in self.modules.values():
            _ACTIVE_MODULES[id(module)] = self
        _ACTIVE_MODELS[id(self.model)] = self
        self.active = True
        return self

    def disable(self) -> None:
        """Restore the model's previous attention implementation (idempotent)."""
        if not self.active:
            return
        for module in self.modules.values():
            if _ACTIVE_MODULES.get(id(module)) is self:
                del _ACTIVE_MODULES[id(module)]
        if _ACTIVE_MODELS.get(id(self.model)) is self:
            del _ACTIVE_MODELS[id(self.model)]
        set_attention_implementation(self.model, self.inner)
        self.active = False

    def __enter__(self) -> SketchWalkAttention:
        return self if self.active else self.enable()

    def __exit__(self, *exc: object) -> None:
        self.disable()

    # ---- records --------------------------------------------------------------------------

    def clear(self) -> None:
        """Drop the call records (the walk state is kept)."""
        self.calls = []
        self.layers = {}

    def summary(self) -> dict[str, Any]:
        """Aggregates over the recorded calls.

        Returns:
            dict with ``mean_density`` (mean selection density over prefill calls, dense ones
            counting 1.0: the share of causal attention blocks computed), ``mean_sparse_density``
            (over sparse calls only, None if none), ``sparse_calls``, ``dense_calls``,
            ``prefill_calls``, ``forward_passes``, ``backends`` (call counts per backend) and
            ``dense_reasons`` (call counts per reason).
        """
        prefill = [c for c in self.calls if c.prefill]
        sparse = [c for c in self.calls if c.mode == "sparse"]
        backends: dict[str, int] = {}
        reasons: dict[str, int] = {}
        for c in self.calls:
            backends[c.backend] = backends.get(c.backend, 0) + 1
            if c.reason is not None:
                reasons[c.reason] = reasons.get(c.reason, 0) + 1
        return {
            "mean_density": (sum(c.density for c in prefill) / len(prefill)) if prefill else None,
            "mean_sparse_density": (sum(c.density for c in sparse) / len(sparse))
            if sparse
            else None,
            "sparse_calls": len(sparse),
            "dense_calls": len(self.calls) - len(sparse),
            "prefill_calls": len(prefill),
            "forward_passes": self.forward_passes,
            "backends": backends,
            "dense_reasons": reasons,
        }

    def _record(
        self,
        layer_idx: int,
        mode: str,
        q_len: int,
        kv_len: int,
        density: float,
        backend: str,
        reason: str | None,
    ) -> None:
        call = LayerCall(
            layer_idx,
            self.forward_passes,
            mode,
            q_len,
            kv_len,
            float(density),
            backend,
            reason,
            q_len == kv_len,
        )
        self.calls.append(call)
        self.layers[layer_idx] = call

    # ---- the attention call ---------------------------------------------------------------

    def _once_per_mask(self, kind: str, mask: torch.Tensor, inspect: Callable[[], Any]) -> Any:
        """``inspect()`` of ``mask``, computed once per mask object and ``kind``: every layer of
        a forward pass (or decode step) gets the same mask object, so its inspection (a host
        sync) runs once, not per layer. Entries are weak references checked by identity, so a
        new mask at a reused address is inspected again."""
        key = (kind, id(mask))
        seen = self._mask_cache.get(key)
        if seen is not None and seen[0]() is mask:
            return seen[1]
        value = inspect()
        self._mask_cache = {k: v for k, v in self._mask_cache.items() if v[0]() is not None}
        self._mask_cache[key] = (weakref.ref(mask), value)
        return value

    def _mask_problem(self, mask: Any, q_len: int, kv_len: int) -> str | None:
        """None when ``mask`` is absent or equals the plain causal mask, else why it is not."""
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor):
            return f"attention mask of type {type(mask).__name__} (only tensors are inspected)"
        if mask.dim() != 4 or mask.shape[-2:] != (q_len, kv_len):
            return f"attention mask of shape {tuple(mask.shape)} (expected (B, 1, S, S))"
        return self._once_per_mask("prefill", mask, lambda: _prefill_mask_verdict(mask))[0]

    def _left_pads(self, mask: Any) -> list[int] | None:
        """Per-row left-padding lengths of the mask `_mask_problem` just inspected, or None when
        it is not a left-padded causal mask."""
        seen = None if mask is None else self._mask_cache.get(("prefill", id(mask)))
        if seen is None or seen[0]() is not mask:
            return None
        return seen[1][1]

    def _dense_reason(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> str | None:
        """Why this call must run the inner implementation, or None when it may run sparse."""
        layer_idx = module.layer_idx
        q_len, kv_len = query.shape[2], key.shape[2]
        if layer_idx not in self.sparse_layers:
            return "layer not selected for SketchWalk"
        if 1 < q_len < kv_len:
            return self._chunk_problem(module, layer_idx, q_len, kv_len, attention_mask, kwargs)
        if q_len < kv_len:
            if self.decode == "dense":
                return "decode step (one new token): dense"
            return self._decode_problem(layer_idx, q_len, kv_len, attention_mask, kwargs)
        if q_len != kv_len:
            return f"query length {q_len} > key length {kv_len}"
        if q_len <= self.config.block_size:
            return f"sequence of {q_len} tokens fits in one block of {self.config.block_size}"
        if args:
            return "positional extra arguments to the attention function"
        problem = _module_problem(module, kv_len, kwargs)
        if problem is not None:
            return problem
        problem = self._mask_problem(attention_mask, q_len, kv_len)
        if problem is not None and self._left_pads(attention_mask) is not None:
            return None  # left padding: each sequence runs sparse on its own tokens
        if problem is not None and self.on_padding == "raise":
            raise ValueError(
                f"SketchWalk (layer {layer_idx}): {problem}; padded batches are not supported "
                "by sparse prefill, only left padding is (use on_padding='fallback' to run them "
                "dense, or left-padded or unpadded batches)"
            )
        return problem

    def _chunk_problem(
        self,
        module: nn.Module,
        layer_idx: int,
        q_len: int,
        kv_len: int,
        attention_mask: Any,
        kwargs: dict,
    ) -> str | None:
        """Why a query chunk (``1 < q_len < kv_len``: chunked prefill, or new tokens after a
        cached prefix) cannot run sparse, or None."""
        if not callable(getattr(self.selector, "select_chunk", None)):
            return "chunked prefill: the selector has no select_chunk: dense"
        seen = self.selector.kept_length(layer_idx)
        if seen != kv_len - q_len:
            return (
                f"chunked prefill: SketchWalk saw {seen or 0} of the {kv_len - q_len} cached "
                "positions (the cache was not filled through it): dense"
            )
        if self.backend == "flex":
            return "chunked prefill: backend 'flex' has no query offset: dense"
        problem = _module_problem(module, kv_len, kwargs)
        if problem is not None:
            return problem
        problem = self._mask_problem(attention_mask, q_len, kv_len)
        if problem is not None:
            return f"chunked prefill: {problem}: dense"
        return None

    def _decode_problem(
        self, layer_idx: int, q_len: int, kv_len: int, attention_mask: Any, kwargs: dict
    ) -> str | None:
        """Why a decode-shaped call cannot run SketchWalk decode, or None."""
        if q_len != 1:
            return f"{q_len} new tokens in one step (decode selection takes one): dense"
        if layer_idx < self.config.dense_layers:
            return "dense layer (config.dense_layers)"
        pads = self._decode_left_pads(attention_mask)
        if pads is None:
            return "decode mask hides cached positions other than left padding: dense"
        if any(pads):
            if pads != self._decode_pads:
                return (
                    "decode mask's left padding is not the padding of the prefill that SketchWalk "
                    "ran: dense"
                )
            decoders = self._row_decoders
            if any(
                decoders.get(row) is None or decoders[row].cache_length(layer_idx) != kv_len - 1 - p
                for row, p in enumerate(pads)
            ):
                return "no SketchWalk prefill state for this cache (prefill ran dense): dense"
        elif self.decoder.cache_length(layer_idx) != kv_len - 1:
            return "no SketchWalk prefill state for this cache (prefill ran dense): dense"
        if float(kwargs.get("dropout", 0.0) or 0.0) != 0.0:
            return "attention dropout > 0"
        for name in _UNSUPPORTED_KWARGS:
            if kwargs.get(name) is not None:
                return f"unsupported attention argument {name!r}"
        window = kwargs.get("sliding_window")
        if isinstance(window, int) and not isinstance(window, bool) and 0 < window < kv_len:
            return f"sliding-window layer (window {window} < {kv_len} keys)"
        return None

    def _decode_left_pads(self, mask: Any) -> list[int] | None:
        """Per-row left padding of a decode step's mask (all zeros without a mask or padding),
        None when the mask hides other positions. Every layer of a step gets the same mask
        object: it is inspected (a host sync) once per step, not per layer."""
        if mask is None:
            return [0]
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1:3] != (1, 1):
            return None
        return self._once_per_mask(
            "decode", mask, lambda: decode_left_padding(_allowed(mask)[:, 0, 0])
        )

    def _start_pass_if_new(self, layer_idx: int) -> None:
        if self._last_layer is None or layer_idx <= self._last_layer:
            self.selector.reset()
            self.decoder.reset()
            self._row_selectors = {}
            self._row_decoders = {}
            self._decode_pads = None
            self.forward_passes += 1
        self._last_layer = layer_idx

    def _chunk(
        self,
        inner_fn: Callable[..., Any],
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        scaling: float | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, Any]:
        """Sparse attention of a query chunk at the end of the cache (chunked prefill).

        The selector continues the sequence from the pooled queries it kept for the cached
        positions (`SketchWalk.select_chunk`): the selection is that of a one-shot prefill of
        the whole cache, restricted to the chunk's query blocks. A chunk is a new pass over the
        layers, but not a new sequence: the selector is not reset. The attention runs on the
        resolved backend (the Triton prefill kernel takes the query offset).
        """
        layer_idx = int(module.layer_idx)
        q_len, kv_len = query.shape[2], key.shape[2]
        if self._last_layer is None or layer_idx <= self._last_layer:
            self.decoder.reset()  # its state was for the cache before this chunk
            self.forward_passes += 1
        self._last_layer = layer_idx
        selection = self.selector.select_chunk(query, key, layer_idx)
        if self.dense_when_full and selection.density >= 1.0:
            why = (
                "dense layer (config.dense_layers)"
                if layer_idx < self.config.dense_layers
                else "selection keeps every causal block"
            )
            self._record(layer_idx, "dense", q_len, kv_len, 1.0, f"inner:{self.inner}", why)
            return inner_fn(module, query, key, value, attention_mask, *args, **kwargs)
        resolved = resolve_backend(self.backend, query)
        out = sparse_attention(query, key, value, selection, backend=resolved, scale=scaling)
        self._record(layer_idx, "sparse", q_len, kv_len, selection.density, resolved, None)
        return out.transpose(1, 2).contiguous(), None

    def _row_selector(self, row: int) -> Any:
        """The selector of batch row ``row`` of a left-padded batch (one per row and forward
        pass, so each sequence carries its own walk state across the layers)."""
        selector = self._row_selectors.get(row)
        if selector is None:
            if isinstance(self.selector, SketchWalk):
                selector = SketchWalk(
                    self.selector.config,
                    backend=self.selector.backend,
                    cuda_graphs=self.selector.cuda_graphs,
                )
            elif hasattr(self.selector, "row_selector"):
                # a selector holding state it cannot copy (the gate's hooks) makes its own
                selector = self.selector.row_selector()
            else:
                selector = copy.deepcopy(self.selector)
                selector.reset()
            self._row_selectors[row] = selector
        return selector

    def _padded_prefill(
        self,
        inner_fn: Callable[..., Any],
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        pads: list[int],
        scaling: float | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, Any]:
        """Sparse prefill of a left-padded batch, one sequence at a time.

        Row b's real tokens are positions ``pads[b]:``; its selection and sparse attention run
        on that slice alone (batch 1, its own length and walk state), so no padding position is
        selected or attended, and the result equals running the sequence unpadded. Padding
        positions get zeros (the model masks them out of every real token's attention). Cost:
        B selector calls and B attention calls per layer instead of one batched call.
        """
        layer_idx = int(module.layer_idx)
        q_len, kv_len = query.shape[2], key.shape[2]
        self._start_pass_if_new(layer_idx)
        selections = []
        share = getattr(self.selector, "share_row_inputs", None)
        for row, pad in enumerate(pads):
            q_row = query[row : row + 1, :, pad:]
            k_row = key[row : row + 1, :, pad:]
            selector = self._row_selector(row)
            if share is not None:  # inputs besides q/k (the gate's pre-RoPE tensors)
                share(selector, layer_idx, row, pad)
            selections.append(selector.select(q_row, k_row, layer_idx))
        if self.decode == "sketchwalk":
            for row, pad in enumerate(pads):
                decoder = self._row_decoders.get(row)
                if decoder is None:
                    decoder = self._row_decoders[row] = SketchWalkDecoder(
                        self.config, cuda_graphs=True
                    )
                decoder.prefill(
                    query[row : row + 1, :, pad:], key[row : row + 1, :, pad:], layer_idx
                )
            self._decode_pads = list(pads)
        kept = sum(int(s.kv_num_blocks.sum(dtype=torch.int64)) for s in selections)
        density = kept / sum(_causal_blocks(s) for s in selections)
        if self.dense_when_full and density >= 1.0:
            why = (
                "dense layer (config.dense_layers)"
                if layer_idx < self.config.dense_layers
                else "selection keeps every causal block"
            )
            self._record(layer_idx, "dense", q_len, kv_len, 1.0, f"inner:{self.inner}", why)
            return inner_fn(module, query, key, value, attention_mask, *args, **kwargs)
        resolved = resolve_backend(self.backend, query)
        out = torch.zeros_like(query)
        for row, (pad, selection) in enumerate(zip(pads, selections, strict=True)):
            out[row : row + 1, :, pad:] = sparse_attention(
                query[row : row + 1, :, pad:],
                key[row : row + 1, :, pad:],
                value[row : row + 1, :, pad:],
                selection,
                backend=resolved,
                scale=scaling,
            )
        self._record(layer_idx, "sparse", q_len, kv_len, density, resolved, None)
        return out.transpose(1, 2).contiguous(), None

    def _trim_unused_slots(
        self, mask: torch.Tensor, key: torch.Tensor, value: torch.Tensor, query_len: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Drop the cache slots no query may see yet (a static cache's preallocated tail).

        A `StaticCache` hands every layer its whole (B, Hkv, max_cache_len, D) buffers and masks
        the slots after the last written position. Keys past the last position any query sees
        are cut off (views, no copy), with the mask, so the call is the prefill, chunk or decode
        step of the written prefix. Inspected (a host sync) once per mask object: the layers of
        a step share the mask, and get the same trimmed mask object back."""

        def inspect() -> tuple[int, torch.Tensor]:
            seen_cols = _allowed(mask).reshape(-1, mask.shape[-1]).any(dim=0)
            visible = int(seen_cols.nonzero().max()) + 1 if bool(seen_cols.any()) else 0
            length = visible or mask.shape[-1]
            return length, (mask if length >= mask.shape[-1] else mask[..., :length])

        length, trimmed = self._once_per_mask("trim", mask, inspect)
        if not query_len <= length < key.shape[2]:
            return mask, key, value
        return trimmed, key[:, :, :length], value[:, :, :length]

    def _padded_decode(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        pads: list[int],
        scaling: float | None,
        backend: str,
    ) -> tuple[torch.Tensor, Any]:
        """A decode step of a left-padded batch: row b's decoder (prefilled on its unpadded
        slice) selects over its own blocks, and one attention call reads each row's blocks
        from its first real key on (``sparse_decode(..., key_start=pads)``), so no padding key
        is selected or attended and each row decodes as it would alone. Cost: B selections and
        one kernel launch per layer."""
        steps, density = [], 0.0
        for row in range(len(pads)):
            steps.append(
                self._row_decoders[row].step(
                    query[row : row + 1], key[row : row + 1, :, -1:], layer_idx
                )
            )
            density += steps[-1].density / len(pads)
        width = max(st.kv_indices.shape[-1] for st in steps)
        kv_indices = torch.cat([
            torch.nn.functional.pad(st.kv_indices, (0, width - st.kv_indices.shape[-1]))
            for st in steps
        ])  # fmt: skip
        kv_num_blocks = torch.cat([st.kv_num_blocks for st in steps])
        starts = self._pads_on(query.device)
        out = sparse_decode(
            query, key, value, kv_num_blocks, kv_indices, self.config.block_size,
            backend=backend, scale=scaling, key_start=starts,
        )  # fmt: skip
        q_len, kv_len = query.shape[2], key.shape[2]
        self._record(layer_idx, "sparse", q_len, kv_len, density, backend, None)
        return out.transpose(1, 2).contiguous(), None

    def _pads_on(self, device: torch.device) -> torch.Tensor:
        """The decode's left pads as an int32 device tensor, made once per generate() call
        (a host-to-device copy per layer and step would wait for the device)."""
        pads = tuple(self._decode_pads)
        cached = getattr(self, "_pads_tensor", None)
        if cached is None or cached[0] != (pads, device):
            cached = ((pads, device), torch.tensor(pads, dtype=torch.int32, device=device))
            self._pads_tensor = cached
        return cached[1]

    def __call__(
        self,
        inner_fn: Callable[..., Any],
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, Any]:
        """One attention call: sparse prefill or the inner implementation (see module doc).

        Args:
            inner_fn: the inner attention function.
            module: the attention module (``layer_idx``, ``scaling``).
            query: (B, Hq, S, D) post-RoPE; key, value: (B, Hkv, S_kv, D).
            attention_mask: what the inner mask function built (None, bool or additive float).
            args, kwargs: the remaining arguments, passed to the inner function unchanged.

        Returns:
            ``(output (B, S, Hq, D), weights)``; weights are None on the sparse path.
        """
        if isinstance(attention_mask, torch.Tensor) and key.shape[2] > query.shape[2]:
            attention_mask, key, value = self._trim_unused_slots(
                attention_mask, key, value, query.shape[2]
            )
        elif attention_mask is None and 1 < query.shape[2] < key.shape[2]:
            # Without a mask, transformers relies on SDPA's is_causal, which aligns the queries
            # to the FIRST keys: the prefill of an empty static cache, whose slots past the
            # prompt are unwritten. Those slots are cut off.
            key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
        layer_idx = int(module.layer_idx)
        q_len, kv_len = query.shape[2], key.shape[2]
        inner_label = f"inner:{self.inner}"
        reason = self._dense_reason(module, query, key, attention_mask, args, kwargs)
        if reason is not None:
            if (
                q_len == kv_len <= self.config.block_size
                and layer_idx in self.sparse_layers
                and getattr(self.selector, "keep_queries", False)
                and self._mask_problem(attention_mask, q_len, kv_len) is None
            ):
                # a first chunk of one block: dense, but the selector keeps its pooled queries
                # so that the next chunks can run sparse
                self._start_pass_if_new(layer_idx)
                self.selector.select(query, key, layer_idx)
            self._record(layer_idx, "dense", q_len, kv_len, 1.0, inner_label, reason)
            return inner_fn(module, query, key, value, attention_mask, *args, **kwargs)

        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", None)
        with on_device(query):  # a layer on another GPU than the current one (device maps)
            return self._sparse_call(
                inner_fn, module, query, key, value, attention_mask, scaling, args, kwargs
            )

    def _sparse_call(
        self,
        inner_fn: Callable[..., Any],
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        scaling: float | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, Any]:
        layer_idx = int(module.layer_idx)
        q_len, kv_len = query.shape[2], key.shape[2]
        inner_label = f"inner:{self.inner}"
        if 1 < q_len < kv_len:  # a query chunk (checked by _dense_reason)
            return self._chunk(
                inner_fn, module, query, key, value, attention_mask, scaling, args, kwargs
            )
        if q_len < kv_len:  # SketchWalk decode step (checked by _dense_reason)
            decode_backend = resolve_backend(self.backend, query, mode="decode")
            pads = self._decode_left_pads(attention_mask)
            if pads is not None and any(pads):
                return self._padded_decode(
                    layer_idx, query, key, value, pads, scaling, decode_backend
                )
            step = self.decoder.step(query, key[:, :, -1:], layer_idx)
            out = sparse_decode(
                query,
                key,
                value,
                step.kv_num_blocks,
                step.kv_indices,
                self.config.block_size,
                backend=decode_backend,
                scale=scaling,
            )
            self._record(layer_idx, "sparse", q_len, kv_len, step.density, decode_backend, None)
            return out.transpose(1, 2).contiguous(), None

        pads = self._left_pads(attention_mask)
        if pads is not None:
            return self._padded_prefill(
                inner_fn, module, query, key, value, attention_mask, pads, scaling, args, kwargs
            )
        self._start_pass_if_new(layer_idx)
        selection = self.selector.select(query, key, layer_idx)
        if self.decode == "sketchwalk":
            self.decoder.prefill(query, key, layer_idx)
        if self.dense_when_full and selection.density >= 1.0:
            why = (
                "dense layer (config.dense_layers)"
                if layer_idx < self.config.dense_layers
                else "selection keeps every causal block"
            )
            self._record(layer_idx, "dense", q_len, kv_len, 1.0, inner_label, why)
            return inner_fn(module, query, key, value, attention_mask, *args, **kwargs)

        resolved = resolve_backend(self.backend, query)
        out = sparse_attention(query, key, value, selection, backend=resolved, scale=scaling)
        self._record(layer_idx, "sparse", q_len, kv_len, selection.density, resolved, None)
        return out.transpose(1, 2).contiguous(), None


def left_padding(allowed: torch.Tensor) -> list[int] | None:
    """Per-row padding lengths when ``allowed`` is a left-padded causal mask, else None.

    Args:
        allowed: bool (B, 1, S, S), True where query i may see key j.

    Returns:
        ``pads`` with row b's query rows ``i >= pads[b]`` seeing exactly keys ``pads[b] <= j <=
        i``, its padding queries ``i < pads[b]`` seeing no key or every key (their outputs are
        never used), and at least one real token per row; None for any other mask (packing,
        holes, right padding, sliding windows, a fully padded row).
    """
    if allowed.dim() != 4 or allowed.shape[1] != 1 or allowed.shape[2] != allowed.shape[3]:
        return None
    s = allowed.shape[-1]
    last = allowed[:, 0, -1]  # the last query sees every real key
    pads = (~last).cumprod(dim=-1).sum(dim=-1)  # leading keys it cannot see
    if bool((pads >= s).any()):
        return None
    pos = torch.arange(s, device=allowed.device)
    want = (pos[None, :] <= pos[:, None])[None] & (pos[None, None, :] >= pads[:, None, None])
    real_rows = (pos[None, :] >= pads[:, None])[..., None]
    if not bool(((allowed[:, 0] == want) | ~real_rows).all()):
        return None
    # A padding query's row sees nothing (or, where transformers unmasks fully masked rows,
    # everything); a row that sees some keys only is a token of another packed document.
    pad_rows = allowed[:, 0].all(dim=-1) | ~allowed[:, 0].any(dim=-1)
    if not bool((pad_rows | real_rows[..., 0]).all()):
        return None
    return [int(p) for p in pads]


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """Bool masks mark allowed positions; additive float masks hold 0 where allowed."""
    return mask if mask.dtype == torch.bool else mask == 0


def _prefill_mask_verdict(mask: torch.Tensor) -> tuple[str | None, list[int] | None]:
    """(None, None) when a (B, 1|H, S_q, S_kv) mask is plain causal with the queries aligned to
    the end of the keys, else (why not, its per-row left padding or None)."""
    q_len, kv_len = mask.shape[-2:]
    allowed = _allowed(mask)
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril(kv_len - q_len)
    if bool(torch.equal(allowed, causal.expand_as(allowed))):
        return None, None
    why = "attention mask is not plain causal (padding, packing or sliding window)"
    return why, left_padding(allowed)


def decode_left_padding(allowed: torch.Tensor) -> list[int] | None:
    """Per-row padding lengths of a decode step's key mask, or None.

    Args:
        allowed: bool (B, S), True where the new token may see cached position j.

    Returns:
        ``pads`` when row b sees exactly positions ``pads[b] <= j < S`` (at least one), else
        None (holes, right padding, an empty row).
    """
    s = allowed.shape[-1]
    pads = (~allowed).cumprod(dim=-1).sum(dim=-1)
    pos = torch.arange(s, device=allowed.device)
    if not bool(torch.equal(allowed, pos[None, :] >= pads[:, None])) or bool((pads >= s).any()):
        return None
    return [int(p) for p in pads]


def _causal_blocks(selection: Any) -> int:
    """Causal blocks of a square selection, over its batch rows and mask groups."""
    b, g, _, nk = selection.block_mask.shape
    return b * g * nk * (nk + 1) // 2


def _module_problem(module: nn.Module, kv_len: int, kwargs: dict) -> str | None:
    """Why this attention call's module or arguments rule out SketchWalk's kernels, or None:
    non-causal modules, dropout, score modifiers, sliding windows shorter than the keys."""
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        return "non-causal attention module"
    if float(kwargs.get("dropout", 0.0) or 0.0) != 0.0:
        return "attention dropout > 0"
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            return f"unsupported attention argument {name!r}"
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    if isinstance(window, int) and not isinstance(window, bool) and 0 < window < kv_len:
        return f"sliding-window layer (window {window} < {kv_len} keys)"
    return None


def _make_attention_fn(inner: str) -> Callable[..., Any]:
    def sketchwalk_attention_forward(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        inner_fn = inner_attention_function(inner, module)
        driver = _ACTIVE_MODULES.get(id(module))
        if driver is None:  # a model switched by name without enable_sketchwalk: stay dense
            return inner_fn(module, query, key, value, attention_mask, *args, **kwargs)
        return driver(inner_fn, module, query, key, value, attention_mask, args, kwargs)

    sketchwalk_attention_forward.__name__ = f"sketchwalk_{inner}_attention_forward"
    # Under torch.compile (transformers compiles the decode step of generate() with a static
    # cache on GPUs) the attention call runs as it is, between the compiled parts: its state
    # (walk, decode bounds, call records, host-side budgets) lives in Python objects that
    # tracing would freeze into guards and recompile on at every step.
    return torch.compiler.disable(sketchwalk_attention_forward)


def sketchwalk_attention(model: nn.Module) -> SketchWalkAttention | None:
    """The active :class:`SketchWalkAttention` of ``model``, or None."""
    return _ACTIVE_MODELS.get(id(model))


def enable_sketchwalk(
    model: nn.Module,
    config: SketchWalkConfig | None = None,
    backend: str = "auto",
    layers: Iterable[int] | None = None,
    **options: Any,
) -> SketchWalkAttention:
    """Switch ``model`` to SketchWalk sparse prefill attention.

    Args:
        model: a transformers causal LM (see :class:`SketchWalkAttention`).
        config: selection settings (default ``SketchWalkConfig.preset("default")``).
        backend: sparse attention backend (``"auto"``, ``"reference"``, ``"triton"``, ``"flex"``).
        layers: layers allowed to run sparse (None: all).
        **options: ``selection_backend``, ``on_padding``, ``dense_when_full``, ``decode``.

    Returns:
        The enabled :class:`SketchWalkAttention` (also usable as a context manager that
        disables on exit).
    """
    return SketchWalkAttention(model, config, backend, layers, **options).enable()


def enable_selector(
    model: nn.Module,
    selector: Any,
    backend: str = "auto",
    layers: Iterable[int] | None = None,
    **options: Any,
) -> SketchWalkAttention:
    """Switch ``model`` to block-sparse prefill attention with any block selector.

    Args:
        model: a transformers causal LM (see :class:`SketchWalkAttention`).
        selector: an object with ``config`` (a ``SketchWalkConfig``), ``reset()`` and
            ``select(q, k, layer_idx) -> BlockSelection`` (``SketchWalk`` or a baseline of
            :mod:`sketchwalk.selection.baselines`).
        backend, layers, **options: as for :func:`enable_sketchwalk` (``selection_backend`` is
            ignored: the selector brings its own).

    Returns:
        The enabled :class:`SketchWalkAttention` (a context manager that disables on exit).
    """
    options.pop("selection_backend", None)
    return SketchWalkAttention(model, None, backend, layers, selector=selector, **options).enable()


def disable_sketchwalk(model: nn.Module) -> bool:
    """Restore the attention implementation ``model`` had before :func:`enable_sketchwalk`.

    Returns:
        True if SketchWalk was active on ``model``, False if there was nothing to undo.
    """
    driver = _ACTIVE_MODELS.get(id(model))
    if driver is None:
        return False
    driver.disable()
    return True
