"""MoMa's auxiliary routers (``moe.aux_router``) and causal routing, in one process.

- Causality: under causal routing, changing the tokens after position ``i`` leaves every logit at
  positions ``<= i`` bit-identical (batch of 1 and of 2, with padding, 3 layers); the control:
  expert choice over the same microbatch does change an earlier logit.
- Batch invariance: a sequence's logits under causal routing are bit-identical alone and batched.
- Causal routing is what the auxiliary routers predict: expert ``e`` takes a token iff the token's
  score for ``e`` is above 0.5 and ``e`` is of its group (never padding), gate = sigmoid(main logit).
- Stop-gradient: adding the auxiliary loss leaves every main-model gradient bit-identical to the
  model without auxiliary routers (the same weights); control: without the detach they differ.
- The family answers ``routes_causally`` from the config; generation asks it.
"""

from __future__ import annotations

import pytest
import torch

from megafusion.core.modality import PAD_DOCUMENT_ID
from megafusion.layers import aux_router as aux_module
from megafusion.layers.aux_router import aux_routers_of, take_stats
from megafusion.layers.masks import dense_mask
from megafusion.layers.routing import ModalityRouting, modality_routing
from megafusion.models.registry import get_family
from tests.causal_helpers import NUM_MODALITIES, assert_causal_and_control_leaks, logits_of
from tests.causal_helpers import aux_model as _aux_model
from tests.causal_helpers import make_batch as _make_batch
from tests.models.test_moma import moma_cfg
from tests.models.test_mot import build

S = 16


def make_batch(b: int, seed: int = 0, pad: int = 0) -> dict:
    """``b`` rows of ``S`` tokens (:func:`tests.causal_helpers.make_batch`)."""
    return _make_batch(b, S, seed, pad)


def aux_model(runtime, cfg=None, scale: float = 10.0):
    """A MoMa model whose auxiliary routers pick a mix of tokens."""
    return _aux_model(runtime, cfg or aux_cfg(), scale)


def aux_cfg(layers: int = 3):
    cfg = moma_cfg({"text": 2, "image": 2})
    cfg.moe.aux_router = True
    cfg.model.num_layers = layers
    cfg.model.seq_length = S
    return cfg


@pytest.mark.parametrize("rows,pad", [(1, 0), (2, 0), (2, 5)])
def test_causal_routing_is_causal_and_expert_choice_is_not(runtime, rows, pad):
    # Control: expert choice ranks each token against the later ones.
    assert_causal_and_control_leaks(aux_model(runtime), make_batch(rows, pad=pad), (3, 7, 10), "moma")


def test_a_sequence_alone_and_batched_is_bit_identical(runtime):
    model = aux_model(runtime)
    pair = make_batch(2, seed=3, pad=4)
    alone = {k: v[:1] for k, v in pair.items()}
    assert torch.equal(logits_of(model, pair, True)[:1], logits_of(model, alone, True))
    last = {k: v[1:] for k, v in pair.items()}
    real = S - 4
    assert torch.equal(logits_of(model, pair, True)[1:, :real], logits_of(model, last, True)[:, :real])
    # Control: under expert choice, the other row changes the routing of this one.
    assert not torch.equal(logits_of(model, pair, False)[:1], logits_of(model, alone, False))


def test_causal_routing_takes_what_the_aux_router_predicts(runtime):
    cfg = aux_cfg(layers=1)
    model = aux_model(runtime, cfg)
    layer = model.decoder.layers[0].mlp
    seen = {}
    original = layer.router.causal_routing

    def spy(predicted, routing):
        seen["predicted"] = predicted.clone()
        out = original(predicted, routing)
        seen["map"] = out[0].clone()
        return out

    layer.router.causal_routing = spy
    batch = make_batch(2, pad=5)
    hidden = {}
    layer.register_forward_pre_hook(lambda m, args: hidden.setdefault("x", args[0].detach().clone()))
    logits_of(model, batch, True)
    x = hidden["x"].reshape(-1, 32).double()
    r = aux_routers_of([model])[0]
    w1, w2 = r.fc1.weight.double(), r.fc2.weight.double()
    h = x @ w1.T
    score = torch.sigmoid((h * torch.sigmoid(h)) @ w2.T)
    modality = batch["modality_ids"].t().reshape(-1)
    real = (batch["document_ids"] != PAD_DOCUMENT_ID).t().reshape(-1)
    groups = torch.tensor([int(layer.router.groups.expert_name(e).startswith("image")) for e in range(4)])
    want = (score > 0.5) & (modality[:, None] == groups[None, :]) & real[:, None]
    assert torch.equal(seen["map"], want)
    assert 0 < int(want.sum()) < want.numel() // 2  # a real mix (each token of 2 experts of its group)


def grads(model, batch, labels):
    model.zero_grad()
    routing = ModalityRouting.from_modality_ids(batch["modality_ids"], None, torch.device("cpu"), NUM_MODALITIES)
    positions = torch.arange(S)[None].expand_as(batch["tokens"])
    with modality_routing(routing):
        logits = model(batch["tokens"], positions, dense_mask(batch["document_ids"]), labels=None)
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_aux_loss_leaves_every_main_gradient_bit_identical(runtime, monkeypatch):
    cfg = aux_cfg()
    with_aux = aux_model(runtime, cfg, scale=1.0)
    plain_cfg = aux_cfg()
    plain_cfg.moe.aux_router = False
    plain = build(plain_cfg, runtime)  # the same weights: init is keyed by each weight's name
    batch = make_batch(2, seed=1)
    labels = torch.randint(64, (2, S), generator=torch.Generator().manual_seed(2))
    main = grads(plain, batch, labels)
    joint = grads(with_aux, batch, labels)
    aux_names = {n for n in joint if ".aux_router." in n}
    assert len(aux_names) == 2 * 3 and all(joint[n].abs().sum() > 0 for n in aux_names)
    assert set(joint) - aux_names == set(main)
    for name, g in main.items():
        assert torch.equal(joint[name], g), name
    assert take_stats(aux_routers_of([with_aux]), torch.device("cpu"))[-1] == 3 * 2 * S * 4
    # Control: without the detach the auxiliary loss reaches the main model.
    monkeypatch.setattr(aux_module.AuxRouter, "logits", lambda self, x: self.fc2(torch.nn.functional.silu(self.fc1(x))))
    leaky = grads(with_aux, batch, labels)
    assert any(not torch.equal(leaky[n], g) for n, g in main.items())


def test_the_family_says_whether_it_routes_causally():
    family = get_family("moma")
    assert not family.routes_causally(moma_cfg()) and family.routes_causally(aux_cfg())
    assert get_family("dense").routes_causally(moma_cfg())
