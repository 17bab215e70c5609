"""Every ``grouped_linear`` backend against a float64 torch reference, forward and all gradients.

The Triton kernels run in Triton's interpreter here (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` on a CPU-only machine), in fp32: the interpreter computes bf16 / fp16
``tl.dot`` in fp32 (its bf16 dot is wrong), so the half-precision cases check the casts and
buffers, not half-precision products. Shapes stay tiny: the interpreter runs each program in
Python, and the interpreter's tiles are 128 wide: the shapes span several tiles in each
dimension somewhere among the cases, none a multiple of 128. Outputs the kernels allocate are
filled with NaN before they run (torch's ``fill_uninitialized_memory``), so an element a
kernel fails to write shows up as NaN.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from megafusion import ops
from megafusion.core.errors import ConfigError
from megafusion.ops import backends

triton_backend = pytest.mark.skipif(not backends.triton_installed(), reason="triton is not installed")


@pytest.fixture
def nan_fill():
    """``torch.empty`` returns NaN-filled memory inside the test."""
    old = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old[0])
    torch.utils.deterministic.fill_uninitialized_memory = old[1]


# counts, k, m, gather, scatter, gate (grouped_mm needs k and m of 16-byte rows: its cases have
# them); gather / scatter "perm" = MoT's token order, "repeat" = expert choice (a token taken by
# several experts, some by none; summed outputs).
CASES = {
    "mot_uneven_with_empty_group": ([5, 0, 150], 20, 136, "perm", "perm", False),
    "one_group_holds_every_row": ([0, 260, 0], 140, 19, None, None, False),
    "odd_sizes_three_groups": ([17, 1, 130], 40, 33, "perm", None, False),
    "expert_choice_gate_and_scatter_add": ([9, 0, 140, 11], 16, 24, "repeat", "repeat", True),
    "experts_gated_rows_in_group_order": ([3, 130, 5], 12, 20, None, None, True),
    "no_rows_at_all": ([0, 0], 8, 8, "perm", "perm", True),
}


def make_case(name, dtype, gen):
    counts, k, m, gather_kind, scatter_kind, gated = CASES[name]
    rows = sum(counts)
    x_rows = 13 if gather_kind == "repeat" else rows
    gather = None
    if gather_kind == "perm":
        gather = torch.randperm(rows, generator=gen)
    elif gather_kind == "repeat":
        gather = torch.randint(x_rows - 2, (rows,), generator=gen)  # rows 11, 12 never read: zero gradient
    scatter, out_rows = None, None
    if scatter_kind == "perm":
        scatter = torch.randperm(rows, generator=gen)
    elif scatter_kind == "repeat":
        out_rows = 15
        scatter = torch.randint(out_rows - 1, (rows,), generator=gen)
    x = torch.randn(x_rows, k, generator=gen, dtype=torch.float64)
    weights = [torch.randn(m, k, generator=gen, dtype=torch.float64) for _ in counts]
    scale = torch.rand(rows, generator=gen, dtype=torch.float64) if gated else None
    grad = torch.randn(out_rows or rows, m, generator=gen, dtype=torch.float64)
    kwargs = dict(gather=gather, scatter=scatter, out_rows=out_rows, gather_permutes=gather_kind != "repeat")
    return counts, x, weights, scale, grad, kwargs


def run(backend, counts, x, weights, scale, grad, kwargs, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in [x, *weights]]
    s = None if scale is None else scale.detach().float().requires_grad_()
    y = ops.grouped_linear(leaves[0], leaves[1:], counts, scale=s, backend=backend, **kwargs)
    y.backward(grad.to(dtype))
    return [y] + [t.grad for t in leaves] + ([] if s is None else [s.grad])


def assert_close(got, want, tol, what):
    for i, (g, w) in enumerate(zip(got, want)):
        assert not torch.isnan(g).any(), f"{what}: output {i} has unwritten (NaN) elements"
        if w.numel() == 0:
            continue
        err = (g.double() - w).abs().max().item() / max(w.abs().max().item(), 1e-30)
        assert err < tol, f"{what}: output {i} relative error {err:.2e} >= {tol:.0e}"


@triton_backend
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_float64_reference(case, nan_fill):
    gen = torch.Generator().manual_seed(sorted(CASES).index(case))
    counts, x, weights, scale, grad, kwargs = make_case(case, torch.float32, gen)
    want = run("torch", counts, x, weights, None if scale is None else scale, grad, kwargs, torch.float64)
    got = run("triton", counts, x, weights, scale, grad, kwargs, torch.float32)
    assert_close(got, want, 1e-5, case)
    if case == "mot_uneven_with_empty_group":
        assert torch.equal(got[3], torch.zeros_like(got[3]))  # the empty group's weight gradient
    if case == "expert_choice_gate_and_scatter_add":
        assert torch.equal(got[1][11:], torch.zeros_like(got[1][11:]))  # rows no expert took
        assert torch.equal(got[0][14], torch.zeros_like(got[0][14]))  # a token no row lands on


@triton_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_precision_keeps_its_dtype(dtype, nan_fill):
    gen = torch.Generator().manual_seed(5)
    counts, x, weights, scale, grad, kwargs = make_case("expert_choice_gate_and_scatter_add", dtype, gen)
    # The reference sees the same rounded inputs (the gate stays fp32, as the router's
    # probabilities do): what is left is the kernels' own error.
    rounded = lambda t: t.to(dtype).double()  # noqa: E731
    case = (counts, rounded(x), [rounded(w) for w in weights], scale, rounded(grad), kwargs)
    want = run("torch", *case, torch.float64)
    got = run("triton", *case, dtype)
    assert [t.dtype for t in got[:-1]] == [dtype] * (len(got) - 1)
    assert_close(got, want, 1e-2, str(dtype))


@triton_backend
def test_triton_is_deterministic_and_takes_stride_zero_gradients():
    gen = torch.Generator().manual_seed(7)
    counts, x, weights, _, _, kwargs = make_case("mot_uneven_with_empty_group", torch.float32, gen)
    grads = []
    for _ in range(2):
        leaves = [t.detach().float().requires_grad_() for t in [x, *weights]]
        ops.grouped_linear(leaves[0], leaves[1:], counts, backend="triton", **kwargs).sum().backward()  # stride-0
        grads.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    want = run("torch", counts, x, weights, None, torch.ones(sum(counts), weights[0].shape[0]), kwargs, torch.float64)
    assert_close(grads[0], want[1:], 1e-5, "stride-0 gradient")


def saved_bytes(fn) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@triton_backend
def test_triton_saves_no_more_for_backward_than_the_reference():
    gen = torch.Generator().manual_seed(8)
    for case in ("mot_uneven_with_empty_group", "expert_choice_gate_and_scatter_add"):
        counts, x, weights, scale, _, kwargs = make_case(case, torch.float32, gen)
        leaves = [t.detach().float().requires_grad_() for t in [x, *weights]]
        s = None if scale is None else scale.detach().float().requires_grad_()
        sizes = {}
        for b in ("torch", "triton"):
            call = partial(ops.grouped_linear, leaves[0], leaves[1:], counts, scale=s, backend=b, **kwargs)
            sizes[b] = saved_bytes(call)
        assert sizes["triton"] <= sizes["torch"], (case, sizes)


@pytest.mark.skipif(not backends.grouped_mm.available(), reason="this torch has no grouped_mm")
@pytest.mark.parametrize("case", ["mot_uneven_with_empty_group", "expert_choice_gate_and_scatter_add"])
def test_torch_grouped_mm_matches_float64_reference(case):
    gen = torch.Generator().manual_seed(9)
    counts, x, weights, scale, grad, kwargs = make_case(case, torch.float32, gen)
    want = run("torch", counts, x, weights, scale, grad, kwargs, torch.float64)
    got = run("torch_grouped_mm", counts, x, weights, scale, grad, kwargs, torch.float32)
    assert_close(got, want, 1e-5, case)


def test_reference_gradients_pass_gradcheck():
    gen = torch.Generator().manual_seed(10)
    counts, x, weights, scale, _, kwargs = make_case("expert_choice_gate_and_scatter_add", torch.float64, gen)
    inputs = [t.requires_grad_() for t in [x, scale, *weights]]
    fn = lambda x, s, *w: ops.grouped_linear(x, w, counts, scale=s, backend="torch", **kwargs)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


def test_backend_choice_and_refusals(monkeypatch):
    x, w = torch.zeros(2, 4), [torch.zeros(3, 4)]
    assert backends.resolve("auto", x.device, x.dtype, 3, 4) == "torch"  # a CPU tensor: the reference
    with pytest.raises(ConfigError, match="ops.backend='cuda' is not one of"):
        ops.use_backend("cuda")
    if backends.triton_installed():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        if not torch.cuda.is_available():
            with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
                ops.use_backend("triton")
    with ops.backend("torch"):
        assert ops.current_backend() == "torch"
    assert ops.current_backend() == "auto"
    with pytest.raises(ValueError, match="sum to 3, but the input has 2 rows"):
        ops.grouped_linear(x, w, [3])
    with pytest.raises(ValueError, match="differ in shape"):
        ops.grouped_linear(x, [w[0], torch.zeros(2, 4)], [1, 1])


@triton_backend
def test_triton_scatter_add_is_the_same_in_any_order():
    """Repeated rows are summed in fp64, exactly: reversing the order of the groups (the order
    a GPU's atomics might take) changes no bit, where an fp32 sum would round differently."""
    gen = torch.Generator().manual_seed(11)
    counts, x, weights, scale, _, kwargs = make_case("expert_choice_gate_and_scatter_add", torch.float32, gen)
    x, weights, scale = x.float(), [w.float() for w in weights], scale.float()
    starts = [sum(counts[:g]) for g in range(len(counts))]
    order = torch.cat([torch.arange(s, s + c) for s, c in zip(starts, counts)][::-1])  # groups reversed
    reversed_kwargs = {**kwargs, "gather": kwargs["gather"][order], "scatter": kwargs["scatter"][order]}
    forward = ops.grouped_linear(x, weights, counts, scale=scale, backend="triton", **kwargs)
    backward = ops.grouped_linear(
        x, weights[::-1], counts[::-1], scale=scale[order], backend="triton", **reversed_kwargs
    )
    assert torch.equal(forward, backward)
    # The same terms summed in fp32 in the two orders differ: the property is not vacuous here.
    gathered = {k: v for k, v in kwargs.items() if k in ("gather", "gather_permutes")}
    terms = ops.grouped_linear(x, weights, counts, scale=scale, backend="torch", **gathered)
    scatter = kwargs["scatter"]
    in_order = torch.zeros_like(forward).index_add(0, scatter, terms)
    reversed_order = torch.zeros_like(forward).index_add(0, scatter[order], terms[order])
    assert not torch.equal(in_order, reversed_order)


@triton_backend
def test_triton_skips_the_gradient_of_a_frozen_weight():
    """A weight that needs no gradient (LMFusion's frozen text half) gets none; the others are exact."""
    gen = torch.Generator().manual_seed(12)
    counts, x, weights, _, grad, kwargs = make_case("mot_uneven_with_empty_group", torch.float32, gen)
    want = run("torch", counts, x, weights, None, grad, kwargs, torch.float64)
    leaves = [t.detach().float().requires_grad_(i != 3) for i, t in enumerate([x, *weights])]  # group 2 frozen
    ops.grouped_linear(leaves[0], leaves[1:], counts, backend="triton", **kwargs).backward(grad.float())
    assert leaves[3].grad is None
    assert_close([leaves[0].grad, leaves[1].grad, leaves[2].grad], want[1:4], 1e-5, "frozen group")
