"""Text and images from a Transfusion checkpoint (one process): ``Generator``, what ``megafusion
generate`` runs (its command line: :mod:`megafusion.commands.generate`).

    megafusion generate --ckpt CKPT --prompt "a red circle at the top left." [--prompt ...]
        --output DIR [--image] [--sampler ddim|ddpm|euler] [--steps 50] [--cfg 3.0]
        [--max-new-tokens 32] [--temperature 0] [--seed 0] [--no-kv-cache]

For each prompt: ``<bos>`` + the prompt's pieces, then text is decoded token by token
(greedy, or sampled with ``--temperature``) until ``<eos>``, the token budget, or ``<boi>``
(``--image`` forces ``<boi>`` right after the prompt). On ``<boi>`` the image's placeholder
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
1); any objective whose spec says ``image_latents`` (Transfusion) generates images.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch


def image_checkpoint(ckpt: str, overrides: list[str] | tuple = ()):
    """The checkpoint ``ckpt`` names and its run config (a :class:`~megafusion.inference.load.CheckpointRun`);
    refuses checkpoints whose objective does not sample images."""
    from megafusion import checkpoint as ck
    from megafusion.inference.load import checkpoint_config, objective_names_with
    from megafusion.objectives.registry import get_objective

    source = checkpoint_config(ckpt, overrides)
    name = source.cfg.objective.name
    if not get_objective(name).image_latents:
        able = ", ".join(objective_names_with("image_latents"))
        raise ck.CheckpointError(
            f"{source.path} was trained with objective.name={name!r}; images can only be "
            f"sampled from checkpoints of an objective that generates them ({able})"
        )
    return source


class Generator:
    """A Transfusion model (an unwrapped ``TransfusionGPTModel``), its tokenizer and latent codec."""

    def __init__(self, cfg, runtime, tokenizer, model, kv_cache: bool = True):
        from megafusion.models.registry import causal_routing
        from megafusion.objectives.transfusion import schedule_for

        if not causal_routing(cfg):
            # E.g. expert choice ranks a microbatch's tokens against each other (later ones included):
            # one decoded token would be taken by every expert of its group.
            raise ValueError(
                f"model.arch={cfg.model.arch}: its routing is not causal (a token's computation depends on "
                f"later tokens), so it cannot generate token by token; train it with a causal router "
                f"(MoMa: moe.aux_router=true, or train.trainable=aux_routers from this checkpoint)"
            )

        self.cfg, self.runtime, self.tokenizer, self.model = cfg, runtime, tokenizer, model
        self.kv_cache = kv_cache
        self.latent = tokenizer.codec.latent_codec
        self.schedule = schedule_for(cfg.objective)
        self.patches = tokenizer.codec.tokens_per_image

    @classmethod
    def from_checkpoint(cls, ckpt: str, kv_cache: bool = True) -> Generator:
        from megafusion.inference.load import model_from_checkpoint

        loaded = model_from_checkpoint(image_checkpoint(ckpt), data=True)
        return cls(loaded.cfg, loaded.runtime, loaded.data.tokenizer, loaded.chunks[0], kv_cache)

    # --- one forward pass over the uncached part of a sequence ---------------------------------

    def new_cache(self):
        """A megatron-core static KV cache for one sequence of up to ``model.seq_length`` positions
        (None when the generator recomputes everything)."""
        if not self.kv_cache:
            return None
        from megatron.core.inference.contexts import StaticInferenceContext

        context = StaticInferenceContext(max_batch_size=1, max_sequence_length=self.cfg.model.seq_length)
        # The image head reads every image position's hidden state, not only the last token's.
        context.materialize_only_last_token_logits = False
        return context

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
        from megafusion.core.modality import Modality
        from megafusion.layers.masks import dense_mask
        from megafusion.layers.routing import routing_for
        from megafusion.models.registry import routed as needs_routing
        from megafusion.models.transfusion import ImageInputs

        if cache is None and start:
            raise ValueError("without a KV cache every forward starts at position 0")
        device, s = self.runtime.device, len(seq.tokens)
        image_ids = torch.full((1, s), -1, dtype=torch.int64)
        first_key = torch.zeros_like(image_ids)
        for k, (a, b) in enumerate(seq.spans):
            image_ids[0, a:b] = k
            if k == hide:
                first_key[0, a - 1 : b] = a - 1  # the image's <boi> and patches start at that <boi>
        # The run positions' rows of the full mask, against every key up to the last one.
        mask = dense_mask(torch.zeros_like(image_ids), image_ids, first_key, first_query=start).to(device)
        image_ids = image_ids[:, start:]
        run = [k for k, (a, _) in enumerate(seq.spans) if a >= start]
        images = None
        if run:
            latents, times = [], []
            for k in run:
                x, t = current if current is not None and k == len(seq.spans) - 1 else (seq.latents[k], torch.zeros(1))
                latents.append(x)
                times.append(t.cpu().float().reshape(1))
            positions = (image_ids.reshape(-1) >= 0).nonzero().flatten()
            images = ImageInputs(
                image_ids=(image_ids - run[0]).clamp(min=-1).to(device),
                noised=torch.cat(latents).to(device),
                timesteps=torch.cat(times).to(device),
                count=len(run),
                positions=positions.to(device),
            )
        modality = torch.where(image_ids >= 0, int(Modality.IMAGE), int(Modality.TEXT))
        ids = torch.tensor([seq.tokens[start:]], dtype=torch.int64, device=device)
        position_ids = torch.arange(start, s, device=device)[None]
        routed = needs_routing(self.cfg)
        if cache is not None:
            cache.sequence_len_offset = start
        # Causal routing: each token is routed from its own state, as when it was generated.
        routing = routing_for({"modality_ids": modality}, device, causal=True)
        with torch.no_grad(), routing if routed else contextlib.nullcontext():
            logits, prediction = self.model(
                ids, position_ids, mask, labels=None, images=images, inference_context=cache, runtime_gather_output=True
            )
        return logits[0, -1], (None if prediction is None else prediction.float())  # the sampler works in fp32

    def image_prediction(self, caption: str, x_t: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
        """The diffusion prediction for the latent ``x_t`` ``[1, C, H, W]`` of an image right
        after ``<bos>`` + ``caption``, at model timestep ``model_t`` ``[1]`` (one full forward)."""
        tok = self.tokenizer
        prompt = [tok.bos_id, *tok.encode_text(caption), tok.boi_id]
        seq = _Sequence(prompt + [tok.image_offset] * self.patches, [(len(prompt), len(prompt) + self.patches)])
        return self._forward(seq, 0, None, current=(x_t, model_t))[1]

    # --- sampling --------------------------------------------------------------------------------

    def _next_token(self, logits: torch.Tensor, temperature: float, gen: torch.Generator) -> int:
        logits = logits[: self.tokenizer.vocab_size].float().clone()  # never the vocabulary's padding rows
        logits[self.tokenizer.image_offset] = float("-inf")  # placeholders only follow <boi>
        if temperature <= 0:
            return int(logits.argmax())
        return int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))

    def _image(self, seq: _Sequence, cache, args, gen) -> torch.Tensor:
        """Sample the latent of the last image of ``seq`` (its patches are the last positions)."""
        from megafusion.objectives.diffusion import make_sampler

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

        return denoise_image(predict, (1, *self.latent.latent_shape), sampler, gen, args.cfg, k)

    def generate(self, prompt: str, args, gen: torch.Generator) -> tuple[str, list[np.ndarray]]:
        tok = self.tokenizer
        seq = _Sequence([tok.bos_id, *tok.encode_text(prompt)])
        cache = self.new_cache()
        images, text_ids = [], []
        force_image = args.image
        for _ in range(args.max_new_tokens + 1):
            if force_image:
                token, force_image = tok.boi_id, False
            else:
                logits = self._forward(seq, seq.cached, cache)[0]
                seq.cached = len(seq.tokens) if cache is not None else 0
                token = self._next_token(logits, args.temperature, gen)
            if token == tok.eos_id or len(seq.tokens) >= self.cfg.model.seq_length - self.patches - 2:
                break
            seq.tokens.append(token)
            if token != tok.boi_id:
                text_ids.append(token)
                continue
            start = len(seq.tokens)
            seq.tokens += [tok.image_offset] * self.patches
            seq.spans.append((start, len(seq.tokens)))
            x0 = self._image(seq, cache, args, gen)
            # The cache holds the last denoising step's keys there: the clean image is run again
            # (at t = 0, with its <eoi>) before the next token.
            seq.latents.append(x0)
            images.append(self.latent.decode(x0[0].numpy()))
            seq.tokens.append(tok.eoi_id)
        return tok.decode_text([t for t in text_ids if t < tok.text_vocab_size]), images


@dataclass
class _Sequence:
    """One generation's state: its tokens, image spans ``(start, end)``, finished image latents
    ``[1, C, H, W]``, and how many leading positions hold valid keys in the KV cache."""

    tokens: list[int]
    spans: list[tuple[int, int]] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    cached: int = 0

    def prefix(self, n: int) -> _Sequence:
        """The first ``n`` positions (images that end by then, with their latents)."""
        spans = [span for span in self.spans if span[1] <= n]
        return _Sequence(self.tokens[:n], spans, self.latents[: len(spans)])


def denoise_image(predict, shape, sampler, gen, guidance: float, hide_index: int) -> torch.Tensor:
    """The latent of the newest image: conditional prediction, guided by the caption-hidden one."""
    from megafusion.objectives.diffusion import denoise

    uncond = (lambda x, t: predict(x, t, hide_index)) if guidance != 1.0 else None  # noqa: E731
    return denoise(predict, shape, sampler, gen, guidance_scale=guidance, uncond_fn=uncond)
