"""Parameters and FLOPs of an objective's extra modules (Transfusion's image modules), measured on
the real modules instead of a hand-written copy of them.

The objective builds its modules on the meta device (no memory, no init) and runs one image
through them (``Objective.accounting_modules``: name -> (module, run)); forward hooks on every
layer that holds parameters record its parameters, its multiply-adds (``Linear``: weights x rows;
``Conv2d``: weights x output pixels) and whether its input needs a gradient. Inputs that are data
(the noised latents, the sinusoidal timestep features) carry no gradient, exactly as in the model,
so the layers reading them cost forward + weight gradient = 2 x forward in training, every other
layer 3 x. Counted as elsewhere: matmuls and convolutions at 2 FLOPs per multiply-add (GroupNorm,
SiLU, interpolation, the sinusoidal features: 0). They are model FLOPs counted once: that every TP
rank computes these small modules in full is not counted again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from megafusion.models.transfusion import IMAGE_MODULES
from megafusion.objectives.registry import get_objective

MATMUL_FLOPS_PER_MAC = 2


@dataclass(frozen=True)
class ImageLayer:
    """One parameterised layer of an image module, for one image.

    ``name`` is its parameter prefix inside the module (e.g. ``down_blocks.0.resnets.0.conv1``),
    ``kind`` one of ``linear``, ``conv``, ``norm`` (parameters, no matmul FLOPs), ``macs`` its
    forward multiply-adds per image, ``input_grad`` whether the backward computes the gradient of
    its input (False where the input is data, which needs none).
    """

    name: str
    kind: str
    params: int
    macs: int = 0
    input_grad: bool = True

    def flops(self, forward_only: bool = False) -> int:
        # Backward: the weight gradient always (a matmul of the forward's size), the input's only if needed.
        passes = 1 if forward_only else 2 + int(self.input_grad)
        return MATMUL_FLOPS_PER_MAC * self.macs * passes


def layers_flops(layers: Iterable[ImageLayer], forward_only: bool = False) -> int:
    """Matmul + convolution FLOPs of ``layers`` for one image."""
    return sum(layer.flops(forward_only) for layer in layers)


def _macs(module: torch.nn.Module, output: torch.Tensor) -> tuple[str, int]:
    if isinstance(module, torch.nn.Linear):
        return "linear", module.in_features * module.out_features * (output.numel() // module.out_features)
    if isinstance(module, torch.nn.Conv2d):
        return "conv", module.weight.numel() * (output.numel() // module.out_channels)
    return "norm", 0


def module_layers(module: torch.nn.Module, run: Callable[[], object]) -> list[ImageLayer]:
    """The layers ``run()`` (one image's forward through ``module``) calls, in call order."""
    names = {sub: name for name, sub in module.named_modules()}
    calls: dict[torch.nn.Module, list] = {}

    def record(sub, inputs, output):
        kind, macs = _macs(sub, output)
        entry = calls.setdefault(sub, [kind, 0, bool(inputs and inputs[0].requires_grad)])
        entry[1] += macs

    hooks = [sub.register_forward_hook(record) for sub in names if any(True for _ in sub.parameters(recurse=False))]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    layers = [
        ImageLayer(names[sub], kind, sum(p.numel() for p in sub.parameters(recurse=False)), macs, grad)
        for sub, (kind, macs, grad) in calls.items()
    ]
    unused = sum(p.numel() for p in module.parameters()) - sum(layer.params for layer in layers)
    if unused:
        raise ValueError(
            f"{type(module).__name__}: {unused} parameters belong to layers one image's forward does "
            "not call: its accounting run does not match the model's forward"
        )
    return layers


def image_latent_shape(cfg, latent_shape: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
    """``[C, H, W]`` of one image latent: ``latent_shape`` when given, else the pixel latent of
    ``data.image_size`` (as ``build_model_chunks`` assumes); ``latent_codec=kl`` must pass it."""
    if latent_shape is not None:
        shape = tuple(int(x) for x in latent_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"latent_shape must be [C, H, W] of positive sizes, got {tuple(latent_shape)}")
        return shape
    codec = cfg.objective.latent_codec
    if codec != "pixels":
        raise ValueError(
            f"objective.latent_codec={codec!r}: the latent shape depends on the autoencoder; pass "
            f"latent_shape (the codec's latent_shape, e.g. data.tokenizer.codec.latent_codec"
            f".latent_shape) to count the image modules"
        )
    size = cfg.data.image_size
    return (3, size, size)


def image_module_layers(cfg, latent_shape: tuple[int, int, int] | None = None) -> dict[str, list[ImageLayer]]:
    """The layers of the objective's extra modules (Transfusion's image modules), keyed by module
    name, for one image of ``latent_shape`` (see :func:`image_latent_shape`), measured on the real
    modules (:mod:`megafusion.accounting.image_modules`); empty when the objective has none."""
    objective = get_objective(cfg.objective.name)
    if not objective.extra_modules:
        return {}
    shape = image_latent_shape(cfg, latent_shape)
    _patch_grid(cfg.objective.latent_patch_size, shape[1], shape[2])
    return {
        name: module_layers(module, run) for name, (module, run) in objective.accounting_modules(cfg, shape).items()
    }


def _patch_grid(patch_size: int, height: int, width: int) -> int:
    """Patches per image, with the latent checked as ``patchify`` checks it."""
    if patch_size < 1 or height < 1 or width < 1 or height % patch_size or width % patch_size:
        raise ValueError(
            f"a latent of height {height} and width {width} cannot be cut into {patch_size}x"
            f"{patch_size} patches: the patch size must divide both"
        )
    return (height // patch_size) * (width // patch_size)


def image_flops_per_image(
    cfg, latent_shape: tuple[int, int, int] | None = None, forward_only: bool = False
) -> dict[str, int]:
    """Model FLOPs of the image modules for one image (forward + backward unless ``forward_only``):
    one key per module of ``IMAGE_MODULES`` and ``total``; all 0 for ``objective.name=lm``."""
    layers = image_module_layers(cfg, latent_shape)
    out = {name: layers_flops(layers.get(name, ()), forward_only) for name in IMAGE_MODULES}
    return {**out, "total": sum(out.values())}
