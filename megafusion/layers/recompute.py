"""Activation recomputation whose recomputed forward sees what the forward saw.

megatron-core recomputes a checkpointed region (``train.recompute``: ``selective`` = core
attention, ``full`` = each transformer layer; :mod:`megafusion.models.transformer_config`) through
``tensor_parallel.checkpoint``: the forward runs without keeping activations, and the backward
pass runs the region's function again on the saved inputs, with the RNG states of the forward
restored. What megatron does not restore is anything the region reads from outside its
arguments: modality-partitioned modules (MoT, MoMa; Transfusion with MoT layers) read the
microbatch's :func:`~megafusion.layers.routing.current_routing`, a context the forward step holds
around the model call only. The pipeline schedule runs the backward after that context has
closed, and with several microbatches in flight (1F1B, interleaved) no later context is the
right one.

:func:`install` replaces ``megatron.core.tensor_parallel.checkpoint`` (what
``TransformerBlock._checkpointed_forward`` and ``Attention._checkpointed_attention_forward`` call)
by :func:`checkpoint`, which hands megatron's ``CheckpointFunction`` a closure holding the routing
active at the forward: the recomputed forward re-enters it, so it routes every token as the
forward did, and it finds the microbatch's host-side facts cached on that routing (MoMa's
expert-parallel dispatch counts), so it exchanges nothing; MoMa's router noise is keyed by the
routing's sample numbers, so the recomputed forward draws the same noise again. Everything else
a layer reads comes in as an argument (the attention mask) or is computed outside the recomputed
region (Transfusion's noise and timesteps, drawn by the objective before the model call; its image
modules and the U-Net stage channel, which sit outside the transformer layers). Arguments that
are not tensors (a FlexAttention ``BlockMask``), which ``save_for_backward`` refuses, are held by
the closure too.

Without recomputation nothing calls it; with it, megatron's function does the work unchanged.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import random as mcore_random

from megafusion.layers.routing import active_routing, modality_routing

_MEGATRON_CHECKPOINT = mcore_random.checkpoint  # megatron-core's own, never the wrapper


def checkpoint(function, distribute_saved_activations, *args):
    """megatron-core's ``tensor_parallel.checkpoint``, re-entering the forward's routing on recompute."""
    routing = active_routing()
    held = {i: a for i, a in enumerate(args) if a is not None and not torch.is_tensor(a)}

    def rerun(*inputs):
        inputs = [held.get(i, x) for i, x in enumerate(inputs)]
        with modality_routing(routing) if routing is not None else contextlib.nullcontext():
            return function(*inputs)

    saved = [None if i in held else a for i, a in enumerate(args)]
    return _MEGATRON_CHECKPOINT(rerun, distribute_saved_activations, *saved)


def install() -> None:
    """Make megatron-core's checkpointed regions call :func:`checkpoint` (idempotent; the models
    call it at build when ``train.recompute`` is on)."""
    tensor_parallel.checkpoint = checkpoint


def installed() -> bool:
    return tensor_parallel.checkpoint is checkpoint
