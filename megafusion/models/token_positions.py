"""TEMPORARY stand-in (replaced by the xdoc branch's module)."""

from __future__ import annotations
import contextlib
import torch

_ACTIVE: list = []


@contextlib.contextmanager
def token_positions(positions):
    _ACTIVE.append(positions)
    try:
        yield
    finally:
        _ACTIVE.pop()


def install(model):
    rope = model.rotary_pos_emb
    plain = type(rope).forward

    def forward(max_seq_len, offset=0, packed_seq=False, cp_group=None):
        if not _ACTIVE or _ACTIVE[-1] is None:
            return (
                plain.__wrapped__(rope, max_seq_len, offset, packed_seq, cp_group)
                if False
                else _plain(rope, max_seq_len, offset)
            )
        pos = _ACTIVE[-1]
        emb = rope.get_emb(int(pos.max()) + 1)  # [S, 1, 1, d]
        return emb[:, 0, 0][pos.t()].unsqueeze(2)  # [s, b, 1, d]

    def _plain(rope, n, offset):
        return rope.get_emb(n, offset)

    rope.forward = forward
