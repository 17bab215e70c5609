"""Fused Triton kernels (imported only when a run uses them: importing Triton costs seconds).

:mod:`megafusion.kernels.grouped_gemm` holds the grouped GEMM with the gather and scatter fused
in; :mod:`megafusion.ops.triton_grouped` wraps it for autograd. On a CPU the kernels run only
under Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is imported).

The sources sit at the top of the repository (``kernels/``) and install as ``megafusion.kernels``
(setup.py's ``package_dir``); a source tree on PYTHONPATH reaches them through the link
``megafusion/kernels -> ../kernels``.
"""
