"""Block-sparse attention: `api` (checks and one dispatch), `reference` (plain PyTorch), the
kernels `triton_prefill`, `triton_decode`, `flex`, and `paged` (a paged KV cache, kernels in
`triton_paged`)."""

from sketchwalk.attention.api import BACKENDS, resolve_backend, sparse_attention, sparse_decode
from sketchwalk.attention.paged import gather_pages, paged_sparse_decode, paged_sparse_prefill
from sketchwalk.attention.reference import dense_attention

__all__ = [
    "BACKENDS",
    "dense_attention",
    "gather_pages",
    "paged_sparse_decode",
    "paged_sparse_prefill",
    "resolve_backend",
    "sparse_attention",
    "sparse_decode",
]
