"""sketchwalk: training-free block-sparse attention (Sketch&Walk) for LLMs.

Importable with torch alone; transformers, triton and matplotlib are imported lazily by the
modules that need them.

    >>> import torch
    >>> from sketchwalk import SketchWalk, SketchWalkConfig, sparse_attention
    >>> sw = SketchWalk(SketchWalkConfig(density=0.2))
    >>> sel = sw.select(q, k, layer_idx=2)          # q (B, Hq, T, D), k (B, Hkv, T, D)
    >>> out = sparse_attention(q, k, v, sel)          # (B, Hq, T, D)
"""

from sketchwalk import metrics
from sketchwalk._version import __version__
from sketchwalk.attention.api import sparse_attention
from sketchwalk.attention.reference import dense_attention
from sketchwalk.blocks import BlockSelection
from sketchwalk.config import SketchWalkConfig
from sketchwalk.selection.prefill import SketchWalk

__all__ = [
    "BlockSelection",
    "SketchWalk",
    "SketchWalkConfig",
    "__version__",
    "dense_attention",
    "metrics",
    "sparse_attention",
]
