"""FLOPs and parameters of Transfusion's image modules, against independent references.

The accounting's per-layer counts (:mod:`megafusion.accounting.image_modules`: forward hooks on
the modules built on the meta device, one image through them) are checked against torch's
``FlopCounterMode`` around the forward and the backward of the real (CPU, random) modules
(``TimestepEmbedding``, ``Linear``/``UNet`` patch embed and head) at tiny sizes, layer by layer, and
around a whole ``TransfusionGPTModel``; parameter counts against ``numel`` of the real modules and
of a built model. FlopCounterMode counts ``mm`` / ``addmm`` / ``convolution``
(and their backward) only, like the closed forms; the layers that read data (the noised
latents, the sinusoidal features) get no input gradient in the real backward, so the inputs
here are made exactly as the model makes them: data without gradient, ``temb``, tokens and
skips with one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megafusion.accounting import flops, image_modules
from megafusion.accounting import params as acc_params
from megafusion.accounting import recompute as R
from megafusion.accounting.report import _n, flops_report, summary
from megafusion.config import Config
from megafusion.core.modality import Modality
from megafusion.layers import attended_keys as attended
from megafusion.layers.patchify import (
    LinearPatchEmbed,
    LinearPatchHead,
    UNetPatchEmbed,
    UNetPatchHead,
    unet_skip_shapes,
)
from megafusion.layers.routing import routing_for
from megafusion.layers.timestep import TimestepEmbedding
from megafusion.models import transfusion as transfusion_model
from megafusion.models.transformer_config import build_transformer_config
from megafusion.models.transfusion import ImageInputs
from megafusion.objectives.build import build_model_chunks
from megafusion.objectives.registry import get_objective

CONV_OPS = ("aten.convolution", "aten.convolution_backward")


def measure(forward, loss):
    """FlopCounterMode around ``forward()`` alone, and around ``loss(forward()).backward()``.

    One counter spans forward and backward: it attributes the backward to modules through the
    hooks it set in the forward."""
    fwd, train = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with fwd:
        forward()
    with train:
        loss(forward()).backward()
    return fwd, train


def per_module(counter) -> dict[str, int]:
    """FLOPs per module name (``Class.sub.module``, as FlopCounterMode names them)."""
    return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


def meta_layers(make, run):
    """The accounting's layers of the module ``make()`` builds on the meta device, for one image
    through ``run(module)`` (data inputs without gradient, the others with one, as in the model)."""
    with torch.device("meta"):
        module = make()
    return image_modules.module_layers(module, lambda: run(module))


def _meta(*shape, grad: bool = True):
    return torch.empty(shape, device="meta", requires_grad=grad)


def check_layers(module, root: str, layers, n: int, fwd):
    """Every layer's parameters and forward FLOPs equal what the real module has and does.

    The backward is checked on totals by the callers: FlopCounterMode's attribution of backward
    ops to modules is approximate (a residual block's 1x1 shortcut gets charged the backward of
    the parallel 3x3 convolutions), while its global count is exact."""
    named = dict(module.named_parameters())
    assert sum(layer.params for layer in layers) == sum(p.numel() for p in named.values())
    for layer in layers:
        prefix = layer.name + "."
        assert layer.params == sum(p.numel() for k, p in named.items() if k.startswith(prefix)), layer.name
    # The closed form lists every matmul / conv module: the same names FlopCounterMode saw working.
    matmuls = {name for name, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert {layer.name for layer in layers if layer.macs} == matmuls
    forward = per_module(fwd)
    for layer in layers:
        if layer.macs:
            assert forward[f"{root}.{layer.name}"] == n * layer.flops(forward_only=True), layer.name
    assert forward[root] == n * image_modules.layers_flops(layers, forward_only=True)


def test_timestep_embedding_matches_flop_counter():
    hidden, freq, n = 16, 8, 3
    module = TimestepEmbedding(hidden, frequency_dim=freq)
    layers = meta_layers(
        lambda: TimestepEmbedding(hidden, frequency_dim=freq), lambda m: m(torch.zeros(1, device="meta"))
    )
    fwd, train = measure(lambda: module(torch.tensor([1.0, 250.0, 999.0])), lambda out: out.square().sum())
    check_layers(module, "TimestepEmbedding", layers, n, fwd)
    assert train.get_total_flops() == n * image_modules.layers_flops(layers)
    # The sinusoidal features need no gradient: linear_1's backward is its weight gradient alone.
    linear_1, linear_2 = 2 * freq * hidden, 2 * hidden * hidden
    assert train.get_total_flops() == n * (2 * linear_1 + 3 * linear_2)


def test_linear_patch_embed_and_head_match_flop_counter():
    c, p, hidden, n, height, width = 3, 2, 16, 2, 4, 6  # not square: H and W must not be swapped
    embed, head = LinearPatchEmbed(c, p, hidden), LinearPatchHead(hidden, p, c)
    latents = torch.randn(n, c, height, width)  # data: no gradient, as the model's noised latents
    temb = torch.randn(n, hidden, requires_grad=True)
    fwd, train = measure(lambda: head(embed(latents, temb), height, width), lambda out: out.square().sum())
    embed_layers = meta_layers(
        lambda: LinearPatchEmbed(c, p, hidden), lambda m: m(_meta(1, c, height, width, grad=False), _meta(1, hidden))
    )
    head_layers = meta_layers(
        lambda: LinearPatchHead(hidden, p, c),
        lambda m: m(_meta(1, (height // p) * (width // p), hidden), height, width),
    )
    check_layers(embed, "LinearPatchEmbed", embed_layers, n, fwd)
    check_layers(head, "LinearPatchHead", head_layers, n, fwd)
    assert train.get_total_flops() == n * image_modules.layers_flops(embed_layers + head_layers)  # nothing else counted
    tokens = (height // p) * (width // p)
    assert image_modules.layers_flops(head_layers, forward_only=True) == 2 * tokens * hidden * c * p * p
    assert image_modules.layers_flops(embed_layers) == 2 * image_modules.layers_flops(embed_layers, forward_only=True)
    assert image_modules.layers_flops(head_layers) == 3 * image_modules.layers_flops(head_layers, forward_only=True)


@pytest.mark.parametrize(
    "channels,layers_per_block,patch,height,width",
    [
        ((8, 12, 16), 2, 8, 16, 8),  # 3 levels, widths that all differ, 2 resnets per down block
        ((8,), 1, 2, 6, 4),  # one level: no down / up sampling
    ],
)
def test_unet_patch_embed_and_head_match_flop_counter(channels, layers_per_block, patch, height, width):
    c, hidden, n = 3, 16, 2
    kw = {"channels": channels, "layers_per_block": layers_per_block, "norm_groups": 4}
    embed, head = UNetPatchEmbed(c, patch, hidden, **kw), UNetPatchHead(hidden, patch, c, **kw)
    latents = torch.randn(n, c, height, width)
    temb = torch.randn(n, hidden, requires_grad=True)  # in the model it comes from the trained time embedding

    def forward():
        tokens, skips = embed(latents, temb)
        return head(tokens, skips, temb)

    fwd, train = measure(forward, lambda out: out.square().sum())
    embed_layers, head_layers = unet_layers(c, patch, hidden, height, width, kw)
    check_layers(embed, "UNetPatchEmbed", embed_layers, n, fwd)
    check_layers(head, "UNetPatchHead", head_layers, n, fwd)
    assert train.get_total_flops() == n * image_modules.layers_flops(embed_layers + head_layers)  # nothing else counted


def unet_layers(c, patch, hidden, height, width, kw):
    skips = unet_skip_shapes(1, height, width, kw["channels"], kw["layers_per_block"])
    embed = meta_layers(
        lambda: UNetPatchEmbed(c, patch, hidden, **kw),
        lambda m: m(_meta(1, c, height, width, grad=False), _meta(1, hidden)),
    )
    head = meta_layers(
        lambda: UNetPatchHead(hidden, patch, c, **kw),
        lambda m: m(
            _meta(1, (height // patch) * (width // patch), hidden), [_meta(*shape) for shape in skips], _meta(1, hidden)
        ),
    )
    return embed, head


def test_unet_convolutions_are_counted():
    """Fails if the closed form left the convolutions out: they are most of the U-Net's FLOPs."""
    c, p, hidden, n, size, channels = 3, 4, 16, 2, 8, (8, 16)
    kw = {"channels": channels, "layers_per_block": 1, "norm_groups": 4}
    embed, head = UNetPatchEmbed(c, p, hidden, **kw), UNetPatchHead(hidden, p, c, **kw)
    latents, temb = torch.randn(n, c, size, size), torch.randn(n, hidden, requires_grad=True)

    def forward():
        tokens, skips = embed(latents, temb)
        return head(tokens, skips, temb)

    counter = FlopCounterMode(display=False)
    with counter:
        forward().square().sum().backward()
    embed_layers, head_layers = unet_layers(c, p, hidden, size, size, kw)
    layers = embed_layers + head_layers
    by_op = {str(op): value for op, value in counter.get_flop_counts()["Global"].items()}
    conv = sum(by_op.get(op, 0) for op in CONV_OPS)
    assert conv == n * image_modules.layers_flops(layer for layer in layers if layer.kind == "conv")
    matmul = n * image_modules.layers_flops(layer for layer in layers if layer.kind == "linear")
    assert conv > 10 * matmul > 0
    assert counter.get_total_flops() == conv + matmul


