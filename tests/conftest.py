"""Test setup: one single-process megatron-core runtime (CPU + gloo) shared by in-process tests;
``gpu``-marked tests skipped where CUDA is not available."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run in Triton's interpreter on a CPU-only machine; it must be chosen before
# Triton is imported (also by the torchrun children, which inherit it). On a GPU they compile.
os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"

# Under pytest-xdist (the README runs two test processes, `-n 2`) each worker computes on one
# thread, as the commands the tests start do (OMP_NUM_THREADS=1): two workers share two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """A ``gpu`` test is skipped, not failed, on a machine without CUDA (the README's command runs on CPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu); torch.cuda.is_available() is False here")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


_RUNTIME = []  # the in-process runtime, made by the first test that asks for one


@pytest.fixture
def runtime():
    """megatron-core initialised with TP = PP = DP = 1 in this process (CPU layer on), shared by the
    in-process tests; made again when an in-process command (which shuts down the runtime it ran
    on, as a real command does) has torn it down, so no test depends on the order tests run in."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megafusion.config import Config
    from megafusion.runtime import initialize

    if not _RUNTIME or not dist.is_initialized() or not ps.model_parallel_is_initialized():
        _RUNTIME[:] = [initialize(Config())]
    return _RUNTIME[0]


@pytest.fixture(scope="session", autouse=True)
def _runtime_shut_down_at_the_end():
    yield
    if _RUNTIME:
        from megafusion.runtime import shutdown

        shutdown()
