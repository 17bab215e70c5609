"""Test setup: one single-process megatron-core runtime (CPU + gloo) shared by in-process tests."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run in Triton's interpreter on a CPU-only machine; it must be chosen before
# Triton is imported (also by the torchrun children, which inherit it). On a GPU they compile.
os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"


@pytest.fixture(scope="session")
def runtime():
    """megatron-core initialised with TP = PP = DP = 1 in this process (CPU layer on)."""
    from megafusion.config import Config
    from megafusion.runtime import initialize, shutdown

    rt = initialize(Config())
    yield rt
    shutdown()
