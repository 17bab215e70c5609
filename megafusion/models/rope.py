"""RoPE frequencies: the rotary base as megatron-core takes it, and Llama-3 frequency scaling.

megatron-core's ``RotaryEmbedding`` can apply Llama-3 scaling (``rope_scaling=True``), but
its ``GPTModel`` only forwards ``rope_scaling_factor``: ``low_freq_factor``,
``high_freq_factor`` and ``original_max_position_embeddings`` stay at Llama 3.1's 1, 4 and
8192. Checkpoints use other values (Llama 3.2 and tiny test models), so megafusion computes
the scaled inverse frequencies itself, with Hugging Face's formula
(``transformers.modeling_rope_utils._compute_llama3_parameters``, operation for operation, so
imported models give the same logits), and installs them on the model's rotary embedding
before any forward pass (its forward caches per sequence length). ``inv_freq`` is a plain
attribute, not a buffer: checkpoints do not hold it, the config does.
"""

from __future__ import annotations

import math

import torch


def rotary_base(theta: float):
    """``model.rope_theta`` as megatron's ``rotary_base``: an int when integral (what it always
    got before; same frequencies), the float otherwise (``int()`` would truncate it)."""
    return int(theta) if float(theta).is_integer() else float(theta)


def llama3_inv_freq(
    inv_freq: torch.Tensor,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> torch.Tensor:
    """Llama-3 scaling of plain RoPE inverse frequencies: long wavelengths (beyond
    ``original / low_freq_factor``) are divided by ``factor``, short ones (below ``original /
    high_freq_factor``) are kept, and the band between is interpolated smoothly."""
    old_context_len = original_max_position_embeddings
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def apply_rope_scaling(model, scaling: dict | None) -> None:
    """Replace the plain inverse frequencies of ``model``'s rotary embedding (a megatron-core
    ``GPTModel``) by their Llama-3 scaled values; ``scaling`` None leaves them alone."""
    if scaling is None:
        return
    rope = model.rotary_pos_emb
    rope.inv_freq = llama3_inv_freq(
        rope.inv_freq,
        float(scaling["factor"]),
        float(scaling["low_freq_factor"]),
        float(scaling["high_freq_factor"]),
        int(scaling["original_max_position_embeddings"]),
    )
