"""Block-sparse attention: `api` (checks and one dispatch), `reference` (plain PyTorch), and the
kernels `triton_prefill`, `triton_decode`, `flex`."""

from sketchwalk.attention.api import BACKENDS, resolve_backend, sparse_attention, sparse_decode
from sketchwalk.attention.reference import dense_attention

__all__ = ["BACKENDS", "dense_attention", "resolve_backend", "sparse_attention", "sparse_decode"]
