"""``[torchrun --nproc-per-node N] python -m megafusion.logits --ckpt CKPT --tokens IN.pt --out OUT.pt
[section.key=value ...]``: the command line of :mod:`megafusion.inference.logits` (full-vocabulary
logits of given token ids from a checkpoint, in any parallel layout).
"""

from __future__ import annotations

import argparse
import sys

from megafusion.commands.main import run
from megafusion.core.errors import DataError

PROG = "megafusion logits"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megafusion.logits", description="logits of token ids")
    p.add_argument("--ckpt", required=True, help="step directory or checkpoint.dir (any layout)")
    p.add_argument("--tokens", required=True, help=".pt file with an int64 tensor [batch, seq]")
    p.add_argument("--out", required=True, help=".pt file for the fp32 logits [batch, seq, vocab]")
    return p


def logits_command(argv: list[str]) -> int:
    args, overrides = _parser().parse_known_args(argv)
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
        torch.save(logits, args.out)
        print(f"[megafusion] logits {tuple(logits.shape)} -> {args.out}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(logits_command, argv, PROG, runtime=True)


if __name__ == "__main__":
    sys.exit(main())