def transfusion_cfg(patchify: str = "linear", arch: str = "dense", codec: str = "pixels") -> Config:
    cfg = Config()
    m = cfg.model
    m.arch, m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups = arch, 2, 32, 4, 2
    m.ffn_hidden_size, m.vocab_size, m.seq_length = 64, 64, 24
    o = cfg.objective
    o.name, o.patchify, o.latent_patch_size, o.latent_codec = "transfusion", patchify, 4, codec
    cfg.data.image_size = 8
    return cfg


def build(cfg, runtime, latent_shape=None):
    return build_model_chunks(cfg, build_transformer_config(cfg, runtime.device), runtime, latent_shape)[0]


@pytest.mark.parametrize(
    "patchify,arch,codec,latent_shape",
    [
        ("linear", "dense", "pixels", None),
        ("unet", "dense", "pixels", None),
        ("linear", "mot", "pixels", None),
        ("unet", "dense", "kl", (4, 8, 12)),  # a VAE's latent: the shape must be passed
    ],
)
def test_parameter_counts_match_built_transfusion_model(runtime, patchify, arch, codec, latent_shape):
    cfg = transfusion_cfg(patchify, arch, codec)
    named = dict(build(cfg, runtime, latent_shape).named_parameters())
    counts = acc_params.parameter_counts(cfg, latent_shape)
    assert counts["total"] == sum(p.numel() for p in named.values())
    for module in transfusion_model.IMAGE_MODULES:
        assert counts[module] == sum(p.numel() for k, p in named.items() if k.startswith(module + ".")) > 0, module
    assert counts["image_modules"] == sum(counts[m] for m in transfusion_model.IMAGE_MODULES)
    assert counts["non_embedding"] == counts["total"] - counts["embedding"] - counts["output_layer"]
    # The transformer's keys keep their meaning: the same as the LM model's of the same shape.
    cfg.objective.name = "lm"
    lm = acc_params.parameter_counts(cfg)
    assert lm["image_modules"] == 0 and lm["total"] == counts["total"] - counts["image_modules"]
    for key in ("embedding", "output_layer", "norm", "matmul"):
        assert counts[key] == lm[key], key
    assert counts["active"] == lm["active"] + counts["image_modules"]
    if codec == "kl":
        cfg.objective.name = "transfusion"
        with pytest.raises(ValueError, match="latent_shape"):
            acc_params.parameter_counts(cfg)


