"""Grouped GEMM backends against one dense GEMM over the same rows: time and TFLOP/s.

Each problem is one projection of ``n`` tokens from ``k`` to ``m`` features, split into groups:

- ``mot``: ``G`` modalities (splits such as 50/50, 90/10, 34/33/33), tokens interleaved in
  token order, so every backend reads them in modality order and writes them back in token
  order (``gather = scatter = order``, MoT's projections);
- ``ec8``: 8 experts with expert-choice capacity 1 (each expert takes ``n / 8`` tokens, chosen
  at random, a token possibly by several experts), rows gathered by index and gate-weighted
  outputs scatter-added back to tokens (``out_rows = n``): MoMa's experts without a separate
  permute / unpermute.

Implementations, forward and forward + backward (input and weight gradients, and the gate's):

- ``dense``: one ``F.linear`` over all ``n`` rows with one weight: the ceiling (cuBLAS on a GPU);
- ``loop``: the torch reference backend (gather, one GEMM per group, scatter);
- ``grouped_mm``: ``torch_grouped_mm`` (stacked weights, torch's grouped GEMM), where torch has it;
- ``triton``: megafusion's fused kernels, where Triton runs (CUDA, or ``TRITON_INTERPRET=1``).

Every implementation's output and gradients are first checked against ``loop`` (relative error
reported; a failure stops the run). FLOPs: ``2 n k m`` forward, three times that forward +
backward, the same for every implementation (each row is multiplied by one weight).

Usage::

    python -m bench.kernels [--dtype bf16] [--iters 20 --warmup 5] [--hidden 2048 4096]
        [--tokens 8192 32768 65536] [--out PATH] [--quick]
    python -m bench.kernels --table-only      # re-render bench/results/kernels.md

The default problems are the GPU targets of issue 16 (hidden 2048 and 4096, FFN 4x and 8/3x,
8k-64k tokens). ``--quick`` runs tiny shapes (a CPU smoke test). Results go to ``--out``
(default ``bench/results/kernels_<device>.json``); ``kernels.md`` beside it is re-rendered from
every ``kernels_*.json`` there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.mot_layer import summary, time_cases
from bench.provenance import ROOT, git_commit, machine, utc_now
from megafusion import ops
from megafusion.ops import backends

RESULTS = ROOT / "bench" / "results"
# Issue 16's GPU targets, checked in the table.
TARGET_OF_DENSE = 0.90  # fused TFLOP/s / dense TFLOP/s, MoT splits 50/50 and 90/10
TARGET_OVER_LOOP = 1.30  # fused / per-group loop at 90/10


def problems(quick: bool, hiddens=(2048, 4096), tokens=(8192, 32768, 65536)) -> list[dict]:
    if quick:
        return [
            {"kind": "mot", "split": [0.5, 0.5], "n": 96, "k": 32, "m": 48},
            {"kind": "mot", "split": [0.9, 0.1], "n": 96, "k": 48, "m": 32},
            {"kind": "ec8", "split": [0.125] * 8, "n": 64, "k": 32, "m": 32},
        ]
    out = []
    for hidden in hiddens:
        for ffn in (4 * hidden, (8 * hidden // 3 + 127) // 128 * 128):
            for n in tokens:
                for split in ([0.5, 0.5], [0.9, 0.1], [0.34, 0.33, 0.33]):
                    out.append({"kind": "mot", "split": split, "n": n, "k": hidden, "m": ffn})
                out.append({"kind": "mot", "split": [0.9, 0.1], "n": n, "k": ffn, "m": hidden})  # down proj
                out.append({"kind": "ec8", "split": [0.125] * 8, "n": n, "k": hidden, "m": ffn})
    return out


def counts_of(split: list[float], n: int) -> list[int]:
    counts = [int(round(f * n)) for f in split[:-1]]
    return counts + [n - sum(counts)]


def make_problem(p: dict, device, dtype, gen) -> dict:
    n, k, m = p["n"], p["k"], p["m"]
    counts = counts_of(p["split"], n)
    rand = lambda *shape: (torch.randn(*shape, generator=gen) * shape[-1] ** -0.5).to(device, dtype)  # noqa: E731
    x, grad = rand(n, k), rand(n, m)
    weights = [rand(m, k) for _ in counts]
    if p["kind"] == "mot":  # modality of each token interleaved in token order
        modality = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        order = torch.sort(modality[torch.randperm(n, generator=gen)], stable=True).indices.to(device)
        kwargs = {"gather": order, "scatter": order}
        scale = None
    else:  # expert choice: each expert's own random tokens, repeats across experts
        index = torch.cat([torch.randperm(n, generator=gen)[:c] for c in counts]).to(device)
        kwargs = {"gather": index, "scatter": index, "out_rows": n, "gather_permutes": False}
        scale = torch.rand(n, generator=gen).to(device, torch.float32)
    return {"x": x, "weights": weights, "counts": counts, "grad": grad, "scale": scale, "kwargs": kwargs}


def grouped_call(prob: dict, backend: str):
    x = prob["x"].detach().requires_grad_()
    weights = [w.detach().requires_grad_() for w in prob["weights"]]
    scale = None if prob["scale"] is None else prob["scale"].detach().requires_grad_()
    leaves = [x, *weights] + ([] if scale is None else [scale])

    def forward():
        return ops.grouped_linear(x, weights, prob["counts"], scale=scale, backend=backend, **prob["kwargs"])

    return forward, leaves


def dense_call(prob: dict):
    x = prob["x"].detach().requires_grad_()
    w = prob["weights"][0].detach().requires_grad_()
    return (lambda: F.linear(x, w)), [x, w]


def implementations(device) -> list[str]:
    names = ["loop"]
    if backends.grouped_mm.available():
        names.append("grouped_mm")
    if backends.triton_installed() and (device.type == "cuda" or backends.triton_interpreted()):
        names.append("triton")
    return names


BACKEND_OF = {"loop": "torch", "grouped_mm": "torch_grouped_mm", "triton": "triton"}
IMPLEMENTATIONS = ("dense", "loop", "grouped_mm", "triton")


def check_against_loop(prob: dict, name: str) -> float:
    """Largest relative error of ``name``'s output and gradients against the loop's."""
    results = []
    for backend in ("torch", BACKEND_OF[name]):
        forward, leaves = grouped_call(prob, backend)
        out = forward()
        out.backward(prob["grad"])
        results.append([out.detach()] + [t.grad for t in leaves])
    err = 0.0
    for a, b in zip(*results):
        err = max(err, ((b.float() - a.float()).abs().max() / a.float().abs().max().clamp_min(1e-30)).item())
    return err


def measure(p: dict, device, dtype, iters: int, warmup: int, gen) -> dict:
    prob = make_problem(p, device, dtype, gen)
    n, k, m = p["n"], p["k"], p["m"]
    names = implementations(device)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    errors = {name: check_against_loop(prob, name) for name in names if name != "loop"}
    bad = {name: e for name, e in errors.items() if not e < tol}
    if bad:
        raise SystemExit(f"bench.kernels: {bad} differ from the per-group loop by more than {tol} on {p}")
    calls = {name: grouped_call(prob, BACKEND_OF[name]) for name in names}
    calls["dense"] = dense_call(prob)
    cases = {}
    for name, (forward, leaves) in calls.items():
        cases[f"{name}/fwd"] = (lambda f=forward: f(), [])
        cases[f"{name}/fwd+bwd"] = (lambda f=forward: f().backward(prob["grad"]), leaves)
    ms = {case: summary(t) for case, t in time_cases(cases, iters, warmup, device).items()}
    flops = {"fwd": 2 * n * k * m, "fwd+bwd": 6 * n * k * m}
    tflops = {case: flops[case.split("/")[1]] / (s["median"] * 1e-3) / 1e12 for case, s in ms.items()}
    return {
        **p,
        "counts": prob["counts"],
        "max_rel_error_vs_loop": errors,
        "ms": ms,
        "tflops": {c: float(f"{v:.4g}") for c, v in tflops.items()},
    }


def row_label(r: dict) -> str:
    split = "/".join(f"{round(f * 100)}" for f in r["split"])
    kind = "MoT" if r["kind"] == "mot" else "EC 8 experts"
    return f"{kind} {split} | {r['n']} | {r['k']} -> {r['m']}"


def table_cells(tflops: dict, phase: str) -> list[str]:
    """TFLOP/s of dense, loop, grouped_mm, triton, then fused / dense and fused / loop."""
    cells = [f"{tflops[f'{n}/{phase}']:.3g}" if f"{n}/{phase}" in tflops else "-" for n in IMPLEMENTATIONS]
    fused = tflops.get(f"triton/{phase}")
    ratios = ["-" if fused is None else f"{fused / tflops[f'{n}/{phase}']:.2f}" for n in ("dense", "loop")]
    return cells + ratios


def markdown(runs: list[dict]) -> str:
    lines = [
        "# Grouped GEMM backends against one dense GEMM (`python -m bench.kernels`)",
        "",
        "TFLOP/s at the median time (forward + backward: input, weight and gate gradients); "
        "`fused / dense` and `fused / loop` are megafusion's Triton kernels against the dense GEMM "
        f"over all rows (target >= {TARGET_OF_DENSE} for MoT 50/50 and 90/10) and against the "
        f"per-group loop (target >= {TARGET_OVER_LOOP} at 90/10). Generated from `bench/results/kernels_*.json`.",
        "",
    ]
    for run in runs:
        info = run["info"]
        lines += [
            f"## {info['machine']}, {info['dtype']}",
            "",
            f"commit `{info['commit']}`, {info['date_utc']}, torch {info['torch']}, triton {info['triton']}: "
            f"`{info['command']}`",
            "",
            "| problem | tokens | k -> m | phase | dense | loop | grouped_mm | triton | fused / dense | fused / loop |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in run["results"]:
            for phase in ("fwd", "fwd+bwd"):
                lines.append(f"| {row_label(r)} | {phase} | {' | '.join(table_cells(r['tflops'], phase))} |")
        lines.append("")
    return "\n".join(lines)


def render_table(directory: Path) -> Path:
    runs = [json.loads(p.read_text()) for p in sorted(directory.glob("kernels_*.json"))]
    path = directory / "kernels.md"
    path.write_text(markdown(runs) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a CPU smoke test)")
    ap.add_argument("--hidden", type=int, nargs="+", default=[2048, 4096], help="hidden sizes (FFN 4x and 8/3x each)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768, 65536], help="tokens per problem")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table-only", action="store_true", help="re-render kernels.md from the recorded JSON")
    args = ap.parse_args(argv)
    if args.table_only:
        print(render_table(RESULTS))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.quick:
        ap.error(
            "the default problems are GPU sizes (hours on a CPU): run on a CUDA machine, or --quick for a smoke test"
        )
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    results = []
    for p in problems(args.quick, args.hidden, args.tokens):
        results.append(measure(p, device, dtype, args.iters, args.warmup, gen))
        print(json.dumps({k: results[-1][k] for k in ("kind", "split", "n", "k", "m", "tflops")}), flush=True)
    triton_version = None
    if backends.triton_installed():
        import triton

        triton_version = triton.__version__
    info = {
        "machine": machine(),
        "commit": git_commit(),
        "date_utc": utc_now(),
        "command": " ".join(["python -m bench.kernels", *(argv if argv is not None else sys.argv[1:])]),
        "dtype": dtype_name,
        "torch": torch.__version__,
        "triton": triton_version,
        "triton_interpreted": backends.triton_interpreted() and device.type != "cuda",
        "iters": args.iters,
    }
    record = {"info": info, "results": results}
    if args.out is None and args.quick:
        print(json.dumps(record, indent=1))
        return 0
    out = args.out or RESULTS / f"kernels_{'gpu' if device.type == 'cuda' else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} and {render_table(out.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
