"""Parameters and FLOPs of an objective's extra modules (Transfusion's image modules), measured on
the real modules instead of a hand-written copy of them.

:class:`~megafusion.models.transfusion.TransfusionGPTModel` adds three modules that run once per
*image* (not per token): ``image_time_embed`` (Linear ``F -> h``, SiLU, Linear ``h -> h`` on
``F = 256`` sinusoidal features), ``image_patch_embed`` and ``image_patch_head``: with
``objective.patchify=linear`` one Linear per patch (``C p^2 <-> h``, ``(H/p)(W/p)`` patches of a
``[C, H, W]`` latent); with ``unet`` diffusers' down / up blocks, whose 3x3 convolutions over the
full ``H x W`` latent (``2 * C_in * C_out * k^2`` FLOPs per output pixel) are far larger than
the linear patchify.

The objective builds its modules on the meta device (no memory, no init) and runs one image
through them (``Objective.accounting_modules``: name -> (module, run)); forward hooks on every
layer that holds parameters record its parameters, its multiply-adds (``Linear``: weights x rows;
``Conv2d``: weights x output pixels) and whether its input needs a gradient. This gives
``parameter_counts(cfg)["image_modules"]`` (and one key per module) and
:func:`image_flops_per_image`. Counted as for the transformer: matmuls and convolutions at
2 FLOPs per multiply-add (GroupNorm, SiLU, interpolation, the sinusoidal features: 0). The
backward computes a weight gradient for every layer but an input gradient only where the input
needs one: the layers that read data (``conv_in`` / the linear embed on the noised latents,
``linear_1`` on the sinusoidal features), which the run feeds without gradient exactly as the
model does, cost forward + weight gradient = 2 x forward, every other layer 3 x forward: what
runs and what FlopCounterMode counts (see ``tests/accounting/test_flops_transfusion.py``). They are
model FLOPs counted once: that every TP rank computes these small modules in full is not counted
again. The latent shape is the objective's to choose when none is given (Transfusion: ``(3, S,
S)`` for ``latent_codec=pixels``, ``S = data.image_size``; for ``kl`` it depends on the VAE, so
callers pass ``latent_shape``, the codec's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

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


def check_latent_shape(latent_shape: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
    """``latent_shape`` as ``[C, H, W]`` of positive ints, or None (the objective's default: e.g.
    Transfusion's pixel latent of ``data.image_size``, its ``latent_codec=kl`` must be given one)."""
    if latent_shape is None:
        return None
    shape = tuple(int(x) for x in latent_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"latent_shape must be [C, H, W] of positive sizes, got {tuple(latent_shape)}")
    return shape


# (repr(cfg), latent_shape) -> measured layers. Building and running the modules takes ~0.1 s even
# on the meta device (the U-Net), and the trainer counts every microbatch; the config's repr is the
# key because a Config is mutable (the same object may describe another model later).
_MEASURED: dict[tuple[str, tuple | None], dict[str, tuple[ImageLayer, ...]]] = {}
_MEASURED_MAX = 16


def image_module_layers(cfg, latent_shape: tuple[int, int, int] | None = None) -> dict[str, list[ImageLayer]]:
    """The layers of the objective's extra modules (``Objective.accounting_modules``: Transfusion's
    image modules), keyed by module name, for one image of ``latent_shape`` (see
    :func:`check_latent_shape`), measured on the real modules; empty when the objective has none."""
    shape = check_latent_shape(latent_shape)
    key = (repr(cfg), shape)
    if key not in _MEASURED:
        modules = get_objective(cfg.objective.name).accounting_modules(cfg, shape)
        if len(_MEASURED) >= _MEASURED_MAX:
            _MEASURED.clear()
        _MEASURED[key] = {name: tuple(module_layers(module, run)) for name, (module, run) in modules.items()}
    return {name: list(layers) for name, layers in _MEASURED[key].items()}


def image_flops_per_image(
    cfg, latent_shape: tuple[int, int, int] | None = None, forward_only: bool = False
) -> dict[str, int]:
    """Model FLOPs of the objective's extra modules for one image (forward + backward unless
    ``forward_only``): one key per module (:func:`image_module_layers`) and ``total``; only
    ``total``, 0, when the objective has none (``lm``)."""
    layers = image_module_layers(cfg, latent_shape)
    out = {name: layers_flops(found, forward_only) for name, found in layers.items()}
    return {**out, "total": sum(out.values())}
