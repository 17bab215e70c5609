"""``megafusion eval``: the command lines of the evaluations.

    megafusion eval --ckpt CKPT [--samples 60] [--cfg 3.0] [--steps 25] [--sampler ddim]
        [--temperature 0] [--top-k 0] [--top-p 1] [--seed 0] [--output DIR]
    [torchrun --nproc-per-node N -m megafusion] eval --ckpt CKPT --text FILE
        [--tokenizer PATH] [--seq-length N] [--batch 4] [--loss-vocab N] [section.key=value ...]

Without ``--text``: validation loss and caption consistency of a checkpoint trained on the
built-in shapes whose images are generated (Transfusion's latents: ``--steps`` / ``--sampler``;
discrete image tokens of the LM objective: ``--temperature`` / ``--top-k`` / ``--top-p``)
(:mod:`megafusion.evaluation.captions`); with it: the mean next-token loss of
any LM or Transfusion checkpoint on a plain text file (:mod:`megafusion.evaluation.text`). Each
prints one JSON object on stdout. ``--out`` is still accepted for ``--output``.
"""

from __future__ import annotations

import argparse
import json
import sys

from megafusion.commands.generate import IMAGE_SAMPLERS, add_token_sampling, check_sampling
from megafusion.commands.main import run
from megafusion.commands.parsing import add_ckpt, add_output, check_ckpt, command_parser
from megafusion.core.errors import UsageError
from megafusion.core.io import ensure_exists, ensure_writable_dir

PROG = "megafusion eval"
# megafusion.evaluation.text.TOKENIZER_KINDS, spelt out here: importing that module imports torch,
# and `--help` must not.
TOKENIZER_KINDS = "a SentencePiece .model, a Hugging Face tokenizer.json, or the directory holding it"

DESCRIPTION = """\
Evaluate a checkpoint trained on the built-in shapes (Transfusion, or LM with discrete image
tokens): the held-out loss per modality and per data domain, the caption consistency of images generated from
held-out captions (colour, shape, position vs chance) and caption_gap. With --text FILE instead:
the mean next-token loss of any LM or Transfusion checkpoint on a plain text file (options:
megafusion eval --text FILE --help). Prints one JSON object."""

EXAMPLES = (
    "megafusion eval --ckpt runs/tiny_transfusion/checkpoints --samples 90 --sampler ddpm --steps 50",
    "megafusion eval --ckpt runs/tiny_transfusion/checkpoints --output runs/tiny_transfusion/eval_samples",
    "megafusion eval --ckpt runs/tiny_mixed_long/checkpoints --samples 90 --cfg 3",
    "megafusion eval --ckpt runs/llama_init --text sample.txt",
)
TEXT_EXAMPLES = (
    "megafusion eval --ckpt runs/llama_init --text sample.txt",
    "megafusion eval --ckpt runs/llama_init --text sample.txt --tokenizer path/to/Llama-3.2-1B --seq-length 512",
    "torchrun --nproc-per-node 2 -m megafusion eval --ckpt runs/llama_init --text sample.txt parallel.tp=2",
)


def _parser() -> argparse.ArgumentParser:
    p = command_parser(PROG, DESCRIPTION, EXAMPLES)
    add_ckpt(p, "a Transfusion or LM checkpoint trained on data.builtin=shapes")
    p.add_argument("--samples", type=int, default=60, help="generated images to check (default 60)")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps per image (latents; default 25)")
    p.add_argument("--sampler", choices=IMAGE_SAMPLERS, default="ddim", help="denoising sampler (latents)")
    add_token_sampling(p)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    # dest "out": megafusion.evaluation.captions reads args.out.
    add_output(p, "directory to keep the generated PNGs in (default: not kept)", "--out", required=False, dest="out")
    p.add_argument(
        "--text",
        metavar="FILE",
        help="instead: the mean next-token loss on this plain text file "
        "(any LM or Transfusion checkpoint; options: --text FILE --help)",
    )
    return p


def _text_parser() -> argparse.ArgumentParser:
    p = command_parser(
        PROG,
        "The mean next-token loss of a checkpoint (LM or Transfusion, any family) on a plain text file,\n"
        "over non-overlapping --seq-length windows of [bos] + text. Prints one JSON line.",
        TEXT_EXAMPLES,
        "section.key=value: the layout to run in, e.g. parallel.tp=2 parallel.pp=2 (launch the processes\n"
        "with torchrun --nproc-per-node N -m megafusion eval ...).",
        usage="megafusion eval --ckpt CKPT --text FILE [--tokenizer PATH] [--seq-length N] [--batch N] "
        "[--loss-vocab N] [section.key=value ...]",
    )
    add_ckpt(p, "step directory or checkpoint.dir (any layout)")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 plain text file, evaluated as one document")
    p.add_argument("--tokenizer", metavar="PATH", help=f"{TOKENIZER_KINDS} (default: the checkpoint's, if found)")
    p.add_argument(
        "--seq-length", type=int, metavar="N", help="tokens per window (default: the checkpoint's model.seq_length)"
    )
    p.add_argument("--batch", type=int, default=4, metavar="N", help="windows per forward call (default 4)")
    p.add_argument(
        "--loss-vocab",
        type=int,
        metavar="N",
        help="softmax over logit columns [0, N) (default: the HF vocabulary for Hugging Face imports "
        "and their descendants, else every row of the model's vocabulary)",
    )
    return p


def _wants_text(argv: list[str]) -> bool:
    return any(a == "--text" or a.startswith("--text=") for a in argv)


def eval_command(argv: list[str]) -> int:
    if _wants_text(argv):
        return text_command(argv)
    args = _parser().parse_args(argv)
    problems = check_sampling(args)
    if min(args.samples, args.steps) < 1:
        problems.append("--samples and --steps must be >= 1")
    if problems:
        raise UsageError("; ".join(problems))
    if args.out is not None:  # before the checkpoint is loaded: an output that cannot be written fails now
        ensure_writable_dir(args.out, "--output")
    check_ckpt(args.ckpt)
    from megafusion.evaluation.captions import evaluate

    print(json.dumps(evaluate(args), indent=1), flush=True)
    return 0


def text_command(argv: list[str]) -> int:
    """``eval --text``: every input is checked before any process group exists."""
    args, overrides = _text_parser().parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        raise UsageError(f"unknown option(s) {' '.join(unknown)} with --text; see megafusion eval --text FILE --help")
    if args.batch < 1 or (args.seq_length is not None and args.seq_length < 2):
        raise UsageError("--batch must be >= 1 and --seq-length >= 2")
    check_ckpt(args.ckpt)
    ensure_exists(args.text, "--text", "a UTF-8 plain text file", kind="file")
    if args.tokenizer:
        ensure_exists(args.tokenizer, "--tokenizer", TOKENIZER_KINDS)
    from megafusion.evaluation.text import evaluate_text, plan

    result = evaluate_text(plan(args, overrides))
    if result is not None:  # the rank that prints
        print(json.dumps(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(eval_command, argv, PROG, runtime=True)


if __name__ == "__main__":
    sys.exit(main())
