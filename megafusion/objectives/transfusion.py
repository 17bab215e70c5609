"""The Transfusion objective for one microbatch: image noise, model inputs, and the combined loss.

``loss = LM + lambda * diffusion`` (Zhou et al., arXiv 2408.11039), both averaged over the
*global* batch exactly, whatever the layout: megatron-core divides the returned sum by the
step's LM-token count ``T`` (``calculate_per_token_loss``), so the diffusion sum enters as
``lambda * diffusion_sum * T / E``, with ``E`` the step's diffusion elements; the trainer
counts ``T`` and ``E`` on the host for the whole global batch (``step_lm_tokens`` and
``step_image_elements`` in every microbatch).

An image with no text before it in its document (image first, then its caption) gets
timesteps ``<= objective.uncaptioned_max_t`` (Transfusion: 500 of 1000): captioning is
learnt from mostly clean images. Noise and timesteps of image ``k`` of sample ``i`` come from
a generator keyed by ``(seed, i, k)``: every pipeline stage of every layout draws the same
numbers for the same image, which is what lets TP / PP / DP runs match one process.
"""

from __future__ import annotations

import functools

import torch

from megafusion.models.transfusion import IMAGE_MODULES, ImageInputs
from megafusion.objectives.caption_options import caption_dropout_rate
from megafusion.objectives.captions import caption_dropout, captioned, image_generator
from megafusion.objectives.diffusion import NoiseSchedule, diffusion_loss_sums
from megafusion.objectives.spec import Objective
from megafusion.objectives.transfusion_options import DEFAULT_CAPTION_DROPOUT, OPTIONS

DIFFUSION_FIELDS = ("diffusion", "diffusion_elements")


def schedule_for(objective) -> NoiseSchedule:
    return _schedule(objective.noise_schedule, objective.train_timesteps, objective.prediction)


@functools.lru_cache(maxsize=8)
def _schedule(kind: str, timesteps: int, prediction: str) -> NoiseSchedule:
    # One per setting: the forward step asks for it every microbatch, and building diffusers'
    # scheduler each time would be host work on the step's critical path.
    return NoiseSchedule(kind, timesteps, prediction)


def attended_keys(batch: dict, cross_document: bool = False) -> torch.Tensor:
    """Keys per query ``[b, s]`` under the Transfusion mask with the batch's caption dropout
    (``cross_document``: ``data.attention=causal``; a dropped image sees the same keys in both)."""
    from megafusion.layers.attended_keys import attended_keys as mixed_keys

    image_ids = batch["image_ids"]
    keys = mixed_keys(batch["document_ids"], image_ids, cross_document)
    dropped = batch["first_key"] > 0
    if dropped.any():
        # A dropped patch sees <bos>, <boi> and every patch of its image; a dropped <boi> sees
        # <bos> and itself.
        size = torch.zeros_like(keys)
        for row in range(keys.shape[0]):
            ids = image_ids[row]
            counts = torch.bincount(ids[ids >= 0])
            size[row][ids >= 0] = counts[ids[ids >= 0]]
        keys = torch.where(dropped, torch.where(image_ids >= 0, size + 2, 2), keys)
    return keys


def noised_images(batch: dict, schedule: NoiseSchedule, seed: int, device: torch.device, uncaptioned_max_t: int = -1):
    """``(ImageInputs, target)`` for the microbatch's images (``target`` ``[n, C, H, W]``)."""
    image_ids, latents = batch["image_ids"], batch["latents"]
    counts = (image_ids.max(dim=1).values + 1).tolist()  # host tensors: no device sync
    noise, steps = [], []
    for row, count in enumerate(counts):
        for k in range(count):
            gen = image_generator(seed, int(batch["sample_ids"][row]), k)
            cap = None if uncaptioned_max_t < 0 or captioned(batch, row, k) else uncaptioned_max_t
            steps.append(schedule.sample_timesteps(1, generator=gen, max_t=cap))
            noise.append(torch.randn(latents.shape[1:], generator=gen))
    n = len(noise)
    if n:
        noise, t = torch.stack(noise), torch.cat(steps)
    else:
        noise, t = torch.zeros_like(latents), schedule.sample_timesteps(0)
    x0 = latents.float()
    noised, target = schedule.add_noise(x0, noise, t), schedule.target(x0, noise, t)
    positions = (image_ids.reshape(-1) >= 0).nonzero().flatten()
    images = ImageInputs(
        image_ids=image_ids.to(device),
        noised=noised.to(device),
        timesteps=schedule.model_timesteps(t).to(device),
        count=n,
        positions=positions.to(device),
    )
    return images, target.to(device)


