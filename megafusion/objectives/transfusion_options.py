"""Transfusion's config keys and checks (torch-free; :mod:`megafusion.core.options`): its keys join
the ``objective`` section (``objective.diffusion_weight``, ...). The objective itself is
:mod:`megafusion.objectives.transfusion`."""

from __future__ import annotations

from dataclasses import dataclass

from megafusion.config.checks import at_least, near, one_of
from megafusion.core.choices import LATENT_CODECS, UNET_CHANNELS
from megafusion.core.options import Options
from megafusion.objectives.caption_options import CaptionDropoutConfig, caption_dropout_problems

DEFAULT_CAPTION_DROPOUT = 0.1  # objective.caption_dropout=null: the Transfusion paper's rate


@dataclass
class TransfusionConfig(CaptionDropoutConfig):
    # Text keeps the next-token loss, images are continuous latents trained with a diffusion loss
    # in the same sequence (data.source=builtin, or indexed from `data prepare --latent-codec`).
    diffusion_weight: float = 5.0  # lambda in loss = LM + lambda * diffusion (Transfusion: 5)
    noise_schedule: str = "cosine"  # cosine|linear (diffusers DDPMScheduler betas)
    prediction: str = "epsilon"  # epsilon|v_prediction|sample (x0)|flow
    train_timesteps: int = 1000
    latent_codec: str = "pixels"  # pixels (the image in [-1, 1]) | kl (a local diffusers AutoencoderKL)
    vae_path: str | None = None  # latent_codec=kl: the AutoencoderKL directory (save_pretrained)
    latent_patch_size: int = 2  # one sequence position per latent_patch_size^2 latent patch
    patchify: str = "linear"  # linear|unet (the paper's U-Net down/up blocks)
    # none: a patch knows where it sits only through the sequence's 1D RoPE positions; sincos2d:
    # DiT's fixed 2D sine-cosine embedding of the patch's row and column is added to every patch
    # (objective.patchify=linear; no parameters).
    image_positions: str = "none"
    # Images with no text before them in their document get timesteps <= this (Transfusion: 500
    # of 1000), so that captioning an image trains on mostly-clean images; -1 = no cap.
    uncaptioned_max_t: int = 500
    # objective.caption_dropout (megafusion.objectives.caption_options) is inherited: here its
    # null default means DEFAULT_CAPTION_DROPOUT.


def transfusion_problems(cfg) -> list[str]:
    o, d = cfg.objective, cfg.data
    problems = []
    for key, v, allowed in [
        ("objective.noise_schedule", o.noise_schedule, ("cosine", "linear")),
        ("objective.prediction", o.prediction, ("epsilon", "v_prediction", "sample", "flow")),
        ("objective.latent_codec", o.latent_codec, LATENT_CODECS),
        ("objective.patchify", o.patchify, ("linear", "unet")),
        ("objective.image_positions", o.image_positions, ("none", "sincos2d")),
    ]:
        problems += one_of(key, v, allowed)
    problems += at_least("objective.train_timesteps", o.train_timesteps, 2)
    problems += at_least("objective.latent_patch_size", o.latent_patch_size, 1)
    if o.diffusion_weight < 0:
        problems.append(f"objective.diffusion_weight={o.diffusion_weight} must be >= 0: e.g. 5.0 (Transfusion)")
    if d.source == "synthetic":
        problems.append(
            f"objective.name={o.name} needs images, and data.source=synthetic has none: set "
            "data.source=builtin, or data.source=indexed with a dataset from `megafusion data "
            "prepare ... --latent-codec pixels|kl`"
        )
    problems += caption_dropout_problems(cfg)
    if not -1 <= o.uncaptioned_max_t < o.train_timesteps:
        problems.append(
            f"objective.uncaptioned_max_t={o.uncaptioned_max_t} must be -1 (no cap) or a timestep "
            f"below objective.train_timesteps={o.train_timesteps}, e.g. {o.train_timesteps // 2}"
        )
    if o.latent_codec == "kl" and not o.vae_path:
        problems.append(
            "objective.latent_codec=kl needs objective.vae_path: the directory of a diffusers "
            "AutoencoderKL saved with save_pretrained"
        )
    factor = 2 ** (len(UNET_CHANNELS) - 1)  # the U-Net's downsampling inside each patch
    if o.patchify == "unet" and o.latent_patch_size >= 1 and o.latent_patch_size % factor:
        problems.append(
            f"objective.latent_patch_size={o.latent_patch_size} must be a multiple of {factor} with "
            f"objective.patchify=unet (its U-Net halves the latent {len(UNET_CHANNELS) - 1} time(s) "
            f"inside each patch): set it to {near(o.latent_patch_size, factor)}, or use "
            f"objective.patchify=linear"
        )
    if o.image_positions != "none" and o.patchify != "linear":
        problems.append(
            f"objective.image_positions={o.image_positions} is added by the linear patch embedding: use it "
            f"with objective.patchify=linear, or set objective.image_positions=none (the U-Net's "
            f"convolutions see the 2D layout)"
        )
    if o.latent_codec == "pixels" and o.latent_patch_size >= 1 and d.image_size % o.latent_patch_size:
        problems.append(
            f"objective.latent_patch_size={o.latent_patch_size} does not divide data.image_size="
            f"{d.image_size} (pixel latents are the image): choose a divisor of {d.image_size}"
        )
    return problems


OPTIONS = Options(sections={"objective": TransfusionConfig}, problems=transfusion_problems)
