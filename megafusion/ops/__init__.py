"""Token-routing operators shared by modality-partitioned and expert layers.

``grouped_linear`` multiplies row groups by one weight each (the grouped GEMM at the heart of
Mixture-of-Transformers and MoE), with the gather of its input rows, a per-row gate and the
scatter (or scatter-add) of its output rows fused in. Backends (``ops.backend``): the torch
reference, torch's ``grouped_mm``, and megafusion's Triton kernels (:mod:`megafusion.kernels`).
"""

from megafusion.ops.backends import BACKENDS, backend, current_backend, use_backend
from megafusion.ops.grouped_gemm import grouped_linear

__all__ = ["BACKENDS", "backend", "current_backend", "grouped_linear", "use_backend"]
