"""Fused Triton kernels (imported only when a run uses them: importing Triton costs seconds).

:mod:`megafusion.kernels.grouped_gemm` holds the grouped GEMM with the gather and scatter fused
in; :mod:`megafusion.ops.triton_grouped` wraps it for autograd. On a CPU the kernels run only
under Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is imported).
"""
