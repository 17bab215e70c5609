"""Transfusion on megatron-core: one ``GPTModel`` that also reads and predicts continuous image patches.

``TransfusionGPTModel`` is megatron-core's ``GPTModel`` (dense or MoT layers, any parallel
layout) plus three small modules (not tensor-parallel: every TP rank computes them in full on
the full sequence, so their gradients agree across TP ranks without communication):

- first pipeline stage: ``image_time_embed`` (timestep embedding) and ``image_patch_embed``
  (linear or U-Net patchify of the *noised* latents, plus the timestep embedding);
- last pipeline stage: ``image_patch_head`` (hidden states of the image positions -> the
  diffusion prediction, e.g. the noise).

Images sit in the token stream as placeholder tokens (``data/transfusion_data.py``). Their
input is the placeholder's embedding *plus* the patch embedding: megatron-core computes the
embeddings (incl. its sequence-parallel scatter) as for any token, and the image
contribution, zero elsewhere, is added in the same layout. On the last stage the hidden
states entering the output layer are captured (a forward pre-hook), gathered to the full
sequence under SP, and the image rows go through the head. The model returns
``(logits, prediction)``; ``prediction`` is None without images or on other stages.

Patch order: latents are in (row, image) order (``MicrobatchSource``), which is the order in
which a row-by-row scan of the ``[b, s]`` grid meets the images, so ``ImageInputs.positions``
(that scan's image positions, computed on the host) lists patch ``j`` of image ``k`` at
``k * patches + j``: a gather / index_copy, no boolean indexing and no device sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)

from megafusion.layers.patchify import LinearPatchEmbed, LinearPatchHead, UNetPatchEmbed, UNetPatchHead
from megafusion.layers.timestep import TimestepEmbedding


@dataclass
class ImageInputs:
    """The images of one microbatch, on the model's device."""

    image_ids: torch.Tensor  # [b, s] int64: -1, or the image's number in its row
    noised: torch.Tensor  # [n_images, C, H, W]: x_t, the input of the patch embedding
    timesteps: torch.Tensor  # [n_images] float: what the timestep embedding reads
    count: int  # n_images, known on the host (no device sync to learn it)
    positions: torch.Tensor  # flat indices (row * s + column) of the image patches, in latent order


class TransfusionGPTModel(GPTModel):
    def __init__(self, *args, objective, latent_shape: tuple[int, int, int], **kwargs):
        super().__init__(*args, **kwargs)
        hidden, channels = self.config.hidden_size, latent_shape[0]
        self.latent_shape, self.patch_size, self.unet = latent_shape, objective.latent_patch_size, \
            objective.patchify == "unet"
        if self.unet and not (self.pre_process and self.post_process):
            # The U-Net head needs the embed's skip activations and timestep embedding.
            raise ValueError("objective.patchify=unet needs the whole model on one pipeline stage "
                             "(parallel.pp=1); use objective.patchify=linear with pipeline parallelism")
        embed, head = (UNetPatchEmbed, UNetPatchHead) if self.unet else (LinearPatchEmbed, LinearPatchHead)
        if self.pre_process or self.unet:
            self.image_time_embed = TimestepEmbedding(hidden)
        if self.pre_process:
            self.image_patch_embed = embed(channels, self.patch_size, hidden)
        if self.post_process:
            self.image_patch_head = head(hidden, self.patch_size, channels)
            self._final_hidden = None
            self.output_layer.register_forward_pre_hook(self._capture_final_hidden)

    def _capture_final_hidden(self, module, args):
        self._final_hidden = args[0]

    def _image_delta(self, images: ImageInputs) -> torch.Tensor:
        """``[s, b, h]``: patch (+ time) embeddings at the image positions, zero elsewhere."""
        temb = self.image_time_embed(images.timesteps)
        if self.unet:
            tokens, self._skips = self.image_patch_embed(images.noised, temb)
            self._temb = temb
        else:
            tokens = self.image_patch_embed(images.noised, temb)
        b, s = images.image_ids.shape
        flat = torch.zeros(b * s, tokens.shape[-1], dtype=tokens.dtype, device=tokens.device)
        flat = flat.index_copy(0, images.positions, tokens.reshape(-1, tokens.shape[-1]))
        return flat.view(b, s, -1).transpose(0, 1)  # megatron's [s, b, h]

    def forward(self, input_ids, position_ids, attention_mask, labels=None, images: ImageInputs | None = None,
                **kwargs):
        decoder_input = None
        if self.pre_process and images is not None and images.count:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)
            delta = self._image_delta(images).to(decoder_input.dtype)
            if self.config.sequence_parallel:
                delta = scatter_to_sequence_parallel_region(delta)
            decoder_input = decoder_input + delta
        logits = super().forward(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                                 labels=labels, **kwargs)
        if not self.post_process:
            return logits  # hidden states for the next pipeline stage
        if images is None or not images.count:
            return logits, None
        hidden = self._final_hidden
        self._final_hidden = None
        if self.config.sequence_parallel:
            # Every TP rank runs the head on the full sequence; backward keeps each rank's own slice.
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        rows = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1]).index_select(0, images.positions)
        rows = rows.view(images.count, -1, hidden.shape[-1])
        _, height, width = self.latent_shape
        if self.unet:
            prediction = self.image_patch_head(rows, self._skips, self._temb)
        else:
            prediction = self.image_patch_head(rows, height, width)
        return logits, prediction
