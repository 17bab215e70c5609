"""Which implementation runs :func:`megafusion.ops.grouped_linear`: ``ops.backend``.

=====================  ===========================================================================
``torch``              the reference (:mod:`megafusion.ops.reference`): any device and dtype
``torch_grouped_mm``   torch's grouped GEMM (:mod:`megafusion.ops.grouped_mm`), stacked weights
``triton``             megafusion's fused kernels (:mod:`megafusion.ops.triton_grouped`): CUDA, or
                       the CPU interpreter under ``TRITON_INTERPRET=1`` (for tests: slow)
``auto`` (default)     ``triton`` on CUDA when Triton is installed; else ``torch_grouped_mm``
                       where its fast path exists (Hopper/Blackwell, bf16); else ``torch``
=====================  ===========================================================================

A run sets the process's backend once (:func:`use_backend`, from ``ops.backend``); ``auto``
is resolved per call, since a CPU tensor (e.g. an fp64 test reference) still takes ``torch``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from megafusion.core.choices import OPS_BACKENDS
from megafusion.core.errors import ConfigError, MissingDependencyError
from megafusion.ops import grouped_mm

BACKENDS = OPS_BACKENDS
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_current = ["auto"]


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_available(name: str) -> None:
    """Refuse a backend this machine cannot run, naming the key and the fix."""
    if name not in BACKENDS:
        raise ConfigError(f"ops.backend={name!r} is not one of {', '.join(BACKENDS)}")
    if name == "triton":
        if not triton_installed():
            raise MissingDependencyError(
                "ops.backend=triton needs Triton: pip install triton (CUDA builds of torch bring it), "
                "or set ops.backend=auto"
            )
        if not torch.cuda.is_available() and not triton_interpreted():
            raise ConfigError(
                "ops.backend=triton needs a CUDA GPU; on a CPU, Triton runs only in its (slow) interpreter: "
                "export TRITON_INTERPRET=1 before starting, or set ops.backend=auto"
            )
    if name == "torch_grouped_mm" and not grouped_mm.available():
        raise ConfigError(
            f"ops.backend=torch_grouped_mm needs torch.nn.functional.grouped_mm (torch {torch.__version__} "
            "has none): upgrade torch or set ops.backend=auto"
        )


def use_backend(name: str) -> None:
    """Make ``name`` the backend of every later :func:`grouped_linear` call in this process."""
    check_available(name)
    _current[0] = name


def current_backend() -> str:
    return _current[0]


@contextlib.contextmanager
def backend(name: str):
    """``use_backend(name)`` inside the block only."""
    previous = _current[0]
    use_backend(name)
    try:
        yield
    finally:
        _current[0] = previous


def resolve(name: str | None, device: torch.device, dtype: torch.dtype, m: int, k: int) -> str:
    """The concrete backend for a call on ``[m, k]`` weights (``auto`` picks by device, dtype, shape)."""
    name = name or _current[0]
    if name != "auto":
        return name
    if device.type == "cuda" and dtype in _TRITON_DTYPES and triton_installed():
        return "triton"
    if grouped_mm.fast_on(device, dtype, m, k):
        return "torch_grouped_mm"
    return "torch"


def implementation(name: str):
    if name == "torch":
        from megafusion.ops.reference import grouped_linear_torch

        return grouped_linear_torch
    if name == "torch_grouped_mm":
        return grouped_mm.grouped_linear_grouped_mm
    if name == "triton":
        from megafusion.ops.triton_grouped import grouped_linear_triton  # imports triton

        return grouped_linear_triton
    raise ConfigError(f"ops.backend={name!r} is not one of {', '.join(BACKENDS)}")
