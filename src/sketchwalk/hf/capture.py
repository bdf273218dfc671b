"""Capture what attention consumes, through transformers' attention interface.

:func:`capture_attention` switches a model to a registered attention function named
``sketchwalk_capture+<inner>`` (``<inner>`` is the implementation the model used before, e.g.
``sdpa`` or ``eager``). That function records, for each captured layer,

- ``Q``: post-RoPE queries ``(B, Hq, T, D)``,
- ``K``, ``V``: post-RoPE keys and values ``(B, Hkv, T, D)`` (not repeated for GQA),

exactly the tensors the model hands to attention, then calls the inner implementation with the same
arguments, so the model's outputs are unchanged. The paired mask function is the inner
implementation's own, so causal and sliding-window masks are built as usual.

Optionally (``pre_rope=True``) forward hooks on ``q_proj``/``k_proj`` (or ``q_norm``/``k_norm``
where the architecture normalises per head, as Qwen3 does) record the pre-RoPE ``Q_pre``
``(B, Hq, T, D)`` and ``K_pre`` ``(B, Hkv, T, D)`` that SeerAttention's gate reads.

Works for Llama, Qwen2, Qwen3 and Mistral (any model whose attention modules have ``layer_idx``,
``head_dim``, ``q_proj`` and ``k_proj`` and dispatch through ``ALL_ATTENTION_FUNCTIONS``).
No modeling file is forked and no ``forward`` is rebound.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["AttentionCapture", "attention_modules", "capture_attention"]

CAPTURE_PREFIX = "sketchwalk_capture+"
# id(attention module) -> the capture recording it. A module is recorded by at most one capture.
_ACTIVE: dict[int, AttentionCapture] = {}


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """The self-attention modules of a decoder, keyed by ``layer_idx`` (in increasing order)."""
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        if (
            hasattr(module, "layer_idx")
            and hasattr(module, "q_proj")
            and hasattr(module, "k_proj")
            and isinstance(getattr(module, "layer_idx", None), int)
        ):
            found[module.layer_idx] = module
    if not found:
        raise ValueError(
            f"{type(model).__name__}: no attention modules with layer_idx/q_proj/k_proj found "
            "(supported: Llama, Qwen2, Qwen3, Mistral and models built the same way)"
        )
    return dict(sorted(found.items()))


def choose_layers(
    modules: dict[int, nn.Module], layers: Iterable[int] | None, who: str
) -> list[int]:
    """Sorted layer indices to act on (all when ``layers`` is None); unknown ones raise."""
    if layers is None:
        return list(modules)
    chosen = sorted({int(i) for i in layers})
    bad = [i for i in chosen if i not in modules]
    if bad:
        raise ValueError(
            f"{who}: layers {bad} do not exist: the model has layers 0..{max(modules)}"
        )
    return chosen


def inner_attention_function(inner: str, module: nn.Module) -> Callable[..., Any]:
    """The attention function registered as ``inner`` ("sdpa", "eager", ...) for ``module``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if inner == "eager":
        modeling = sys.modules[type(module).__module__]
        return modeling.eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[inner]


