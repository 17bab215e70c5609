"""Layers against independent float64 references: masks, core attention, RMSNorm, LM loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType

from megafusion.layers.core_attention import MaskedCoreAttention
from megafusion.layers.masks import block_mask, dense_mask
from megafusion.layers.norm import RMSNorm


def random_document_ids(b: int, s: int, gen: torch.Generator) -> torch.Tensor:
    """Rows of packed documents with random lengths (ids increase along the row)."""
    starts = torch.rand(b, s, generator=gen) < 0.2
    starts[:, 0] = True
    return starts.long().cumsum(dim=1) - 1


def brute_force_blocked(doc_ids: torch.Tensor) -> torch.Tensor:
    b, s = doc_ids.shape
    out = torch.ones(b, 1, s, s, dtype=torch.bool)
    for r in range(b):
        for i in range(s):
            for j in range(s):
                if j <= i and doc_ids[r, i] == doc_ids[r, j]:
                    out[r, 0, i, j] = False
    return out


def reference_attention(q, k, v, blocked, scale):
    """float64 softmax attention; q [s,b,h,d], k/v [s,b,g,d] with h = g * (h/g)."""
    q, k, v = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(blocked, float("-inf"))
    out = scores.softmax(-1) @ v
    return out.permute(2, 0, 1, 3).reshape(q.shape[2], q.shape[0], -1)


def test_dense_mask_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        doc_ids = random_document_ids(3, 24, gen)
        assert torch.equal(dense_mask(doc_ids), brute_force_blocked(doc_ids))


def test_block_mask_matches_dense_mask():
    gen = torch.Generator().manual_seed(1)
    doc_ids = random_document_ids(2, 32, gen)
    bm = block_mask(doc_ids, block_size=8)
    dense_allowed = bm.to_dense()  # [b, 1, nq_blocks, nk_blocks]: blocks with any allowed pair
    allowed = ~dense_mask(doc_ids)
    blocks = allowed.reshape(2, 1, 4, 8, 4, 8).any(dim=(3, 5))
    assert torch.equal(dense_allowed.bool(), blocks)


def _core_attention(config):
    return MaskedCoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal)


@pytest.fixture
def tconfig(runtime):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        use_cpu_initialization=True,
        attention_dropout=0.0,
    )


@pytest.mark.parametrize("mask_kind", ["causal", "dense", "flex"])
def test_core_attention_matches_float64_reference(tconfig, mask_kind):
    gen = torch.Generator().manual_seed(2)
    s, b, h, g, d = 32, 2, 4, 2, 8
    q, k, v = (torch.randn(s, b, n, d, generator=gen) for n in (h, g, g))
    doc_ids = random_document_ids(b, s, gen) if mask_kind != "causal" else torch.zeros(b, s, dtype=torch.long)
    mask = {"causal": None, "dense": dense_mask(doc_ids), "flex": block_mask(doc_ids, block_size=8)}[mask_kind]
    got = _core_attention(tconfig)(q, k, v, mask)
    want = reference_attention(q, k, v, brute_force_blocked(doc_ids), 1 / math.sqrt(d))
    assert got.shape == (s, b, h * d)
    rel = ((got.double() - want).norm() / want.norm()).item()
    assert rel < 1e-6, rel


def test_rmsnorm_matches_float64_reference(tconfig):
    gen = torch.Generator().manual_seed(3)
    norm = RMSNorm(tconfig, 32, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, generator=gen))
    x = torch.randn(5, 3, 32, generator=gen) * 3
    xd = x.double()
    want = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    assert torch.allclose(norm(x).double(), want, rtol=1e-6, atol=1e-6)
    assert norm.weight.sequence_parallel is False


def test_lm_loss_and_z_loss_match_float64_reference(runtime):
    from megafusion.objectives.lm import lm_loss_sums

    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 6, 11, generator=gen) * 4
    labels = torch.randint(11, (2, 6), generator=gen)
    mask = (torch.rand(2, 6, generator=gen) > 0.3).float()
    sums = lm_loss_sums(logits, labels, mask, z_loss_weight=0.1)
    ld = logits.double()
    lse = torch.logsumexp(ld, dim=-1)
    ce = F.cross_entropy(ld.reshape(-1, 11), labels.reshape(-1), reduction="none").reshape(2, 6)
    assert torch.allclose(sums["lm"].double(), (ce * mask).sum(), rtol=1e-6)
    assert torch.allclose(sums["z"].double(), (lse.square() * mask).sum(), rtol=1e-6)
    assert torch.allclose(sums["total"].double(), (ce * mask).sum() + 0.1 * (lse.square() * mask).sum(), rtol=1e-6)
    assert sums["tokens"].item() == int(mask.sum())
