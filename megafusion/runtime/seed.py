"""Seeding of every random number generator a run touches.

One seed drives Python's ``random``, NumPy and torch's CPU generator on every rank, so
that everything derived from them (synthetic data, init fallbacks) is the same in every
parallel layout. On a GPU, megatron-core's CUDA RNG tracker is seeded too: it gives each
tensor-parallel rank its own dropout stream while keeping data-parallel replicas equal.
Model weights do not depend on these generators at all: see ``megafusion.models.init``.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch (CPU) and, where CUDA exists, megatron's RNG tracker."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
