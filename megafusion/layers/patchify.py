"""Latent images <-> transformer tokens: patchify, and linear or small-U-Net embed / head.

``patchify`` cuts ``[n, C, H, W]`` into ``p x p`` patches in raster order (row by row) and
flattens each in ``(C, p, p)`` order, i.e. as ``Conv2d(C, D, p, stride=p).weight`` is
flattened, so a ``Linear`` on patches is that convolution. ``unpatchify`` is its exact inverse.

Two ways in and out of the transformer (Transfusion, sec. 3.2):

- ``LinearPatchEmbed`` / ``LinearPatchHead``: a linear layer per patch; the embed adds
  the timestep embedding to every patch vector and, with ``positions="sincos2d"``, DiT's fixed
  2D sine-cosine embedding of the patch's row and column (diffusers' ``get_2d_sincos_pos_embed``).
- ``UNetPatchEmbed`` / ``UNetPatchHead``: diffusers ``DownBlock2D`` / ``UpBlock2D``
  (``ResnetBlock2D`` conditioned on the timestep embedding ``temb``) around the transformer,
  which plays the U-Net's middle block. The head needs the embed's skip activations::

      tokens, skips = embed(latents, temb)      # latents [n, C, H, W] -> tokens [n, (H/p)(W/p), hidden]
      ...                                       # transformer on tokens
      out = head(tokens, skips, temb)           # -> [n, out_channels, H, W]

  With ``channels = (c_0, ..., c_k)``: ``conv_in`` to ``c_0``, then ``k + 1`` down blocks,
  each but the last halving H and W, so the feature map is ``[n, c_k, H/f, W/f]`` with
  ``f = 2^k``; it is patchified with ``p / f`` (``patch_size`` must be a multiple of
  ``f``) and projected to ``hidden``. The head mirrors it (``UNet2DModel``'s layout, no
  middle block). ``skips`` is a tuple of ``(k + 1) * (layers_per_block + 1)`` tensors,
  the first ``[n, c_0, H, W]``; it must come from the same forward as ``tokens``.
  ``unet_skip_shapes`` (also ``embed.skip_shapes`` / ``head.skip_shapes``) gives their
  shapes without running the embed: what a pipeline stage that only holds the head receives
  (``megafusion.runtime.stage_channel``).
"""

from __future__ import annotations

import torch

from megafusion.core.choices import UNET_CHANNELS, UNET_LAYERS_PER_BLOCK

# The U-Net that ``TransfusionGPTModel`` builds (objective.patchify=unet): the widths and layers
# above, and this (``megafusion.accounting`` measures the built modules, so it follows any change).
UNET_NORM_GROUPS = 8


def _check_latents(x: torch.Tensor, p: int):
    if x.ndim != 4:
        raise ValueError(f"latents must be [n, C, H, W], got shape {tuple(x.shape)}")
    _, _, h, w = x.shape
    if h % p or w % p:
        raise ValueError(
            f"latent height {h} and width {w} must be multiples of patch_size {p}: "
            f"pad or resize the image, or pick a patch size that divides both"
        )


def patchify(latents: torch.Tensor, p: int) -> torch.Tensor:
    """``[n, C, H, W] -> [n, (H/p)*(W/p), C*p*p]``; patch ``(i, j)`` is token ``i * W/p + j``."""
    _check_latents(latents, p)
    n, c, h, w = latents.shape
    x = latents.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // p) * (w // p), c * p * p)


