"""SketchWalk as a vLLM V1 attention backend (out of tree).

Enable: install ``sketchwalk[vllm]`` (its ``vllm.general_plugins`` entry point calls
:func:`register` in every vLLM process), then start vLLM with ``attention_backend="CUSTOM"``
(``--attention-backend CUSTOM``). The selection settings come from :func:`configure` (this
process) or the ``SKETCHWALK_VLLM_CONFIG`` environment variable (a preset name, or a JSON object
of `SketchWalkConfig` fields, optionally with ``"preset"``, ``"backend"``,
``"selection_backend"`` and ``"page_queries"``), read in the process that runs the model.

Each step vLLM hands the backend one flattened batch (``query_start_loc``, ``seq_lens``,
``block_table``, ``slot_mapping``) mixing decodes and prefill chunks. :class:`SketchWalkImpl`
writes the new keys and values into the paged cache (``slot_mapping``), then attends per
sequence:

- a prefill chunk that starts at position 0 (the whole prompt, or its first chunk) and spans
  more than one block: `SketchWalk.select` on the chunk's queries and keys (the walk runs across
  the layers of the step: one selector per sequence lives in the step's metadata) and
  `paged_sparse_prefill` over the kept blocks; the selector, with its pooled queries, is kept
  across steps (`ChunkStates`, keyed by the prompt's first page) so that a later chunk of the
  same prompt continues with `SketchWalk.select_chunk` (the same selection a one-shot prefill
  would make for those rows);
- the step's decodes (one query after at least one cached token), all rows together: the quest
  rule on per-physical-page key bounds (`PageKeyBounds`, one per layer, updated here whenever
  keys are written: no per-request state; kept in room vLLM reserves after each cache page,
  :func:`reserve_page_state`, so inside its KV-cache budget) by one `paged_quest_select`, and one
  `paged_sparse_decode` call; dense decodes (dense layers, one-block sequences) likewise in one
  call with every page kept;
- everything else runs an exact dense path over the sequence's pages and is recorded with its
  reason (:func:`summary`): layers below ``dense_layers``, one-block sequences, later chunks
  without the pooled queries of their earlier chunks (a first chunk of one block, a prefix-cache
  hit, several queries after cached tokens as in speculative decoding) unless ``page_queries``
  keeps the queries' sums per page (`PageQuerySums`: the selector of such a chunk is seeded from
  its pages), sliding windows and logit soft-capping.

When the page size equals ``config.block_size`` the kept blocks are read through the block
table (`sketchwalk.attention.paged`); otherwise each sequence's pages are gathered into a
contiguous cache first. On the CPU every path is the PyTorch reference.

vLLM's CPU platform answers every backend request with its own CPU attention; :func:`register`
therefore also makes the CPU platform honour ``attention_backend="CUSTOM"`` when the custom
backend registered is this one (nothing changes for any other choice).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

try:
    from vllm.v1.attention.backend import (
        AttentionBackend,
        AttentionImpl,
        AttentionLayer,
        AttentionMetadata,
        AttentionMetadataBuilder,
        AttentionType,
        CommonAttentionMetadata,
    )
except ImportError as err:  # pragma: no cover - exercised only without vLLM
    raise ImportError(
        "sketchwalk.engines.vllm needs vLLM (a release with the V1 attention backend API, "
        ">= 0.26): pip install 'sketchwalk[vllm]'"
    ) from err

from vllm.logger import init_logger

from sketchwalk.attention.api import sparse_attention, sparse_decode
from sketchwalk.attention.paged import gather_pages, paged_sparse_decode, paged_sparse_prefill
from sketchwalk.attention.reference import dense_attention
from sketchwalk.config import SketchWalkConfig
from sketchwalk.engines.page_tail import PageTailLayout, PageTailViews
from sketchwalk.selection.decode import SketchWalkDecoder
from sketchwalk.selection.paged_queries import PageQuerySums
from sketchwalk.selection.paged_quest import PagedDecodePlan, PageKeyBounds, paged_quest_select
from sketchwalk.selection.prefill import SketchWalk

__all__ = [
    "ENV_CONFIG",
    "NO_CHUNK_STATE",
    "NO_PAGE_QUERIES",
    "BackendSettings",
    "ChunkStates",
    "PageTailLayout",
    "SketchWalkBackend",
    "SketchWalkImpl",
    "SketchWalkMetadata",
    "SketchWalkMetadataBuilder",
    "configure",
    "configure_engine",
    "engine_summary",
    "page_state_layout",
    "register",
    "reserve_page_state",
    "reset_summary",
    "settings",
    "summary",
]

ENV_CONFIG = "SKETCHWALK_VLLM_CONFIG"
# a child of vLLM's logger, so that vLLM's logging configuration shows it
logger = init_logger("vllm.sketchwalk")
BACKEND_NAME = "CUSTOM"


# ---- settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendSettings:
    """What the backend runs with.

    Attributes:
        config: the selection settings (default ``SketchWalkConfig.preset("default")``).
        backend: sparse attention backend (``"auto"``: Triton on CUDA, else the reference;
            ``"reference"``; ``"triton"``).
        selection_backend: ``SketchWalk(backend=)`` for the transition matrix.
        page_queries: keep the queries' sums per physical page (`PageQuerySums`, Hq x D
            float32 per page and layer) so that a prompt whose first pages come from the prefix
            cache runs its prefill sparse; without them it runs dense.
    """

    config: SketchWalkConfig = field(default_factory=lambda: SketchWalkConfig.preset("default"))
    backend: str = "auto"
    selection_backend: str = "auto"
    page_queries: bool = False

    def __post_init__(self) -> None:
        if self.config.decode_pin_blocks:
            raise ValueError(
                "SketchWalk vLLM backend: decode_pin_blocks needs the prompt's queries at "
                "decode time, which the backend's decodes do not keep (they rank pages by "
                "their key bounds alone); set decode_pin_blocks=0"
            )

    def to_json(self) -> str:
        return json.dumps(
            {
                "config": self.config.to_dict(),
                "backend": self.backend,
                "selection_backend": self.selection_backend,
                "page_queries": self.page_queries,
            }
        )

    @classmethod
    def from_env(cls, text: str) -> BackendSettings:
        text = text.strip()
        if not text.startswith("{"):
            return cls(config=SketchWalkConfig.preset(text))
        data = json.loads(text)
        if "config" in data:  # what to_json writes
            return cls(
                config=SketchWalkConfig.from_dict(data["config"]),
                backend=data.get("backend", "auto"),
                selection_backend=data.get("selection_backend", "auto"),
                page_queries=bool(data.get("page_queries", False)),
            )
        backend = data.pop("backend", "auto")
        selection_backend = data.pop("selection_backend", "auto")
        page_queries = bool(data.pop("page_queries", False))
        preset = data.pop("preset", "default")
        return cls(
            config=SketchWalkConfig.preset(preset, **data),
            backend=backend,
            selection_backend=selection_backend,
            page_queries=page_queries,
        )


_SETTINGS: BackendSettings | None = None


def configure(
    config: SketchWalkConfig | None = None,
    backend: str = "auto",
    selection_backend: str = "auto",
    page_queries: bool = False,
) -> BackendSettings:
    """Set the backend's settings in this process and in ``SKETCHWALK_VLLM_CONFIG`` (so vLLM
    processes started afterwards inherit them). Takes effect at the next step."""
    global _SETTINGS
    if config is not None and not isinstance(config, SketchWalkConfig):
        raise TypeError(f"configure: config must be a SketchWalkConfig, got {type(config)}")
    _SETTINGS = BackendSettings(
        config if config is not None else SketchWalkConfig.preset("default"),
        backend,
        selection_backend,
        bool(page_queries),
    )
    os.environ[ENV_CONFIG] = _SETTINGS.to_json()
    return _SETTINGS


def configure_engine(
    llm: Any,
    config: SketchWalkConfig | None = None,
    backend: str = "auto",
    selection_backend: str = "auto",
    page_queries: bool = False,
) -> BackendSettings:
    """:func:`configure` here and in every worker of a running ``vllm.LLM`` (``llm``): a worker
    reads ``SKETCHWALK_VLLM_CONFIG`` once, when it starts, so the settings of running
    tensor-parallel workers or of the engine process change only this way (vLLM's
    ``collective_rpc`` of the worker method :func:`register` adds: a method name and a JSON
    string travel, no pickled code). Takes effect at the next step."""
    current = configure(config, backend, selection_backend, page_queries)
    llm.collective_rpc(WORKER_CONFIGURE, args=(current.to_json(),))
    return current


def _apply_settings(worker: Any, text: str) -> None:
    """In a vLLM worker (`configure_engine`)."""
    global _SETTINGS
    _SETTINGS = BackendSettings.from_env(text)
    os.environ[ENV_CONFIG] = text


def settings() -> BackendSettings:
    """The settings in force: :func:`configure`'s, else ``SKETCHWALK_VLLM_CONFIG``'s, else the
    defaults."""
    global _SETTINGS
    if _SETTINGS is None:
        text = os.environ.get(ENV_CONFIG)
        _SETTINGS = BackendSettings.from_env(text) if text else BackendSettings()
    return _SETTINGS


# ---- records ----------------------------------------------------------------------------

_COUNTS: Counter = Counter()
_DENSITY_SUM: dict[str, float] = {"prefill": 0.0, "decode": 0.0}
_SPARSE_COUNT: dict[str, int] = {"prefill": 0, "decode": 0}


def _record(kind: str, mode: str, reason: str | None, density: float = 1.0) -> None:
    _COUNTS[(kind, mode, reason)] += 1
    if mode == "sparse":
        _DENSITY_SUM[kind] += density
        _SPARSE_COUNT[kind] += 1


def summary() -> dict[str, Any]:
    """What ran in THIS process since the last :func:`reset_summary` (per-sequence, per-layer
    attention calls): counts of sparse and dense calls, the dense calls' reasons, the mean
    density of the sparse prefill and decode calls."""
    reasons: Counter = Counter()
    sparse = {"prefill": 0, "decode": 0}
    dense = {"prefill": 0, "decode": 0}
    for (kind, mode, reason), n in _COUNTS.items():
        if mode == "sparse":
            sparse[kind] += n
        else:
            dense[kind] += n
            reasons[reason] += n
    return {
        "sparse_calls": sparse,
        "dense_calls": dense,
        "fallback_reasons": dict(reasons),
        "mean_density": {
            kind: (_DENSITY_SUM[kind] / _SPARSE_COUNT[kind]) if _SPARSE_COUNT[kind] else None
            for kind in ("prefill", "decode")
        },
    }


def reset_summary() -> None:
    _COUNTS.clear()
    for kind in _DENSITY_SUM:
        _DENSITY_SUM[kind] = 0.0
        _SPARSE_COUNT[kind] = 0


def engine_summary(llm: Any, reset: bool = False) -> list[dict[str, Any]]:
    """:func:`summary` of every worker of a running ``vllm.LLM``, in rank order (with vLLM's
    default multiprocessing the attention runs in other processes than the caller's);
    ``reset`` then clears their records."""
    return llm.collective_rpc(WORKER_SUMMARY, args=(reset,))


def _worker_summary(worker: Any, reset: bool) -> dict[str, Any]:
    """In a vLLM worker (`engine_summary`)."""
    out = summary()
    if reset:
        reset_summary()
    return out


# ---- backend, metadata, builder -----------------------------------------------------------


class SketchWalkBackend(AttentionBackend):
    """The backend class vLLM resolves for ``attention_backend="CUSTOM"``."""

    # forward() writes the new keys and values into the cache itself (slot_mapping)
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        # vLLM maps the impl back to AttentionBackendEnum[get_name()]
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[SketchWalkImpl]:
        return SketchWalkImpl

    @staticmethod
    def get_builder_cls() -> type[SketchWalkMetadataBuilder]:
        return SketchWalkMetadataBuilder

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True  # served by the dense path

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supported_kv_cache_layouts(cls):
        return None  # the cache is read through its strides: any layout

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        cache_dtype_str: str = "auto",
    ) -> tuple[int, ...]:
        """The logical per-layer cache [pages, heads, page_size, K|V] (vLLM 0.26 asks the
        backend; later releases derive this shape themselves)."""
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)

    @classmethod
    def customize_spec(cls, spec: Any) -> Any:
        """The layer's KV-cache spec with each page grown by the per-page state
        (`PageTailLayout`), so that vLLM's block count pays for it (vLLM's hook since 0.3x;
        on 0.26 :func:`register` routes the layer's ``get_kv_cache_spec`` here)."""
        return reserve_page_state(spec)


@dataclass
class SketchWalkMetadata(AttentionMetadata):
    """One step's batch, shared by the layers of a KV cache group.

    ``query_start_loc_cpu`` / ``seq_lens_cpu`` are host copies of the per-sequence boundaries;
    ``selectors`` holds the step's `SketchWalk` per sequence index (the walk carries from one
    layer to the next within the step); ``prompts`` is the builder's store of the selectors of
    prompts being prefilled in chunks (`ChunkStates`); ``decode_plans`` the step's batched
    decode rows (`_DecodeRows`), built by the first sparse layer and reused by the others;
    ``first_pages`` each sequence's first physical page (host).
    """

    num_actual_tokens: int
    query_start_loc: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens: torch.Tensor
    seq_lens_cpu: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    num_reqs: int
    causal: bool = True
    selectors: dict[int, SketchWalk] = field(default_factory=dict)
    prompts: ChunkStates | None = None
    decode_plans: dict[Any, Any] = field(default_factory=dict)
    first_pages: list[int] | None = None
    seeded: set[int] = field(default_factory=set)

    def first_page(self, b: int) -> int:
        """Physical page of sequence b's first block (the `ChunkStates` key), from the host
        copy the builder made (one sync per step), else read from the block table."""
        if self.first_pages is not None:
            return self.first_pages[b]
        return int(self.block_table[b, 0])


class ChunkStates:
    """The `SketchWalk` (with its pooled queries) of each prompt being prefilled in chunks,
    across steps, so that a later chunk continues with `SketchWalk.select_chunk`.

    vLLM's attention metadata names no request, so a prompt is keyed by the physical page of its
    first block (``block_table[b, 0]``): unique among the requests in flight, except that prefix
    caching lets requests with the same first block share it (their cached positions hold the
    same tokens, hence the same queries). A mismatch (the kept queries do not end where the chunk
    starts) is caught by `select_chunk`, and the chunk runs dense with the reason recorded. An
    entry is dropped at the sequence's first decode, replaced when a prefill starts at position
    0 on its page, and the oldest is dropped beyond ``capacity`` (aborted requests).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, int(capacity))
        self._states: OrderedDict[int, SketchWalk] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def start(self, key: int, selector: SketchWalk) -> None:
        self._states.pop(key, None)
        self._states[key] = selector
        while len(self._states) > self.capacity:
            self._states.popitem(last=False)

    def get(self, key: int) -> SketchWalk | None:
        selector = self._states.get(key)
        if selector is not None:
            self._states.move_to_end(key)
        return selector

    def finish(self, key: int) -> None:
        self._states.pop(key, None)


class SketchWalkMetadataBuilder(AttentionMetadataBuilder[SketchWalkMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        scheduler = getattr(vllm_config, "scheduler_config", None)
        self.prompts = ChunkStates(4 * getattr(scheduler, "max_num_seqs", 256))

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> SketchWalkMetadata:
        m = common_attn_metadata
        num_reqs = m.num_reqs
        causal = m.causal if isinstance(m.causal, bool) else None
        # lengths and first pages in one device-to-host copy (the step's one host sync)
        host = torch.stack(
            [m.seq_lens[:num_reqs], m.block_table_tensor[:num_reqs, 0].to(m.seq_lens.dtype)]
        ).to("cpu")
        return SketchWalkMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=m.query_start_loc,
            query_start_loc_cpu=m.query_start_loc_cpu[: num_reqs + 1].to("cpu"),
            seq_lens=m.seq_lens,
            seq_lens_cpu=host[0],
            block_table=m.block_table_tensor,
            slot_mapping=m.slot_mapping,
            num_reqs=num_reqs,
            causal=bool(causal) if causal is not None else False,
            prompts=self.prompts,
            first_pages=host[1].tolist(),
        )


# ---- the attention --------------------------------------------------------------------------

NO_CHUNK_STATE = "later prefill chunk without the pooled queries of the earlier ones"
NO_PAGE_QUERIES = "later prefill chunk whose pages hold no query sums"
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class _DecodeRows:
    """The sparse decode rows of a step: their query positions in the flattened batch, block
    table rows, lengths and `PagedDecodePlan` (built once, shared by the layers)."""

    token_index: torch.Tensor
    table: torch.Tensor
    seq_lens: torch.Tensor
    plan: PagedDecodePlan
    _all: tuple[torch.Tensor, torch.Tensor] | None = None

    def all_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv_num_blocks, kv_indices) keeping every block of every row (one group)."""
        if self._all is None:
            device = self.table.device
            nks = self.plan.num_key_blocks
            num = torch.tensor(nks, dtype=torch.int32).to(device)[:, None]
            idx = torch.arange(max(nks), dtype=torch.int32, device=device)
            self._all = (num, idx.expand(len(nks), 1, -1).contiguous())
        return self._all

    @classmethod
    def build(cls, rows, token_starts, seq_lens, block_table, config) -> _DecodeRows:
        device = block_table.device
        host = torch.tensor([rows, token_starts, seq_lens], dtype=torch.int64).to(device)
        table = block_table.index_select(0, host[0])
        return cls(
            token_index=host[1],
            table=table,
            seq_lens=host[2].to(torch.int32),
            plan=PagedDecodePlan.build(seq_lens, table, config),
        )


# dense decodes that the paged kernel serves with every block kept (the others need a window
# or soft-capping: the dense reference)
_BATCHED_DENSE = ("dense layer", "short sequence (one block)", "layer index unknown")


def _layer_index(name: str | None) -> int | None:
    if not name:
        return None
    found = _LAYER_RE.search(name)
    return int(found.group(1)) if found else None


# vLLM's BlockPool keeps block 0 as its null block (0.26 and 0.32): never a request's page, so
# its state takes the padded slots (-1) of the per-page state kept in the cache's pages
NULL_PAGE = 0
# query heads of this process's layers by (kv heads, head size), for the page reservation: the
# KV-cache spec names only the kv heads
_QUERY_HEADS: dict[tuple[int, int], int] = {}


def page_state_layout(
    num_kv_heads: int, head_size: int, dtype: torch.dtype, page_queries: bool | None = None
) -> PageTailLayout:
    """The per-page state a layer of this shape keeps: the key bounds, plus the query sums when
    ``page_queries`` (default: the current settings') and the layer's query heads are known."""
    if page_queries is None:
        page_queries = settings().page_queries
    heads = _QUERY_HEADS.get((num_kv_heads, head_size), 0) if page_queries else 0
    return PageTailLayout(num_kv_heads, head_size, dtype, heads)


def reserve_page_state(spec: Any) -> Any:
    """``spec`` (a layer's vLLM KV-cache spec) with ``page_size_padded`` grown by the per-page
    state's bytes; unchanged for any spec but a plain full-attention one without padding (those
    layers keep their state outside the cache, or none)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    if (
        type(spec) is not FullAttentionSpec
        or spec.page_size_padded is not None
        or getattr(spec, "sliding_window", None) is not None
        or getattr(spec, "head_size_v", spec.head_size) != spec.head_size
    ):
        return spec
    layout = page_state_layout(spec.num_kv_heads, spec.head_size, spec.dtype)
    return dataclasses.replace(spec, page_size_padded=spec.page_size_bytes + layout.nbytes)


class SketchWalkImpl(AttentionImpl[SketchWalkMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra: Any,
    ) -> None:
        if alibi_slopes is not None:
            raise NotImplementedError("SketchWalk vLLM backend: ALiBi is not supported")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(
                f"SketchWalk vLLM backend: only decoder attention, got {attn_type}"
            )
        if kv_cache_dtype != "auto":
            raise NotImplementedError(
                f"SketchWalk vLLM backend: kv_cache_dtype must be 'auto', got {kv_cache_dtype!r}"
            )
        if extra.get("sinks") is not None:
            raise NotImplementedError("SketchWalk vLLM backend: attention sinks are not supported")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        self.sliding_window = sliding_window if sliding_window and sliding_window > 0 else None
        self.kv_cache_dtype = kv_cache_dtype
        self.logits_soft_cap = logits_soft_cap or None
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.layer_idx: int | None = None
        self.bounds: PageKeyBounds | None = None
        self.queries: PageQuerySums | None = None
        self._out_of_memory = False
        self._cache_key: tuple | None = None
        self._tail: PageTailViews | None = None
        _QUERY_HEADS[(self.num_kv_heads, head_size)] = num_heads
        logger.info_once("SketchWalk attention backend in use: %s", settings())

    # -- cache ------------------------------------------------------------------------------

    def _pages(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(num_pages, page_size, Hkv, D) views of the keys and values of vLLM's logical
        [pages, heads, page_size, K|V] per-layer cache (any physical layout: strides)."""
        d = self.head_size
        k = kv_cache[..., :d].transpose(1, 2)
        v = kv_cache[..., d : 2 * d].transpose(1, 2)
        return k, v

    @staticmethod
    def _write(pages: torch.Tensor, new: torch.Tensor, slots: torch.Tensor) -> None:
        page_size = pages.shape[1]
        keep = slots >= 0  # padded tokens carry slot -1
        slots = slots.long()
        if not bool(keep.all()):
            slots, new = slots[keep], new[keep]
        pages[slots // page_size, slots % page_size] = new.to(pages.dtype)

    # -- forward ----------------------------------------------------------------------------

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: SketchWalkMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("SketchWalk vLLM backend: fused output quantization")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        if self.layer_idx is None:
            self.layer_idx = _layer_index(getattr(layer, "layer_name", None))
        m = attn_metadata
        n = m.num_actual_tokens
        k_pages, v_pages = self._pages(kv_cache)
        st = settings()
        writes = self.kv_sharing_target_layer_name is None and key is not None and value is not None
        slots = m.slot_mapping[:n]
        if writes:
            self._ensure_bounds(kv_cache, k_pages)  # before the write: what is there now
            self._write(k_pages, key[:n], slots)
            self._write(v_pages, value[:n], slots)
            if self.bounds is not None:
                self.bounds.update(key[:n], slots)
        self._ensure_query_store(st, k_pages, writes)
        out = output[:n].view(n, self.num_heads, self.head_size)
        starts = m.query_start_loc_cpu.tolist()
        lens = m.seq_lens_cpu.tolist()
        batched = (
            self.bounds is not None
            and self.kv_sharing_target_layer_name is None
            and k_pages.shape[1] == st.config.block_size
        )
        sparse_rows, dense_rows = [], []
        for b in range(m.num_reqs):
            qs, qe, seq_len = starts[b], starts[b + 1], lens[b]
            if qe <= qs:
                continue
            q = query[qs:qe].transpose(0, 1)[None]  # (1, Hq, T, D)
            kind, reason = self._route(q.shape[2], m, b, seq_len, st.config)
            # decodes go below, each kind in one kernel call (and one selection)
            if kind == "decode" and reason is None and batched:
                sparse_rows.append(b)
                continue
            if kind == "decode" and reason in _BATCHED_DENSE:
                _record("decode", "dense", reason)
                dense_rows.append(b)
                continue
            o = self._attend(q, k_pages, v_pages, m, b, seq_len, kind, reason, st)
            out[qs:qe] = o[0].transpose(0, 1)
        for rows, sparse in ((sparse_rows, True), (dense_rows, False)):
            if rows:
                self._decode_rows(query, out, starts, lens, rows, k_pages, v_pages, m, st, sparse)
        if self.queries is not None:  # after the selections: they read the earlier tokens only
            self.queries.update(query[:n].view(n, self.num_heads, self.head_size), slots)
        return output

    def _ensure_bounds(self, kv_cache: torch.Tensor, k_pages: torch.Tensor) -> None:
        """Keep `PageKeyBounds` for this cache: in the room vLLM reserved after each page
        (`reserve_page_state`), else (no room there: a cache made elsewhere, a spec vLLM did
        not pad) a new allocation outside vLLM's budget."""
        key = (kv_cache.data_ptr(), tuple(kv_cache.shape), kv_cache.stride(), kv_cache.dtype)
        if key != self._cache_key:  # a new cache: the state starts anew from its contents
            self._cache_key = key
            layout = page_state_layout(self.num_kv_heads, self.head_size, kv_cache.dtype, True)
            self._tail = layout.views(kv_cache)
            self.bounds = self.queries = None
        if self.bounds is not None or self._out_of_memory:
            return
        if self._tail is not None:
            storage = (self._tail.key_min, self._tail.key_max)
            self.bounds = PageKeyBounds(k_pages, storage, scratch=NULL_PAGE)
        else:
            self.bounds = self._allocate("key bounds", lambda: PageKeyBounds(k_pages))

    def _ensure_query_store(self, st: BackendSettings, k_pages: torch.Tensor, writes: bool) -> None:
        """Keep `PageQuerySums` while ``page_queries`` is on (layers that write the cache, pages
        that are blocks), else drop it: in the cache's page padding when vLLM reserved room for
        them (``page_queries`` on when the engine started), else outside vLLM's budget."""
        num_pages, page_size = k_pages.shape[:2]
        if not (st.page_queries and writes and page_size == st.config.block_size):
            self.queries = None  # sums kept in the pages restart (flags cleared) when back on
            return
        if self._out_of_memory:
            self.queries = None
        elif self._tail is not None and self._tail.sums is not None:
            if self.queries is None:
                storage = (self._tail.sums, self._tail.valid)
                self.queries = PageQuerySums(
                    num_pages, page_size, self.num_heads, self.head_size, k_pages.device,
                    storage, scratch=NULL_PAGE,
                )  # fmt: skip
        elif self.queries is None or not self.queries.matches(
            num_pages, page_size, self.num_heads, k_pages.device
        ):
            self.queries = self._allocate(
                "query sums",
                lambda: PageQuerySums(
                    num_pages, page_size, self.num_heads, self.head_size, k_pages.device
                ),
            )

    def _allocate(self, what: str, make: Callable[[], Any]) -> Any:
        """``make()`` (per-page state for which vLLM's cache pages hold no room, allocated
        outside its KV-cache budget); when the device has no room left, None from now on for
        this layer, with a warning: decodes then rebuild their bounds per sequence and
        prefix-cache hits prefill dense."""
        try:
            return make()
        except torch.OutOfMemoryError:
            self._out_of_memory = True
            self.bounds = self.queries = None
            logger.warning(
                "SketchWalk backend: no memory for the per-page %s of layer %s (vLLM's cache "
                "pages hold no room for them: set page_queries before the engine starts, or "
                "lower gpu_memory_utilization); this layer's decodes rebuild their key bounds "
                "per sequence instead",
                what,
                self.layer_idx,
            )
            return None

    def _route(
        self, t: int, m: SketchWalkMetadata, b: int, seq_len: int, cfg: SketchWalkConfig
    ) -> tuple[str, str | None]:
        """(kind, reason): ``decode`` or ``prefill``, and why the row runs dense (None: it
        runs sparse)."""
        kind = "decode" if t == 1 and seq_len > 1 else "prefill"
        layer = self.layer_idx
        reason = None
        if self.sliding_window is not None:
            reason = "sliding window"
        elif self.logits_soft_cap is not None:
            reason = "logit soft-capping"
        elif not m.causal:
            reason = "non-causal"
        elif layer is None:
            reason = "layer index unknown"
        elif layer < cfg.dense_layers:
            reason = "dense layer"
        elif seq_len <= cfg.block_size:
            reason = "short sequence (one block)"
        if reason is None and kind == "prefill" and t != seq_len:
            reason = self._continue_prompt(m, b, cfg)
        if reason is None and kind == "decode" and m.prompts is not None and b not in m.selectors:
            m.prompts.finish(m.first_page(b))  # the prompt is done: drop its state
            m.selectors[b] = None
        return kind, reason

    def _attend(
        self,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        m: SketchWalkMetadata,
        b: int,
        seq_len: int,
        kind: str,
        reason: str | None,
        st: BackendSettings,
    ) -> torch.Tensor:
        if reason is not None:
            _record(kind, "dense", reason)
            return self._dense(q, k_pages, v_pages, m.block_table[b], seq_len)
        if kind == "prefill":
            return self._sparse_prefill(q, k_pages, v_pages, m, b, seq_len, st)
        return self._sparse_decode(q, k_pages, v_pages, m, b, seq_len, st)

    def _continue_prompt(self, m: SketchWalkMetadata, b: int, cfg: SketchWalkConfig) -> str | None:
        """Find the selector of the prompt a later chunk continues (once per step and
        sequence): kept from its earlier chunks, else (``page_queries``) a new one that each
        layer seeds from its pages; the reason to run dense when there is none."""
        if b in m.selectors:
            return None if m.selectors[b] is not None else NO_CHUNK_STATE
        selector = None if m.prompts is None else m.prompts.get(m.first_page(b))
        if selector is None and self.queries is not None:
            selector = SketchWalk(cfg, backend=settings().selection_backend, cuda_graphs=False)
            selector.keep_queries = True
            m.seeded.add(b)
            if m.prompts is not None:  # the prompt's next chunks continue from it
                m.prompts.start(m.first_page(b), selector)
        m.selectors[b] = selector
        return None if selector is not None else NO_CHUNK_STATE

    def _sparse_prefill(self, q, k_pages, v_pages, m, b, seq_len, st) -> torch.Tensor:
        cfg = st.config
        table = m.block_table[b : b + 1]
        k = gather_pages(k_pages, table, seq_len)  # (1, Hkv, S, D)
        t = q.shape[2]
        if t == seq_len:  # a prompt's first chunk: a new selector, kept for later chunks
            selector = m.selectors.get(b)
            if selector is None:
                selector = m.selectors[b] = SketchWalk(
                    cfg, backend=st.selection_backend, cuda_graphs=False
                )
                selector.keep_queries = True
                if m.prompts is not None:
                    m.prompts.start(m.first_page(b), selector)
            sel = selector.select(q, k, self.layer_idx)
        else:  # a later chunk: continue from the pooled queries of the earlier ones
            if b in m.seeded:  # ... which this layer's pages hold
                reason = self._seed(m.selectors[b], table[0], seq_len - t, cfg)
                if reason is not None:
                    _record("prefill", "dense", reason)
                    return self._dense(q, k_pages, v_pages, m.block_table[b], seq_len)
            try:
                sel = m.selectors[b].select_chunk(q, k, self.layer_idx)
            except ValueError:
                # the kept selector does not end where this chunk starts (another request on
                # the same first page): a new one seeded from the pages, else dense
                if m.prompts is not None:
                    m.prompts.finish(m.first_page(b))
                m.selectors[b] = None  # the rest of this step's layers run dense too ...
                if b in m.seeded or self.queries is None:
                    _record("prefill", "dense", NO_CHUNK_STATE)
                    return self._dense(q, k_pages, v_pages, m.block_table[b], seq_len)
                del m.selectors[b]  # ... unless the pages hold the queries
                self._continue_prompt(m, b, cfg)
                return self._sparse_prefill(q, k_pages, v_pages, m, b, seq_len, st)
        _record("prefill", "sparse", None, sel.density)
        page_size = k_pages.shape[1]
        if page_size == cfg.block_size:
            lens = torch.tensor([seq_len], dtype=torch.int32, device=q.device)
            return paged_sparse_prefill(
                q, k_pages, v_pages, table, lens, sel.kv_num_blocks, sel.kv_indices,
                page_size, self.scale, st.backend, validate=False,
            )  # fmt: skip
        v = gather_pages(v_pages, table, seq_len)
        return sparse_attention(q, k, v, sel, backend=st.backend, scale=self.scale)

    def _seed(self, selector: SketchWalk, table_row, offset: int, cfg) -> str | None:
        """Seed ``selector`` for this layer with the pooled queries of the first ``offset``
        tokens from this layer's pages; the reason to run dense when they are not all there."""
        if self.queries is None:
            return NO_PAGE_QUERIES
        pooled, valid = self.queries.pooled(table_row, offset, cfg.block_size, cfg.parity)
        if not bool(valid):  # pages written before the sums existed (one host sync)
            return NO_PAGE_QUERIES
        selector.seed_queries(self.layer_idx, pooled, offset)
        return None

    def _sparse_decode(self, q, k_pages, v_pages, m, b, seq_len, st) -> torch.Tensor:
        cfg = st.config
        if cfg.decode_rule != "quest":
            cfg = cfg.replace(decode_rule="quest")  # the walk rule needs past queries
        table = m.block_table[b : b + 1]
        k = gather_pages(k_pages, table, seq_len)  # (1, Hkv, S, D)
        # the per-sequence path (pages unlike blocks, or a layer sharing another's cache): the
        # bounds rebuilt from this sequence's keys
        decoder = SketchWalkDecoder(cfg)
        past = k[:, :, :-1]
        dummy_q = past.new_zeros(1, q.shape[1], past.shape[2], q.shape[3])  # quest reads k only
        decoder.prefill(dummy_q, past, self.layer_idx)
        sel = decoder.step(q, k[:, :, -1:], self.layer_idx)
        _record("decode", "sparse", None, sel.density)
        page_size = k_pages.shape[1]
        if page_size == cfg.block_size:
            lens = torch.tensor([seq_len], dtype=torch.int32, device=q.device)
            return paged_sparse_decode(
                q, k_pages, v_pages, table, lens, sel.kv_num_blocks, sel.kv_indices,
                page_size, self.scale, st.backend, validate=False,
            )  # fmt: skip
        v = gather_pages(v_pages, table, seq_len)
        return sparse_decode(
            q, k, v, sel.kv_num_blocks, sel.kv_indices, cfg.block_size,
            backend=st.backend, scale=self.scale,
        )  # fmt: skip

    def _decode_rows(
        self, query, out, starts, lens, rows, k_pages, v_pages, m, st, sparse: bool
    ) -> None:
        """Decode rows together in one `paged_sparse_decode` call: ``sparse``, with the quest
        rule on the per-page key bounds (`paged_quest_select`, no per-request state); else
        every block (the dense decodes)."""
        cfg = st.config
        if cfg.decode_rule != "quest":
            cfg = cfg.replace(decode_rule="quest")  # the walk rule needs past queries
        if not sparse:  # blocks are the pages
            cfg = cfg.replace(block_size=k_pages.shape[1])
        key = (tuple(rows), cfg)
        plan = m.decode_plans.get(key)
        if plan is None:
            plan = m.decode_plans[key] = _DecodeRows.build(
                rows, [starts[b] for b in rows], [lens[b] for b in rows], m.block_table, cfg
            )
        q = query.index_select(0, plan.token_index)  # (R, Hq, D)
        if not sparse:
            num, idx = plan.all_blocks()
        else:
            num, idx = paged_quest_select(q, self.bounds, plan.plan, cfg)
        o = paged_sparse_decode(
            q[:, :, None], k_pages, v_pages, plan.table, plan.seq_lens, num, idx,
            k_pages.shape[1], self.scale, st.backend, validate=False,
        )  # fmt: skip
        out.index_copy_(0, plan.token_index, o[:, :, 0].to(out.dtype))
        if not sparse:
            return
        kept = plan.plan.kept
        if kept is None:  # a budget that is not a count per row: read the counts back
            kept = num.float().mean(dim=1).tolist()
        for n_kept, nk in zip(kept, plan.plan.num_key_blocks, strict=True):
            _record("decode", "sparse", None, n_kept / nk)

    def _dense(self, q, k_pages, v_pages, table_row, seq_len) -> torch.Tensor:
        k = gather_pages(k_pages, table_row, seq_len)
        v = gather_pages(v_pages, table_row, seq_len)
        return dense_attention(
            q, k, v, causal=True, scale=self.scale, window=self.sliding_window,
            softcap=self.logits_soft_cap,
        )  # fmt: skip


# ---- registration ---------------------------------------------------------------------------

BACKEND_PATH = f"{__name__}.SketchWalkBackend"


WORKER_CONFIGURE = "sketchwalk_configure"
WORKER_SUMMARY = "sketchwalk_summary"


def register() -> None:
    """Register :class:`SketchWalkBackend` as vLLM's ``CUSTOM`` attention backend (the
    ``vllm.general_plugins`` entry point; safe to call more than once), let vLLM's CPU
    platform honour ``attention_backend="CUSTOM"`` for it, and give vLLM's workers the two
    methods :func:`configure_engine` and :func:`engine_summary` call by name."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    _patch_cpu_platform()
    _patch_layer_spec()
    _add_worker_methods()


def _patch_layer_spec(attention_cls: type | None = None) -> None:
    """vLLM 0.26 builds a layer's KV-cache spec in ``Attention.get_kv_cache_spec`` with no
    backend hook (later releases call ``AttentionBackend.customize_spec``): wrap it so that
    layers running this backend get `SketchWalkBackend.customize_spec` (the page grown by the
    per-page state). Nothing changes for other backends, nor where vLLM has the hook."""
    if attention_cls is None:
        if "customize_spec" in vars(AttentionBackend):
            return  # vLLM asks the backend itself
        try:
            from vllm.model_executor.layers.attention.attention import Attention
        except ImportError:  # pragma: no cover - a vLLM without this layer module
            return
        attention_cls = Attention
    original = attention_cls.__dict__.get("get_kv_cache_spec")
    if original is None or getattr(original, "_sketchwalk", False):
        return

    def get_kv_cache_spec(self, vllm_config):
        spec = original(self, vllm_config)
        if spec is not None and self.get_attn_backend() is SketchWalkBackend:
            spec = SketchWalkBackend.customize_spec(spec)
        return spec

    get_kv_cache_spec._sketchwalk = True  # type: ignore[attr-defined]
    attention_cls.get_kv_cache_spec = get_kv_cache_spec


def _add_worker_methods() -> None:
    try:
        from vllm.v1.worker.worker_base import WorkerBase
    except ImportError:  # pragma: no cover - a vLLM without the V1 worker base
        return
    setattr(WorkerBase, WORKER_CONFIGURE, _apply_settings)
    setattr(WorkerBase, WORKER_SUMMARY, _worker_summary)


def _patch_cpu_platform() -> None:
    try:
        from vllm.platforms.cpu import CpuPlatform
    except Exception:  # pragma: no cover - a vLLM build without the CPU platform
        return
    original = CpuPlatform.__dict__.get("get_attn_backend_cls")
    if original is None or getattr(getattr(original, "__func__", None), "_sketchwalk", False):
        return
    inner = original.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        if (
            selected_backend == AttentionBackendEnum.CUSTOM
            and not attn_selector_config.use_mla
            and AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH
        ):
            return BACKEND_PATH
        return inner(cls, selected_backend, attn_selector_config, *args, **kwargs)

    wrapped = classmethod(get_attn_backend_cls)
    wrapped.__func__._sketchwalk = True  # type: ignore[attr-defined]
    CpuPlatform.get_attn_backend_cls = wrapped
