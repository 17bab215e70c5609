"""``megafusion generate``: the command line of
:class:`megafusion.inference.generate.Generator` (text and images from a Transfusion checkpoint).

    megafusion generate --ckpt CKPT --prompt "a red circle at the top left." [--prompt ...]
        --output DIR [--image] [--sampler ddim|ddpm|euler] [--steps 50] [--cfg 3.0]
        [--max-new-tokens 32] [--temperature 0] [--seed 0] [--no-kv-cache]

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
Generate text, and images on <boi> (or at once with --image), from a Transfusion checkpoint:
images are denoised with classifier-free guidance (one process; a checkpoint of any layout).
Prints one JSON line per prompt (its text and image files); images go to DIR/<prompt>_<image>.png."""

EXAMPLES = (
    'megafusion generate --ckpt runs/tiny_transfusion/checkpoints --prompt "a red circle at the top left." '
    "--image --sampler ddpm --steps 50 --cfg 3 --output runs/tiny_transfusion/samples",
    'megafusion generate --ckpt runs/tiny_transfusion/checkpoints --prompt "a blue square" --prompt "a green '
    'triangle" --max-new-tokens 16 --output runs/tiny_transfusion/samples',
)


def _parser() -> argparse.ArgumentParser:
    p = command_parser(PROG, DESCRIPTION, EXAMPLES)
    add_ckpt(p, "a Transfusion checkpoint (step directory or checkpoint.dir)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    add_output(p, "directory for the PNG files", "--out")
    p.add_argument("--image", action="store_true", help="start an image right after the prompt")
    p.add_argument("--sampler", choices=IMAGE_SAMPLERS, default="ddim")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
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
    if args.steps < 1:
        raise UsageError("--steps must be >= 1")
    # Before the checkpoint is loaded: an output that cannot be written fails now.
    ensure_writable_dir(args.output, "--output")
    check_ckpt(args.ckpt)
    import torch
    from PIL import Image

    from megafusion.inference.generate import Generator

    generator = Generator.from_checkpoint(args.ckpt, args.kv_cache)
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
