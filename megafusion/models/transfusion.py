"""Transfusion on megatron-core: one ``GPTModel`` that also reads and predicts continuous image patches.

``TransfusionGPTModel`` is megatron-core's ``GPTModel`` (dense or MoT layers, any parallel
layout) plus three small modules (not tensor-parallel: every TP rank computes them in full on
the full sequence, so their gradients agree across TP ranks without communication):

- first pipeline stage: ``image_time_embed`` (timestep embedding) and ``image_patch_embed``
  (linear or U-Net patchify of the *noised* latents, plus the timestep embedding);
- last pipeline stage: ``image_patch_head`` (hidden states of the image positions -> the
  diffusion prediction, e.g. the noise).

With ``objective.patchify=unet`` the head also reads the embed's skip activations and the
timestep embedding. On one stage they are kept on the module between the embed and the head;
with pipeline parallelism the first stage sends them to the last stage, and the last stage
sends their gradients back, over ``megafusion.runtime.stage_channel`` (a point-to-point
channel of its own, outside megatron's schedule; see that module for the protocol). The last
stage then holds no timestep embedding of its own: it uses the first stage's.

Images sit in the token stream as placeholder tokens (``data/transfusion_data.py``). Their
input is the placeholder's embedding *plus* the patch embedding: megatron-core computes the
embeddings (incl. its sequence-parallel scatter) as for any token, and the image
contribution, zero elsewhere, is added in the same layout. On the last stage the hidden
states entering the output layer are captured (a forward pre-hook), gathered to the full
sequence under SP, and the image rows go through the head. The model returns
``(logits, prediction)``; ``prediction`` is None without images or on other stages.

Context parallelism (``parallel.cp`` > 1, :mod:`megafusion.runtime.context_parallel`): the
objective draws noise and timesteps for the whole microbatch before sharding, and every
context-parallel rank embeds every image (the image modules are small); ``_image_delta`` is
made for the whole ``[s, b, h]`` grid and each rank keeps its own rows. An image may straddle
the ranks' chunks, so the head reads whole images: the final hidden states are gathered over the
context-parallel group (backward: reduce-scatter) and put back in row order
(:func:`~megafusion.layers.context_rows.gather_rows`), and every context-parallel rank runs the
head on every image; the objective counts the diffusion loss ``1 / cp`` on each rank (and
reports its sums on context rank 0 only), so the gradients summed over data x context ranks are
one process's.

Patch order: latents are in (row, image) order (``MicrobatchSource``), which is the order in
which a row-by-row scan of the ``[b, s]`` grid meets the images, so ``ImageInputs.positions``
(that scan's image positions, computed on the host) lists patch ``j`` of image ``k`` at
``k * patches + j``: a gather / index_copy, no boolean indexing and no device sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region

from megafusion.layers.context_rows import gather_rows, local_rows
from megafusion.layers.patchify import LinearPatchEmbed, LinearPatchHead, UNetPatchEmbed, UNetPatchHead
from megafusion.layers.timestep import TimestepEmbedding
from megafusion.runtime import stage_channel
from megafusion.runtime.context_parallel import current_shard

IMAGE_MODULES = ("image_time_embed", "image_patch_embed", "image_patch_head")  # attribute names


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
        self.latent_shape, self.patch_size, self.unet = (
            latent_shape,
            objective.latent_patch_size,
            objective.patchify == "unet",
        )
        self._stage_channel = None
        if self.unet and self.pre_process != self.post_process:
            # The U-Net head needs the embed's skip activations and timestep embedding: the first
            # and the last stage exchange them (and their gradients) over the stage channel.
            self._stage_channel = stage_channel.get_channel()
            if self._stage_channel is None:
                raise RuntimeError(
                    "objective.patchify=unet split over pipeline stages needs the stage channel "
                    "between the first and the last stage: build the model after "
                    "megafusion.runtime.initialize(cfg), which opens it when parallel.pp > 1"
                )
        embed, head = (UNetPatchEmbed, UNetPatchHead) if self.unet else (LinearPatchEmbed, LinearPatchHead)
        if self.pre_process:
            self.image_time_embed = TimestepEmbedding(hidden)
            positions = {} if self.unet else {"positions": objective.image_positions}
            self.image_patch_embed = embed(channels, self.patch_size, hidden, **positions)
        if self.post_process:
            self.image_patch_head = head(hidden, self.patch_size, channels)
            self._final_hidden = None
            self.output_layer.register_forward_pre_hook(self._capture_final_hidden)
        # In the transformer's params_dtype (bf16 on GPUs) like every megatron weight: megatron's
        # mixed-precision optimizer keeps the fp32 master copies, and cannot checkpoint a model
        # that mixes fp32 and bf16 parameters. Inputs are cast in; the loss is computed in fp32.
        for name in IMAGE_MODULES:
            if hasattr(self, name):
                getattr(self, name).to(dtype=self.config.params_dtype)

    def _sent_shapes(self, count: int) -> list[tuple[int, ...]]:
        """What crosses the stage channel for ``count`` images: the skips, then ``temb``."""
        _, height, width = self.latent_shape
        module = self.image_patch_embed if self.pre_process else self.image_patch_head
        return [*module.skip_shapes(count, height, width), (count, self.config.hidden_size)]

    def _channel_dtype(self) -> torch.dtype:
        """The image modules' dtype (the same on both ends): what the channel carries."""
        module = self.image_patch_embed if self.pre_process else self.image_patch_head
        return module.proj.weight.dtype

    def _check_sent(self, count: int, skips, temb) -> None:
        # The last stage allocates what it receives from these shapes: a mismatch would hang or
        # corrupt the exchange, so it fails here, on the host, first.
        got, want = [tuple(t.shape) for t in (*skips, temb)], self._sent_shapes(count)
        if got != want:
            raise RuntimeError(
                f"stage channel: the U-Net embed gave skips + temb of shapes {got}, but the last "
                f"stage expects {want} (latent shape {self.latent_shape}, {count} images)"
            )

    def _capture_final_hidden(self, module, args):
        self._final_hidden = args[0]

    def _image_delta(self, images: ImageInputs) -> torch.Tensor:
        """``[s, b, h]``: patch (+ time) embeddings at the image positions, zero elsewhere."""
        temb = self.image_time_embed(images.timesteps)
        noised = images.noised.to(self._channel_dtype())  # fp32 latents into bf16 modules
        if self.unet:
            tokens, skips = self.image_patch_embed(noised, temb)
            if self.post_process:  # the head is on this stage
                self._skips, self._temb = skips, temb
            else:
                self._check_sent(images.count, skips, temb)
                tokens = stage_channel.SendToLastStage.apply(
                    self._stage_channel, self._channel_dtype(), tokens, *skips, temb
                )
        else:
            tokens = self.image_patch_embed(noised, temb)
        b, s = images.image_ids.shape
        flat = torch.zeros(b * s, tokens.shape[-1], dtype=tokens.dtype, device=tokens.device)
        flat = flat.index_copy(0, images.positions, tokens.reshape(-1, tokens.shape[-1]))
        return flat.view(b, s, -1).transpose(0, 1)  # megatron's [s, b, h]

    def forward(
        self, input_ids, position_ids, attention_mask, labels=None, images: ImageInputs | None = None, **kwargs
    ):
        decoder_input = None
        if self.pre_process and images is not None and images.count:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)
            delta = self._image_delta(images).to(decoder_input.dtype)
            shard = current_shard()
            if shard is not None:  # this rank's rows of the whole microbatch's delta
                delta = local_rows(delta, shard)
            if self.config.sequence_parallel:
                delta = scatter_to_sequence_parallel_region(delta)
            decoder_input = decoder_input + delta
        logits = super().forward(
            input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels, **kwargs
        )
        if not self.post_process:
            return logits  # hidden states for the next pipeline stage
        if images is None or not images.count:
            return logits, None
        hidden = self._final_hidden
        self._final_hidden = None
        # Every TP rank runs the head on the full sequence (backward keeps each rank's own slice),
        # and every context-parallel rank on the whole microbatch in row order (backward sums).
        tp_group = ps.get_tensor_model_parallel_group() if self.config.sequence_parallel else None
        hidden = gather_rows(hidden, current_shard(), tp_group, tp_summed=False)
        rows = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1]).index_select(0, images.positions)
        rows = rows.view(images.count, -1, hidden.shape[-1])
        _, height, width = self.latent_shape
        if self.unet:
            if self.pre_process:
                skips, temb = self._skips, self._temb
                self._skips = self._temb = None
            else:  # from the first stage (its forward of this microbatch sent them)
                rows, *received = stage_channel.RecvFromFirstStage.apply(
                    self._stage_channel, self._sent_shapes(images.count), self._channel_dtype(), rows
                )
                skips, temb = tuple(received[:-1]), received[-1]
            prediction = self.image_patch_head(rows, skips, temb)
        else:
            prediction = self.image_patch_head(rows, height, width)
        return logits, prediction
