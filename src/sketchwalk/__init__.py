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
from sketchwalk.attention import dense_attention, sparse_attention
from sketchwalk.config import SketchWalkConfig
from sketchwalk.core import SketchWalk
from sketchwalk.selection import BlockSelection

__version__ = "0.1.0"

__all__ = [
    "BlockSelection",
    "SketchWalk",
    "SketchWalkConfig",
    "__version__",
    "dense_attention",
    "metrics",
    "sparse_attention",
]
