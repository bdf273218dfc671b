"""sketchwalk: training-free block-sparse attention (Sketch&Walk) for LLMs.

Importable with torch alone; transformers, triton and matplotlib are imported lazily by the
modules that need them.
"""

from sketchwalk.config import SketchWalkConfig

__version__ = "0.1.0"

__all__ = ["SketchWalkConfig", "__version__"]
