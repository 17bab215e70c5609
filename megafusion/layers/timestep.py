"""Diffusion timestep embedding: sinusoidal features, then Linear-SiLU-Linear (DiT / diffusers).

Features are diffusers' ``Timesteps(frequency_dim, flip_sin_to_cos=True,
downscale_freq_shift=0)``: ``[cos(t f_i), sin(t f_i)]`` with ``f_i = 10000^(-i / (d/2))``,
DiT's ``timestep_embedding``. The MLP is diffusers' ``TimestepEmbedding``.

State dict: ``mlp.linear_1.{weight,bias}`` ``[hidden, frequency_dim]``,
``mlp.linear_2.{weight,bias}`` ``[hidden, hidden]``.
"""

from __future__ import annotations

import torch

FREQUENCY_DIM = 256  # sinusoidal features per timestep (DiT)


class TimestepEmbedding(torch.nn.Module):
    """``[n]`` int or float timesteps -> ``[n, hidden_size]`` in the module's dtype."""

    def __init__(self, hidden_size: int, frequency_dim: int = FREQUENCY_DIM):
        # Imported here: diffusers takes seconds to import, and LM runs never build this module.
        from diffusers.models.embeddings import TimestepEmbedding as _DiffusersTimestepMLP
        from diffusers.models.embeddings import Timesteps

        super().__init__()
        self.frequencies = Timesteps(frequency_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = _DiffusersTimestepMLP(frequency_dim, hidden_size, act_fn="silu")

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        if timesteps.ndim != 1:
            raise ValueError(f"timesteps must be [n] (one per image), got shape {tuple(timesteps.shape)}")
        # The features come out fp32 whatever t is; cast them to the weights' dtype (bf16 runs).
        features = self.frequencies(timesteps).to(self.mlp.linear_1.weight.dtype)
        return self.mlp(features)
