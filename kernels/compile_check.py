"""Compile every kernel variant the Triton backend launches for NVIDIA GPUs, without a GPU.

Triton's wheel carries its compiler passes and ``ptxas``, so the kernels can be lowered to
cubin for any architecture on a CPU-only machine: a kernel that the interpreter runs but the
compiler rejects (a type that changes in a loop, too much shared memory for a tile config)
fails here, before a GPU hour is spent. Every autotune config is compiled once, and every
combination of flags the backend uses (forward, input gradient with and without the gate's
gradient, weight gradient; gathered / scattered / accumulated) in bf16, fp16 and fp32::

    python -m megafusion.kernels.compile_check [--arch 80 90 100] [--dtype bf16 fp16 fp32]

Must run without ``TRITON_INTERPRET=1`` (it compiles the real kernels); prints one line per
kernel with its shared memory and exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("megafusion.kernels.compile_check compiles the kernels: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from megafusion.kernels import grouped_gemm as kernels  # noqa: E402


def _gemm_flags(rows: bool, scale: bool, accumulate: bool, dscale: bool = False) -> dict:
    return dict(HAS_A_ROWS=rows, HAS_C_ROWS=rows, HAS_SCALE=scale, ACCUMULATE=accumulate, HAS_DSCALE=dscale)


# The flags of gather_gemm_scatter that ops.triton_grouped launches with
GEMM_VARIANTS = {
    "forward, MoT (gather + scatter)": _gemm_flags(rows=True, scale=False, accumulate=False),
    "forward, experts (gather, gated scatter-add)": _gemm_flags(rows=True, scale=True, accumulate=True),
    "forward, grouped rows, gated": _gemm_flags(rows=False, scale=True, accumulate=False),
    "input gradient, MoT": _gemm_flags(rows=True, scale=False, accumulate=False),
    "input gradient, experts (gate gradient)": _gemm_flags(rows=True, scale=True, accumulate=True, dscale=True),
}
WGRAD_VARIANTS = {
    "weight gradient, MoT": dict(HAS_DY_ROWS=True, HAS_X_ROWS=True, HAS_SCALE=False),
    "weight gradient, experts (gated)": dict(HAS_DY_ROWS=True, HAS_X_ROWS=True, HAS_SCALE=True),
    "weight gradient, grouped rows": dict(HAS_DY_ROWS=False, HAS_X_ROWS=False, HAS_SCALE=False),
}
DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
INDEX = {"a_rows_ptr", "c_rows_ptr", "b_delta_ptr", "dy_rows_ptr", "x_rows_ptr"}


def signature(fn, dtype: str, constexprs: dict, accumulate: bool = False) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INDEX:
            sig[name] = "*i64"
        elif name in ("offsets_ptr", "groups_ptr"):
            sig[name] = "*i32"
        elif name in ("scale_ptr", "dscale_ptr"):
            sig[name] = "*fp32"  # gates, gate-gradient partials
        elif name == "c_ptr" and accumulate:
            sig[name] = "*fp64"  # the buffer atomic adds sum repeated rows into
        elif name.endswith("_ptr"):
            sig[name] = DTYPES[dtype]
        else:
            sig[name] = "i32"
    return sig


def jobs(dtypes=tuple(DTYPES)):
    """(label, kernel, flags, dtype, config) covering every config, and every variant in each of
    ``dtypes``, at least once."""
    gemm, wgrad = kernels.gather_gemm_scatter.fn, kernels.group_weight_grad.fn
    for kernel, variants, configs in (
        (gemm, list(GEMM_VARIANTS.items()), kernels.GEMM_CONFIGS),
        (wgrad, list(WGRAD_VARIANTS.items()), kernels.WGRAD_CONFIGS),
    ):
        pairs = list(itertools.product(variants, dtypes))
        for i in range(max(len(pairs), len(configs))):
            (label, flags), dtype = pairs[i % len(pairs)]
            yield label, kernel, flags, dtype, configs[i % len(configs)]


def compile_one(kernel, flags: dict, dtype: str, config, arch: int):
    constexprs = dict(flags, UPCAST=False, IEEE=dtype == "fp32", **config.kwargs)
    sig = signature(kernel, dtype, constexprs, accumulate=constexprs.get("ACCUMULATE", False))
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", arch, 32), options=options)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megafusion.kernels.compile_check", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80 A100, 90 H100/H200)"
    )
    ap.add_argument("--dtype", choices=list(DTYPES), nargs="+", default=list(DTYPES))
    args = ap.parse_args(argv)
    for arch in args.arch:
        for label, kernel, flags, dtype, config in jobs(tuple(args.dtype)):
            compiled = compile_one(kernel, flags, dtype, config, arch)
            tiles = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            print(f"sm_{arch} {dtype} {label}: tiles {tiles}, {compiled.metadata.shared} B shared memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
