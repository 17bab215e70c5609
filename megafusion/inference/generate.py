"""Text and images from a Transfusion checkpoint (one process): ``Generator``, what ``megafusion
generate`` runs (its command line: :mod:`megafusion.commands.generate`).

    megafusion generate --ckpt CKPT --prompt "a red circle at the top left." [--prompt ...]
        --output DIR [--image] [--sampler ddim|ddpm|euler] [--steps 50] [--cfg 3.0]
        [--max-new-tokens 32] [--temperature 0] [--top-k 0] [--top-p 1] [--seed 0] [--no-kv-cache]

For each prompt: ``<bos>`` + the prompt's pieces, then text is decoded token by token
(greedy, or sampled with ``--temperature``, ``--top-k``, ``--top-p``: text ids and ``<boi>``
only) until ``<eos>``, the token budget, or ``<boi>`` (``--image`` forces ``<boi>`` right
after the prompt; the loop is :class:`~megafusion.inference.decoding.Decoder`'s). On ``<boi>`` the image's placeholder
positions are appended and its latent is sampled by iterative denoising (DDPM / DDIM, or
Euler for flow) with classifier-free guidance: the unconditional branch is the same sequence
with the caption hidden from the patches and from their ``<boi>``, exactly the view caption
dropout trains (no layer of it reads the caption); then
``<eoi>`` follows and text resumes. Images are written as ``DIR/<prompt index>_<image>.png``;
a JSON line per prompt on stdout lists the text and the image files.

KV cache: megatron-core's ``StaticInferenceContext`` holds every layer's keys and values, so a
text step runs one position, and each denoising step runs only the image's ``<boi>`` and patches
against the cached prefix (their slots are overwritten at every step, conditional and
unconditional alike: the two views differ in ``<boi>``'s keys from the second layer on). Once
sampled, the clean image (``t = 0``) is run once more with its ``<boi>`` and ``<eoi>``, so later
text reads the same keys as a full recomputation would give; ``--no-kv-cache`` does that full
recomputation at every step (the reference the cache is tested against).

The checkpoint may come from any parallel layout (dist_checkpointing reshards into TP = PP =
1); any objective whose spec says ``image_latents`` (Transfusion) generates images here (discrete
image tokens: :mod:`megafusion.inference.token_images`).
"""

from __future__ import annotations

import torch

from megafusion.inference.decoding import Decoder
from megafusion.inference.decoding import Sequence as _Sequence  # noqa: F401  (the tests' name for it)


class Generator(Decoder):
    """A Transfusion model (an unwrapped ``TransfusionGPTModel``), its tokenizer and latent codec."""

    bidirectional_images = True  # an image's patches are denoised together

    def __init__(self, cfg, runtime, tokenizer, model, kv_cache: bool = True):
        from megafusion.objectives.transfusion import schedule_for

        super().__init__(cfg, runtime, tokenizer, model, kv_cache)
        self.latent = tokenizer.codec.latent_codec
        self.schedule = schedule_for(cfg.objective)

    @staticmethod
    def generates(objective) -> bool:
        return bool(objective.image_latents)

    # --- one forward pass over the uncached part of a sequence ---------------------------------

    def _forward(self, seq: _Sequence, start: int, cache, current=None, hide: int | None = None):
        """Run positions ``start ..`` of ``seq`` (keys: every position ``<=`` the last one).

        With a ``cache`` the keys and values of positions ``< start`` come from it, and those of
        the run positions are written into it (overwriting, so the denoising steps of one image
        reuse the same slots); without one, ``start`` must be 0. ``current`` = ``(x_t, t)`` of the
        image being denoised (the last span); finished images enter as clean latents at
        ``t = 0``. ``hide`` = index of an image whose patches and ``<boi>`` see no caption (the
        unconditional view, what caption dropout trains). Returns (logits of the last position, image
        predictions of the images in the run part, in order).
        """
        from megafusion.models.transfusion import ImageInputs

        image_ids, mask = self._view(seq, start, hide)
        image_ids = image_ids[:, start:]
        run = [k for k, (a, _) in enumerate(seq.spans) if a >= start]
        images = None
        if run:
            latents, times = [], []
            for k in run:
                x, t = current if current is not None and k == len(seq.spans) - 1 else (seq.latents[k], torch.zeros(1))
                latents.append(x)
                times.append(t.cpu().float().reshape(1))
            device = self.runtime.device
            positions = (image_ids.reshape(-1) >= 0).nonzero().flatten()
            images = ImageInputs(
                image_ids=(image_ids - run[0]).clamp(min=-1).to(device),
                noised=torch.cat(latents).to(device),
                timesteps=torch.cat(times).to(device),
                count=len(run),
                positions=positions.to(device),
            )
        logits, prediction = self._run(seq, start, cache, mask, image_ids, images=images)
        return logits[0, -1], (None if prediction is None else prediction.float())  # the sampler works in fp32

    def image_prediction(self, caption: str, x_t: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
        """The diffusion prediction for the latent ``x_t`` ``[1, C, H, W]`` of an image right
        after ``<bos>`` + ``caption``, at model timestep ``model_t`` ``[1]`` (one full forward)."""
        tok = self.tokenizer
        prompt = [tok.bos_id, *tok.encode_text(caption), tok.boi_id]
        seq = _Sequence(prompt + [tok.image_offset] * self.patches, [(len(prompt), len(prompt) + self.patches)])
        return self._forward(seq, 0, None, current=(x_t, model_t))[1]

    # --- sampling --------------------------------------------------------------------------------

    def _image(self, seq: _Sequence, cache, args, gen):
        """Append the image's placeholders after its ``<boi>``, sample its latent, append ``<eoi>``."""
        from megafusion.objectives.diffusion import make_sampler

        tok = self.tokenizer
        start = len(seq.tokens)
        seq.tokens += [tok.image_offset] * self.patches
        seq.spans.append((start, len(seq.tokens)))
        kind = "euler" if self.schedule.is_flow else args.sampler
        # Pixel latents live in [-1, 1]: clip the x0 estimates there (VAE latents have no fixed range).
        clip = 1.0 if self.cfg.objective.latent_codec == "pixels" else None
        sampler = make_sampler(kind, self.schedule, args.steps, clip_range=clip)
        k, boi, start = len(seq.spans) - 1, seq.spans[-1][0] - 1, 0
        if cache is not None:
            # Bring the cache up to just before the image's <boi>; each denoising step then runs
            # the <boi> (whose keys differ between the two views) and the patches.
            if seq.cached < boi:
                self._forward(seq.prefix(boi), seq.cached, cache)
            seq.cached = start = boi

        def predict(x, t, hide=None):
            return self._forward(seq, start, cache, current=(x, t), hide=hide)[1][-1:].cpu()

        x0 = denoise_image(predict, (1, *self.latent.latent_shape), sampler, gen, args.cfg, k)
        # The cache holds the last denoising step's keys there: the clean image is run again
        # (at t = 0, with its <eoi>) before the next token.
        seq.latents.append(x0)
        seq.tokens.append(tok.eoi_id)
        return self.latent.decode(x0[0].numpy())


def denoise_image(predict, shape, sampler, gen, guidance: float, hide_index: int) -> torch.Tensor:
    """The latent of the newest image: conditional prediction, guided by the caption-hidden one."""
    from megafusion.objectives.diffusion import denoise

    uncond = (lambda x, t: predict(x, t, hide_index)) if guidance != 1.0 else None  # noqa: E731
    return denoise(predict, shape, sampler, gen, guidance_scale=guidance, uncond_fn=uncond)
