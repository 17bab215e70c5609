"""``megafusion plan --config FILE --gpus N --gpu h100|a100|h200 [...]``: which parallel layouts of
a config fit in memory on N GPUs and which is fastest, predicted before any GPU hour is spent.

The work is in :mod:`megafusion.planning.plan` (memory: :mod:`megafusion.planning.memory`, step
time: :mod:`megafusion.planning.step_time`, the layouts: :mod:`megafusion.planning.search`, the
GPUs: :mod:`megafusion.planning.hardware`). Nothing is built or run and no process group starts.
"""

from __future__ import annotations

import argparse
import json
import sys

from megafusion.commands.main import run
from megafusion.commands.parsing import add_config, command_parser, config_missing, config_paths
from megafusion.core.choices import RECOMPUTE_MODES
from megafusion.core.errors import UsageError
from megafusion.core.io import ensure_writable_file_parent

PROG = "megafusion plan"

DESCRIPTION = """\
Every parallel layout (TP, SP, CP, PP, VPP, DP, EP, distributed optimizer, recompute, micro-batch
size) of a config that validates on N GPUs, with the predicted memory of its fullest GPU (parameters,
gradients, optimizer states, activations) and its step time (compute, TP / CP / pipeline / DP /
expert communication, bubble, optimizer), ranked fastest first; layouts that do not fit are marked.
The GPU numbers and the efficiency are printed and can be overridden. Context parallelism is tried
for rows of 8192 tokens or more, or when nothing fits without it (--cp picks the sizes)."""

EXAMPLES = (
    "megafusion plan --config examples/configs/papers/mot_7b.yaml --gpus 64 --gpu h100",
    "megafusion plan --config examples/configs/papers/transfusion_7b.yaml --gpus 256 --gpu a100 --latent-shape 8,32,32 "
    "--top 10",
    "megafusion plan --config examples/configs/tiny_dense.yaml model.vocab_size=256 --gpus 8 --gpu h200 "
    "--efficiency 0.4 --nodes-bandwidth 25 --json plan.json",
)


