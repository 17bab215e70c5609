"""``megafusion generate``: text and images from a Transfusion checkpoint (one process).

    megafusion generate --ckpt CKPT --prompt "a red circle at the top left." [--prompt ...]
        --out DIR [--image] [--sampler ddim|ddpm|euler] [--steps 50] [--cfg 3.0]
        [--max-new-tokens 32] [--temperature 0] [--seed 0]

For each prompt: ``<bos>`` + the prompt's pieces, then text is decoded token by token
(greedy, or sampled with ``--temperature``) until ``<eos>``, the token budget, or ``<boi>``
(``--image`` forces ``<boi>`` right after the prompt). On ``<boi>`` the image's placeholder
positions are appended and its latent is sampled by iterative denoising (DDPM / DDIM, or
Euler for flow) with classifier-free guidance: the unconditional branch is the same sequence
with the caption hidden from the patches, exactly the view caption dropout trains; then
``<eoi>`` follows and text resumes. Images are written as ``DIR/<prompt index>_<image>.png``;
a JSON line per prompt on stdout lists the text and the image files.

The checkpoint may come from any parallel layout (dist_checkpointing reshards into TP = PP =
1). Decoding recomputes the whole sequence at every step (no KV cache yet: fine for the
built-in model sizes, quadratic for long generations).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

IMAGE_SAMPLERS = ("ddim", "ddpm", "euler")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megafusion generate", description="generate text and images")
    p.add_argument("--ckpt", required=True, help="a Transfusion checkpoint (step directory or checkpoint.dir)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    p.add_argument("--out", required=True, help="directory for the PNG files")
    p.add_argument("--image", action="store_true", help="start an image right after the prompt")
    p.add_argument("--sampler", choices=IMAGE_SAMPLERS, default="ddim")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    return p


def load_transfusion_config(ckpt: str):
    """(checkpoint step directory, its config for one process); refuses non-Transfusion checkpoints."""
    from megafusion.config.loader import config_from_dict
    from megafusion.config.schema import ParallelConfig
    from megafusion.training import checkpoint as ck

    path = ck.resolve_checkpoint(ckpt)
    cfg = config_from_dict(ck.read_manifest(path)["config"], source=str(path / ck.MANIFEST))
    if cfg.objective.name != "transfusion":
        raise ck.CheckpointError(f"{path} was trained with objective.name={cfg.objective.name!r}; "
                                 f"images can only be sampled from Transfusion checkpoints")
    cfg.parallel = ParallelConfig()  # dist_checkpointing reshards any layout into one process
    return path, cfg


class Generator:
    """A Transfusion model (an unwrapped ``TransfusionGPTModel``), its tokenizer and latent codec."""

    def __init__(self, cfg, runtime, tokenizer, model):
        from megafusion.objectives.transfusion import schedule_for

        self.cfg, self.runtime, self.tokenizer, self.model = cfg, runtime, tokenizer, model
        self.latent = tokenizer.codec.latent_codec
        self.schedule = schedule_for(cfg.objective)
        self.patches = tokenizer.codec.tokens_per_image

    @classmethod
    def from_checkpoint(cls, ckpt: str) -> "Generator":
        from megafusion.data.sources import build_data
        from megafusion.models.registry import build_model_chunks
        from megafusion.models.transformer_config import build_transformer_config
        from megafusion.runtime import initialize
        from megafusion.training import checkpoint as ck

        path, cfg = load_transfusion_config(ckpt)
        runtime = initialize(cfg)
        data = build_data(cfg)
        cfg.model.vocab_size = data.vocab_size
        latent_shape = data.tokenizer.codec.latent_codec.latent_shape
        model = build_model_chunks(cfg, build_transformer_config(cfg, runtime.device), runtime, latent_shape)[0]
        ck.load_weights(path, [model])
        return cls(cfg, runtime, data.tokenizer, model.eval())

    # --- one forward pass over a sequence ------------------------------------------------------

    def _forward(self, tokens: list[int], image_spans: list[tuple[int, int]], latents: torch.Tensor | None,
                 t: torch.Tensor | None, hide_caption_of: int | None = None):
        """(logits of the last position, prediction of the last image); ``image_spans`` = (start, end)."""
        from megafusion.data.types import Modality
        from megafusion.layers.masks import dense_mask
        from megafusion.models.transfusion import ImageInputs
        from megafusion.training.forward_step import routing_for

        device, s = self.runtime.device, len(tokens)
        ids = torch.tensor([tokens], dtype=torch.int64)
        image_ids = torch.full((1, s), -1, dtype=torch.int64)
        for k, (a, b) in enumerate(image_spans):
            image_ids[0, a:b] = k
        first_key = torch.zeros_like(image_ids)
        if hide_caption_of is not None:  # the unconditional view: what caption dropout trains
            a, b = image_spans[hide_caption_of]
            first_key[0, a:b] = a - 1
        modality = torch.where(image_ids >= 0, int(Modality.IMAGE), int(Modality.TEXT))
        mask = dense_mask(torch.zeros_like(ids), image_ids, first_key).to(device)
        images = None
        if image_spans:
            positions = (image_ids.reshape(-1) >= 0).nonzero().flatten()
            images = ImageInputs(image_ids=image_ids.to(device), noised=latents.to(device),
                                 timesteps=t.to(device), count=len(image_spans), positions=positions.to(device))
        routed = self.cfg.model.arch == "mot"
        with torch.no_grad(), (routing_for({"modality_ids": modality}, device) if routed else contextlib.nullcontext()):
            position_ids = torch.arange(s)[None].to(device)
            logits, prediction = self.model(ids.to(device), position_ids, mask, labels=None, images=images)
        return logits[0, -1], prediction

    # --- sampling --------------------------------------------------------------------------------

    def _next_token(self, logits: torch.Tensor, temperature: float, gen: torch.Generator) -> int:
        logits = logits[: self.tokenizer.vocab_size].float().clone()  # never the vocabulary's padding rows
        logits[self.tokenizer.image_offset] = float("-inf")  # placeholders only follow <boi>
        if temperature <= 0:
            return int(logits.argmax())
        return int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))

    def _image(self, tokens, spans, latents, args, gen):
        from megafusion.objectives.diffusion import make_sampler

        kind = "euler" if self.schedule.is_flow else args.sampler
        # Pixel latents live in [-1, 1]: clip the x0 estimates there (VAE latents have no fixed range).
        clip = 1.0 if self.cfg.objective.latent_codec == "pixels" else None
        sampler = make_sampler(kind, self.schedule, args.steps, clip_range=clip)
        k = len(spans) - 1

        def predict(x, t, hide=None):
            stacked = torch.cat([latents, x]) if latents is not None else x
            times = torch.cat([torch.zeros(k), t.cpu()]) if k else t.cpu()
            return self._forward(tokens, spans, stacked, times, hide)[1][-1:].cpu()

        return denoise_image(predict, (1, *self.latent.latent_shape), sampler, gen, args.cfg, k)

    def generate(self, prompt: str, args, gen: torch.Generator) -> tuple[str, list[np.ndarray]]:
        tok = self.tokenizer
        tokens = [tok.bos_id, *tok.encode_text(prompt)]
        spans: list[tuple[int, int]] = []
        latents, images, text_ids = None, [], []
        force_image = args.image
        for _ in range(args.max_new_tokens + 1):
            if force_image:
                token, force_image = tok.boi_id, False
            else:
                token = self._next_token(self._forward(tokens, spans, latents, self._clean_times(spans))[0],
                                         args.temperature, gen)
            if token == tok.eos_id or len(tokens) >= self.cfg.model.seq_length - self.patches - 2:
                break
            tokens.append(token)
            if token != tok.boi_id:
                text_ids.append(token)
                continue
            start = len(tokens)
            tokens += [tok.image_offset] * self.patches
            spans.append((start, len(tokens)))
            x0 = self._image(tokens, spans, latents, args, gen)
            latents = x0 if latents is None else torch.cat([latents, x0])
            images.append(self.latent.decode(x0[0].numpy()))
            tokens.append(tok.eoi_id)
        return tok.sp.decode([t for t in text_ids if t < tok.text_vocab_size]), images

    @staticmethod
    def _clean_times(spans) -> torch.Tensor | None:
        """Finished images are clean context: timestep 0."""
        return torch.zeros(len(spans)) if spans else None


def denoise_image(predict, shape, sampler, gen, guidance: float, hide_index: int) -> torch.Tensor:
    """The latent of the newest image: conditional prediction, guided by the caption-hidden one."""
    from megafusion.objectives.diffusion import denoise

    uncond = (lambda x, t: predict(x, t, hide_index)) if guidance != 1.0 else None  # noqa: E731
    return denoise(predict, shape, sampler, gen, guidance_scale=guidance, uncond_fn=uncond)


def main(argv: list[str] | None = None) -> int:
    from megafusion.config import ConfigError
    from megafusion.data.types import DataError
    from megafusion.runtime import shutdown
    from megafusion.training.checkpoint import CheckpointError

    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.steps < 1:
        print("megafusion generate: --steps must be >= 1", file=sys.stderr)
        return 2
    try:
        generator = Generator.from_checkpoint(args.ckpt)
    except (CheckpointError, ConfigError, DataError) as err:
        print(f"megafusion generate: {err}", file=sys.stderr)
        return 2
    try:
        from PIL import Image

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for i, prompt in enumerate(args.prompt):
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + i)
            text, images = generator.generate(prompt, args, gen)
            files = []
            for k, image in enumerate(images):
                files.append(str(out / f"{i}_{k}.png"))
                Image.fromarray(image).save(files[-1])
            print(json.dumps({"prompt": prompt, "text": text, "images": files}), flush=True)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
