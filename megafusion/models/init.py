"""Weight initialisation that gives the same model in every parallel layout.

Each parameter's full tensor is drawn from its own generator, seeded from the run seed and
the parameter's *global* name, then sliced to this rank's shard. So TP=1 and TP=2, PP=1
and PP=2 x VPP=2 start from bit-identical weights, which is what lets the parity tests
compare layouts step by step, and what a user expects when changing the layout of a run.

Scheme (Megatron/GPT-2): weights ~ N(0, init_std); the two projections that write into
the residual stream (``linear_proj``, ``linear_fc2``) ~ N(0, init_std / sqrt(2 L)); norm
weights = 1; biases (Transfusion's patch and timestep modules) and LMFusion's new-row deltas = 0.
The full tensor is built on the CPU (as megatron's ``use_cpu_initialization`` does) and copied to the device.
"""

from __future__ import annotations

import math
import re
import zlib

import torch

from megafusion.core.modality import MODALITY_NAMES
from megafusion.models.lmfusion import INPUT_ROWS, OUTPUT_ROWS
from megafusion.models.param_layout import EMBEDDING, full_shape, global_param_names, is_tied_output_copy, shard_of_full

_RESIDUAL_OUT = ("linear_proj.weight", "linear_fc2.weight")
_NEW_TOKEN_ROWS = (INPUT_ROWS, OUTPUT_ROWS)


def tied_name(name: str) -> str:
    """The dense name of a modality-partitioned parameter: ``mlp.image.linear_fc1.weight`` ->
    ``mlp.linear_fc1.weight``, ``input_layernorm.text.weight`` -> ``input_layernorm.weight``."""
    parts = name.split(".")
    return ".".join(p for p in parts if p not in MODALITY_NAMES)


_ONES, _ZEROS = "ones", "zeros"
_NORM_WEIGHT = re.compile(r"norm\w*\.weight$")  # layernorm.weight, and GroupNorm norm1 / norm_out (U-Net)


def param_init(name: str, init_std: float, num_layers: int):
    """How ``name`` starts: ``"ones"`` (norm weights), ``"zeros"`` (biases: only the image
    patch / timestep modules of Transfusion have any), or the std of a normal draw.

    Each modality's copy of a MoT parameter follows its dense counterpart's scheme but is
    drawn independently (the generator is keyed by the full, modality-qualified name).
    """
    name = tied_name(name)
    if name.startswith(_NEW_TOKEN_ROWS):  # LMFusion's deltas: the model starts as its checkpoint
        return _ZEROS
    if _NORM_WEIGHT.search(name):
        return _ONES
    if name.endswith(".bias"):
        return _ZEROS
    if name.endswith(_RESIDUAL_OUT):
        return init_std / math.sqrt(2.0 * num_layers)
    return init_std


@torch.no_grad()
def initialize_weights(model_chunks, seed: int, init_std: float, num_layers: int, tp_rank: int, tp: int):
    for chunk in model_chunks:
        for name, param in global_param_names(chunk).items():
            if is_tied_output_copy(name, param):
                name = EMBEDDING  # megatron synced it at build; the same draw keeps it synced
            how = param_init(name, init_std, num_layers)
            if how in (_ONES, _ZEROS):
                param.fill_(1.0 if how == _ONES else 0.0)
                continue
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
            full = torch.empty(full_shape(param, tp), dtype=torch.float32).normal_(0.0, how, generator=gen)
            param.copy_(shard_of_full(full, param, tp_rank, tp).to(param.dtype))
