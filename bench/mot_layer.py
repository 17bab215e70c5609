"""One Mixture-of-Transformers layer against one dense layer: forward + backward at equal FLOPs.

Both are single megatron-core ``TransformerLayer`` modules built from the project's own specs
(``dense_layer_spec`` and ``mot_layer_spec`` with ``untie=all``), fed the same random hidden
states ``[s, b, h]`` with RoPE and plain causal attention, so the attention work is identical
and only the untied, modality-routed projections / MLP / norms differ. Each row of the batch is
an interleaved mixed-modal layout: text span, image span, text span, ... with the requested
image fraction (the same fraction in every row, span positions drawn per row from ``--seed``).

Measured, alternating dense and MoT every iteration so that background load hits both alike:

- the whole layer, forward + backward (``out.backward(grad)`` with a fixed random ``grad``);
- the MLP alone (megatron's SwiGLU ``MLP`` vs ``ModalityMLP``);
- the routing alone: the permute / unpermute pairs of the torch reference backend (forward + backward) that
  the MoT layer does around its QKV, output projection and MLP, and those of the MLP only.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` around one forward +
backward of each layer under ``SDPBackend.MATH`` (the CPU flash kernel reports 0 FLOPs, the
fused CUDA ones ignore causality); the two counts must be equal or the run fails. Achieved
TFLOP/s use *model* FLOPs (causal attention, see ``megafusion.accounting.flops``).

Usage::

    python -m bench.mot_layer [--hidden 512 --heads 8 --ffn 1376 --seq 1024 --batch 4
        --image-fraction 0.5 --iters 20 --warmup 5 --dtype auto --out PATH] [--quick]
    python -m bench.mot_layer --table-only        # re-render bench/results/mot_layer.md

Results go to ``--out`` (default ``bench/results/mot_layer_<device>.json``) and the markdown
table ``mot_layer.md`` beside it is re-rendered from every ``mot_layer_*.json`` there.
``--quick`` uses tiny sizes for tests; it writes only where ``--out`` says (else prints).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.provenance import cpu_cores, cpu_name, git_commit
from bench.provenance import write_table as write_results_table
from megafusion import ops
from megafusion.core.choices import OPS_BACKENDS
from megafusion.core.errors import MegafusionError

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RESULT_GLOB = "mot_layer_*.json"
TABLE_NAME = "mot_layer.md"

SIZES = ("hidden", "heads", "ffn", "seq", "batch", "image_fraction", "images_per_row", "iters", "warmup")
DEFAULTS = dict(
    hidden=512, heads=8, ffn=1376, seq=1024, batch=4, image_fraction=0.5, images_per_row=2, iters=20, warmup=5
)
QUICK = dict(hidden=64, heads=4, ffn=176, seq=64, batch=2, image_fraction=0.5, images_per_row=2, iters=3, warmup=1)
INIT_STD = 0.02


def argument_parser(benchmark: str, description: str) -> argparse.ArgumentParser:
    """The options this benchmark shares with its siblings (``bench.moma_layer``): sizes, dtype, output."""
    p = argparse.ArgumentParser(prog=f"python -m bench.{benchmark}", description=description)
    # Sizes default to None so that --quick can tell "not given" from "given".
    for name, kind in (
        ("hidden", int),
        ("heads", int),
        ("ffn", int),
        ("seq", int),
        ("batch", int),
        ("image-fraction", float),
        ("images-per-row", int),
        ("iters", int),
        ("warmup", int),
    ):
        default = DEFAULTS[name.replace("-", "_")]
        p.add_argument(
            f"--{name}", type=kind, default=None, help=f"default {default} (--quick: {QUICK[name.replace('-', '_')]})"
        )
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ops-backend",
        choices=OPS_BACKENDS,
        default="auto",
        help="grouped GEMMs of the MoT / MoMa layers (ops.backend; auto = Triton on CUDA, torch on CPU)",
    )
    p.add_argument("--out", default=None, help=f"result JSON (default bench/results/{benchmark}_<device>.json)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few iterations (tests)")
    p.add_argument("--table-only", action="store_true", help="only re-render the markdown table")
    return p


def resolve_sizes(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill the sizes not given from ``QUICK`` or ``DEFAULTS`` and check them (``p.error`` if wrong)."""
    try:  # e.g. --ops-backend triton on a CPU: one line, before any process group starts
        ops.backends.check_available(args.ops_backend)
    except MegafusionError as err:
        p.error(str(err))
    base = QUICK if args.quick else DEFAULTS
    for name in SIZES:
        if getattr(args, name) is None:
            setattr(args, name, base[name])
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    if not 0.0 <= args.image_fraction <= 1.0:
        p.error(f"--image-fraction {args.image_fraction} must lie in [0, 1]")
    if args.iters < 2 or args.warmup < 0 or args.images_per_row < 1:
        p.error("need --iters >= 2 (for percentiles), --warmup >= 0 and --images-per-row >= 1")
    return args


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argument_parser("mot_layer", __doc__.split("\n")[0])
    return resolve_sizes(p, p.parse_args(argv))