def image_microbatch(cfg):
    """Two rows of 24 positions with three 2x2-patch images (8x8 latents, patch 4): row 0 two, row 1 one."""
    b, s = 2, cfg.model.seq_length
    image_ids = torch.full((b, s), -1, dtype=torch.int64)
    image_ids[0, 2:6], image_ids[0, 10:14], image_ids[1, 6:10] = 0, 1, 0
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (b, s), generator=gen)
    images = ImageInputs(
        image_ids=image_ids,
        noised=torch.randn(3, 3, 8, 8, generator=gen),
        timesteps=torch.tensor([10.0, 500.0, 900.0]),
        count=3,
        positions=(image_ids.reshape(-1) >= 0).nonzero().flatten(),
    )
    modality = torch.where(image_ids >= 0, int(Modality.IMAGE), int(Modality.TEXT))
    return tokens, images, modality


@pytest.mark.parametrize("patchify", ["linear", "unet"])
def test_transfusion_model_flops_match_flop_counter(runtime, patchify):
    """The whole model, forward + backward: transformer (math SDPA: mask-blind) + 3 images' modules."""
    cfg = transfusion_cfg(patchify)
    model = build(cfg, runtime)
    tokens, images, modality = image_microbatch(cfg)
    b, s = tokens.shape
    position_ids = torch.arange(s).expand(b, s)
    counter = FlopCounterMode(display=False)
    model.zero_grad(set_to_none=True)
    with sdpa_kernel(SDPBackend.MATH), counter:
        logits, prediction = model(tokens, position_ids, None, labels=None, images=images)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)) + prediction.square().mean()
        loss.backward()
    assert model.image_patch_embed.proj.weight.grad is not None  # the backward reached the image modules
    measured = counter.get_total_flops()
    per_image = image_modules.image_flops_per_image(cfg)
    assert measured == flops.flop_counter_flops(cfg, b, s, "math") + images.count * per_image["total"]
    doc = torch.zeros(b, s, dtype=torch.int64)
    stats = flops.batch_flops(cfg, doc, modality, attention="full", image_ids=images.image_ids)
    assert stats["images"] == images.count and measured == stats["total"]
    forward = FlopCounterMode(display=False)  # per module: forward only (see check_layers)
    with torch.no_grad(), forward:
        model(tokens, position_ids, None, labels=None, images=images)
    by_module = per_module(forward)
    forward_per_image = image_modules.image_flops_per_image(cfg, forward_only=True)
    for module in transfusion_model.IMAGE_MODULES:
        assert by_module[f"TransfusionGPTModel.{module}"] == images.count * forward_per_image[module], module


