"""Shared test setup: the Triton CPU interpreter without CUDA, and the ``gpu`` marker's skip."""

import os

import pytest
import torch

# Without CUDA the Triton kernels run under the CPU interpreter (small shapes). The variable must
# be set before triton is first imported: this file is imported before any test module.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