def _make_attention_fn(inner: str) -> Callable[..., Any]:
    def capture_attention_forward(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        capture = _ACTIVE.get(id(module))
        if capture is not None:
            capture._record(module.layer_idx, query, key, value)
        return inner_attention_function(inner, module)(
            module, query, key, value, attention_mask, *args, **kwargs
        )

    capture_attention_forward.__name__ = f"capture_{inner}_attention_forward"
    return capture_attention_forward


def register_wrapper(
    prefix: str, inner: str, make_fn: Callable[[str], Callable[..., Any]], who: str
) -> str:
    """Register ``<prefix><inner>`` once: the attention function ``make_fn(inner)`` paired with
    the inner implementation's own mask function, so masks are built exactly as before.

    Returns the registered name; raises ValueError (prefixed with ``who``) for an unknown inner
    implementation or one without a mask function.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = prefix + inner
    if name in ALL_ATTENTION_FUNCTIONS._global_mapping:
        return name
    if inner != "eager" and inner not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        raise ValueError(f"{who}: cannot wrap unknown attention implementation {inner!r}")
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(inner)
    if mask_fn is None:
        raise ValueError(f"{who}: attention implementation {inner!r} has no mask function to reuse")
    AttentionInterface.register(name, make_fn(inner))
    AttentionMaskInterface.register(name, mask_fn)
    return name


def set_attention_implementation(model: nn.Module, name: str) -> None:
    """Switch ``model`` to the registered attention implementation ``name``."""
    try:
        model.set_attn_implementation(name)
    except (AttributeError, ValueError):
        model.config._attn_implementation = name


class AttentionCapture:
    """Records attention inputs of selected layers while active (a context manager).

    Args:
        model: a transformers causal LM (Llama, Qwen2, Qwen3, Mistral).
        layers: layer indices to record; None records every layer.
        dtype: storage dtype of the recorded tensors; None keeps the model's.
        offload: move recorded tensors to the CPU right away (saves accelerator memory).
        pre_rope: also record ``Q_pre``/``K_pre`` (pre-RoPE, after projection and q/k norm).

    After a forward pass, ``capture.layers[i]`` holds ``{'Q', 'K', 'V'[, 'Q_pre', 'K_pre']}`` for
    each recorded layer ``i``; a new forward pass replaces them. Leaving the context restores the
    model's attention implementation and removes every hook.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[int] | None = None,
        dtype: torch.dtype | None = None,
        offload: bool = True,
        pre_rope: bool = False,
    ):
        self.model = model
        modules = attention_modules(model)
        chosen = choose_layers(modules, layers, "capture")
        self.layer_ids: list[int] = chosen
        self.modules = {i: modules[i] for i in chosen}
        self.dtype = dtype
        self.offload = offload
        self.pre_rope = pre_rope
        self.layers: dict[int, dict[str, torch.Tensor]] = {}
        self._hooks: list[Any] = []
        self._previous: str | None = None
        self.active = False

    def _store(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if self.dtype is not None and t.dtype != self.dtype:
            t = t.to(self.dtype)
        if self.offload and t.device.type != "cpu":
            t = t.to("cpu")
        return t.contiguous()

    def _record(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> None:
        entry = self.layers.setdefault(layer_idx, {})
        entry["Q"] = self._store(query)
        entry["K"] = self._store(key)
        entry["V"] = self._store(value)

    def _pre_hook(self, layer_idx: int, name: str, head_dim: int, per_head: bool):
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            if per_head:  # q_norm/k_norm output: (B, T, H, D)
                x = output
            else:  # q_proj/k_proj output: (B, T, H * D)
                x = output.view(*output.shape[:-1], -1, head_dim)
            self.layers.setdefault(layer_idx, {})[name] = self._store(x.transpose(1, 2))

        return hook

    def clear(self) -> None:
        """Drop the recorded tensors."""
        self.layers = {}

    def __enter__(self) -> AttentionCapture:
        if self.active:
            raise RuntimeError("this capture is already active")
        for module in self.modules.values():
            other = _ACTIVE.get(id(module))
            if other is not None and other is not self:
                raise RuntimeError(
                    f"layer {module.layer_idx} is already being captured by another capture"
                )
        previous = self.model.config._attn_implementation or "sdpa"
        if previous.startswith(CAPTURE_PREFIX):
            inner = previous[len(CAPTURE_PREFIX) :]
            self._previous = None
        else:
            inner = previous
            self._previous = previous
        name = register_wrapper(CAPTURE_PREFIX, inner, _make_attention_fn, "capture")
        if self._previous is not None:
            set_attention_implementation(self.model, name)
        for i, module in self.modules.items():
            _ACTIVE[id(module)] = self
            if self.pre_rope:
                head_dim = int(module.head_dim)
                for side in ("q", "k"):
                    norm = getattr(module, f"{side}_norm", None)
                    proj = getattr(module, f"{side}_proj")
                    target = norm if isinstance(norm, nn.Module) else proj
                    hook = self._pre_hook(
                        i, f"{side.upper()}_pre", head_dim, per_head=isinstance(norm, nn.Module)
                    )
                    self._hooks.append(target.register_forward_hook(hook))
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for module in self.modules.values():
            if _ACTIVE.get(id(module)) is self:
                del _ACTIVE[id(module)]
        if self._previous is not None:
            set_attention_implementation(self.model, self._previous)
        self.active = False


def capture_attention(
    model: nn.Module,
    layers: Iterable[int] | None = None,
    dtype: torch.dtype | None = None,
    offload: bool = True,
    pre_rope: bool = False,
) -> AttentionCapture:
    """Context manager recording post-RoPE Q, K, V (and optionally pre-RoPE q, k) per layer.

    Example::

        with capture_attention(model, layers=[0, 5]) as cap:
            model(input_ids)
        q = cap.layers[5]["Q"]  # (B, Hq, T, D)

    See :class:`AttentionCapture` for the arguments.
    """
    return AttentionCapture(model, layers=layers, dtype=dtype, offload=offload, pre_rope=pre_rope)
