"""The method, one file per step of the paper: `sketch` (block pooling and the randomized
Hadamard sketch), `walk` (transition matrix and cross-layer walk), `select` (forced blocks and
budgets), tied together by `prefill` (`SketchWalk`) and `decode` (`SketchWalkDecoder`, whose
query-aware ``decode_rule="quest"`` scores blocks from the key bounds in `quest`); the fused
transition kernel `triton_transition` sits beside the PyTorch `walk` code it replaces.

Other methods at the same budgets: `baselines` (oracle, streaming, forced, gate, quest), one file
per paper (`xattention`, `minference`, `flexprefill`), and `selectors.make_selector`, which builds
any of them by name.
"""
