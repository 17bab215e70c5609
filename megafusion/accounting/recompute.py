"""Hardware FLOPs: the model FLOPs plus the forward that activation recomputation runs again.

Model FLOPs (:mod:`megafusion.accounting.flops`, what MFU divides) do not depend on
``train.recompute``: the model computes the same thing. The hardware does more work: in the
backward pass megatron-core runs the checkpointed regions' forward a second time, so

- ``selective`` (core attention recomputed): each layer's ``QK^T`` and ``PV`` forward again, i.e.
  the forward attention FLOPs of the microbatch (with its real mask, as the model FLOPs count it);
- ``full`` (each transformer layer keeps only its input): every layer's forward again: the
  attention projections, MLP (MoMa: the router on every token and each expert on the tokens it
  took), and the forward attention. Not the output layer, the embedding or an objective's extra
  modules (Transfusion's image modules): they sit outside the transformer layers.

``hardware = model + recompute``; HFU = hardware FLOP/s over the peak, beside MFU. The count is
exact per microbatch, from the same inputs as :func:`~megafusion.accounting.flops.batch_flops`
(its keywords pass through). :func:`flop_counter_recompute_flops` is what ``FlopCounterMode``
adds around a real forward + backward with recomputation on (the tests' oracle): its attention
is mask-blind, full ``s x s`` for the math and fused kernels (the recomputed forward is a plain
forward: 1 x), and 0 for SDPA's CPU kernel, which it cannot count.
"""

from __future__ import annotations

from megafusion.accounting.flops import FLOP_COUNTER_KERNELS, batch_flops
from megafusion.accounting.image_modules import MATMUL_FLOPS_PER_MAC
from megafusion.accounting.params import _matmul_parts
from megafusion.core.choices import RECOMPUTE_MODES
from megafusion.core.modality import MODALITY_NAMES, Modality


def recompute_flops(cfg, document_ids, modality_ids=None, *, mode: str | None = None, **batch_kwargs) -> dict:
    """FLOPs of the forward that ``mode`` (default ``cfg.train.recompute``) runs again for one microbatch.

    ``batch_kwargs`` are :func:`~megafusion.accounting.flops.batch_flops`'s (``attention``, ``keys``,
    ``image_ids``, ``num_images``, ``latent_shape``; ``Objective.flops_inputs(batch)`` gives them).
    Returns ints: ``total``, ``attention`` (its attention part), ``per_modality`` (by the query
    token's modality, like the model FLOPs) and ``mode``.
    """
    mode = cfg.train.recompute if mode is None else mode
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute mode {mode!r}: choose one of {', '.join(RECOMPUTE_MODES)}")
    if mode == "none":
        return {"total": 0, "attention": 0, "per_modality": dict.fromkeys(MODALITY_NAMES, 0), "mode": mode}
    forward = batch_flops(cfg, document_ids, modality_ids, forward_only=True, **batch_kwargs)
    attention = forward["attention_per_modality"]
    if mode == "selective":
        per_modality = dict(attention)
    else:
        # The layers' forward: everything of the forward but the per-token output layer (+ LMFusion's
        # output delta) and the objective's image modules.
        parts = _matmul_parts(cfg)
        outside = MATMUL_FLOPS_PER_MAC * (parts["output"] + parts["new_rows"])
        per_modality = {
            name: forward["per_modality"][name]
            - forward["tokens_per_modality"][name] * outside
            - (forward["image_modules"] if m == Modality.IMAGE else 0)
            for name, m in zip(MODALITY_NAMES, Modality)
        }
    return {
        "total": sum(per_modality.values()),
        "attention": sum(attention.values()),
        "per_modality": per_modality,
        "mode": mode,
    }


def flop_counter_recompute_flops(
    cfg, document_ids, modality_ids=None, kernel: str = "fused", *, mode: str | None = None, **batch_kwargs
) -> int:
    """What ``FlopCounterMode`` counts on top of :func:`~megafusion.accounting.flops.flop_counter_flops`
    around one forward + backward with recomputation ``mode``: mask-blind attention (0 for ``cpu``)."""
    if kernel not in FLOP_COUNTER_KERNELS:
        raise ValueError(f"kernel={kernel!r} must be one of {FLOP_COUNTER_KERNELS}")
    counted = recompute_flops(cfg, document_ids, modality_ids, mode=mode, attention="full", **batch_kwargs)
    return counted["total"] - (counted["attention"] if kernel == "cpu" else 0)
