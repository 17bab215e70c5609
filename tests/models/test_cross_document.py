"""Cross-document attention (``data.attention``) and per-document RoPE positions (``data.positions``)
on a real two-layer model, in one process.

- Neighbours: in ``causal`` mode document k's logits change when document k-1 of its row changes
  and stay bit-identical when document k+1 changes; in ``isolated`` mode they are bit-identical
  whatever either neighbour holds (the control), with RoPE at row or at document positions.
- Positions: the rotary table at given positions is, row for row, megatron's own table (Llama-3
  scaled frequencies too), so RoPE at the row indices is bit-identical to megatron's path (also
  through a Mixture-of-Depths layer, which gathers the table per token); at document positions
  a packed row's documents give the logits of each document run alone (isolated), while with
  cross-document attention the positions change the logits (causal). The float64 reference of
  both modes is in ``tests/models/test_dense_reference.py``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from megafusion.layers.masks import attention_mask_for, document_positions
from megafusion.models.token_positions import active_positions, token_positions
from tests.models.test_mot import build, small_cfg

LENGTHS = (7, 9, 8)  # one row: documents 0, 1, 2
VOCAB = 64


def packed(lengths=LENGTHS, rows: int = 2, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    doc = torch.cat([torch.full((n,), k) for k, n in enumerate(lengths)]).expand(rows, -1).contiguous()
    return {
        "tokens": torch.randint(VOCAB, doc.shape, generator=gen),
        "document_ids": doc,
        "position_ids": document_positions(doc),
    }


def logits_of(model, batch: dict, cross: bool, by_document: bool) -> torch.Tensor:
    """The model's logits as the forward step runs it (its mask, its positions)."""
    mask = attention_mask_for(batch, "auto", True, torch.device("cpu"), cross)
    with torch.no_grad(), token_positions(batch["position_ids"]) if by_document else contextlib.nullcontext():
        return model(batch["tokens"], batch["position_ids"], mask, labels=None)


def with_document(batch: dict, k: int, seed: int) -> dict:
    """``batch`` with every token of document ``k`` replaced by another."""
    other = dict(batch)
    shift = torch.randint(1, VOCAB, batch["tokens"].shape, generator=torch.Generator().manual_seed(seed))
    inside = batch["document_ids"] == k
    other["tokens"] = torch.where(inside, (batch["tokens"] + shift) % VOCAB, batch["tokens"])
    assert (other["tokens"] != batch["tokens"]).sum() == inside.sum()
    return other


@pytest.fixture
def model(runtime):
    torch.manual_seed(0)
    return build(small_cfg("dense", docs=3), runtime)


@pytest.mark.parametrize("by_document", [False, True])
def test_a_document_sees_the_one_before_it_only_with_cross_document_attention(model, by_document):
    batch = packed()
    doc = batch["document_ids"][0]
    k = doc == 1
    for cross in (False, True):
        base = logits_of(model, batch, cross, by_document)
        before = logits_of(model, with_document(batch, 0, seed=1), cross, by_document)
        after = logits_of(model, with_document(batch, 2, seed=2), cross, by_document)
        assert torch.equal(after[:, k], base[:, k]), f"cross={cross}: a later document changed document 1"
        assert torch.equal(after[:, doc == 0], base[:, doc == 0])
        if cross:
            changed = (before[:, k] - base[:, k]).abs().amax(dim=-1)
            assert (changed > 1e-4).all(), "every token of document 1 reads document 0"
        else:
            assert torch.equal(before[:, k], base[:, k]), "isolated: document 0 reached document 1"
            assert torch.equal(before[:, doc == 2], base[:, doc == 2])


def test_the_table_at_positions_is_megatrons_table_row_for_row(runtime):
    cfg = small_cfg("dense")
    cfg.model.rope_scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 4,
    }
    rope = build(cfg, runtime).rotary_pos_emb
    s = 40
    megatron = rope(s)  # outside any token_positions block: megatron's [s, 1, 1, d]
    assert megatron.shape[1:3] == (1, 1)
    positions = torch.randint(s, (3, 17), generator=torch.Generator().manual_seed(4))
    with token_positions(positions):
        assert active_positions() is positions
        with token_positions(None):  # nests: the innermost wins
            assert rope(s) is megatron
        table = rope(s)
    assert active_positions() is None
    assert table.shape == (17, 3, 1, megatron.shape[-1])
    assert torch.equal(table, megatron[positions.t(), 0])
    with pytest.raises(ValueError, match=r"\[b, s\] integer positions"):
        with token_positions(torch.zeros(4)):
            pass


@pytest.mark.parametrize("mod", [False, True])
def test_rope_at_the_row_indices_is_bit_identical_to_megatrons_path(runtime, mod):
    cfg = small_cfg("dense", docs=3)
    if mod:
        cfg.mod.capacity = 0.5  # a layer that runs half the tokens, each at its own gathered position
    torch.manual_seed(1)
    model = build(cfg, runtime)
    assert mod == any("mod_router" in name for name, _ in model.named_parameters())
    batch = packed()
    rows = dict(batch, position_ids=torch.arange(batch["tokens"].shape[1]).expand_as(batch["tokens"]))
    for cross in (False, True):
        want = logits_of(model, rows, cross, by_document=False)
        assert torch.equal(logits_of(model, rows, cross, by_document=True), want)
        # The document positions reach the model: in causal mode they change the logits.
        moved = logits_of(model, batch, cross, by_document=True)
        assert cross == bool((moved - want).abs().max() > 1e-4)


def test_document_positions_give_each_document_alone(model):
    """Isolated, RoPE at document positions: a packed row's documents = each document alone."""
    batch = packed(rows=1)
    got = logits_of(model, batch, False, by_document=True)
    doc = batch["document_ids"][0]
    for k, n in enumerate(LENGTHS):
        alone = {"tokens": batch["tokens"][:, doc == k], "document_ids": torch.zeros(1, n, dtype=torch.long)}
        alone["position_ids"] = torch.arange(n)[None]
        want = logits_of(model, alone, False, by_document=False)
        assert (got[:, doc == k] - want).abs().max() < 1e-5 * want.abs().max()
