"""Token-routing operators shared by modality-partitioned and expert layers.

``grouped_linear`` multiplies contiguous row groups of one matrix by one weight each (the
grouped GEMM at the heart of Mixture-of-Transformers and MoE); ``permute_rows`` /
``unpermute_rows`` bring tokens into group order and back. Each has a plain torch
implementation that is always available and is the reference the fused kernels (a later
issue: Triton / CUDA, picked here by ``backend``) are tested against.
"""

from megafusion.ops.grouped_gemm import grouped_linear, permute_rows, unpermute_rows

__all__ = ["grouped_linear", "permute_rows", "unpermute_rows"]