def parser() -> argparse.ArgumentParser:
    p = command_parser(PROG, DESCRIPTION, EXAMPLES, allow_abbrev=False)
    add_config(p)
    p.add_argument("--gpus", type=int, help="number of GPUs (the world size)")
    p.add_argument("--gpu", default="h100", help="GPU kind: h100 | a100 | h200 (default h100)")
    p.add_argument("--gpu-memory", type=float, metavar="GB", help="memory per GPU in GB (overrides the table)")
    p.add_argument("--peak-tflops", type=float, metavar="TF", help="dense bf16 peak TFLOP/s per GPU")
    p.add_argument("--nvlink-gbps", type=float, metavar="GBps", help="NVLink bandwidth per GPU and direction, GB/s")
    p.add_argument(
        "--nodes-bandwidth", type=float, metavar="GBps", help="inter-node bandwidth per GPU and direction, GB/s"
    )
    p.add_argument("--hbm-gbps", type=float, metavar="GBps", help="HBM bandwidth, GB/s")
    p.add_argument("--gpus-per-node", type=int, metavar="N", help="GPUs per node (default 8)")
    p.add_argument("--efficiency", type=float, default=0.5, help="achieved fraction of peak FLOP/s (default 0.5)")
    p.add_argument("--reserve", type=float, default=4.0, metavar="GB", help="memory kept free per GPU (default 4)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="parameter dtype (default bf16)")
    p.add_argument("--image-fraction", type=float, default=0.5, help="Transfusion: share of image tokens")
    p.add_argument("--latent-shape", metavar="C,H,W", help="Transfusion: one image latent's shape")
    p.add_argument("--recompute", help="only these train.recompute modes (comma-separated)")
    p.add_argument("--micro-batch-sizes", metavar="LIST", help="micro-batch sizes to try (default 1,2,4,8)")
    p.add_argument(
        "--cp",
        metavar="LIST",
        help="context-parallel sizes to try (default: 1, and 2, 4, 8 up to a node's GPUs for rows of 8192 "
        "tokens or more or when nothing fits without)",
    )
    p.add_argument("--top", type=int, default=20, help="rows per group in the table (0: all)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--json", metavar="FILE", help="also write every layout and the assumptions as JSON")
    return p


def _ints(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} {text}: expected comma-separated integers") from None


def plan_command(argv: list[str]) -> int:
    cli = parser()
    args = cli.parse_intermixed_args(argv)
    if not args.config:
        return config_missing(cli)
    if args.gpus is None or args.gpus < 1:
        raise UsageError("--gpus N: the number of GPUs to plan for (a positive integer) is required")
    # Every flag is checked before any work (the config, the data's vocabulary, the search).
    if not 0 < args.efficiency <= 1:
        raise UsageError(f"--efficiency {args.efficiency:g}: must be in (0, 1] (the achieved fraction of peak)")
    if args.reserve < 0 or args.top < 0 or not 0 <= args.image_fraction <= 1:
        raise UsageError("--reserve and --top must be >= 0 and --image-fraction in [0, 1]")
    latent = _ints(args.latent_shape, "--latent-shape")
    if latent is not None and (len(latent) != 3 or min(latent) < 1):
        raise UsageError(f"--latent-shape {args.latent_shape}: expected C,H,W (three positive integers)")
    micro_batch_sizes = _ints(args.micro_batch_sizes, "--micro-batch-sizes")
    modes = [m.strip() for m in args.recompute.split(",")] if args.recompute else None
    unknown = [m for m in modes or () if m not in RECOMPUTE_MODES]
    if unknown:
        raise UsageError(
            f"--recompute {args.recompute}: {', '.join(unknown)} is not one of {', '.join(RECOMPUTE_MODES)}"
        )
    if micro_batch_sizes is not None and min(micro_batch_sizes) < 1:
        raise UsageError(f"--micro-batch-sizes {args.micro_batch_sizes}: expected positive integers")
    cp_sizes = _ints(args.cp, "--cp")
    if cp_sizes is not None and min(cp_sizes) < 1:
        raise UsageError(f"--cp {args.cp}: expected positive integers (context-parallel sizes, 1 = none)")
    if args.json:  # an output that cannot be written fails now, not after the search
        ensure_writable_file_parent(args.json, "--json")
    from megafusion.planning.hardware import hardware

    hw = hardware(
        args.gpu,
        hbm_gb=args.gpu_memory,
        peak_tflops=args.peak_tflops,
        nvlink_gbps=args.nvlink_gbps,
        nodes_gbps=args.nodes_bandwidth,
        hbm_gbps=args.hbm_gbps,
        gpus_per_node=args.gpus_per_node,
    )
    from megafusion.config import load_config

    cfg = load_config(config_paths(args.config), args.overrides)
    from megafusion.objectives.registry import get_objective

    objective = get_objective(cfg.objective.name)
    if latent is None and objective.image_latents and objective.latent_shape(cfg) is None:
        raise UsageError(
            f"--latent-shape C,H,W is needed: with objective.name={cfg.objective.name} and this config an image's "
            "latent shape depends on the autoencoder (e.g. objective.latent_codec=kl: --latent-shape 8,32,32, "
            "8 channels, 256-pixel images downsampled 8x)"
        )
    if cfg.model.vocab_size is None:  # the data decides it, as in training (megafusion.data.sources)
        from megafusion.data.sources import VOCAB_MULTIPLE, data_vocabulary

        cfg.model.vocab_size, where = data_vocabulary(cfg)
        print(
            f"model.vocab_size={cfg.model.vocab_size}: taken from the data as a run takes it ({where}, "
            f"padded to a multiple of {VOCAB_MULTIPLE})"
        )
    from megafusion.planning.plan import format_table, plan

    try:
        result = plan(
            cfg,
            args.gpus,
            hw,
            params_dtype=args.dtype,
            efficiency=args.efficiency,
            reserve_gb=args.reserve,
            latent_shape=tuple(latent) if latent else None,
            image_fraction=args.image_fraction,
            recompute=modes,
            micro_batch_sizes=micro_batch_sizes,
            cp_sizes=cp_sizes,
        )
    except ValueError as err:  # a config the formulas cannot count (e.g. a latent the patch size does not divide)
        raise UsageError(str(err)) from err
    print(format_table(result, top=args.top or None, markdown=args.markdown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(plan_command, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
