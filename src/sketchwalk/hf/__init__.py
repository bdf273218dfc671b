"""transformers glue: `models` (aliases, offline loading), `text` (real offline text tokenized into
passages), `capture` (Q/K/V through the attention interface), `integration` (`enable_sketchwalk`:
SketchWalk as a drop-in attention).
"""