@pytest.mark.parametrize("arch", ["dense", "mot"])
def test_transfusion_full_recompute_reruns_the_layers_not_the_image_modules(runtime, arch):
    """``train.recompute=full``: FlopCounterMode adds the transformer layers' forward (math SDPA:
    mask-blind attention), not the output layer's or the image modules'."""
    cfg = transfusion_cfg("unet", arch)
    cfg.train.recompute = "full"
    model = build(cfg, runtime)
    tokens, images, modality = image_microbatch(cfg)
    b, s = tokens.shape
    position_ids = torch.arange(s).expand(b, s)
    doc = torch.zeros(b, s, dtype=torch.int64)
    batch = {"modality_ids": modality, "modality_counts": torch.bincount(modality.reshape(-1), minlength=2)}
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        with routing_for(batch, torch.device("cpu")):
            logits, prediction = model(tokens, position_ids, None, labels=None, images=images)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)) + prediction.square().mean()
        loss.backward()  # outside the routing: the recomputed MoT layers re-enter the forward's
    stats = flops.batch_flops(cfg, doc, modality, attention="full", image_ids=images.image_ids)
    extra = R.flop_counter_recompute_flops(cfg, doc, modality, "math", image_ids=images.image_ids)
    assert counter.get_total_flops() == stats["total"] + extra
    output = 2 * b * s * acc_params._matmul_parts(cfg)["output"]
    layers = b * s * flops.flops_per_token(cfg, s, forward_only=True) - output
    assert extra == layers


