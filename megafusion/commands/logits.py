"""``[torchrun --nproc-per-node N -m] megafusion logits --ckpt CKPT --tokens IN.pt --output OUT.pt
[section.key=value ...]``: the command line of :mod:`megafusion.inference.logits` (full-vocabulary
logits of given token ids from a checkpoint, in any parallel layout). ``--out`` is still accepted
for ``--output``, which is checked to be writable before the checkpoint is loaded.
"""

from __future__ import annotations

import argparse
import sys

from megafusion.commands.main import run
from megafusion.commands.parsing import add_ckpt, add_output, check_ckpt, command_parser
from megafusion.core.errors import DataError
from megafusion.core.io import ensure_exists, ensure_writable_file_parent

PROG = "megafusion logits"

DESCRIPTION = """\
Full-vocabulary logits of given token ids from a checkpoint of any family, loaded into any parallel
layout (section.key=value, e.g. parallel.tp=2; start the processes with torchrun). Writes an fp32
tensor [batch, seq, vocab] with torch.save."""

EXAMPLES = (
    "megafusion logits --ckpt runs/tiny_mixed/checkpoints --tokens ids.pt --output logits.pt",
    "torchrun --nproc-per-node 2 -m megafusion logits --ckpt runs/tiny_mixed/checkpoints --tokens ids.pt "
    "--output logits.pt parallel.tp=2",
)


def _parser() -> argparse.ArgumentParser:
    p = command_parser(
        PROG,
        DESCRIPTION,
        EXAMPLES,
        usage=f"{PROG} [-h] --ckpt CKPT --tokens IN.pt --output OUT.pt [section.key=value ...]",
    )
    add_ckpt(p, "step directory or checkpoint.dir (any layout)")
    p.add_argument("--tokens", required=True, metavar="IN.pt", help=".pt file with an int64 tensor [batch, seq]")
    add_output(p, ".pt file for the fp32 logits [batch, seq, vocab]", "--out", metavar="OUT.pt")
    return p


def logits_command(argv: list[str]) -> int:
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    # The rest are section.key=value overrides; a flag there is a typo, refused before torch is imported.
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # Before the checkpoint is loaded: an output that cannot be written fails now.
    ensure_writable_file_parent(args.output, "--output")
    check_ckpt(args.ckpt)
    ensure_exists(args.tokens, "--tokens", ".pt file with an int64 tensor [batch, seq]", kind="file")
    import torch

    from megafusion.inference.logits import forward_logits, load_model

    tokens = torch.load(args.tokens)
    if tokens.dim() != 2 or tokens.dtype != torch.int64:
        raise DataError(
            f"{args.tokens} must hold an int64 tensor [batch, seq], got {tuple(tokens.shape)} {tokens.dtype}"
        )
    loaded = load_model(args.ckpt, overrides, tokens.shape[1], tokens.shape[0])
    cfg, runtime = loaded.cfg, loaded.runtime
    if int(tokens.max()) >= cfg.model.vocab_size or int(tokens.min()) < 0:
        raise DataError(f"{args.tokens} holds ids outside the model's vocabulary [0, {cfg.model.vocab_size})")
    logits = forward_logits(cfg, runtime, loaded.chunks, tokens)
    if logits is not None and runtime.tp_rank == 0 and runtime.dp_rank == 0:
        torch.save(logits, args.output)
        print(f"[megafusion] logits {tuple(logits.shape)} -> {args.output}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(logits_command, argv, PROG, runtime=True)


if __name__ == "__main__":
    sys.exit(main())
