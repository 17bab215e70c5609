"""On a GPU: the compiled Triton kernels in bf16 against the float64 reference, forward and all gradients.

``test_grouped_gemm.py`` runs the same kernels in Triton's interpreter, whose bf16 ``tl.dot``
computes in fp32; only a GPU multiplies in bf16, so only here are the half-precision products
themselves checked. The reference sees the same bf16-rounded inputs, so what is left is the
kernels' own error: fp32 accumulation, one rounding of each output to bf16, and the gated
gradient (fp32 gate times bf16 gradient) rounded to bf16 before it is multiplied, which in a
group of a few rows that cancel reaches ~1e-2 of the largest element (the interpreter shows
1.1e-2 on the gated case). A wrong row, group or gate gives errors of order 1.
"""

from __future__ import annotations

import pytest
import torch

from megafusion.ops import backends
from tests.kernels.test_grouped_gemm import CASES, assert_close, make_case, nan_fill, run  # noqa: F401 (nan_fill: a fixture)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not backends.triton_installed(), reason="triton is not installed"),
]


@pytest.mark.usefixtures("nan_fill")
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_bf16_kernels_match_the_float64_reference(case):
    gen = torch.Generator().manual_seed(sorted(CASES).index(case))
    counts, x, weights, scale, grad, kwargs = make_case(case, torch.float32, gen)
    cuda = lambda t: None if t is None else t.to("cuda")  # noqa: E731
    rounded = lambda t: t.to(torch.bfloat16).double().to("cuda")  # noqa: E731
    kwargs = {k: cuda(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    inputs = (counts, rounded(x), [rounded(w) for w in weights], cuda(scale), rounded(grad), kwargs)
    want = run("torch", *inputs, torch.float64)
    got = run("triton", *inputs, torch.bfloat16)
    assert all(t.is_cuda for t in got)
    assert [t.dtype for t in got[: 1 + len(weights) + 1]] == [torch.bfloat16] * (len(weights) + 2)
    assert_close(got, want, 3e-2, f"{case} bf16 on {torch.cuda.get_device_name()}")