def combined_loss(
    lm_total: torch.Tensor, prediction, target, weight: float, step_lm_tokens: float, step_image_elements: float
):
    """``(loss sum for megatron, diffusion sum, diffusion elements)`` of one microbatch."""
    if prediction is None:
        zero = lm_total.new_zeros(())
        return lm_total, zero, zero
    sums = diffusion_loss_sums(prediction.float(), target.float())
    if step_lm_tokens <= 0:
        raise ValueError(
            "a Transfusion step without any text token to predict cannot be normalised: "
            "every document needs a caption (the LM loss averages over text tokens)"
        )
    scale = weight * step_lm_tokens / step_image_elements
    return lm_total + scale * sums["diffusion"], sums["diffusion"].detach(), sums["elements"].float()


class Transfusion(Objective):
    """LM loss on text + ``objective.diffusion_weight`` x diffusion loss on the image latents,
    with the image modules of :class:`~megafusion.models.transfusion.TransfusionGPTModel`."""

    name = "transfusion"
    options = OPTIONS
    report_fields = DIFFUSION_FIELDS
    extra_modules = IMAGE_MODULES
    module_stages = {"image_time_embed": "first", "image_patch_embed": "first", "image_patch_head": "last"}
    image_latents = True

    def model_class(self, cfg, latent_shape):
        from megafusion.models.transfusion import TransfusionGPTModel

        size = cfg.data.image_size
        return TransfusionGPTModel, {"objective": cfg.objective, "latent_shape": tuple(latent_shape or (3, size, size))}

    def needs_stage_channel(self, cfg) -> bool:
        # The U-Net head reads the embed's skips and timestep embedding from the first stage.
        return cfg.objective.patchify == "unet"

    def manifest_key(self, cfg) -> str:
        o = cfg.objective
        positions = "" if o.image_positions == "none" else f":{o.image_positions}"
        return f"{o.name}:{o.patchify}:{o.latent_codec}:patch{o.latent_patch_size}{positions}"

    def prepare_step(self, cfg, source, first_sample, batches, training):
        # The two loss normalisers of the whole global batch (all DP ranks), counted on the host.
        step = source.microbatch(first_sample, cfg.train.global_batch_size)
        counts = {
            "step_lm_tokens": float(step["loss_mask"].sum()),
            "step_image_elements": float(step["latents"][0].numel() * step["latents"].shape[0])
            if step["latents"].shape[0]
            else 0.0,
        }
        # Caption dropout trains the unconditional branch; evaluation keeps every caption.
        rate = caption_dropout_rate(cfg.objective, DEFAULT_CAPTION_DROPOUT) if training else 0.0
        for batch in batches:
            batch.update(counts, first_key=caption_dropout(batch, cfg.train.seed, rate))

    def forward_inputs(self, cfg, batch, device):
        o = cfg.objective
        images, target = noised_images(batch, schedule_for(o), cfg.train.seed, device, o.uncaptioned_max_t)
        return {"images": images}, (target, o.diffusion_weight, batch["step_lm_tokens"], batch["step_image_elements"])

    def loss(self, lm_total, extra_output, context):
        total, diffusion, elements = combined_loss(lm_total, extra_output, *context)
        return total, torch.stack([diffusion, elements])

    def metrics(self, sums, prefix):
        if sums["diffusion_elements"] > 0:
            return {f"{prefix}/diffusion": sums["diffusion"] / sums["diffusion_elements"]}
        return {}

    def flops_inputs(self, batch, cross_document=False):
        if "first_key" in batch:
            out = {"keys": attended_keys(batch, cross_document)}
        else:
            out = super().flops_inputs(batch, cross_document)
        if "latents" in batch:
            out["num_images"] = batch["latents"].shape[0]
        return out

    def accounting_modules(self, cfg, latent_shape):
        """The image modules of one model on the meta device (no memory, no init), each with one
        image's forward as the model runs it: the noised latent and the sinusoidal features are
        data (no gradient); ``temb``, the head's tokens and the U-Net's skips carry one."""
        from megafusion.core.choices import UNET_CHANNELS, UNET_LAYERS_PER_BLOCK
        from megafusion.layers.patchify import (
            LinearPatchEmbed,
            LinearPatchHead,
            UNetPatchEmbed,
            UNetPatchHead,
            unet_skip_shapes,
        )
        from megafusion.layers.timestep import TimestepEmbedding

        o, hidden = cfg.objective, cfg.model.hidden_size
        if latent_shape is None and o.latent_codec != "pixels":
            raise ValueError(
                f"objective.latent_codec={o.latent_codec!r}: the latent shape depends on the autoencoder; pass "
                f"latent_shape (the codec's latent_shape, e.g. data.tokenizer.codec.latent_codec"
                f".latent_shape) to count the image modules"
            )
        channels, height, width = latent_shape or self.latent_shape(cfg)
        p, unet = o.latent_patch_size, o.patchify == "unet"
        if p < 1 or height % p or width % p:  # before the forward, whose own check speaks of tensor shapes
            raise ValueError(
                f"a latent of height {height} and width {width} cannot be cut into {p}x{p} patches: "
                "the patch size must divide both"
            )
        meta = torch.device("meta")
        with meta:
            time_embed = TimestepEmbedding(hidden)
            embed = (UNetPatchEmbed if unet else LinearPatchEmbed)(channels, p, hidden)
            head = (UNetPatchHead if unet else LinearPatchHead)(hidden, p, channels)

        def grad(*shape):
            return torch.empty(shape, device=meta, requires_grad=True)

        latent, temb = torch.empty(1, channels, height, width, device=meta), grad(1, hidden)
        tokens = grad(1, (height // p) * (width // p), hidden)
        if unet:
            skips = [grad(*shape) for shape in unet_skip_shapes(1, height, width, UNET_CHANNELS, UNET_LAYERS_PER_BLOCK)]
            run_head = lambda: head(tokens, skips, temb)  # noqa: E731
        else:
            run_head = lambda: head(tokens, height, width)  # noqa: E731
        return {
            "image_time_embed": (time_embed, lambda: time_embed(torch.zeros(1, device=meta))),
            "image_patch_embed": (embed, lambda: embed(latent, temb)),
            "image_patch_head": (head, run_head),
        }

    def latent_shape(self, cfg):
        """Pixel latents are the image, ``(3, S, S)``; a ``kl`` latent's shape is the autoencoder's."""
        size = cfg.data.image_size
        return (3, size, size) if cfg.objective.latent_codec == "pixels" else None

    def activation_bytes_per_image_token(self, cfg, latent_shape, element_bytes):
        """First stage: the patch ``C p^2`` and the patch embedding's output ``h`` (element bytes)
        and its index (8); last stage: the head's input ``h``."""
        channels = (latent_shape or self.latent_shape(cfg) or (3,))[0]
        h, p = cfg.model.hidden_size, cfg.objective.latent_patch_size
        return {"first": element_bytes * (channels * p**2 + h) + 8, "last": element_bytes * h}


OBJECTIVE = Transfusion()