# ---------------------------------------------------------------------------- inputs and layers


def modality_layout(batch: int, seq: int, image_fraction: float, images_per_row: int, seed: int) -> torch.Tensor:
    """``[b, s]`` modality ids (0 text, 1 image): text, image, text, ... spans in every row.

    Each row has exactly ``round(s * image_fraction)`` image tokens in ``images_per_row``
    contiguous images of (near) equal size; the text between them is cut at random points.
    """
    n_image = round(seq * image_fraction)
    images = min(images_per_row, n_image)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, seq, dtype=torch.int64)
    for row in range(batch):
        cuts = sorted(torch.randint(0, seq - n_image + 1, (images,), generator=gen).tolist())
        pos = 0
        for i in range(images):
            size = n_image // images + (1 if i < n_image % images else 0)
            start = pos + cuts[i] - (cuts[i - 1] if i else 0)  # text span before image i
            ids[row, start : start + size] = 1
            pos = start + size
    return ids


def make_cfg(args):
    from megafusion.config import Config

    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads = 1, args.hidden, args.heads
    m.ffn_hidden_size, m.seq_length, m.params_dtype, m.untie = args.ffn, args.seq, args.dtype, "all"
    m.vocab_size = 256  # only enters the analytic formulas, whose output layer is subtracted
    # One synthetic document per row: megafusion then builds a plain causal layer (no doc mask).
    cfg.data.source, cfg.data.docs_per_sequence = "synthetic", 1
    return cfg


@torch.no_grad()
def init_weights(layer: torch.nn.Module, seed: int) -> None:
    """N(0, 0.02) matrices, unit norms; megafusion's config skips megatron's own init."""
    for name, p in layer.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0)
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        p.copy_(torch.empty(p.shape).normal_(0.0, INIT_STD, generator=gen))


def build_layer(spec, tconfig, device, seed: int) -> torch.nn.Module:
    from megatron.core.transformer.spec_utils import build_module

    layer = build_module(spec, config=tconfig, layer_number=1).to(device)
    init_weights(layer, seed)
    return layer.train()


# ---------------------------------------------------------------------------- measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clear_grads(tensors) -> None:
    for t in tensors:
        t.grad = None


