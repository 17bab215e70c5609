"""``megafusion flops --config FILE [section.key=value ...]``: parameters and model FLOPs of a config.

The report (:mod:`megafusion.accounting.report`) is analytic: nothing is built or run, so it is
instant even for large configs. Its microbatch is the first of the config's own training data
(the synthetic packed documents, the built-in set or an indexed dataset). Without ``--config`` it
prints its help and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from megafusion.commands.main import run
from megafusion.commands.parsing import add_config, command_parser, config_missing, config_paths
from megafusion.core.errors import UsageError

PROG = "megafusion flops"

DESCRIPTION = """\
Parameters (total, embedding, active per token) and model FLOPs per token per modality of a
config, counted analytically on its first training microbatch: nothing is built or run."""

EXAMPLES = (
    "megafusion flops --config examples/configs/tiny_mixed.yaml",
    "megafusion flops --config examples/configs/tiny_mixed.yaml model.arch=mot",
    "megafusion flops --config examples/configs/tiny_transfusion.yaml model.seq_length=256",
)


def parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: `--conf x` is refused, as the hand-written parser this replaced did.
    p = command_parser(PROG, DESCRIPTION, EXAMPLES, allow_abbrev=False)
    add_config(p)
    return p


def representative_batch(cfg) -> tuple[dict, str]:
    """A microbatch to report on, and where it came from."""
    from megafusion.data.sources import build_data

    data = build_data(cfg)
    data.set_model_vocabulary(cfg.model)
    return data.train.microbatch(0, cfg.train.micro_batch_size), data.train.describe()


def flops_command(argv: list[str]) -> int:
    cli = parser()
    args = cli.parse_intermixed_args(argv)
    if not args.config:
        return config_missing(cli)
    from megafusion.config import load_config, validate
    from megafusion.data.paths import check_data_paths

    cfg = load_config(config_paths(args.config), args.overrides)
    # FLOPs do not depend on the layout: validate against the smallest world it accepts.
    p = cfg.parallel
    validate(cfg, world_size=max(1, p.tp * p.pp * p.cp))
    check_data_paths(cfg)  # before torch is imported
    from megafusion.accounting.report import _images, flops_report, summary

    batch, where = representative_batch(cfg)  # first: the data decides the vocabulary
    try:
        report = summary(cfg, _images(batch)["latent_shape"])
        report += f"\nper modality on a representative microbatch ({where}):\n" + flops_report(cfg, batch)
    except ValueError as err:  # a config the formulas cannot count (e.g. a latent the patch size does not divide)
        raise UsageError(str(err)) from err
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(flops_command, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