def test_batch_flops_charges_images_to_the_image_modality():
    cfg = transfusion_cfg("unet")
    tokens, images, modality = image_microbatch(cfg)
    doc = torch.zeros_like(tokens)
    stats = flops.batch_flops(cfg, doc, modality, num_images=3)
    per_image = image_modules.image_flops_per_image(cfg)["total"]
    assert stats["image_modules"] == 3 * per_image > 0
    assert stats["total"] == stats["dense"] + stats["attention"] + stats["image_modules"]
    assert sum(stats["per_modality"].values()) == stats["total"]
    cfg.objective.name = "lm"  # the same transformer without image modules
    lm = flops.batch_flops(cfg, doc, modality)
    assert lm["image_modules"] == 0 and lm["images"] == 0
    assert stats["per_modality"]["image"] == lm["per_modality"]["image"] + 3 * per_image
    assert stats["per_modality"]["text"] == lm["per_modality"]["text"]
    assert stats["dense"] == lm["dense"] and stats["attention"] == lm["attention"]
    with pytest.raises(ValueError, match="no image modules"):
        flops.batch_flops(cfg, doc, modality, num_images=3)
    cfg.objective.name = "transfusion"
    # The count may come from image_ids (with the Transfusion mask) or be given beside keys (the loop).
    from_ids = flops.batch_flops(cfg, doc, modality, image_ids=images.image_ids)
    keys = attended.attended_keys(doc, images.image_ids)
    assert from_ids == flops.batch_flops(cfg, doc, modality, keys=keys, num_images=3)
    assert from_ids["image_modules"] == stats["image_modules"]
    forward = flops.batch_flops(cfg, doc, modality, num_images=3, forward_only=True)
    assert forward["image_modules"] == 3 * image_modules.image_flops_per_image(cfg, forward_only=True)["total"]
    with pytest.raises(ValueError, match="num_images"):
        flops.batch_flops(cfg, doc, modality)  # image tokens but no image count: would under-count
    assert flops.batch_flops(cfg, doc)["images"] == 0  # all text: no image to count
    cfg.objective.latent_codec = "kl"
    with pytest.raises(ValueError, match="latent_shape"):
        flops.batch_flops(cfg, doc, modality, num_images=3)
    shape = (4, 8, 8)
    assert (
        flops.batch_flops(cfg, doc, modality, num_images=3, latent_shape=shape)["image_modules"]
        == 3 * image_modules.image_flops_per_image(cfg, shape)["total"]
    )


def test_image_flops_scale_with_the_latent_and_check_it():
    cfg = transfusion_cfg("linear")
    small, large = (
        image_modules.image_flops_per_image(cfg, (3, 8, 8)),
        image_modules.image_flops_per_image(cfg, (3, 16, 16)),
    )
    assert large["image_time_embed"] == small["image_time_embed"]  # once per image, whatever its size
    assert large["image_patch_embed"] == 4 * small["image_patch_embed"]  # 4x the patches
    cfg.objective.patchify = "unet"
    unet = image_modules.image_flops_per_image(cfg, (3, 8, 8))
    assert unet["image_patch_embed"] > 10 * small["image_patch_embed"]
    with pytest.raises(ValueError, match="patch size must divide"):  # checked before any module is built
        image_modules.image_flops_per_image(cfg, (3, 10, 8))
    cfg.objective.latent_patch_size = 1  # the default U-Net halves once: patches must be even
    with pytest.raises(ValueError, match="downsampling factor"):
        image_modules.image_flops_per_image(cfg, (3, 8, 8))
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        image_modules.check_latent_shape((8, 8))
    cfg.objective.name = "lm"
    assert image_modules.image_flops_per_image(cfg)["total"] == 0 and image_modules.image_module_layers(cfg) == {}


def test_flops_cli_reports_the_image_modules():
    cfg = transfusion_cfg("unet")
    tokens, images, modality = image_microbatch(cfg)
    batch = {
        "document_ids": torch.zeros_like(tokens),
        "modality_ids": modality,
        "latents": images.noised,
        "image_ids": images.image_ids,
    }
    text = flops_report(cfg, batch)
    stats = flops.batch_flops(cfg, batch["document_ids"], modality, num_images=3)
    assert "image modules" in text and "for 3 images" in text
    # The report counts the mask training counts: image patches see their whole image.
    bidirectional = flops.batch_flops(cfg, batch["document_ids"], modality, image_ids=images.image_ids)
    assert bidirectional["mean_attended_keys"] > stats["mean_attended_keys"]
    assert f"mean {bidirectional['mean_attended_keys']:.2f} keys per query" in text
    assert f"total     {_n(bidirectional['total'])}" in text and "bidirectional within each image" in text
    # ... and the trainer's caption dropout (first_key) where it is drawn, exactly as training does.
    dropped = {**batch, "first_key": torch.zeros_like(images.image_ids)}
    dropped["first_key"][0, 1:6] = 1  # row 0's first image, its <boi> at 1: <bos>, <boi>, its 4 patches
    keys = get_objective("transfusion").flops_inputs(dropped)["keys"]
    assert keys[0, 1:6].tolist() == [2] + [6] * 4
    assert torch.equal(keys[1], attended.attended_keys(batch["document_ids"], images.image_ids)[1])  # row 1 untouched
    assert f"{acc_params.parameter_counts(cfg)['image_modules']:,}" in summary(cfg)
    assert stats["image_modules"] > 0
