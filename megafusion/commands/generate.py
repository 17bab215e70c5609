"""``megafusion generate``: the command line of the generators (text and images from a checkpoint):
:class:`megafusion.inference.generate.Generator` for an objective whose images are denoised latents
(Transfusion), :class:`megafusion.inference.token_images.TokenImageGenerator` for one whose images
are discrete tokens (the LM objective, the Chameleon setting); :mod:`megafusion.inference.generators`
picks by asking the checkpoint's objective.

    megafusion generate --ckpt CKPT --prompt "a red circle at the top left." [--prompt ...]
        --output DIR [--image] [--cfg 3.0] [--max-new-tokens 32] [--temperature 0]
        [--top-k 0] [--top-p 1] [--seed 0] [--no-kv-cache] [--sampler ddim|ddpm|euler] [--steps 50]
        [--context "an earlier document." ...]

(``--sampler`` and ``--steps``: the denoising of latents; discrete image tokens are sampled with
``--temperature`` / ``--top-k`` / ``--top-p``, as text is.)

``--context``: texts of earlier documents, each ``<bos> text <eos>``, before every prompt's own
``<bos>``: the multi-document prompt of a checkpoint trained with ``data.attention=causal`` (a
checkpoint whose documents are isolated refuses it: they would change nothing).

Images go to ``DIR/<prompt index>_<image>.png``; one JSON line per prompt on stdout lists the
text and the image files. ``--out`` is still accepted for ``--output``, which is checked to be
writable before the checkpoint is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megafusion.commands.main import run
from megafusion.commands.parsing import add_ckpt, add_output, check_ckpt, command_parser
from megafusion.core.errors import UsageError
from megafusion.core.io import ensure_writable_dir

PROG = "megafusion generate"
# megafusion.objectives.diffusion.make_sampler's kinds (euler: flow schedules, which always use it)
IMAGE_SAMPLERS = ("ddim", "ddpm", "euler")

DESCRIPTION = """\
Generate text, and images on <boi> (or at once with --image), from a Transfusion checkpoint
(images denoised) or an LM checkpoint with discrete image tokens (one image's tokens sampled, then
decoded by the data's codec), both with classifier-free guidance (one process; any layout).
Prints one JSON line per prompt (its text and image files); images go to DIR/<prompt>_<image>.png."""

EXAMPLES = (
    'megafusion generate --ckpt runs/tiny_transfusion/checkpoints --prompt "a red circle at the top left." '
    "--image --sampler ddpm --steps 50 --cfg 3 --output runs/tiny_transfusion/samples",
    'megafusion generate --ckpt runs/tiny_transfusion/checkpoints --prompt "a blue square" --prompt "a green '
    'triangle" --max-new-tokens 16 --output runs/tiny_transfusion/samples',
)


def add_token_sampling(p: argparse.ArgumentParser, temperature: float = 0.0) -> None:
    """``--temperature``, ``--top-k``, ``--top-p``: how a token is drawn (text, and discrete image tokens)."""
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature:g})")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely ids only (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the top-p probability mass only (1 = off)")


def check_sampling(args) -> list[str]:
    """What is wrong with ``--temperature`` / ``--top-k`` / ``--top-p`` (torch-free: before any import)."""
    problems = []
    if args.temperature < 0:
        problems.append(f"--temperature {args.temperature} must be >= 0 (0 = greedy)")
    if args.top_k < 0:
        problems.append(f"--top-k {args.top_k} must be >= 0 (0 = off)")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p {args.top_p} must be in (0, 1] (1 = off)")
    return problems


def _parser() -> argparse.ArgumentParser:
    p = command_parser(PROG, DESCRIPTION, EXAMPLES)
    add_ckpt(p, "a Transfusion or LM checkpoint with images (step directory or checkpoint.dir)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument(
        "--context",
        action="append",
        default=[],
        help="an earlier document's text, placed before every prompt's own document (repeatable, in order; "
        "read by checkpoints trained with data.attention=causal)",
    )
    add_output(p, "directory for the PNG files", "--out")
    p.add_argument("--image", action="store_true", help="start an image right after the prompt")
    p.add_argument("--sampler", choices=IMAGE_SAMPLERS, default="ddim", help="denoising sampler (latent images)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (latent images; default 50)")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    add_token_sampling(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-kv-cache",
        dest="kv_cache",
        action="store_false",
        help="recompute the whole sequence at every step (the reference the cache is tested against)",
    )
    return p


def generate_command(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    problems = check_sampling(args) + (["--steps must be >= 1"] if args.steps < 1 else [])
    if problems:
        raise UsageError("; ".join(problems))
    # Before the checkpoint is loaded: an output that cannot be written fails now.
    ensure_writable_dir(args.output, "--output")
    check_ckpt(args.ckpt)
    import torch
    from PIL import Image

    from megafusion.inference.generators import load_generator

    generator = load_generator(args.ckpt, args.kv_cache)
    if args.context and not generator.cfg.data.cross_document():
        raise UsageError(
            f"--context: {args.ckpt} was trained with data.attention={generator.cfg.data.attention}, so a document "
            "never attends the documents before it and the context would change nothing: drop --context, or use "
            "a checkpoint trained with data.attention=causal"
        )
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for i, prompt in enumerate(args.prompt):
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + i)
        text, images = generator.generate(prompt, args, gen)
        files = []
        for k, image in enumerate(images):
            files.append(str(out / f"{i}_{k}.png"))
            Image.fromarray(image).save(files[-1])
        print(json.dumps({"prompt": prompt, "text": text, "images": files}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(generate_command, argv, PROG, runtime=True)


if __name__ == "__main__":
    sys.exit(main())
