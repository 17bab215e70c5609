"""Seeding of every random number generator a run touches.

One seed drives Python's ``random``, NumPy and torch's CPU generator on every rank, so
that everything derived from them (synthetic data, init fallbacks) is the same in every
parallel layout. megatron-core's RNG tracker is seeded too (on CPU it drives the CPU
generator): it gives each tensor-parallel rank its own dropout stream while keeping
data-parallel replicas equal.
Model weights do not depend on these generators at all: see ``megafusion.models.init``.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch (CPU) and, where CUDA exists, megatron's RNG tracker."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed % (2**32))
    # On CPU the "CUDA" generator is the CPU one (see runtime.cpu_compat); re-seed it last.
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
