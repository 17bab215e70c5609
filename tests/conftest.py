"""Test setup: one single-process megatron-core runtime (CPU + gloo) shared by in-process tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def runtime():
    """megatron-core initialised with TP = PP = DP = 1 in this process (CPU layer on)."""
    from megafusion.config import Config
    from megafusion.runtime import initialize, shutdown

    rt = initialize(Config())
    yield rt
    shutdown()
