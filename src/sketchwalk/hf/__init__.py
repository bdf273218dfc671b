"""transformers glue: `models` (aliases, offline loading), `capture` (Q/K/V through the attention
interface), `integration` (`enable_sketchwalk`: SketchWalk as a drop-in attention).
"""