def unpatchify(patches: torch.Tensor, p: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Inverse of ``patchify``: ``[n, (H/p)*(W/p), C*p*p] -> [n, C, H, W]``."""
    if height % p or width % p:
        raise ValueError(f"height {height} and width {width} must be multiples of patch_size {p}")
    gh, gw = height // p, width // p
    if patches.ndim != 3 or patches.shape[1:] != (gh * gw, channels * p * p):
        raise ValueError(
            f"patches must be [n, {gh * gw}, {channels * p * p}] for C={channels}, H={height}, "
            f"W={width}, p={p}; got {tuple(patches.shape)}"
        )
    n = patches.shape[0]
    x = patches.reshape(n, gh, gw, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, channels, height, width)


class LinearPatchEmbed(torch.nn.Module):
    """``[n, C, H, W]`` (+ optional ``temb [n, hidden]``) -> ``[n, (H/p)(W/p), hidden]``."""

    def __init__(self, in_channels: int, patch_size: int, hidden_size: int, positions: str = "none"):
        super().__init__()
        self.patch_size = patch_size
        self.positions = positions
        self.proj = torch.nn.Linear(in_channels * patch_size * patch_size, hidden_size)

    def forward(self, latents: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.proj(patchify(latents, self.patch_size).to(self.proj.weight.dtype))
        if temb is not None:
            tokens = tokens + temb.unsqueeze(1)  # the same timestep embedding on every patch
        if self.positions == "sincos2d":
            grid = (latents.shape[2] // self.patch_size, latents.shape[3] // self.patch_size)
            tokens = tokens + _sincos2d(tokens.shape[-1], grid, tokens.device).to(tokens.dtype)
        return tokens


def _sincos2d(hidden: int, grid: tuple[int, int], device) -> torch.Tensor:
    """``[rows * cols, hidden]`` fixed 2D position features in raster order (patch (i, j) = row i * cols + j)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    # base_size = rows: unscaled integer positions, as DiT; diffusers returns rows of the grid's raster order.
    return get_2d_sincos_pos_embed(hidden, grid, base_size=grid[0], device=device, output_type="pt")


class LinearPatchHead(torch.nn.Module):
    """``[n, (H/p)(W/p), hidden] -> [n, out_channels, H, W]``."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.proj = torch.nn.Linear(hidden_size, out_channels * patch_size * patch_size)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return unpatchify(self.proj(tokens), self.patch_size, self.out_channels, height, width)


def _unet_plan(patch_size: int, channels, norm_groups: int) -> tuple[int, int]:
    """(downsampling factor f, inner patch size p / f), with the configuration checked."""
    channels = tuple(channels)
    if not channels:
        raise ValueError("channels must name at least one U-Net block width, e.g. (32, 64)")
    bad = [c for c in channels if c % norm_groups]
    if bad:
        raise ValueError(f"U-Net channels {bad} are not multiples of norm_groups={norm_groups} (GroupNorm)")
    factor = 2 ** (len(channels) - 1)
    if patch_size % factor:
        raise ValueError(
            f"patch_size {patch_size} must be a multiple of the U-Net's downsampling factor {factor} "
            f"(2^(len(channels)-1) for channels={channels}): use fewer blocks or a larger patch"
        )
    return factor, patch_size // factor


def unet_skip_shapes(
    n: int, height: int, width: int, channels=UNET_CHANNELS, layers_per_block: int = UNET_LAYERS_PER_BLOCK
) -> list[tuple[int, ...]]:
    """Shapes of the ``skips`` that ``UNetPatchEmbed(channels=channels, layers_per_block=...)``
    returns for ``n`` latents of ``height x width``, in order: ``conv_in``'s output, then per
    down block its ``layers_per_block`` resnet outputs and (all but the last block) its
    downsampler's output (a 3x3 stride-2 convolution with padding 1: ``ceil(size / 2)``)."""
    channels = tuple(channels)
    shapes, h, w = [(n, channels[0], height, width)], height, width
    for i, c in enumerate(channels):
        shapes += [(n, c, h, w)] * layers_per_block
        if i < len(channels) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((n, c, h, w))
    return shapes


class UNetPatchEmbed(torch.nn.Module):
    """U-Net down blocks, then patchify + Linear: ``latents [n, C, H, W]``, ``temb [n,
    temb_channels]`` -> ``(tokens [n, (H/p)(W/p), hidden], skips)``. See the module docstring.

    ``temb_channels`` defaults to ``hidden_size`` (one ``TimestepEmbedding`` serves the
    transformer and the U-Net).
    """

    def __init__(
        self,
        in_channels: int,
        patch_size: int,
        hidden_size: int,
        channels=UNET_CHANNELS,
        temb_channels: int | None = None,
        layers_per_block: int = UNET_LAYERS_PER_BLOCK,
        norm_groups: int = UNET_NORM_GROUPS,
    ):
        super().__init__()
        self.channels, self.layers_per_block = tuple(channels), layers_per_block
        self.patch_size = patch_size
        self.factor, self.inner_patch = _unet_plan(patch_size, self.channels, norm_groups)
        temb_channels = hidden_size if temb_channels is None else temb_channels
        self.conv_in = torch.nn.Conv2d(in_channels, self.channels[0], kernel_size=3, padding=1)
        from diffusers.models.unets import unet_2d_blocks as unet_blocks  # slow to import: only when used

        blocks, prev = [], self.channels[0]
        for i, c in enumerate(self.channels):
            blocks.append(
                unet_blocks.get_down_block(
                    "DownBlock2D",
                    num_layers=layers_per_block,
                    in_channels=prev,
                    out_channels=c,
                    temb_channels=temb_channels,
                    add_downsample=i < len(self.channels) - 1,
                    resnet_eps=1e-6,
                    resnet_act_fn="silu",
                    resnet_groups=norm_groups,
                    downsample_padding=1,
                    attention_head_dim=1,  # unused by DownBlock2D; set to keep diffusers from warning
                )
            )
            prev = c
        self.down_blocks = torch.nn.ModuleList(blocks)
        self.proj = torch.nn.Linear(self.channels[-1] * self.inner_patch**2, hidden_size)

    def skip_shapes(self, n: int, height: int, width: int) -> list[tuple[int, ...]]:
        """The shapes of ``forward``'s ``skips`` for ``n`` latents of ``height x width``."""
        return unet_skip_shapes(n, height, width, self.channels, self.layers_per_block)

    def forward(self, latents: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        _check_latents(latents, self.patch_size)
        h = self.conv_in(latents.to(self.conv_in.weight.dtype))
        skips = (h,)
        for block in self.down_blocks:
            h, res = block(h, temb)
            skips += res
        return self.proj(patchify(h, self.inner_patch)), skips


class UNetPatchHead(torch.nn.Module):
    """Linear + unpatchify, then U-Net up blocks fed ``skips`` from the matching
    ``UNetPatchEmbed``: ``tokens [n, (H/p)(W/p), hidden]`` -> ``[n, out_channels, H, W]``
    (H and W read from ``skips[0]``). Built with the embed's ``channels``,
    ``layers_per_block`` and ``norm_groups``."""

    def __init__(
        self,
        hidden_size: int,
        patch_size: int,
        out_channels: int,
        channels=UNET_CHANNELS,
        temb_channels: int | None = None,
        layers_per_block: int = UNET_LAYERS_PER_BLOCK,
        norm_groups: int = UNET_NORM_GROUPS,
    ):
        super().__init__()
        self.channels, self.layers_per_block = tuple(channels), layers_per_block
        self.patch_size = patch_size
        self.factor, self.inner_patch = _unet_plan(patch_size, self.channels, norm_groups)
        temb_channels = hidden_size if temb_channels is None else temb_channels
        self.num_skips = len(self.channels) * (layers_per_block + 1)  # conv_in + downsamplers + resnets
        self.proj = torch.nn.Linear(hidden_size, self.channels[-1] * self.inner_patch**2)
        # UNet2DModel's up path: block i reads the skips of down block k-i (plus the
        # downsampler's / conv_in's output), hence layers_per_block + 1 resnets each.
        from diffusers.models.unets import unet_2d_blocks as unet_blocks

        rev = self.channels[::-1]
        blocks, out = [], rev[0]
        for i in range(len(rev)):
            prev, out = out, rev[i]
            skip_in = rev[min(i + 1, len(rev) - 1)]
            blocks.append(
                unet_blocks.get_up_block(
                    "UpBlock2D",
                    num_layers=layers_per_block + 1,
                    in_channels=skip_in,
                    out_channels=out,
                    prev_output_channel=prev,
                    temb_channels=temb_channels,
                    add_upsample=i < len(rev) - 1,
                    resnet_eps=1e-6,
                    resnet_act_fn="silu",
                    resnet_groups=norm_groups,
                    attention_head_dim=1,
                )
            )
        self.up_blocks = torch.nn.ModuleList(blocks)
        self.norm_out = torch.nn.GroupNorm(norm_groups, self.channels[0], eps=1e-6)
        self.act = torch.nn.SiLU()
        self.conv_out = torch.nn.Conv2d(self.channels[0], out_channels, kernel_size=3, padding=1)

    def skip_shapes(self, n: int, height: int, width: int) -> list[tuple[int, ...]]:
        """The shapes of the ``skips`` this head reads for ``n`` images of ``height x width``."""
        return unet_skip_shapes(n, height, width, self.channels, self.layers_per_block)

    def forward(self, tokens: torch.Tensor, skips: tuple[torch.Tensor, ...], temb: torch.Tensor) -> torch.Tensor:
        if len(skips) != self.num_skips:
            raise ValueError(
                f"UNetPatchHead expects the {self.num_skips} skips returned by the matching "
                f"UNetPatchEmbed (same channels / layers_per_block), got {len(skips)}"
            )
        height, width = skips[0].shape[-2:]
        h = unpatchify(
            self.proj(tokens), self.inner_patch, self.channels[-1], height // self.factor, width // self.factor
        )
        skips = tuple(skips)
        for block in self.up_blocks:
            k = len(block.resnets)
            h = block(h, skips[-k:], temb)
            skips = skips[:-k]
        return self.conv_out(self.act(self.norm_out(h)))
