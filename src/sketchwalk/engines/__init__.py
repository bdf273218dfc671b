"""Serving-engine integrations. Each submodule imports its engine lazily: importing
``sketchwalk.engines`` needs nothing beyond sketchwalk itself.

- :mod:`sketchwalk.engines.vllm`: a vLLM V1 attention backend (``pip install 'sketchwalk[vllm]'``).
"""

__all__: list[str] = []
