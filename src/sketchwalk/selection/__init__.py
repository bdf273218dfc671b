"""The method, one file per step of the paper: `sketch` (block pooling and the randomized
Hadamard sketch), `walk` (transition matrix and cross-layer walk), `select` (forced blocks and
budgets), tied together by `prefill` (`SketchWalk`) and `decode` (`SketchWalkDecoder`, whose
query-aware ``decode_rule="quest"`` scores blocks from the key bounds in `quest`); the fused
transition kernel `triton_transition` sits beside the PyTorch `walk` code it replaces.
"""