def time_cases(cases: dict, iters: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Milliseconds per call of each ``fn`` in ``cases`` ({name: (fn, tensors with grads)}).

    Every iteration runs every case once, in reversed order on odd iterations, so slow drift
    and background load spread evenly over the cases instead of biasing the ratio.
    """
    names = list(cases)
    times = {n: [] for n in names}
    gc.collect()
    gc.disable()  # a collection inside one timed call would land on one case only
    try:
        for i in range(warmup + iters):
            for name in names if i % 2 == 0 else names[::-1]:
                fn, grads = cases[name]
                clear_grads(grads)
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                if i >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
    finally:
        gc.enable()
    return times


def summary(ms: list[float]) -> dict:
    deciles = statistics.quantiles(ms, n=10, method="inclusive")
    return {
        "median": round(statistics.median(ms), 4),
        "p10": round(deciles[0], 4),
        "p90": round(deciles[-1], 4),
        "n": len(ms),
    }


def count_flops(fn, grads) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # The math backend decomposes attention into counted bmm's; CPU flash would count 0.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    clear_grads(grads)
    return int(counter.get_total_flops())


@dataclass
class Inputs:
    """What every timed case reads: hidden states ``[s, b, h]``, their gradient, RoPE, the layout."""

    x: torch.Tensor
    grad: torch.Tensor
    rope: torch.Tensor
    modality_ids: torch.Tensor  # [b, s]
    routing: object  # megafusion.layers.routing.ModalityRouting
    gen: torch.Generator  # drawn on by later inputs (routing_case), after x and grad


def make_inputs(args, cfg, tconfig, device: torch.device) -> Inputs:
    """The same inputs for every case: random ``x`` and ``grad`` from ``--seed``, RoPE, the modality layout."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megafusion.core.modality import NUM_MODALITIES
    from megafusion.layers.routing import ModalityRouting

    s, b, h, dtype = args.seq, args.batch, args.hidden, tconfig.params_dtype
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(s, b, h, generator=gen).to(device, dtype).requires_grad_()
    grad = torch.randn(s, b, h, generator=gen).to(device, dtype)
    rope = RotaryEmbedding(
        tconfig.kv_channels,
        rotary_percent=1.0,
        rotary_base=int(cfg.model.rope_theta),
        use_cpu_initialization=device.type != "cuda",
    )(s)
    modality_ids = modality_layout(b, s, args.image_fraction, args.images_per_row, args.seed)
    routing = ModalityRouting.from_modality_ids(modality_ids, None, device, NUM_MODALITIES)
    return Inputs(x, grad, rope, modality_ids, routing, gen)


def layer_step(layer, inputs: Inputs):
    """Forward + backward of one ``TransformerLayer``, and the tensors whose grads to clear."""
    x, grad, rope = inputs.x, inputs.grad, inputs.rope

    def step():
        out, _ = layer(x, attention_mask=None, rotary_pos_emb=rope)  # None: causal, as in training
        out.backward(grad)

    return step, [x, *layer.parameters()]


def mlp_step(mlp, inputs: Inputs):
    """Forward + backward of one layer's MLP (anything returning ``(out, bias)``) on the same inputs."""
    x, grad = inputs.x, inputs.grad

    def step():
        out, _ = mlp(x)
        out.backward(grad)

    return step, [x, *mlp.parameters()]


def routing_case(routing, widths: list[tuple[int, int]], device, dtype, gen):
    """Forward + backward of the permute (width in) / unpermute (width out) pairs of MoT's torch
    reference path (the fused kernels read and write in token order and do neither)."""
    from megafusion.ops.reference import gather_rows, place_rows

    n = routing.order.numel()
    pairs = [
        (
            torch.randn(n, a, generator=gen).to(device, dtype).requires_grad_(),
            torch.randn(n, b, generator=gen).to(device, dtype).requires_grad_(),
        )
        for a, b in widths
    ]
    grads = [torch.randn(n, w, generator=gen).to(device, dtype) for pair in widths for w in pair]

    def step():
        outs = []
        for x, y in pairs:
            outs += [
                gather_rows(x, routing.order),
                place_rows(y, routing.order, None),
            ]
        torch.autograd.backward(outs, grads)

    return step, [t for pair in pairs for t in pair]


def layer_flops(cfg, batch: int, seq: int) -> tuple[int, int]:
    """One dense layer's forward + backward FLOPs, analytic: (what FlopCounterMode counts under the
    math kernel, model FLOPs with causal attention); the model's output layer is left out."""
    from megafusion.accounting import flops as F
    from megafusion.accounting import image_modules
    from megafusion.accounting import params as acc_params

    tokens = seq * batch
    out_layer = (
        image_modules.MATMUL_FLOPS_PER_MAC * (1 + F.BACKWARD_FACTOR) * acc_params.parameter_counts(cfg)["output_layer"]
    )
    analytic = F.flop_counter_flops(cfg, batch, seq, kernel="math") - tokens * out_layer
    model_flops = round(tokens * (F.flops_per_token(cfg, F.causal_mean_attended_keys(seq)) - out_layer))
    return analytic, model_flops


def layer_shape(args, cfg, tconfig, modality_ids: torch.Tensor) -> dict:
    """The ``shape`` a result records: sizes, the tokens of each modality, attention."""
    from megafusion.core.modality import MODALITY_NAMES, NUM_MODALITIES

    counts = torch.bincount(modality_ids.reshape(-1), minlength=NUM_MODALITIES).tolist()
    return {
        "hidden": args.hidden,
        "heads": tconfig.num_attention_heads,
        "query_groups": tconfig.num_query_groups,
        "head_dim": tconfig.kv_channels,
        "ffn": args.ffn,
        "seq": args.seq,
        "batch": args.batch,
        "image_fraction": args.image_fraction,
        "images_per_row": args.images_per_row,
        "tokens": dict(zip(MODALITY_NAMES, counts)),
        "qk_norm": cfg.model.qk_norm,
        "rope": True,
        "attention": "causal",
    }


def peak_tflops(device: torch.device) -> float | None:
    """The GPU's dense peak (``megafusion.accounting.mfu``) for MFU; None on CPU."""
    if device.type != "cuda":
        return None
    from megafusion.accounting.mfu import peak_tflops as peak

    return peak(device)


def measure(args, cfg, device: torch.device) -> dict:
    from megafusion.layers.routing import modality_routing
    from megafusion.models.dense import dense_layer_spec
    from megafusion.models.mot import mot_layer_spec
    from megafusion.models.transformer_config import build_transformer_config

    tconfig = build_transformer_config(cfg, device)
    dtype = tconfig.params_dtype
    layers = {
        "dense": build_layer(dense_layer_spec(cfg), tconfig, device, args.seed),
        "mot": build_layer(mot_layer_spec(cfg), tconfig, device, args.seed),
    }
    s, b, h = args.seq, args.batch, args.hidden
    inputs = make_inputs(args, cfg, tconfig, device)
    modality_ids, routing, gen = inputs.modality_ids, inputs.routing, inputs.gen
    heads, groups, d = tconfig.num_attention_heads, tconfig.num_query_groups, tconfig.kv_channels
    qkv, proj = (heads + 2 * groups) * d, heads * d
    cases = {
        "dense": layer_step(layers["dense"], inputs),
        "mot": layer_step(layers["mot"], inputs),
        "mlp_dense": mlp_step(layers["dense"].mlp, inputs),
        "mlp_mot": mlp_step(layers["mot"].mlp, inputs),
        # QKV (h in, qkv out), output projection (heads*d in, h out), MLP (h in, h out).
        "routing_layer": routing_case(routing, [(h, qkv), (proj, h), (h, h)], device, dtype, gen),
        "routing_mlp": routing_case(routing, [(h, h)], device, dtype, gen),
    }

    with modality_routing(routing):  # the dense layer ignores it; MoT modules read it
        counted = {name: count_flops(*cases[name]) for name in ("dense", "mot")}
        if counted["dense"] != counted["mot"]:
            raise RuntimeError(
                f"FlopCounterMode counts {counted['mot']} FLOPs for the MoT layer but "
                f"{counted['dense']} for dense: MoT must multiply each token by one "
                f"modality's weights only (megafusion.ops.grouped_linear)"
            )
        times = time_cases(cases, args.iters, args.warmup, device)

    analytic, model_flops = layer_flops(cfg, b, s)
    stats = {name: summary(ms) for name, ms in times.items()}
    tflops = {n: float(f"{model_flops / (stats[n]['median'] * 1e-3) / 1e12:.4g}") for n in ("dense", "mot")}
    peak = peak_tflops(device)
    return {
        "shape": layer_shape(args, cfg, tconfig, modality_ids),
        "dtype": {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype],
        "iters": args.iters,
        "warmup": args.warmup,
        "seed": args.seed,
        "params": {n: sum(p.numel() for p in layer.parameters()) for n, layer in layers.items()},
        "layer_ms": {"dense": stats["dense"], "mot": stats["mot"]},
        "ratio": round(stats["mot"]["median"] / stats["dense"]["median"], 4),
        "mlp_ms": {"dense": stats["mlp_dense"], "mot": stats["mlp_mot"]},
        "mlp_ratio": round(stats["mlp_mot"]["median"] / stats["mlp_dense"]["median"], 4),
        "routing_ms": {
            "layer": stats["routing_layer"],
            "mlp": stats["routing_mlp"],
            "what": "index_select permute + unpermute, forward + backward, timed alone",
        },
        "flops": {
            "dense": counted["dense"],
            "mot": counted["mot"],
            "equal": True,
            "counter": "FlopCounterMode, SDPBackend.MATH (full s x s attention)",
            "analytic": analytic,
            "matches_analytic": analytic == counted["dense"],
            "model": model_flops,
            "model_note": "causal attention, megafusion.accounting.flops",
        },
        "tflops": tflops,
        "peak_tflops": peak,
        "mfu": None if peak is None else {n: round(v / peak, 4) for n, v in tflops.items()},
    }


# ---------------------------------------------------------------------------- provenance


def device_info(device: torch.device) -> dict:
    cores = cpu_cores()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_").removeprefix("nvidia_")
        return {"type": "cuda", "name": name, "slug": slug, "cuda": torch.version.cuda, "host_cpu": cpu_name()}
    from megafusion.runtime import cpu_compat

    # On CPU megatron-core runs under megafusion's compat layer (a TorchFunctionMode), as in training.
    return {
        "type": "cpu",
        "name": f"{cpu_name()} ({cores} cores)",
        "slug": "cpu",
        "cores": cores,
        "threads": torch.get_num_threads(),
        "cpu_compat": cpu_compat.is_enabled(),
    }


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform
        return None


def versions() -> dict:
    import megatron.core

    return {
        "torch": torch.__version__,
        "megatron_core": getattr(megatron.core, "__version__", "unknown"),
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------- table


def _ms(stat: dict) -> str:
    return f"{stat['median']:.2f} ({stat['p10']:.2f}-{stat['p90']:.2f})"


def render_table(results_dir: Path) -> str:
    """Markdown table, one row per ``mot_layer_*.json`` in ``results_dir``."""
    results = []
    for path in sorted(Path(results_dir).glob(RESULT_GLOB)):
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a readable mot_layer result ({err}); fix or remove it") from err
    lines = [
        "# One MoT layer vs one dense layer (forward + backward)",
        "",
        f"Generated by `python -m bench.mot_layer` from `{RESULT_GLOB}` in this folder; do not edit by hand.",
        "Times are the median (p10-p90) in ms over the timed iterations; ratio = MoT / dense median.",
        "Shape: h hidden, H heads, f ffn, s sequence, b batch, img image fraction. Both layers count the",
        "same FLOPs (FlopCounterMode); rows marked (quick) are tiny smoke-test sizes, not results.",
        "",
        "| device | commit | date (UTC) | shape | dtype, ops | dense ms | MoT ms | MoT/dense | MLP MoT/dense "
        "| command |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["device"]["name"], r["date"])):
        sh = r["shape"]
        shape = f"h{sh['hidden']} H{sh['heads']} f{sh['ffn']} s{sh['seq']} b{sh['batch']} img{sh['image_fraction']:g}"
        device = r["device"]["name"] + (" (quick)" if r.get("quick") else "")
        command = r["command"].replace("|", "\\|")
        lines.append(
            f"| {device} | {r['commit']} | {r['date']} | {shape} | {r['dtype']}, {r.get('ops_backend', 'torch')} | "
            f"{_ms(r['layer_ms']['dense'])} | {_ms(r['layer_ms']['mot'])} | {r['ratio']:.3f} | "
            f"{r['mlp_ratio']:.3f} | `{command}` |"
        )
    return "\n".join(lines) + "\n"


def write_table(results_dir: Path) -> Path:
    return write_results_table(results_dir, TABLE_NAME, render_table)


# ---------------------------------------------------------------------------- entry point


def run(args, argv: list[str], benchmark: str = "mot_layer", measure_fn=measure) -> dict:
    """``measure_fn(args, cfg, device)`` inside a runtime, with the provenance every result records."""
    from megafusion.runtime import initialize, seed_everything, shutdown

    cfg = make_cfg(args)
    runtime = initialize(cfg)  # TP = PP = 1; CPU + gloo (compat layer) or one GPU + NCCL
    try:
        # megatron's GPU weight allocation forks its CUDA RNG tracker, which must be seeded.
        seed_everything(args.seed)
        device = runtime.device
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        load_before = load_average()
        ops.use_backend(args.ops_backend)
        measured = measure_fn(args, cfg, device)
        dtype = torch.bfloat16 if measured["dtype"] == "bf16" else torch.float32
        h = cfg.model.hidden_size
        return {
            "benchmark": benchmark,
            "quick": args.quick,
            "device": device_info(device),
            "versions": versions(),
            "commit": git_commit(),
            "date": started,
            "command": shlex.join(["python", "-m", f"bench.{benchmark}", *argv]),
            # Other work on a shared host slows both layers; this says how busy it was.
            "load_average_1min": {"start": load_before, "end": load_average()},
            "ops_backend": ops.backends.resolve(args.ops_backend, device, dtype, h, h),
            **measured,
        }
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.table_only:
        print(f"wrote {write_table(Path(args.out).parent if args.out else RESULTS)}")
        return 0
    result = run(args, argv)
    lm, mm = result["layer_ms"], result["mlp_ms"]
    print(
        f"{result['device']['name']} {result['dtype']}: dense {lm['dense']['median']:.3f} ms, "
        f"MoT {lm['mot']['median']:.3f} ms (x{result['ratio']:.3f}); MLP dense {mm['dense']['median']:.3f} ms, "
        f"MoT {mm['mot']['median']:.3f} ms (x{result['mlp_ratio']:.3f}); routing alone "
        f"{result['routing_ms']['layer']['median']:.3f} ms/layer; FLOPs {result['flops']['dense']} (equal)"
    )
    save_result(args, result, "mot_layer", write_table)
    return 0


def save_result(args, result: dict, benchmark: str, write_table_fn) -> None:
    """``result`` to ``--out`` (default ``<benchmark>_<device>.json``) and the table re-rendered;
    a ``--quick`` run without ``--out`` only prints it."""
    if args.out is None and args.quick:
        print("--quick without --out writes nothing (recorded results are left alone):")
        print(json.dumps(result, indent=2))
        return
    out = Path(args.out) if args.out else RESULTS / f"{benchmark}_{result['device']['slug']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} and {write_table_fn(out.parent)}")


if __name__ == "__main__":
    sys.exit(main())
