"""The pipeline commands: `collect`, `validate`, `compare` (with `seer`, its SeerAttention side,
and `plots`), `demo`; tensor files (`tensorio`) and what runs share (`runs`).
"""
