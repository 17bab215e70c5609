"""RoPE at given token positions instead of row indices: :func:`token_positions`.

megatron-core's ``RotaryEmbedding`` builds its table from the sequence length: token ``i`` of a
row is rotated by position ``i``. Two things need other positions:

- ``data.positions=document``: each token at its position within its document (the batch's
  ``position_ids``, restarting at 0 for every packed document), wired in
  :mod:`megafusion.training.forward_step` and :mod:`megafusion.inference.decoding`;
- context parallelism: a rank that holds some of the row's tokens rotates each at its true
  position in the row (the positions of its shard).

Inside ``with token_positions(positions):`` (``positions`` ``[b, s]`` int64, on the model's
device) every model chunk's rotary embedding returns the table *at those positions*,
``[s, b, 1, d]`` (row ``t`` of batch row ``r`` = the angles of position ``positions[r, t]``;
megatron's ``apply_rotary_pos_emb`` broadcasts a table over the batch, and takes a per-row
one as well), instead of ``[s, 1, 1, d]`` at ``0 .. s-1``. The angles are computed as megatron
computes its table (``position * inv_freq``, the same fp32 product, Llama-3 scaled frequencies
included: :mod:`megafusion.models.rope` sets ``inv_freq``), so a token at position ``p`` gets
bit for bit the angles row ``p`` of megatron's table holds. No context-parallel slicing happens
here (megatron's ``get_pos_emb_on_this_cp_rank`` is never called): the caller passes exactly
the positions of the tokens the rank holds. Outside the context (``positions`` None) the
embedding is megatron's, call for call, so ``data.positions=row`` stays on the old path.

The table is made in ``GPTModel._preprocess``, before the layers, on every pipeline stage
(each stage's forward step enters the context with the same batch); activation recomputation
re-runs layers with the table they were given, so it never needs the context again. With a
KV cache (megatron's static inference context) the table is sliced by sequence offsets: the
caller passes the positions of all ``max_sequence_length`` slots (:meth:`Decoder._run`).
``install`` puts the embedding on a built ``GPTModel`` (:func:`megafusion.models.build.assemble_chunks`).
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

_positions: torch.Tensor | None = None


@contextlib.contextmanager
def token_positions(positions: torch.Tensor | None):
    """Rotate each token at ``positions`` ``[b, s]`` (None: at its row index, megatron's table)
    in every model forward inside the block; nests (the innermost wins) and restores on exit."""
    global _positions
    if positions is not None and (positions.dim() != 2 or positions.is_floating_point()):
        raise ValueError(
            f"token_positions takes [b, s] integer positions, got {positions.dtype} {tuple(positions.shape)}"
        )
    previous, _positions = _positions, positions
    try:
        yield
    finally:
        _positions = previous


def active_positions() -> torch.Tensor | None:
    """The positions of the innermost :func:`token_positions` block, None outside any."""
    return _positions


class PositionedRotaryEmbedding(RotaryEmbedding):
    """megatron-core's ``RotaryEmbedding`` that honours :func:`token_positions`."""

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> torch.Tensor:
        if _positions is None:
            return super().forward(max_seq_len, offset, packed_seq, cp_group)
        return self.table_at(_positions)

    def table_at(self, positions: torch.Tensor) -> torch.Tensor:
        """``[s, b, 1, d]``: the angles of ``positions`` ``[b, s]``, as megatron's ``get_emb`` makes them."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)  # once, as megatron's get_emb does
        seq = positions.t().to(self.inv_freq.dtype)
        if self.seq_len_interpolation_factor is not None:
            seq = seq * (1 / self.seq_len_interpolation_factor)
        freqs = seq[..., None] * self.inv_freq  # = torch.outer's product, row by row: [s, b, d/2]
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
        return emb[:, :, None, :]


def install(model) -> None:
    """Make ``model``'s (a megatron ``GPTModel``) rotary embedding a :class:`PositionedRotaryEmbedding`
    (the same object and attributes: only its class changes); nothing without RoPE."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None or isinstance(rope, PositionedRotaryEmbedding):
        return
    if type(rope) is not RotaryEmbedding:
        raise TypeError(f"token positions need megatron's RotaryEmbedding, the model has {type(rope).__name__}")
    rope.__class__ = PositionedRotaryEmbedding
