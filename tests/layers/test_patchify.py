"""Patchify / unpatchify, the linear and U-Net patch embeds and heads, timestep embedding."""

from __future__ import annotations

import math

import pytest
import torch

from megafusion.layers.patchify import (
    LinearPatchEmbed,
    LinearPatchHead,
    UNetPatchEmbed,
    UNetPatchHead,
    patchify,
    unpatchify,
)
from megafusion.layers.timestep import TimestepEmbedding


@pytest.mark.parametrize("shape,p", [((2, 3, 8, 8), 2), ((1, 4, 6, 10), 2), ((3, 1, 12, 8), 4), ((2, 5, 3, 7), 1)])
def test_roundtrip_exact(shape, p):
    x = torch.randn(shape)
    n, c, h, w = shape
    tokens = patchify(x, p)
    assert tokens.shape == (n, (h // p) * (w // p), c * p * p)
    assert torch.equal(unpatchify(tokens, p, c, h, w), x)
    assert torch.equal(patchify(unpatchify(tokens, p, c, h, w), p), tokens)


def test_raster_order_by_hand():
    x = torch.arange(4 * 6).reshape(1, 1, 4, 6)  # value = row * 6 + col
    tokens = patchify(x, 2)
    assert tokens.shape == (1, 6, 4)
    assert tokens[0, 0].tolist() == [0, 1, 6, 7]  # patch (0, 0)
    assert tokens[0, 1].tolist() == [2, 3, 8, 9]  # patch (0, 1): along the row first
    assert tokens[0, 3].tolist() == [12, 13, 18, 19]  # patch (1, 0)
    # two channels: channel-major within a patch, as Conv2d's weight is flattened
    x2 = torch.stack([x[0, 0], 100 + x[0, 0]]).unsqueeze(0)
    assert patchify(x2, 2)[0, 0].tolist() == [0, 1, 6, 7, 100, 101, 106, 107]


def test_linear_embed_is_strided_conv():
    embed = LinearPatchEmbed(3, 2, 16)
    conv = torch.nn.Conv2d(3, 16, 2, stride=2)
    with torch.no_grad():
        conv.weight.copy_(embed.proj.weight.reshape(16, 3, 2, 2))
        conv.bias.copy_(embed.proj.bias)
    x = torch.randn(2, 3, 6, 8)
    torch.testing.assert_close(embed(x), conv(x).flatten(2).transpose(1, 2))


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="height 6 and width 7 must be multiples of patch_size 2"):
        patchify(torch.zeros(1, 3, 6, 7), 2)
    with pytest.raises(ValueError, match=r"\[n, C, H, W\]"):
        patchify(torch.zeros(3, 6, 6), 2)
    with pytest.raises(ValueError, match=r"patches must be \[n, 9, 12\]"):
        unpatchify(torch.zeros(1, 8, 12), 2, 3, 6, 6)
    with pytest.raises(ValueError, match="multiple of the U-Net's downsampling factor 4"):
        UNetPatchEmbed(4, 2, 32, channels=(16, 32, 32))
    with pytest.raises(ValueError, match="norm_groups"):
        UNetPatchHead(32, 2, 4, channels=(12, 24))


def test_linear_embed_head_shapes_and_gradients():
    torch.manual_seed(0)
    embed, head = LinearPatchEmbed(4, 2, 32), LinearPatchHead(32, 2, 4)
    x, temb = torch.randn(3, 4, 8, 6), torch.randn(3, 32)
    tokens = embed(x, temb)
    assert tokens.shape == (3, 12, 32)
    torch.testing.assert_close(tokens - embed(x), temb.unsqueeze(1).expand(3, 12, 32))  # on every patch
    out = head(tokens, 8, 6)
    assert out.shape == x.shape
    out.square().sum().backward()
    for name, p in [*embed.named_parameters(), *head.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("channels,patch,layers", [((32, 64), 2, 1), ((16, 32, 32), 4, 2), ((16,), 2, 1)])
def test_unet_embed_head_shapes_and_gradients(channels, patch, layers):
    torch.manual_seed(0)
    hidden = 48
    temb_net = TimestepEmbedding(hidden)
    embed = UNetPatchEmbed(4, patch, hidden, channels=channels, layers_per_block=layers)
    head = UNetPatchHead(hidden, patch, 4, channels=channels, layers_per_block=layers)
    x = torch.randn(2, 4, 8, 12)
    temb = temb_net(torch.tensor([3, 700]))
    tokens, skips = embed(x, temb)
    assert tokens.shape == (2, (8 // patch) * (12 // patch), hidden)
    assert len(skips) == len(channels) * (layers + 1) and skips[0].shape == (2, channels[0], 8, 12)
    # what a last pipeline stage, holding only the head, allocates to receive them
    assert [tuple(s.shape) for s in skips] == embed.skip_shapes(2, 8, 12) == head.skip_shapes(2, 8, 12)
    out = head(tokens, skips, temb)
    assert out.shape == x.shape
    out.square().sum().backward()
    for name, p in [*embed.named_parameters(), *head.named_parameters(), *temb_net.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="skips returned by the matching UNetPatchEmbed"):
        head(tokens, skips[:-1], temb)


def test_unet_head_uses_every_skip():
    torch.manual_seed(0)
    embed, head = UNetPatchEmbed(4, 2, 32), UNetPatchHead(32, 2, 4)
    x, temb = torch.randn(2, 4, 8, 8), torch.randn(2, 32)
    with torch.no_grad():
        tokens, skips = embed(x, temb)
        base = head(tokens, skips, temb)
        for i in range(len(skips)):
            changed = list(skips)
            changed[i] = changed[i] + 1.0
            assert not torch.allclose(head(tokens, tuple(changed), temb), base), f"skip {i} unused"
        assert not torch.allclose(head(tokens, skips, temb + 1.0), base)  # timestep-conditioned


def test_timestep_embedding():
    torch.manual_seed(0)
    emb = TimestepEmbedding(64, frequency_dim=32)
    out = emb(torch.tensor([0, 1, 500, 999]))
    assert out.shape == (4, 64)
    assert all(not torch.allclose(out[i], out[j]) for i in range(4) for j in range(i + 1, 4))
    torch.testing.assert_close(emb(torch.tensor([7.0, 250.5]))[0], emb(torch.tensor([7]))[0])  # int or float
    # features are DiT's timestep_embedding: [cos(t f), sin(t f)], f_i = 10000^(-i / half)
    t = torch.tensor([3.0, 250.5], dtype=torch.float64)
    freqs = torch.exp(-math.log(10000) * torch.arange(16, dtype=torch.float64) / 16)
    args = t[:, None] * freqs[None]
    ref = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    torch.testing.assert_close(emb.frequencies(t.float()).double(), ref, rtol=0, atol=1e-4)
    assert emb.to(torch.bfloat16)(torch.tensor([1, 2])).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"\[n\]"):
        emb(torch.tensor(5))
