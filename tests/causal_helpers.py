"""What the causal-routing tests share (MoMa's auxiliary routers, Mixture-of-Depths'): tiny mixed-modal
batches, logits under either routing, a batch whose later tokens are all changed, and a model whose
auxiliary routers pick a mix of tokens."""

from __future__ import annotations

import torch

from megafusion.core.modality import MODALITY_NAMES, PAD_DOCUMENT_ID
from megafusion.layers.aux_router import aux_routers_of
from megafusion.layers.masks import dense_mask
from megafusion.layers.routing import ModalityRouting, modality_routing
from tests.models.test_mot import build

NUM_MODALITIES = len(MODALITY_NAMES)
VOCAB = 64


def aux_model(runtime, cfg, scale: float = 10.0):
    """The model of ``cfg`` whose auxiliary routers pick a mix of tokens (their output weights scaled
    up from the 0.2 std init, which would leave every score near 0.5)."""
    model = build(cfg, runtime)
    with torch.no_grad():
        for r in aux_routers_of([model]):
            r.fc2.weight.mul_(scale)
    return model


def make_batch(b: int, s: int, seed: int = 0, pad: int = 0) -> dict:
    """``b`` rows of ``s`` tokens, mixed modalities, one document; the last ``pad`` positions of the
    last row are padding."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(VOCAB, (b, s), generator=gen)
    modality = torch.randint(NUM_MODALITIES, (b, s), generator=gen)
    docs = torch.zeros(b, s, dtype=torch.int64)
    if pad:
        docs[-1, s - pad :] = PAD_DOCUMENT_ID
    return {"tokens": tokens, "modality_ids": modality, "document_ids": docs}


def routing_of(batch: dict, causal: bool) -> ModalityRouting:
    padding = batch["document_ids"] == PAD_DOCUMENT_ID
    return ModalityRouting.from_modality_ids(
        batch["modality_ids"], None, torch.device("cpu"), NUM_MODALITIES, padding, causal=causal
    )


def logits_of(model, batch: dict, causal: bool) -> torch.Tensor:
    """The model's logits on ``batch`` under causal routing or the training routing (``causal=False``)."""
    positions = torch.arange(batch["tokens"].shape[1])[None].expand_as(batch["tokens"])
    with torch.no_grad(), modality_routing(routing_of(batch, causal)):
        return model(batch["tokens"], positions, dense_mask(batch["document_ids"]), labels=None)


def changed_after(batch: dict, i: int, seed: int = 5) -> dict:
    """``batch`` with every token after position ``i`` of every row replaced by another."""
    other = {k: v.clone() for k, v in batch.items()}
    shift = torch.randint(1, VOCAB, other["tokens"].shape, generator=torch.Generator().manual_seed(seed))
    later = torch.zeros_like(shift, dtype=torch.bool)
    later[:, i + 1 :] = True
    other["tokens"] = torch.where(later, (batch["tokens"] + shift) % VOCAB, batch["tokens"])
    assert (other["tokens"][:, i + 1 :] != batch["tokens"][:, i + 1 :]).all()
    return other


def assert_causal_and_control_leaks(model, batch: dict, cuts, label: str = "") -> None:
    """Under causal routing, changing the tokens after each cut ``i`` leaves the logits at positions
    ``<= i`` bit-identical and changes later ones; the control: the training routing (which ranks
    tokens against later ones) changes an earlier logit at two cuts at least (the test can fail)."""
    leaked = 0
    for i in cuts:
        later = changed_after(batch, i)
        causal, causal_later = logits_of(model, batch, True), logits_of(model, later, True)
        assert torch.equal(causal[:, : i + 1], causal_later[:, : i + 1]), f"{label}: position <= {i} changed"
        assert not torch.equal(causal[:, i + 1 :], causal_later[:, i + 1 :])  # the change reached later logits
        forced, forced_later = logits_of(model, batch, False), logits_of(model, later, False)
        leaked += not torch.equal(forced[:, : i + 1], forced_later[:, : i + 1])
    assert leaked >= 2, f"{label}: the training routing leaked at only {leaked} cuts: the control cannot fail"
